"""What a model of the report is: its display name, its role in the ordering claims and, for a
mixture, the names of its experts, all read from the artifact's manifest (written by its stage).

Roles: ``seed``, ``expert`` (a branch expert), ``untrained`` (a mix artifact), ``mixture`` (a trained
mixture), ``dense`` (the dense baseline of the mixture phase, a single model), ``ensemble`` (BTM, at eval)
and ``probe`` (a model changed at eval to test a question, e.g. uniform attention weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bam_pipeline.store.artifacts import Artifact
from bam_pipeline.store.layout import parse_label

STAGE_ROLES = {"seed": "seed", "branch": "expert", "mix": "untrained", "moe": "mixture"}


@dataclass(frozen=True)
class About:
    """A model's description, as its stage wrote it into the manifest (``about``)."""

    display: str
    role: str
    domain: str | None = None  # a branch expert's domain
    experts: dict[str, list[str]] | None = None  # a mixture's expert names per router kind

    def to_dict(self) -> dict[str, Any]:
        return {"display": self.display, "role": self.role, "domain": self.domain, "experts": self.experts}


def about(art: Artifact) -> About:
    """The artifact's description; an artifact without one is named by its label, its role by its stage."""
    given = art.manifest.get("about") or {}
    stage, name = parse_label(art.label)
    return About(
        display=given.get("display") or art.label,
        role=given.get("role") or STAGE_ROLES.get(stage, stage),
        domain=given.get("domain") or (name if stage == "branch" else None),
        experts=given.get("experts"),
    )


def expert_names(info: About, kind: str, n: int) -> list[str]:
    """Names of the ``n`` experts of router kind ``kind``; ``e0..e{n-1}`` when the manifest does not say."""
    names = (info.experts or {}).get(kind)
    return list(names) if names and len(names) == n else [f"e{i}" for i in range(n)]


def column_name(source: str) -> str:
    """Display name of a source column (``general`` -> ``General``)."""
    return source.capitalize()
