"""The ordering claims of docs/paper.md section 8, and the comparisons reported beside them, each declared
once as a list of paired comparisons "model A beats model B on column c".

A claim is declared over the models the run should have, not only those it has: "each expert beats the
seed" names an expert for every domain of the table (``PplTable.domains``), and every claim names the
models eval skipped or an aggregate left out (``PplTable.missing``). It is judged two ways from the same
declaration:
- on point values of a :class:`PplTable` (the paper's Table 1, or a run's): it holds when every
  comparison does, fails when one does not, and is not measurable when a model it needs is missing;
- with intervals (:func:`judge_with_intervals`): each comparison is the difference in mean per-token
  loss (the log of perplexity) between the two models on the same test tokens, with its paired
  bootstrap interval over seeds and test documents (:mod:`bam_pipeline.eval.stats`). The claim holds
  when every interval lies below 0, fails when one lies above 0, and is not resolved at this scale
  otherwise, or whenever a source behind it has fewer than ``eval.min_documents`` test documents or an
  interval has zero width (:func:`~bam_pipeline.eval.stats.claim_verdict`). The Average column compares
  the mean over the in-domain sources of each source's mean loss: every domain weighs the same, as in
  the paper's Average.
Either way, a claim some of whose comparisons cannot be made (a model or a cell missing) while others can
is ``incomplete``, naming what is missing, whatever the others say: a claim about every expert or every
column is not shown to hold by the ones at hand. With none that can be made it is not measurable.

Claim (b) is the paper's: trained mixtures against the seed and the domain experts. The continued
dense model is its own comparison (``mixtures_beat_dense``), as is the BTM ensemble (``bam_beats_btm``);
neither is in the paper's Table 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from bam_pipeline.eval.names import column_name
from bam_pipeline.eval.stats import (FAILS, HOLDS, MIN_DOCUMENTS, NOT_RESOLVED, Interval, SourceDocs, Verdict,
                                     claim_verdict, interval_of)
from bam_pipeline.eval.table import AVERAGE, PplTable
from bam_pipeline.store.layout import CM_SUFFIX, parse_label

UNMEASURABLE = "not measurable"
INCOMPLETE = "incomplete"
__all__ = ["HOLDS", "FAILS", "NOT_RESOLVED", "UNMEASURABLE", "INCOMPLETE", "Comparison", "ClaimSpec", "Claim",
           "claim_specs", "check_claims", "judge_with_intervals", "IntervalClaim", "LossColumns"]


@dataclass(frozen=True)
class Comparison:
    """``better`` has lower loss than ``worse`` on ``column`` (a source, or AVERAGE)."""

    better: str
    worse: str
    column: str


@dataclass(frozen=True)
class ClaimSpec:
    """A claim: its key, its sentence, its comparisons in the table at hand, and what it needs when it has none."""

    key: str
    text: str
    comparisons: tuple[Comparison, ...]
    needs: str
    in_paper: bool = True  # one of docs/paper.md section 8's claims (else a comparison reported beside them)


@dataclass(frozen=True)
class Claim:
    """A claim judged on point values."""

    key: str
    text: str
    status: str
    detail: str


def expected_labels(t: PplTable) -> list[str]:
    """The models the claims are declared over: ``t``'s rows, the models it misses (``t.missing``), and,
    where ``t`` knows its domains, the seed and a branch expert per domain (``branch/<domain>``) it lacks."""
    out = list(dict.fromkeys([*t.labels, *t.missing]))
    if t.domains:
        have = {parse_label(lab)[1] for lab in out if t.role(lab) == "expert"}
        out += [lab for lab in ("seed",) if not any(t.role(x) == "seed" for x in out)]
        out += [f"branch/{d}" for d in t.domains if d not in have]
    return out


def _pairs(labels: Sequence[str], t: PplTable, pairs: Sequence[tuple[str, str]]) -> tuple[Comparison, ...]:
    return tuple(Comparison(a, b, c) for a, b in pairs if a in labels and b in labels for c in t.claim_columns)


def claim_specs(t: PplTable) -> list[ClaimSpec]:
    """Every claim's comparisons among the models ``t`` has or should have (:func:`expected_labels`), by
    label and role; comparisons with a model ``t`` lacks make the claim incomplete where it is judged."""
    labels = expected_labels(t)
    by_role = {r: [lab for lab in labels if t.role(lab) == r] for r in ("seed", "expert", "mixture", "dense")}
    seed = by_role["seed"][:1]
    experts = [(lab, parse_label(lab)[1]) for lab in by_role["expert"]]
    singles = seed + by_role["expert"]
    moe = {parse_label(lab)[1] for lab in labels if parse_label(lab)[0] == "moe"}
    cm_pairs = sorted((f"moe/{v[: -len(CM_SUFFIX)]}", f"moe/{v}") for v in moe if v.endswith(CM_SUFFIX))
    return [
        ClaimSpec("experts_beat_seed", "each expert beats the seed in its own domain",
                  tuple(Comparison(e, s, d) for e, d in experts for s in seed if d in t.columns),
                  "the seed and a branch expert"),
        ClaimSpec("mixtures_beat_singles", "every trained mixture beats the seed and every expert on average",
                  tuple(Comparison(m, s, AVERAGE) for m in by_role["mixture"] for s in singles),
                  "a trained mixture and the seed or an expert"),
        ClaimSpec("bam_beats_btx", "BAM beats BTX on every column", _pairs(labels, t, [("moe/bam", "moe/btx")]),
                  "moe/bam and moe/btx"),
        ClaimSpec("expert_kv_beats_shared", "expert KV beats shared KV on every column",
                  _pairs(labels, t, [("moe/bam", "moe/bam_kv_shared")]), "moe/bam and moe/bam_kv_shared"),
        ClaimSpec("dm_beats_cm", "data-matched beats compute-matched on every column",
                  _pairs(labels, t, cm_pairs or [("moe/bam", "moe/bam_cm")]), "moe/bam and moe/bam_cm"),
        ClaimSpec("mixtures_beat_dense", "every trained mixture beats the dense model trained as long on average",
                  tuple(Comparison(m, d, AVERAGE) for m in by_role["mixture"] for d in by_role["dense"]),
                  "a trained mixture and the dense baseline (moe/dense)", in_paper=False),
        ClaimSpec("bam_beats_btm", "BAM beats the BTM ensemble of its own dense models on every column",
                  _pairs(labels, t, [("moe/bam", "btm")]), "moe/bam and the BTM row (eval.btm=true)",
                  in_paper=False),
    ]


def _describe(t: PplTable, c: Comparison, values: Callable[[str, str], float]) -> str:
    a, b = values(c.better, c.column), values(c.worse, c.column)
    return f"{t.name(c.better)} vs {t.name(c.worse)}, {column_name(c.column)}: {a:.2f} {'<' if a < b else '>='} {b:.2f}"


def _summary(lines: list[tuple[bool, str]]) -> str:
    """Every comparison when there are few; else how many hold and the failing ones (or the first)."""
    if len(lines) <= 4:
        return "; ".join(text for _, text in lines)
    failing = [text for ok, text in lines if not ok]
    shown = failing[:3] or [lines[0][1]]
    return f"{sum(ok for ok, _ in lines)} of {len(lines)} comparisons hold; " + "; ".join(shown)


def missing_text(comparisons: Sequence[Comparison], has_model: Callable[[str], bool],
                 has_cell: Callable[[str, str], bool]) -> str:
    """What the comparisons that cannot be made lack, e.g. ``missing branch/math, branch/law`` (models
    without any value) or ``missing moe/bam on Law`` (a model without that column); empty when none."""
    models, cells = [], []
    for c in comparisons:
        for lab in (c.better, c.worse):
            if not has_model(lab):
                models.append(lab)
            elif not has_cell(lab, c.column):
                cells.append(f"{lab} on {column_name(c.column)}")
    missing = list(dict.fromkeys(models + cells))
    return "missing " + ", ".join(missing) if missing else ""


def _split(spec: ClaimSpec, has: Callable[[str, str], bool]) -> tuple[list[Comparison], list[Comparison]]:
    """(the comparisons that can be made, those that cannot)."""
    ok = [c for c in spec.comparisons if has(c.better, c.column) and has(c.worse, c.column)]
    return ok, [c for c in spec.comparisons if c not in ok]


def check_claims(t: PplTable) -> list[Claim]:
    """Every claim judged on the point values of ``t``; incomplete when some comparison lacks a value."""
    out = []
    has = lambda lab, col: t.get(lab, col) is not None  # noqa: E731
    for spec in claim_specs(t):
        comps, lacking = _split(spec, has)
        missing = missing_text(lacking, lambda lab: bool(t.values.get(lab)), has)
        if not comps:
            out.append(Claim(spec.key, spec.text, UNMEASURABLE, f"needs {spec.needs}"))
            continue
        lines = [(t.get(c.better, c.column) < t.get(c.worse, c.column), _describe(t, c, t.get)) for c in comps]
        if missing:
            out.append(Claim(spec.key, spec.text, INCOMPLETE, f"{missing}; {_summary(lines)}"))
        else:
            out.append(Claim(spec.key, spec.text, HOLDS if all(ok for ok, _ in lines) else FAILS, _summary(lines)))
    return out


@dataclass(frozen=True)
class IntervalClaim:
    """A claim judged with intervals: its verdict, the comparison and interval deciding it, in how many
    training seeds every comparison held (per-seed point values), and every comparison's interval."""

    key: str
    text: str
    status: str
    deciding: str
    interval: Interval | None
    seeds_holding: int
    n_seeds: int
    intervals: dict[str, Interval]
    in_paper: bool
    reason: str = ""  # why it is incomplete or not resolved whatever its intervals say (missing models, few documents)

    @property
    def verdict(self) -> str:
        """The status with its reason, as the report and the summary print it."""
        return f"{self.status}: {self.reason}" if self.reason else self.status


class LossColumns:
    """Mean losses per (model, column) of one aggregate: the estimate, its bootstrap resamples and its value
    per training seed, with the Average column derived from the in-domain ones; ``n_docs`` the scored test
    documents per source, ``split_docs`` the documents of its test split (default: as many)."""

    def __init__(self, estimates: Mapping[str, Mapping[str, float]], resamples: Mapping[str, Mapping[str, np.ndarray]],
                 per_seed: Mapping[str, Mapping[str, np.ndarray]], columns: Sequence[str], n_seeds: int,
                 n_docs: Mapping[str, int], split_docs: Mapping[str, int] | None = None) -> None:
        self.estimates, self.resamples, self.per_seed = estimates, resamples, per_seed
        self.columns, self.n_seeds, self._n_docs = tuple(columns), n_seeds, dict(n_docs)
        self._split_docs = {**self._n_docs, **(split_docs or {})}

    def sources(self, column: str) -> tuple[str, ...]:
        """The sources behind a column (every in-domain one for the Average)."""
        return self.columns if column == AVERAGE else (column,)

    def n_docs(self, column: str) -> int:
        """Test documents behind a column (every in-domain source's for the Average)."""
        return sum(self._n_docs[s] for s in self.sources(column))

    def documents(self, column: str) -> tuple[SourceDocs, ...]:
        """The scored and test-split documents of every source behind a column."""
        return tuple(SourceDocs(s, self._n_docs[s], self._split_docs[s]) for s in self.sources(column))

    def all_documents(self) -> tuple[SourceDocs, ...]:
        """The scored and test-split documents of every source with losses, in-domain or not."""
        return tuple(SourceDocs(s, n, self._split_docs[s]) for s, n in self._n_docs.items())

    def difference(self, better: str, worse: str, column: str, level: float = 0.95) -> Interval:
        """The paired interval of (mean loss of ``better``) minus (that of ``worse``) on ``column``: every
        paired interval of the report (claims, the open questions, out of domain) is this one."""
        return interval_of(self.estimate(better, column) - self.estimate(worse, column),
                           self.resampled(better, column) - self.resampled(worse, column), n_seeds=self.n_seeds,
                           n_docs=self.n_docs(column), level=level, documents=self.documents(column))

    def has(self, model: str, column: str) -> bool:
        row = self.estimates.get(model, {})
        return all(c in row for c in self.columns) if column == AVERAGE else column in row

    def _get(self, table: Mapping[str, Mapping[str, object]], model: str, column: str):
        if column == AVERAGE:
            return sum(table[model][c] for c in self.columns) / len(self.columns)
        return table[model][column]

    def estimate(self, model: str, column: str) -> float:
        return float(self._get(self.estimates, model, column))

    def resampled(self, model: str, column: str) -> np.ndarray:
        return self._get(self.resamples, model, column)

    def seed_values(self, model: str, column: str) -> np.ndarray:
        return self._get(self.per_seed, model, column)


def judge_with_intervals(t: PplTable, losses: LossColumns, level: float = 0.95, *,
                         min_documents: int = MIN_DOCUMENTS) -> list[IntervalClaim]:
    """Every claim of ``t``'s models judged with the paired intervals of ``losses``: not measurable when no
    comparison can be made, incomplete when some cannot (their models or cells lack losses), else the
    verdict of :func:`~bam_pipeline.eval.stats.claim_verdict` (with ``min_documents``)."""
    out = []
    for spec in claim_specs(t):
        comps, lacking = _split(spec, losses.has)
        missing = missing_text(lacking, lambda lab: bool(losses.estimates.get(lab)), losses.has)
        if not comps:
            out.append(IntervalClaim(spec.key, spec.text, UNMEASURABLE, f"needs {spec.needs}", None, 0,
                                     losses.n_seeds, {}, spec.in_paper))
            continue
        intervals, seed_ok = {}, np.ones(losses.n_seeds, dtype=bool)
        for c in comps:
            name = f"{t.name(c.better)} vs {t.name(c.worse)}, {column_name(c.column)}"
            intervals[name] = losses.difference(c.better, c.worse, c.column, level)
            seed_ok &= (losses.seed_values(c.better, c.column) - losses.seed_values(c.worse, c.column)) < 0
        v: Verdict = claim_verdict(intervals, min_documents=min_documents)
        status = INCOMPLETE if missing else v.status  # the comparisons at hand cannot decide a claim over all
        reason = "; ".join(x for x in (missing, v.reason) if x)
        out.append(IntervalClaim(spec.key, spec.text, status, v.column, v.interval, int(seed_ok.sum()),
                                 losses.n_seeds, intervals, spec.in_paper, reason))
    return out
