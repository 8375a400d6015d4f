"""The ordering claims of PAPER.md section 8, evaluated on any :class:`PplTable` (the paper's or a run's).

Each claim is "holds", "does not hold" or "not measurable" (a model it needs is missing), with a
detail line giving the numbers compared. Lower perplexity is better everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from bam_pipeline.eval.names import SINGLE_MODEL_ROLES, column_name
from bam_pipeline.eval.table import AVERAGE, PplTable
from bam_pipeline.store.layout import CM_SUFFIX, parse_label

HOLDS, FAILS, UNMEASURABLE = "holds", "does not hold", "not measurable"


@dataclass(frozen=True)
class Claim:
    key: str
    text: str
    status: str
    detail: str


def _status(ok: list[bool]) -> str:
    return UNMEASURABLE if not ok else (HOLDS if all(ok) else FAILS)


def _cmp(a: float, b: float) -> str:
    return f"{a:.2f} {'<' if a < b else '>='} {b:.2f}"


def _beats_everywhere(t: PplTable, a: str, b: str) -> tuple[list[bool], list[str]]:
    """Per column (and average) where both rows have a value: does ``a`` have lower perplexity than ``b``?"""
    ok, detail = [], []
    for c in t.claim_columns:
        va, vb = t.get(a, c), t.get(b, c)
        if va is not None and vb is not None:
            ok.append(va < vb)
            detail.append(f"{column_name(c)} {_cmp(va, vb)}")
    return ok, detail


def experts_beat_seed(t: PplTable) -> Claim:
    text = "each expert beats the seed in its own domain"
    ok, detail = [], []
    for lab in t.labels:
        d = parse_label(lab)[1] if t.role(lab) == "expert" else None
        e, s = (t.get(lab, d), t.get("seed", d)) if d else (None, None)
        if e is not None and s is not None:
            ok.append(e < s)
            detail.append(f"{column_name(d)}: expert {_cmp(e, s)} seed")
    return Claim("experts_beat_seed", text, _status(ok), "; ".join(detail) or "needs the seed and a branch expert")


def mixtures_beat_singles(t: PplTable) -> Claim:
    text = "every trained mixture beats every single model on average"
    singles = [(v, lab) for lab in t.labels if t.role(lab) in SINGLE_MODEL_ROLES and (v := t.get(lab, AVERAGE)) is not None]
    mixes = [(v, lab) for lab in t.labels if t.role(lab) == "mixture" and (v := t.get(lab, AVERAGE)) is not None]
    if not singles or not mixes:
        return Claim("mixtures_beat_singles", text, UNMEASURABLE, "needs a trained mixture and a single model")
    best_single, best_label = min(singles)
    ok = [v < best_single for v, _ in mixes]
    detail = "; ".join(f"{t.name(lab)} {_cmp(v, best_single)}" for v, lab in mixes)
    return Claim("mixtures_beat_singles", text, _status(ok), f"best single model {t.name(best_label)}: {detail}")


def _pair_claim(t: PplTable, key: str, text: str, pairs: list[tuple[str, str]]) -> Claim:
    ok, detail = [], []
    for a, b in pairs:
        if a in t.values and b in t.values:
            o, d = _beats_everywhere(t, a, b)
            ok += o
            detail.append(f"{t.name(a)} vs {t.name(b)}: " + ", ".join(d))
    need = " or ".join(f"{a} and {b}" for a, b in pairs)
    return Claim(key, text, _status(ok), "; ".join(detail) or f"needs {need}")


def check_claims(t: PplTable) -> list[Claim]:
    """All five ordering claims of PAPER.md section 8 on table ``t``."""
    moe = {parse_label(lab)[1] for lab in t.labels if parse_label(lab)[0] == "moe"}
    cm_pairs = sorted((f"moe/{v[: -len(CM_SUFFIX)]}", f"moe/{v}") for v in moe if v.endswith(CM_SUFFIX))
    return [
        experts_beat_seed(t),
        mixtures_beat_singles(t),
        _pair_claim(t, "bam_beats_btx", "BAM beats BTX on every column", [("moe/bam", "moe/btx")]),
        _pair_claim(t, "expert_kv_beats_shared", "expert KV beats shared KV on every column",
                    [("moe/bam", "moe/bam_kv_shared")]),
        _pair_claim(t, "dm_beats_cm", "data-matched beats compute-matched on every column",
                    cm_pairs or [("moe/bam", "moe/bam_cm")]),
    ]
