"""Display names and roles of artifact labels (``seed``, ``branch/<domain>``, ``mix/<v>``, ``moe/<v>``).

Data-driven: a label's stage and name decide its display name and its role in the ordering claims;
nothing is specific to one run. ``<v>_cm`` is the compute-matched run of variant ``<v>``.
"""

from __future__ import annotations

CM_SUFFIX = "_cm"

VARIANT_NAMES: dict[str, str] = {
    "bam": "BAM (expert KV)",
    "bam_kv_shared": "BAM (shared KV)",
    "bam_attn_top1": "BAM (top-1 attention)",
    "bam_attn_top2": "BAM (top-2 attention)",
    "btx": "BTX",
    "btx_matched": "BTX (parameter-matched)",
    "sparse_upcycle": "Sparse upcycling",
    "dense": "Dense",
}


def split_label(label: str) -> tuple[str, str]:
    """(stage, name) of a label; the seed's label is just ``seed``."""
    stage, _, name = label.partition("/")
    return stage, name or "main"


def variant_display(variant: str) -> str:
    """``bam`` -> ``BAM (expert KV)``; ``bam_cm`` -> ``BAM CM (expert KV)``; unknown names unchanged."""
    if variant.endswith(CM_SUFFIX):
        base, paren, rest = variant_display(variant[: -len(CM_SUFFIX)]).partition(" (")
        return f"{base} CM{paren}{rest}"
    return VARIANT_NAMES.get(variant, variant)


def display_name(label: str) -> str:
    """Human name of an artifact label, e.g. ``branch/code`` -> ``Code expert``."""
    stage, name = split_label(label)
    if stage == "seed":
        return "Seed"
    if stage == "branch":
        return f"{name.capitalize()} expert"
    if stage == "mix":
        return f"{name} (untrained)"
    if stage == "moe":
        return variant_display(name)
    return label


def column_name(source: str) -> str:
    """Display name of a source column (``general`` -> ``General``)."""
    return source.capitalize()


def is_dense_variant(variant: str) -> bool:
    return variant == "dense" or variant.startswith("dense" + CM_SUFFIX)


def is_single_model(label: str) -> bool:
    """Seed, a branch expert, or the dense baseline of the mixture phase."""
    stage, name = split_label(label)
    return stage in ("seed", "branch") or (stage == "moe" and is_dense_variant(name))


def is_trained_mixture(label: str) -> bool:
    stage, name = split_label(label)
    return stage == "moe" and not is_dense_variant(name)


def expert_domain(label: str) -> str | None:
    """The domain of a branch expert, else None."""
    stage, name = split_label(label)
    return name if stage == "branch" else None
