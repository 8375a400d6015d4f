"""Learning-rate schedule: linear warm-up from 0, cosine decay to a fraction of the peak (docs/paper.md s.6)."""

from __future__ import annotations

import math


def warmup_steps_for(total_steps: int, warmup_frac: float, warmup_max: int) -> int:
    """Warm-up length: a fraction of the run, capped (paper: 1500 steps), at least 1 step."""
    return max(1, min(warmup_max, int(round(warmup_frac * total_steps))))


def lr_at(step: int, *, peak: float, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    Linear warm-up reaches ``peak`` at the end of step ``warmup_steps - 1``; then cosine decay
    reaches ``min_ratio * peak`` at the last step ``total_steps - 1`` and stays there.
    """
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    floor = min_ratio * peak
    span = max(1, total_steps - 1 - (warmup_steps - 1))
    progress = min(1.0, (step - (warmup_steps - 1)) / span)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
