"""stage=all: the whole pipeline, each stage skipped when it is up to date."""

from __future__ import annotations

import time

from bam_pipeline.stages.context import RunContext
from bam_pipeline.stages.data import run_data
from bam_pipeline.stages.eval import run_eval_stage
from bam_pipeline.stages.mix import run_mix
from bam_pipeline.stages.train import run_branch, run_moe, run_seed


def run_all(ctx: RunContext) -> None:
    t0 = time.perf_counter()
    run_data(ctx)
    run_seed(ctx)
    for d in ctx.data.domains:
        run_branch(ctx, d)
    for v in ctx.pipeline.mix_variants:
        run_mix(ctx, v)
    for name in ctx.pipeline.moe_runs:
        run_moe(ctx, name)
    run_eval_stage(ctx)
    print(f"pipeline finished in {time.perf_counter() - t0:.0f} s")
