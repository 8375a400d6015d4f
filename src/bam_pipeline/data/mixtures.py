"""The paper's three data mixtures as token proportions per source, and exact token allocation.

- seed: ``seed_general`` of general text, the rest spread evenly over the domains;
- branch for domain d: d plus ``branch_general`` of general text (docs/paper.md section 1: 10%);
- moe: general and every domain in equal shares (paper: 25% each of four).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Mapping

from bam_pipeline.errors import BamError

if TYPE_CHECKING:
    from bam_pipeline.data.spec import DataSpec

STAGES = ("seed", "branch", "moe")


def stage_mixture(stage: str, spec: "DataSpec", domain: str | None = None) -> dict[str, float]:
    """Token proportions per source (summing to 1) for a training stage."""
    general, domains = spec.general, list(spec.domains)
    if stage == "seed":
        g = spec.mixtures.seed_general
        out = {general: g, **{d: (1.0 - g) / len(domains) for d in domains}}
    elif stage == "branch":
        if domain not in domains:
            raise BamError(f"unknown branch domain {domain!r}; known domains: {', '.join(domains)} (data.domains)")
        g = spec.mixtures.branch_general
        out = {domain: 1.0 - g, general: g}
    elif stage == "moe":
        names = [general, *domains]
        out = {n: 1.0 / len(names) for n in names}
    else:
        raise BamError(f"unknown data stage {stage!r}; mixtures exist for {', '.join(STAGES)}")
    return {k: v for k, v in out.items() if v > 0}


def allocate(proportions: Mapping[str, float], total: int) -> dict[str, int]:
    """Integers summing to ``total`` closest to ``p * total`` (largest remainder; each off by < 1)."""
    psum = sum(proportions.values())
    if psum <= 0 or any(p < 0 for p in proportions.values()):
        raise BamError(f"mixture proportions {dict(proportions)} must be non-negative with a positive sum")
    exact = {k: p / psum * total for k, p in proportions.items()}
    out = {k: math.floor(v) for k, v in exact.items()}
    short = total - sum(out.values())
    for k in sorted(exact, key=lambda k: (out[k] - exact[k], k))[:short]:
        out[k] += 1
    return out
