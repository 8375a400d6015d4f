"""Measured speeds: the small JSON file ``make bench`` writes (``info.speeds``), and the wall time of
a run projected from it and the stages' budgets (``stage=info``).

The file names the machine it was measured on and, per model (``<preset>/<layout>``: ``tiny/dense``,
``tiny/bam``, ...), training tokens/s (forward + backward + AdamW step) and forward-only tokens/s
(validation and eval), each at the batch it was measured with. A projection is only as good as
the match between that machine and batch and the run's; both are printed beside it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bam_pipeline.errors import BamError
from bam_pipeline.store.files import write_json


@dataclass(frozen=True)
class SpeedTable:
    """Tokens/s measured by ``make bench`` on one machine."""

    machine: str  # CPU model (or GPU name), cores/threads
    measured: str  # date
    device: str
    dtype: str
    torch: str
    batch: dict[str, list[int]]  # model -> [sequences, tokens per sequence] it was measured at
    train_tokens_per_s: dict[str, float] = field(default_factory=dict)
    forward_tokens_per_s: dict[str, float] = field(default_factory=dict)

    def write(self, path: Path) -> None:
        write_json(path, asdict(self), sort_keys=True)

    @classmethod
    def read(cls, path: Path) -> "SpeedTable | None":
        """The table in ``path``, or None when there is none; a BamError when it is unreadable."""
        if not path.is_file():
            return None
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as e:
            raise BamError(f"{path} is not a speeds file written by `make bench` ({e}); delete it or re-run "
                           "`make bench`") from None


def model_key(preset: str, layout: str) -> str:
    """``tiny/dense``, ``tiny/bam``: a preset and a mixture layout (a mix variant's name, or dense)."""
    return f"{preset}/{layout}"


@dataclass(frozen=True)
class StageWork:
    """One training stage's work in a projection."""

    label: str  # seed, branch/code, moe/bam
    model: str  # model_key of what it trains
    train_tokens: int
    val_passes: int
    val_tokens: int


def project(work: list[StageWork], eval_tokens: dict[str, int], speeds: SpeedTable) -> dict[str, Any]:
    """Seconds per stage (training + validation), for eval, and in total; ``missing`` lists the models
    the table has no speed for (their stages are left out of the total)."""
    rows, missing = [], []
    for w in work:
        train_s, fwd_s = speeds.train_tokens_per_s.get(w.model), speeds.forward_tokens_per_s.get(w.model)
        if train_s is None or fwd_s is None:
            missing.append(w.model)
            rows.append({"stage": w.label, "model": w.model, "seconds": math.nan})
            continue
        rows.append({"stage": w.label, "model": w.model,
                     "seconds": w.train_tokens / train_s + w.val_passes * w.val_tokens / fwd_s})
    eval_s = 0.0
    for model, tokens in eval_tokens.items():
        fwd_s = speeds.forward_tokens_per_s.get(model)
        if fwd_s is None:
            missing.append(model)
        else:
            eval_s += tokens / fwd_s
    total = sum(r["seconds"] for r in rows if math.isfinite(r["seconds"])) + eval_s
    return {"stages": rows, "eval_s": eval_s, "total_s": total, "missing": sorted(set(missing))}


def format_duration(seconds: float) -> str:
    """``42 s``, ``17 min``, ``3.1 h``."""
    if not math.isfinite(seconds):
        return "-"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
