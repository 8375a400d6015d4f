"""stage=eval: score every model of the run, then write and print the report; with ``pipeline.seeds``,
every seed's run and then the report over the seeds.

Eval, the report and the seeds report each have an identity (:class:`~bam_pipeline.stages.inputs.OutputIdentity`)
and are skipped when it is unchanged, like a fresh artifact (``eval.rebuild=true`` redoes them):
- eval: the labels and hashes of the models it scores, the labels and reasons of those it leaves out, the
  prepared data's hash, the ``eval`` settings that change numbers, the device, the loss chunking and
  :data:`~bam_pipeline.eval.report.REPORT_VERSION`;
- the report: the identity of the eval it reads, the hash of ``downstream/results.json``, the report's
  own settings (resamples, min_documents, the general source, the train seed) and ``REPORT_VERSION``;
- the seeds report: the identity of every seed's eval and report, its settings and ``REPORT_VERSION``.
Whenever eval runs, it measures every model's speed afresh (:mod:`bam_pipeline.eval.runner`). Under a
multi-device ``trainer:`` the ranks share the scoring and rank 0 alone writes the results and the report.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bam_pipeline.data.prepare import PreparedData, open_prepared
from bam_pipeline.errors import BamError
from bam_pipeline.eval.aggregate import RunEval
from bam_pipeline.eval.report import REPORT_VERSION, build_report, print_seeds_summary, print_summary, report_files
from bam_pipeline.eval.runner import ModelSelection, data_hash, resolve_device, run_eval, select_models
from bam_pipeline.stages.context import RunContext
from bam_pipeline.stages.data import link_shared_data
from bam_pipeline.stages.inputs import OutputIdentity, open_data, rebuild_hint, recorded_hash
from bam_pipeline.store.files import sha256_file
from bam_pipeline.store.layout import RunLayout
from bam_pipeline.store.locks import StageLock, wait_while_held
from bam_pipeline.training.loggers import log_report
from bam_pipeline.ranks import Ranks, is_rank_zero, join_ranks

REBUILD_HINT = "eval.rebuild=true"


def _command() -> str:
    return "python -m bam_pipeline " + " ".join(sys.argv[1:])


def eval_settings(ctx: RunContext) -> dict[str, Any]:
    """The ``eval`` settings that change what eval writes (all but ``rebuild``, and the report's own)."""
    spec = asdict(ctx.eval)
    for key in ("rebuild", "resamples", "min_documents"):
        spec.pop(key)
    return spec


def eval_identity(ctx: RunContext, prepared: PreparedData, selection: ModelSelection) -> OutputIdentity:
    """What the run's eval results (``eval/``) are made from (the module docstring)."""
    return OutputIdentity("eval", RunLayout.identity(ctx.layout.eval), {
        "version": REPORT_VERSION, **selection.identity(), "data": data_hash(prepared),
        "eval": eval_settings(ctx), "device": str(resolve_device(ctx.eval.device)),
        "loss_chunking": asdict(ctx.train.loss_chunking)})


def report_identity(ctx: RunContext) -> OutputIdentity:
    """What the run's report is made from: the eval results it reads (by their recorded identity), the
    downstream results and the report's own settings."""
    layout = ctx.layout
    results = layout.downstream_results
    return OutputIdentity("report", RunLayout.identity(layout.report), {
        "version": REPORT_VERSION, "eval": recorded_hash(layout.eval),
        "downstream": sha256_file(results) if results.is_file() else None,
        "resamples": ctx.eval.resamples, "min_documents": ctx.eval.min_documents, "general": ctx.data.general,
        "train_seed": ctx.train.seed})


def selection_for(ctx: RunContext) -> tuple[PreparedData, ModelSelection]:
    """The run's prepared data (checksums not read) and the models eval would score and leave out."""
    prepared = open_prepared(ctx.layout.data, verify=False)
    return prepared, select_models(ctx.layout, prepared, rebuild=lambda label: rebuild_hint(ctx, label))


def write_report(ctx: RunContext) -> None:
    """The run's report, unless its identity is unchanged (it reads eval's results and downstream's table)."""
    identity = report_identity(ctx)
    if identity.fresh(rebuild=ctx.eval.rebuild, hint=REBUILD_HINT):
        return
    with StageLock(ctx.layout.lock("eval", "report"), "the eval report"):
        build_report(ctx.layout, command=_command(), config_hash=ctx.config_hash, train_seed=ctx.train.seed,
                     resamples=ctx.eval.resamples, min_documents=ctx.eval.min_documents,
                     identity=identity.as_record())
    print(f"report: {ctx.layout.report}")


def stage_ranks(ctx: RunContext) -> Ranks:
    """The processes eval and downstream split their scoring over: one for a one-device ``trainer:``, else every
    rank of the launch (started here with Lightning Fabric's launcher when no training stage started them)."""
    return join_ranks(ctx.trainer.flags(), ctx.trainer.collective_timeout_s)


def score(ctx: RunContext) -> Path | None:
    """Eval's results of one run (one training seed), skipped when their identity is unchanged: the path of
    metrics.json when eval ran, None when it was up to date (or on another rank). Models built from inputs
    the run has rebuilt since (outdated: eval never rebuilds) are left out and listed as skipped. Under a
    multi-device ``trainer:`` every rank scores its share of the models (:func:`run_eval`)."""
    ranks = stage_ranks(ctx)
    todo = None
    if ranks.is_zero:
        wait_while_held(ctx.layout.lock("data"), "the prepared data", timeout_s=ctx.pipeline.wait_s)
        prepared, selection = selection_for(ctx)
        identity = eval_identity(ctx, prepared, selection)
        if not identity.fresh(rebuild=ctx.eval.rebuild, hint=REBUILD_HINT):
            todo = identity, selection
    if not ranks.broadcast(todo is not None, "rank 0 to check whether eval is up to date"):
        return None
    if todo is None:  # another rank: its share of the scoring
        run_eval(ctx.eval, ctx.layout, general=ctx.data.general, chunking=ctx.train.loss_chunking, ranks=ranks)
        return None
    identity, selection = todo
    with StageLock(ctx.layout.lock("eval", "report"), "the eval report"):
        identity.forget()
        metrics_path = run_eval(ctx.eval, ctx.layout, general=ctx.data.general, chunking=ctx.train.loss_chunking,
                                selection=selection, ranks=ranks)
        identity.write()
    return metrics_path


def report(ctx: RunContext, scored: Path | None) -> None:
    """The run's report (unless its identity is unchanged), logged to the logger when eval ran, and its summary."""
    if not is_rank_zero():
        return
    write_report(ctx)
    if scored is not None:
        wandb_dir = log_report(ctx.logger, run=ctx.run, files=report_files(ctx.layout),
                               metrics_rows=json.loads(scored.read_text())["rows"])
        if wandb_dir is not None:
            print(f"report logged to wandb ({wandb_dir})")
    print_summary(ctx.layout)


def run_eval_one(ctx: RunContext) -> None:
    """Evaluate one run (one training seed), write its report and print its summary; each skipped when its
    identity is unchanged."""
    report(ctx, score(ctx))


def seeds_identity(ctx: RunContext) -> OutputIdentity:
    """What the report over the training seeds is made from: every seed's recorded eval and report identity."""
    per_seed = {}
    for s in ctx.seeds:
        layout = ctx.for_seed(s).layout
        per_seed[str(s)] = [recorded_hash(layout.eval), recorded_hash(layout.report)]
    return OutputIdentity("seeds report", RunLayout.identity(ctx.layout.seeds_report), {
        "version": REPORT_VERSION, "seeds": per_seed, "resamples": ctx.eval.resamples,
        "min_documents": ctx.eval.min_documents})


def run_seeds_report(ctx: RunContext) -> None:
    """The report over the training seeds of ``pipeline.seeds``, from each seed's evaluated run; skipped
    when every seed's eval and report are what it was made from."""
    if not is_rank_zero():
        return
    identity = seeds_identity(ctx)
    if not identity.fresh(rebuild=ctx.eval.rebuild, hint=REBUILD_HINT):
        runs = [RunEval.read(ctx.for_seed(s).layout, s) for s in ctx.seeds]
        with StageLock(ctx.layout.lock("eval", "seeds"), "the report over seeds"):
            build_report(ctx.layout, runs, command=_command(), resamples=ctx.eval.resamples,
                         min_documents=ctx.eval.min_documents, identity=identity.as_record())
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
