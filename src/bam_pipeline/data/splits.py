"""Deterministic document-level splits: exact-duplicate removal, then train/val/test by sha1 of the id.

The split of a document depends only on its id and the fractions (never on Python's salted
``hash()``, the machine or the order documents arrive in), so every machine agrees.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

from bam_pipeline.data.sources import Document

SPLITS = ("train", "val", "test")


def split_of(doc_id: str, val: float, test: float) -> str:
    """The split of one document: the first 64 bits of sha1(id) as a fraction in [0, 1)."""
    u = int.from_bytes(hashlib.sha1(doc_id.encode()).digest()[:8], "big") / 2.0**64
    if u < test:
        return "test"
    if u < test + val:
        return "val"
    return "train"


def dedupe_and_split(docs: Iterable[Document], val: float, test: float) -> tuple[dict[str, list[Document]], int]:
    """Drop exact duplicates (same text; the first one kept), then split by id.

    Returns ({split: documents in arrival order}, number of duplicates removed). The fractions are
    checked where they are read (:class:`~bam_pipeline.data.spec.SplitSpec`).
    """
    seen: set[bytes] = set()
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    dups = 0
    for doc in docs:
        key = hashlib.sha1(doc.text.encode()).digest()
        if key in seen:
            dups += 1
            continue
        seen.add(key)
        out[split_of(doc.id, val, test)].append(doc)
    return out, dups
