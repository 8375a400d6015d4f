"""One run's or several training seeds' evaluations as one table with intervals.

Reads each run's ``eval/metrics.json`` and ``eval/documents.json`` (per-document test losses), keeps
the models every seed has, and resamples seeds and test documents jointly
(:func:`~bam_pipeline.eval.stats.joint_mean_losses`), so every cell's interval and every claim's paired
difference come from the same draws. A cell's estimate is the perplexity of the mean per-token loss over
the seeds (the geometric mean of the seeds' perplexities: every seed is scored on the same tokens); the
Average column is the arithmetic mean of a row's in-domain perplexities, as in the paper's Table 1.
With one seed the intervals cover test documents only. Models a run skipped (eval could not load them) or
that some seed lacks are the table's ``missing`` models: the claims over them are incomplete.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from bam_pipeline.errors import BamError
from bam_pipeline.eval.claims import IntervalClaim, LossColumns, judge_with_intervals
from bam_pipeline.eval.scores import ScoreRow, rows_of
from bam_pipeline.eval.stats import MIN_DOCUMENTS, DocLosses, Interval, interval_of, joint_mean_losses
from bam_pipeline.eval.table import AVERAGE, PplTable, order_columns, table_from_rows
from bam_pipeline.store.layout import RunLayout


@dataclass(frozen=True)
class RunEval:
    """One training seed's evaluation: its run directory, metrics.json and documents.json."""

    seed: int
    layout: RunLayout
    metrics: dict[str, Any]
    documents: dict[str, Any]

    @classmethod
    def read(cls, layout: RunLayout, seed: int) -> "RunEval":
        missing = [p for p in (layout.metrics, layout.documents) if not p.is_file()]
        if missing:
            raise BamError(f"run {layout.run} (train seed {seed}) has no {missing[0].name}; run its eval "
                           f"(`python -m bam_pipeline stage=eval run={layout.run} train.seed={seed}`)")
        return cls(seed, layout, json.loads(layout.metrics.read_text()), json.loads(layout.documents.read_text()))

    @property
    def rows(self) -> list[ScoreRow]:
        """The score rows of its metrics.json."""
        return rows_of(self.metrics)


@dataclass(frozen=True)
class Aggregate:
    """The aggregated table: point perplexities (``table``), their intervals (``cells``), the mean losses
    behind the claims (``losses``), and the models left out with why."""

    seeds: tuple[int, ...]
    table: PplTable
    cells: dict[str, dict[str, Interval]]
    losses: LossColumns
    left_out: dict[str, str] = field(default_factory=dict)
    level: float = 0.95
    min_documents: int = MIN_DOCUMENTS  # eval.min_documents: scored test documents per source a verdict needs

    @property
    def covers(self) -> str:
        return next((iv.covers for row in self.cells.values() for iv in row.values()), "")

    def claims(self) -> list[IntervalClaim]:
        return judge_with_intervals(self.table, self.losses, self.level, min_documents=self.min_documents)

    def thin_sources(self) -> list[tuple[str, int, int]]:
        """(source, scored test documents, documents in its test split) of every source, in-domain or not,
        with fewer scored documents than ``min_documents``: no verdict rests on them."""
        return [(d.source, d.scored, d.in_split) for d in self.losses.all_documents() if d.scored < self.min_documents]

    def per_seed_average(self, label: str) -> list[float] | None:
        """The row's Average perplexity in each seed (point values), or None when a column is missing."""
        if not self.losses.has(label, AVERAGE):
            return None
        cols = self.losses.columns
        return [sum(math.exp(self.losses.per_seed[label][c][s]) for c in cols) / len(cols)
                for s in range(len(self.seeds))]


def _doc_losses(runs: Sequence[RunEval], label: str, source: str, keep: np.ndarray) -> DocLosses:
    """One model's per-document test losses on one source in every run; a BamError naming the run whose
    documents.json holds losses that are not finite (an older version's eval wrote them) and how to redo it."""
    per = [r.documents["models"][label][source] for r in runs]
    nll = np.array([p["nll"] for p in per], dtype=np.float64)[:, keep]
    for r, row in zip(runs, nll):
        if not np.isfinite(row).all():
            raise BamError(f"{label}'s test losses on {source} in {r.layout.documents} are not finite; score the run "
                           f"again (`python -m bam_pipeline stage=eval eval.rebuild=true run={r.layout.run} "
                           f"train.seed={r.seed}`), which names a model it cannot score")
    tokens = np.array([p["tokens"] for p in per], dtype=np.int64)[:, keep]
    return DocLosses(nll, tokens)


def skipped_models(metrics: dict[str, Any]) -> dict[str, str | None]:
    """The model artifacts eval skipped (could not load), with their role where recorded; eval-time probes
    of a model are left out (they are not models of the run)."""
    return {x["name"]: x.get("role") for x in metrics.get("skipped", [])
            if x.get("kind") == "model" and x.get("role", "") != "probe" and "+" not in x["name"]}


def aggregate(runs: Sequence[RunEval], *, resamples: int, level: float = 0.95, rng_seed: int = 0,
              min_documents: int = MIN_DOCUMENTS) -> Aggregate:
    """The table with intervals over ``runs`` (one per training seed, all scored on one prepared data);
    its verdicts need ``min_documents`` scored test documents per source."""
    if not runs:
        raise BamError("nothing to aggregate: no evaluated run")
    first = runs[0].metrics
    hashes = {r.layout.run: r.metrics.get("data_hash") for r in runs}
    if len(set(hashes.values())) > 1:
        raise BamError(f"the seeds' runs were evaluated on different prepared data ({hashes}); seeds share one data "
                       "directory: re-run them with pipeline.seeds so they do")
    first_rows = {(r.model, r.domain): r for r in runs[0].rows}
    sources = list(first["sources"])
    ood = [s for s in sources if s in first.get("ood_sources", [])]
    columns = order_columns([s for s in sources if s not in ood], first.get("general_source"))
    labels = list(dict.fromkeys(model for model, _ in first_rows))
    left_out: dict[str, str] = {}
    for r in runs[1:]:
        theirs = r.documents.get("models", {})
        for lab in labels:
            if lab not in theirs and lab not in left_out:
                left_out[lab] = f"not evaluated in run {r.layout.run} (train seed {r.seed})"
    labels = [lab for lab in labels if lab not in left_out]
    losses: dict[str, dict[str, DocLosses]] = {}
    reference: dict[str, np.ndarray] = {}  # source -> the token counts every model must share
    for lab in labels:
        mine = {}
        for src in sources:
            if not all(src in r.documents["models"][lab] for r in runs):
                continue
            tokens = np.array([r.documents["models"][lab][src]["tokens"] for r in runs])
            ref = reference.setdefault(src, tokens)
            if ref.shape != tokens.shape or not np.array_equal(ref, tokens):
                left_out[lab] = (f"scored on other {src} test tokens than the other models (a different eval "
                                 "seq_len or model context)")
                break
            mine[src] = _doc_losses(runs, lab, src, ref[0] > 0)
        else:
            if mine:
                losses[lab] = mine
    labels = [lab for lab in labels if lab in losses]
    rng = np.random.default_rng(rng_seed)
    reps = joint_mean_losses(losses, resamples=resamples, rng=rng)
    estimates = {lab: {s: x.mean_loss for s, x in row.items()} for lab, row in losses.items()}
    per_seed = {lab: {s: x.nll.sum(1) / x.tokens.sum(1) for s, x in row.items()} for lab, row in losses.items()}
    n_docs = {s: int((ref[0] > 0).sum()) for s, ref in reference.items()}
    split_docs = {s: int(ref.shape[1]) for s, ref in reference.items()}
    loss_cols = LossColumns(estimates, reps, per_seed, columns, len(runs), n_docs, split_docs)
    n_seeds = len(runs)
    cells: dict[str, dict[str, Interval]] = {}
    for lab in labels:
        row = {s: interval_of(math.exp(estimates[lab][s]), np.exp(reps[lab][s]), n_seeds=n_seeds,
                              n_docs=n_docs[s], level=level) for s in estimates[lab]}
        if all(c in row for c in columns):
            avg = sum(np.exp(reps[lab][c]) for c in columns) / len(columns)
            row[AVERAGE] = interval_of(sum(row[c].estimate for c in columns) / len(columns), avg, n_seeds=n_seeds,
                                       n_docs=sum(n_docs[c] for c in columns), level=level)
        cells[lab] = row
    point = [replace(first_rows[(lab, s)], perplexity=iv.estimate)  # the first run's row: its model's name and role
             for lab in labels for s, iv in cells[lab].items() if s != AVERAGE]
    missing = {lab: role for r in runs for lab, role in skipped_models(r.metrics).items()}
    role = {model: r.role for (model, _), r in first_rows.items()}  # every row of a model has its role
    missing.update({lab: role[lab] for lab in left_out if lab not in labels})
    table = table_from_rows(point, labels, columns, ood=ood, general=first.get("general_source"), missing=missing)
    return Aggregate(tuple(r.seed for r in runs), table, cells, loss_cols, left_out, level, min_documents)

