"""stage=eval: score every model of the run, then write and print the report."""

from __future__ import annotations

import json
import sys

from bam_pipeline.eval.report import build_report, print_summary, report_files
from bam_pipeline.eval.runner import run_eval
from bam_pipeline.stages.context import RunContext
from bam_pipeline.store.locks import StageLock, wait_while_held
from bam_pipeline.training.loggers import log_report
from bam_pipeline.training.ranks import is_rank_zero


def run_eval_stage(ctx: RunContext) -> None:
    if not is_rank_zero():
        return
    with StageLock(ctx.layout.lock("eval", "report"), "the eval report"):
        wait_while_held(ctx.layout.lock("data"), "the prepared data", timeout_s=ctx.pipeline.wait_s)
        metrics_path = run_eval(ctx.eval, ctx.layout, general=ctx.data.general, chunking=ctx.train.loss_chunking)
        command = "python -m bam_pipeline " + " ".join(sys.argv[1:])
        build_report(ctx.layout, command=command, config_hash=ctx.config_hash)
    wandb_dir = log_report(ctx.logger, run=ctx.run, files=report_files(ctx.layout),
                           metrics_rows=json.loads(metrics_path.read_text())["rows"])
    if wandb_dir is not None:
        print(f"report logged to wandb ({wandb_dir})")
    print_summary(ctx.layout)
