"""Deterministic document-level splits: exact-duplicate removal within and across sources, then
train/val/test by sha1 of the id.

The rule: **every text occurs once in the prepared data.** Two documents are exact duplicates when
their texts are identical as their sources yield them (a file's byte-order mark is not part of its
text; nothing else is normalised). Sources claim texts one after another in the dedupe order
(:attr:`~bam_pipeline.data.spec.DataSpec.dedupe_order`: the domains in ``data.domains`` order, then
the general source, then the out-of-domain sources), each in its own reading order. The first claim
keeps the text, in the split its document id gives (:func:`split_of`); every later copy is removed,
counted as a within-source duplicate when the source that keeps it is its own, else as a
cross-source duplicate of the source that keeps it. So a text is in one split of one source: no
test or validation text is trained on by any stage, and corpora without duplicates split exactly as
they did before duplicates were removed across sources.

The split of a document depends only on its id and the fractions (never on Python's salted
``hash()``, the machine or the order documents arrive in), so every machine agrees.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator

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


def text_key(text: str) -> bytes:
    """What makes two documents exact duplicates: the sha1 of their text (the one home of that rule)."""
    return hashlib.sha1(text.encode()).digest()


@dataclass
class SourceSplits:
    """One source after duplicate removal: its documents per split and what was removed from it."""

    source: str
    splits: dict[str, list[Document]]  # split -> documents, in arrival order
    duplicates: int = 0  # copies of a text this source already held
    # source that keeps the text -> copies removed from this source (it came earlier in the dedupe order)
    kept_elsewhere: dict[str, int] = field(default_factory=dict)

    @property
    def documents(self) -> int:
        return sum(len(v) for v in self.splits.values())

    @property
    def cross_source_duplicates(self) -> int:
        return sum(self.kept_elsewhere.values())


def dedupe_and_split(sources: Iterable[tuple[str, Iterable[Document]]], val: float, test: float
                     ) -> Iterator[SourceSplits]:
    """Remove exact duplicates within and across ``sources`` ((name, documents) in the dedupe order),
    then split each kept document by its id: one :class:`SourceSplits` per source, yielded as soon as
    that source is read. The fractions are checked where they are read
    (:class:`~bam_pipeline.data.spec.SplitSpec`)."""
    holder: dict[bytes, str] = {}  # text key -> the source that keeps that text
    for name, docs in sources:
        out = SourceSplits(name, {s: [] for s in SPLITS})
        elsewhere: Counter[str] = Counter()
        for doc in docs:
            key = text_key(doc.text)
            kept_by = holder.get(key)
            if kept_by is None:
                holder[key] = name
                out.splits[split_of(doc.id, val, test)].append(doc)
            elif kept_by == name:
                out.duplicates += 1
            else:
                elsewhere[kept_by] += 1
        out.kept_elsewhere = dict(sorted(elsewhere.items()))
        yield out
