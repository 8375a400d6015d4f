"""stage=eval: score every model of the run, then write and print the report; with ``pipeline.seeds``,
every seed's run and then the report over the seeds."""

from __future__ import annotations

import json
import sys

from bam_pipeline.errors import BamError
from bam_pipeline.eval.aggregate import RunEval
from bam_pipeline.eval.report import (build_report, build_seeds_report, print_seeds_summary, print_summary,
                                      report_files)
from bam_pipeline.eval.runner import run_eval
from bam_pipeline.stages.context import RunContext
from bam_pipeline.stages.data import link_shared_data
from bam_pipeline.stages.inputs import open_data, rebuild_hint
from bam_pipeline.store.locks import StageLock, wait_while_held
from bam_pipeline.training.loggers import log_report
from bam_pipeline.training.ranks import is_rank_zero


def _command() -> str:
    return "python -m bam_pipeline " + " ".join(sys.argv[1:])


def run_eval_one(ctx: RunContext) -> None:
    """Evaluate one run (one training seed), write its report and print its summary. Models built from
    inputs the run has rebuilt since (outdated: eval never rebuilds) are left out and listed as skipped."""
    if not is_rank_zero():
        return
    with StageLock(ctx.layout.lock("eval", "report"), "the eval report"):
        wait_while_held(ctx.layout.lock("data"), "the prepared data", timeout_s=ctx.pipeline.wait_s)
        metrics_path = run_eval(ctx.eval, ctx.layout, general=ctx.data.general, chunking=ctx.train.loss_chunking,
                                rebuild=lambda label: rebuild_hint(ctx, label))
        build_report(ctx.layout, command=_command(), config_hash=ctx.config_hash, train_seed=ctx.train.seed,
                     resamples=ctx.eval.resamples, min_documents=ctx.eval.min_documents)
    wandb_dir = log_report(ctx.logger, run=ctx.run, files=report_files(ctx.layout),
                           metrics_rows=json.loads(metrics_path.read_text())["rows"])
    if wandb_dir is not None:
        print(f"report logged to wandb ({wandb_dir})")
    print_summary(ctx.layout)


def run_seeds_report(ctx: RunContext) -> None:
    """The report over the training seeds of ``pipeline.seeds``, from each seed's evaluated run."""
    if not is_rank_zero():
        return
    runs = [RunEval.read(ctx.for_seed(s).layout, s) for s in ctx.seeds]
    with StageLock(ctx.layout.lock("eval", "seeds"), "the report over seeds"):
        build_seeds_report(ctx.layout, runs, command=_command(), resamples=ctx.eval.resamples,
                           min_documents=ctx.eval.min_documents)
    print_seeds_summary(ctx.layout)


def run_eval_stage(ctx: RunContext) -> None:
    """stage=eval: this run; with ``pipeline.seeds``, every seed's run, then the report over them."""
    if ctx.pipeline.seeds is None:
        run_eval_one(ctx)
        return
    prepared = open_data(ctx)
    for seed in ctx.seeds:
        seed_ctx = ctx.for_seed(seed)
        link_shared_data(seed_ctx, prepared)
        if not seed_ctx.layout.run_dir.is_dir():
            raise BamError(f"train seed {seed} has no run yet ({seed_ctx.layout.run_dir}); train it with "
                           f"`{ctx.cmd('stage=all')}`")
        run_eval_one(seed_ctx)
    run_seeds_report(ctx)
