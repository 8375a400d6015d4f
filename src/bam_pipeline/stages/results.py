"""stage=results: the run's summary into the repository's ``docs/results/<experiment>.json`` (when every seed of
the run is evaluated), then ``docs/results.md`` and its plots from every committed summary
(:mod:`bam_pipeline.eval.results`). ``make results`` runs it for each experiment the page shows."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bam_pipeline.errors import BamError
from bam_pipeline.eval.aggregate import RunEval, aggregate
from bam_pipeline.eval.results import summarize, summary_path, write_results, write_summary
from bam_pipeline.eval.serving import cpu_model
from bam_pipeline.stages.context import RunContext
from bam_pipeline.ranks import is_rank_zero


def git_commit(path: Path) -> tuple[str, bool]:
    """(HEAD's commit, whether the work tree has uncommitted changes besides the results) of the repository
    holding ``path``; ("unknown", False) outside one."""
    path = Path(path).absolute()
    here = next((p for p in (path, *path.parents) if p.is_dir()), Path.cwd())

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()

    try:
        status = git("status", "--porcelain", "--", ":/", ":(top,exclude)docs/results",
                     ":(top,exclude)docs/results.md")
        return git("rev-parse", "HEAD"), bool(status)
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


def provenance(ctx: RunContext, runs: list[RunEval]) -> dict[str, Any]:
    commit, dirty = git_commit(ctx.results_dir)
    return {
        "command": ctx.cmd("stage=all"),
        "exported_by": "python -m bam_pipeline " + " ".join(sys.argv[1:]),
        "commit": commit,
        "dirty": dirty,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
        "eval_device": (runs[0].metrics.get("settings") or {}).get("device"),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "runs": [r.layout.run for r in runs],
        "config_hash": ctx.config_hash,
    }


def evaluated_runs(ctx: RunContext) -> list[RunEval] | None:
    """Every seed's evaluated run, or None (after a line saying which is missing) where one is not evaluated."""
    runs = []
    for seed in ctx.seeds:
        try:
            runs.append(RunEval.read(ctx.for_seed(seed).layout, seed))
        except BamError as e:
            print(f"results: no summary of {ctx.experiment} exported ({e})")
            return None
    return runs


def run_results(ctx: RunContext) -> None:
    """Export this run's summary when it is evaluated (else keep the committed one), then write docs/results.md."""
    if not is_rank_zero():
        return
    experiment = ctx.experiment or ctx.run
    runs = evaluated_runs(ctx)
    if runs is not None:
        agg = aggregate(runs, resamples=ctx.eval.resamples, min_documents=ctx.eval.min_documents)
        summary = summarize(runs, agg, experiment=experiment, provenance=provenance(ctx, runs),
                            resamples=ctx.eval.resamples)
        print(f"results: {experiment} over train seeds {list(agg.seeds)} -> {write_summary(ctx.results_dir, summary)}")
    elif summary_path(ctx.results_dir, experiment).is_file():
        print(f"results: keeping the committed {summary_path(ctx.results_dir, experiment)}")
    print(f"results: {write_results(ctx.results_dir)}")
