"""Deterministic document-level splits, by sha1 of the id, and exact-duplicate removal within and across
sources.

The rule: **every text occurs once in the prepared data.** Two documents are exact duplicates when
their texts are identical as their sources yield them (a file's byte-order mark is not part of its
text; nothing else is normalised). Sources claim texts one after another in the dedupe order
(:attr:`~bam_pipeline.data.spec.DataSpec.dedupe_order`: the domains in ``data.domains`` order, then
the general source, then the out-of-domain sources), each in its own reading order: its shards in
order, each shard's documents in order (data/shards.py). The first claim keeps the text, in the split
its document id gives (:func:`split_of`); every later copy is removed, counted as a within-source
duplicate when the source that keeps it is its own, else as a cross-source duplicate of the source that
keeps it. So a text is in one split of one source: no test or validation text is trained on by any
stage.

Removal happens in two steps that together apply that rule: each shard drops the copies inside itself
while it is prepared, and the merge drops the copies of texts an earlier shard keeps
(:class:`KeptTexts`, which holds :data:`KEY_BYTES` bytes per kept document and nothing else).

The split of a document depends only on its id and the fractions (never on Python's salted
``hash()``, the machine or the order documents arrive in), so every machine agrees.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Iterator

import numpy as np

from bam_pipeline.data.sources import Document

SPLITS = ("train", "val", "test")
KEY_BYTES = 16  # a text's key: the first 16 bytes of its sha1 (collisions: ~1 in 2**64 at 2**32 documents)


def split_of(doc_id: str, val: float, test: float) -> str:
    """The split of one document: the first 64 bits of sha1(id) as a fraction in [0, 1)."""
    u = int.from_bytes(hashlib.sha1(doc_id.encode()).digest()[:8], "big") / 2.0**64
    if u < test:
        return "test"
    if u < test + val:
        return "val"
    return "train"


def text_key(text: str) -> bytes:
    """What makes two documents exact duplicates: their text's key, the first :data:`KEY_BYTES` bytes of
    its sha1 (the one home of that rule)."""
    return hashlib.sha1(text.encode()).digest()[:KEY_BYTES]


def first_copies(docs: Iterable[Document], copies: list[bytes]) -> Iterator[tuple[Document, bytes]]:
    """(document, its text key) of each document whose text is not an earlier one's; the key of every copy
    dropped is appended to ``copies`` (the merge counts it against the source that keeps the text). Holds the
    keys of the documents it yields (one shard's)."""
    seen: set[bytes] = set()
    for doc in docs:
        key = text_key(doc.text)
        if key in seen:
            copies.append(key)
            continue
        seen.add(key)
        yield doc, key


class KeptTexts:
    """The keys of the texts kept so far, by the source that keeps them: the merge's dedupe index.

    Shards are offered in the dedupe order (:meth:`claim`); each shard's keys are kept as one sorted array
    of ``S16`` (16 bytes per document), so the index costs :data:`KEY_BYTES` bytes per kept document."""

    def __init__(self) -> None:
        self._by_source: dict[str, list[np.ndarray]] = {}

    def claim(self, source: str, keys: np.ndarray) -> np.ndarray:
        """Offer a shard's keys (``(n,)`` S16, distinct: a shard drops its own copies first). Returns, per key,
        the source that already keeps that text (``""`` where none does: the document is kept, from now on
        under ``source``)."""
        keys = np.asarray(keys, dtype=f"S{KEY_BYTES}")
        holders = np.full(len(keys), "", dtype=object)
        for holder, arrays in self._by_source.items():
            for kept in arrays:
                at = np.searchsorted(kept, keys).clip(max=len(kept) - 1)
                hit = (kept[at] == keys) & (holders == "")
                holders[hit] = holder
        mine = np.sort(keys[holders == ""])
        if len(mine):
            self._by_source.setdefault(source, []).append(mine)
        return holders

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for arrays in self._by_source.values() for a in arrays)
