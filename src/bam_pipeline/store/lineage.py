"""What a model artifact was built from, through its manifests' inputs, and the total training compute of a
model: its own training FLOPs plus those of every artifact it was built from, each counted once.

That is the one definition of total training compute (every comparison of "equal total compute" uses it).
What an artifact was built from is what its manifest records as inputs: a mixture that copies the domain
experts lists them (seed -> branches -> mix -> moe counts the seed once, however many experts it fed), while
``dense`` and ``sparse_upcycle`` list only the seed, so no expert's FLOPs count towards them. The prepared data
is an input but trains nothing. Training FLOPs are a manifest's ``flops`` (the total convention of
:mod:`bam_pipeline.model.counting`: the LM head counted); a manifest without them gets its ``tokens`` times
:func:`~bam_pipeline.model.counting.training_flops_per_token` of its model at its training ``seq_len``. An
imported model records 0: its pretraining elsewhere is not known here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from bam_pipeline.errors import BamError
from bam_pipeline.model.counting import training_flops_per_token
from bam_pipeline.store.artifacts import Artifact, input_label, read_model_config

DATA = "data"  # the prepared data's input label: an input that trains nothing


@dataclass(frozen=True)
class Built:
    """One model artifact in the lineage: its own training FLOPs and the labels of the models it was built from."""

    flops: float
    inputs: tuple[str, ...] = ()


def total_training_flops(lineage: Mapping[str, Built], models: Iterable[str]) -> float:
    """The training FLOPs of ``models`` (one model, or the members of an ensemble) and of everything they were
    built from, each artifact counted once however many paths lead to it; a BamError naming an input the
    lineage does not hold."""
    seen: set[str] = set()
    todo = list(models)
    total = 0.0
    while todo:
        lab = todo.pop()
        if lab in seen:
            continue
        if lab not in lineage:
            raise BamError(f"{lab} is not among the run's current models; its training compute is not known")
        seen.add(lab)
        total += lineage[lab].flops
        todo.extend(lineage[lab].inputs)
    return total


def training_flops(art: Artifact) -> float:
    """An artifact's own training FLOPs: its manifest's ``flops``, else its ``tokens`` at its model's training
    FLOPs per token (0 for a model that was not trained here)."""
    m = art.manifest
    if isinstance(m.get("flops"), (int, float)):
        return float(m["flops"])
    tokens = m.get("tokens") or 0
    if not tokens:
        return 0.0
    seq_len = ((m.get("config") or {}).get("train") or {}).get("seq_len")
    return tokens * training_flops_per_token(read_model_config(art), seq_len)


def lineage_of(arts: Sequence[Artifact]) -> dict[str, Built]:
    """The lineage of a run's model artifacts (``store.artifacts.find_model_artifacts``): each one's own FLOPs
    and the model inputs its manifest records. An input rebuilt since (another hash than recorded) or no longer
    there is named by label and hash, so a total that reaches it is refused rather than counted from another
    artifact."""
    current = {a.label: a.hash for a in arts}
    out = {}
    for art in arts:
        inputs = []
        for key, record in (art.manifest.get("inputs") or {}).items():
            if not isinstance(record, dict):
                continue
            lab = input_label(key, record)
            if lab == DATA:
                continue
            inputs.append(lab if current.get(lab) == record.get("hash") else f"{lab}@{str(record.get('hash'))[:12]}")
        out[art.label] = Built(training_flops(art), tuple(inputs))
    return out


def total_compute(lineage: Mapping[str, Built], models: Iterable[str]) -> float | None:
    """:func:`total_training_flops`, or None where the lineage is incomplete (an input rebuilt or removed)."""
    try:
        return total_training_flops(lineage, models)
    except BamError:
        return None
