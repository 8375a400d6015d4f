"""stage=all: the whole pipeline, each stage skipped when it is up to date; with ``pipeline.seeds``,
once per training seed (the prepared data shared) and then the report over the seeds."""

from __future__ import annotations

import time

from bam_pipeline.stages.context import RunContext
from bam_pipeline.stages.data import link_shared_data, run_data
from bam_pipeline.stages.downstream import run_downstream_in_all
from bam_pipeline.stages.eval import report, run_seeds_report, score
from bam_pipeline.stages.mix import run_mix
from bam_pipeline.stages.train import run_branch, run_moe, run_seed


def run_one_seed(ctx: RunContext) -> None:
    """Every stage of one run (one training seed)."""
    run_data(ctx)
    run_seed(ctx)
    for d in ctx.data.domains:
        run_branch(ctx, d)
    for v in ctx.pipeline.mix_variants:
        run_mix(ctx, v)
    for name in ctx.pipeline.moe_runs:
        run_moe(ctx, name)
    scored = score(ctx)
    run_downstream_in_all(ctx)  # lm-eval tasks of every model, before the report: it is written once, with their table
    report(ctx, scored)


def run_all(ctx: RunContext) -> None:
    t0 = time.perf_counter()
    if ctx.pipeline.seeds is None:
        run_one_seed(ctx)
    else:
        prepared = run_data(ctx)
        for i, seed in enumerate(ctx.seeds):
            print(f"==== train seed {seed} ({i + 1} of {len(ctx.seeds)}) ====")
            seed_ctx = ctx.for_seed(seed)
            link_shared_data(seed_ctx, prepared)
            run_one_seed(seed_ctx)
        run_seeds_report(ctx)
    print(f"pipeline finished in {time.perf_counter() - t0:.0f} s")
