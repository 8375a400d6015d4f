"""Eval's results as typed data: a :class:`ScoreRow` per (model, source), and :class:`ModelScores`, one
model's rows with its router statistics, skip records and per-document losses (an eval cache entry).

Each serialises to exactly the JSON eval has always written (keys and their order): a row of
``eval/metrics.json`` is a :class:`ScoreRow` with its :class:`Timing`; an entry of ``eval/cache/`` is a
:class:`ModelScores` whose rows have none (speed is never cached).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

from bam_pipeline.errors import BamError

REBUILD = "score the run again (`python -m bam_pipeline stage=eval eval.rebuild=true`)"
_OPTIONAL = ("btm_models", "btm_prior", "timing")  # left out of the JSON while None
_TIMING = {"tokens_per_s", "wall_time"}  # Timing's keys in the JSON


@dataclass(frozen=True)
class Timing:
    """What every eval measures afresh and never caches: the forward pass's tokens/s (a probe runs at its model's
    speed, BTM at its members' one after another) and the training stage's wall time split (its manifest's
    ``wall_time``; None for an untrained model, a probe and BTM)."""

    tokens_per_s: float
    wall_time: dict[str, float] | None


@dataclass(frozen=True)
class ScoreRow:
    """One model's scores on one source's test split, with what the model is and costs."""

    model: str  # the label: ``stage/name``, ``seed``, a probe's ``label+probe``, or ``btm``
    stage: str
    name: str
    display: str
    role: str  # eval.names.STAGE_ROLES, ``ensemble`` (BTM) or ``probe``
    artifact_hash: str  # BTM: the hash of its members' hashes
    domain: str  # the source
    tokens: int  # test tokens scored
    bytes: float  # the UTF-8 bytes of text they stand for (eval.runner: counted, or estimated)
    loss: float  # mean per-token NLL (nats)
    perplexity: float
    bits_per_byte: float
    params_total: int
    params_active: int
    flops_per_token: float  # forward FLOPs per token at ``seq_len``
    seq_len: int
    device: str  # where the scores were computed
    tokens_trained: int | None  # the artifact's training tokens (None: BTM)
    btm_models: list[str] | None = None  # BTM only: the labels of its members, in order
    btm_prior: list[float] | None = None  # BTM only: the prior over its members on this source
    timing: Timing | None = None  # None until measured (a cached row)

    def timed(self, timing: Timing) -> "ScoreRow":
        return replace(self, timing=timing)

    def to_dict(self) -> dict[str, Any]:
        """The row as eval writes it: the BTM keys only on BTM's rows, the timing keys only once measured."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _OPTIONAL}
        if self.btm_models is not None:
            out.update(btm_models=self.btm_models, btm_prior=self.btm_prior)
        if self.timing is not None:
            out.update(tokens_per_s=self.timing.tokens_per_s, wall_time=self.timing.wall_time)
        return out

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> "ScoreRow":
        """A row of metrics.json or of the eval cache; a BamError when another version of eval wrote it."""
        plain = {k: v for k, v in row.items() if k not in _TIMING}
        try:
            timing = Timing(row["tokens_per_s"], row["wall_time"]) if _TIMING & row.keys() else None
            return cls(**plain, timing=timing)
        except (KeyError, TypeError) as e:
            raise BamError(f"the score row of {row.get('model', '?')} on {row.get('domain', '?')} is not one this "
                           f"version of eval writes ({e}); {REBUILD}") from e


def rows_of(metrics: Mapping[str, Any]) -> list[ScoreRow]:
    """The rows of a metrics.json."""
    return [ScoreRow.from_dict(r) for r in metrics["rows"]]


@dataclass(frozen=True)
class ModelScores:
    """One model's results on every source: its rows, its router statistics per source (empty without
    routers), the records of the sources it could not be scored on, and its per-document test losses per
    source (``{"nll": [...], "tokens": [...]}``, one entry per test document)."""

    rows: list[ScoreRow]
    routing: dict[str, Any]
    skipped: list[dict[str, Any]]
    documents: dict[str, dict[str, list]]

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [r.to_dict() for r in self.rows], "routing": self.routing, "skipped": self.skipped,
                "documents": self.documents}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelScores":
        return cls([ScoreRow.from_dict(r) for r in d["rows"]], d["routing"], d["skipped"], d["documents"])
