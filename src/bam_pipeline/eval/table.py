"""The perplexity table (the run's analogue of paper Table 1): rows = models, columns = sources + average,
then the out-of-domain sources (shown, but left out of the average and of the paper's claims).

Pure data: built from eval's score rows (or the paper's numbers), rendered as rows of strings by
:mod:`bam_pipeline.eval.render`. "Average" is the arithmetic mean of a row's column perplexities, as
in the paper's Table 1; a row missing a column has no average.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

from bam_pipeline.eval.names import STAGE_ROLES, column_name
from bam_pipeline.eval.scores import ScoreRow
from bam_pipeline.store.layout import parse_label

AVERAGE = "average"


@dataclass(frozen=True)
class PplTable:
    """Perplexity (or another lower-is-better metric) per (model label, source column), with each
    model's display name and role (:mod:`~bam_pipeline.eval.names`)."""

    labels: tuple[str, ...]
    columns: tuple[str, ...]
    values: dict[str, dict[str, float]]
    names: dict[str, str] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)
    ood: tuple[str, ...] = ()  # out-of-domain columns: after the average, not in it
    general: str | None = None  # the general source among ``columns`` (None: not known); the others are domains
    # models the run has (or should have) but this table has no values of: skipped by eval (a bad checksum),
    # left out of an aggregate over seeds; a claim over them is incomplete (bam_pipeline.eval.claims)
    missing: tuple[str, ...] = ()

    def name(self, label: str) -> str:
        """The model's display name (its label when none is given)."""
        return self.names.get(label, label)

    def role(self, label: str) -> str:
        """The model's role; without one given, its stage's role."""
        return self.roles.get(label) or STAGE_ROLES.get(parse_label(label)[0], "")

    @property
    def domains(self) -> tuple[str, ...]:
        """The in-domain sources other than the general one (each has a branch expert); empty when the
        general source is not known."""
        return tuple(c for c in self.columns if c != self.general) if self.general in self.columns else ()

    @property
    def claim_columns(self) -> tuple[str, ...]:
        """The columns the paper's claims compare: the in-domain sources and their average."""
        return (*self.columns, AVERAGE)

    @property
    def all_columns(self) -> tuple[str, ...]:
        """Every column shown: the in-domain sources, their average, the out-of-domain sources."""
        return (*self.columns, AVERAGE, *self.ood)

    def get(self, label: str, column: str) -> float | None:
        """One cell; ``column = AVERAGE`` gives the row mean (None when the row is incomplete)."""
        row = self.values.get(label, {})
        if column != AVERAGE:
            return row.get(column)
        if not self.columns or any(c not in row for c in self.columns):
            return None
        return sum(row[c] for c in self.columns) / len(self.columns)

    def best(self, column: str, among: Iterable[str] | None = None) -> str | None:
        """Label with the lowest perplexity in ``column`` (among ``among``, default all rows)."""
        cells = [(v, lab) for lab in (self.labels if among is None else among) if (v := self.get(lab, column)) is not None]
        return min(cells)[1] if cells else None


def order_columns(sources: Iterable[str], general: str | None) -> tuple[str, ...]:
    """Source columns with the general source first (the paper's "Pretrain" column), others in order."""
    sources = list(sources)
    return tuple([general] + [s for s in sources if s != general]) if general in sources else tuple(sources)


def table_from_rows(rows: Iterable[ScoreRow], labels: Iterable[str], columns: Iterable[str],
                    key: str = "perplexity", ood: Iterable[str] = (), general: str | None = None,
                    missing: Mapping[str, str | None] | None = None) -> PplTable:
    """A table of the score rows' field ``key`` (lower is better), with the models' display names and roles
    (where not empty); ``missing``: the models without rows it should have, with their role where known."""
    values: dict[str, dict[str, float]] = {}
    names, roles = {}, {}
    for r in rows:
        values.setdefault(r.model, {})[r.domain] = float(getattr(r, key))
        if r.display:
            names[r.model] = r.display
        if r.role:
            roles[r.model] = r.role
    for lab, role in (missing or {}).items():
        if role:
            roles.setdefault(lab, role)
    return PplTable(tuple(labels), tuple(columns), values, names, roles, tuple(ood), general,
                    tuple(m for m in (missing or {}) if m not in values))


def table_cells(table: PplTable, *, mark_best: str = "**", among: Iterable[str] | None = None) -> list[list[str]]:
    """Header + one row of strings per model; the best cell per column (among ``among``) is wrapped
    in ``mark_best``; missing cells are "-"."""
    best = {c: table.best(c, among) for c in table.all_columns}
    out = [["model", *(column_name(c) + (" (OOD)" if c in table.ood else "") for c in table.all_columns)]]
    for lab in table.labels:
        cells = [table.name(lab)]
        for c in table.all_columns:
            v = table.get(lab, c)
            text = "-" if v is None else f"{v:.2f}"
            cells.append(f"{mark_best}{text}{mark_best}" if v is not None and best[c] == lab else text)
        out.append(cells)
    return out
