"""Shards: what one output file of the data stage holds, the plan of them, and preparing one.

A *shard* is a fixed group of one source's input units (data/sources.py: files, works, books, data files)
in reading order, closed once it holds about ``data.shard_bytes`` of text; its documents go to one Arrow
file per split (data/storage.py). A *part* is one machine's share of the work: part ``i`` of ``N``
prepares every source's shards ``j`` with ``j mod N == i`` (:func:`part_of`).

The plan is fixed before any shard is prepared. A source with a byte cap is read once, up to the cap, in
reading order (:class:`CappedRead`): that fixes its units (the last one cut after a number of documents) and
their text bytes, and its documents go to a spill file (bounded by the cap) that its shards and the
tokenizer's sample read instead of the source. An uncapped source is sized from its units without reading
them (:meth:`~bam_pipeline.data.sources.Source.unit_bytes`). The tokenizer's sample
(:func:`tokenizer_sample`) is the first ``share * tokenizer.train_bytes`` of each seed-mixture source's
train documents in reading order, each text once: a copy of a text read earlier (in a capped source before
it in the dedupe order, whole; in an uncapped one, its sampled head) is left out.

Preparing a shard (:func:`build_shard`) reads its units, drops copies of a text it already holds, assigns
each document its split (data/splits.py), tokenises in batches and writes the files batch by batch: memory
holds one batch of text and the keys of the shard's documents, whatever the corpus's size. Copies across
shards are dropped later, by the merge (data/prepare.py), which reads each shard's keys from two raw files of
16 bytes a key (:func:`kept_path`, :func:`copies_path`), never from the token files.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np

from bam_pipeline.data.sources import ByteCap, Document, Source
from bam_pipeline.data.splits import KEY_BYTES, SPLITS, first_copies, split_of, text_key
from bam_pipeline.data.storage import ShardWriter, shard_file
from bam_pipeline.data.tokenizer import DocumentEncoder
from bam_pipeline.errors import BamError
from bam_pipeline.store.files import atomic_path, sha256_file

BATCH_DOCS = 256  # documents tokenised and written at once


@dataclass(frozen=True)
class ShardPlan:
    """One shard of a source: its units (indices into ``source.units()``), and where a byte cap cuts the
    last one (``last_docs`` documents read from it; None: all of it)."""

    source: str
    index: int
    units: tuple[int, ...]
    last_docs: Optional[int]
    text_bytes: int  # the units' text as planned: counted under a cap, else their size

    @property
    def name(self) -> str:
        return f"{self.source}/{self.index:05d}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShardPlan":
        return cls(d["source"], int(d["index"]), tuple(d["units"]), d["last_docs"], int(d["text_bytes"]))


def copies_path(root: Path, shard: ShardPlan) -> Path:
    """The keys of the copies a shard dropped (of texts it keeps): 16 bytes each, in the build directory."""
    return Path(root) / "copies" / shard.source / f"{shard.index:05d}.keys"


def kept_path(root: Path, shard: ShardPlan) -> Path:
    """The keys of the texts a shard keeps, its train, val and test documents in file order one after another:
    16 bytes each, in the build directory (the merge's dedupe reads these, not the token files)."""
    return Path(root) / "kept" / shard.source / f"{shard.index:05d}.keys"


def part_of(shard: int, parts: int) -> int:
    """The part that prepares shard ``shard`` of every source."""
    return shard % parts


def group_units(sizes: Sequence[int], shard_bytes: int) -> list[list[int]]:
    """Consecutive unit indices grouped into shards: a shard closes once its units reach ``shard_bytes``."""
    out: list[list[int]] = []
    cur: list[int] = []
    total = 0
    for i, size in enumerate(sizes):
        cur.append(i)
        total += size
        if total >= shard_bytes:
            out.append(cur)
            cur, total = [], 0
    if cur:
        out.append(cur)
    return out


def plan_from_sizes(name: str, sizes: Sequence[int], shard_bytes: int, last_docs: Optional[int] = None
                    ) -> list[ShardPlan]:
    """A source's shards from its units' sizes (``last_docs``: where a byte cap cuts the last unit)."""
    groups = group_units(sizes, shard_bytes)
    return [ShardPlan(name, j, tuple(g), last_docs if j == len(groups) - 1 else None, sum(sizes[i] for i in g))
            for j, g in enumerate(groups)]


def plan_uncapped(source: Source, shard_bytes: int) -> tuple[list[ShardPlan], int]:
    """(the shards of a source read whole, sized from its units without reading them; how many units it lists)."""
    units = source.units()
    return plan_from_sizes(source.name, [source.unit_bytes(u) for u in units], shard_bytes), len(units)


@dataclass(frozen=True)
class CappedRead:
    """Read a source with a byte cap in reading order, once: its documents go to ``spill`` (an Arrow file of
    id, text and unit, bounded by the cap), which the shards and the tokenizer's sample then read instead of
    the source; the units read and their text bytes fix its shards (picklable: a worker process runs it)."""

    source: Source
    cap: int
    shard_bytes: int
    spill: Path

    def __call__(self) -> tuple[list[ShardPlan], int]:
        """(its shards, how many units the source lists)."""
        import pyarrow as pa

        schema = pa.schema([("id", pa.string()), ("text", pa.string()), ("unit", pa.int64())])
        sizes: list[int] = []
        last_docs: Optional[int] = None
        cap = ByteCap(self.cap)
        self.spill.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.spill) as tmp, pa.ipc.new_stream(str(tmp), schema) as out:
            rows: list[tuple[str, str, int]] = []
            units = self.source.units()
            for u, unit in enumerate(units):
                read, size = 0, 0
                for doc in self.source.read(unit):
                    if cap.reached:
                        break
                    read += 1
                    n = cap.take(doc)
                    if n:
                        size += n
                        rows.append((doc.id, doc.text, u))
                        if len(rows) >= BATCH_DOCS:
                            out.write_batch(_spill_batch(rows, schema))
                            rows.clear()
                sizes.append(size)
                if cap.reached:
                    last_docs = read
                    break
            if rows:
                out.write_batch(_spill_batch(rows, schema))
        return plan_from_sizes(self.source.name, sizes, self.shard_bytes, last_docs), len(units)


def _spill_batch(rows: list[tuple[str, str, int]], schema: Any) -> Any:
    import pyarrow as pa

    return pa.record_batch([pa.array([r[i] for r in rows], schema.field(i).type) for i in range(3)], schema=schema)


def spilled_documents(spill: Path, units: Optional[tuple[int, ...]] = None) -> Iterator[Document]:
    """The documents a :class:`CappedRead` kept, in reading order (only those of ``units`` when given)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    with pa.memory_map(str(spill)) as f:
        for batch in pa.ipc.open_stream(f):
            if units is not None:
                unit = batch.column(2)
                batch = batch.filter(pc.and_(pc.greater_equal(unit, units[0]), pc.less_equal(unit, units[-1])))
            for doc_id, text in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                yield Document(doc_id, text)


def tokenizer_sample(documents: Iterable[tuple[str, Iterator[Document], bool]], sample_bytes: dict[str, float],
                     val: float, test: float) -> dict[str, list[str]]:
    """The tokenizer's sample (module docstring). ``documents``: (source, its documents in reading order,
    whether to read them all), the sources in the dedupe order. A source is read until its ``sample_bytes``
    are taken, or whole when asked (a capped source's spill: then every copy of its texts in a later source
    is left out, as the merge leaves it out of the data)."""
    seen: set[bytes] = set()  # keys of every document read here: bounded by the caps and the sample
    out: dict[str, list[str]] = {}
    for name, docs, whole in documents:
        left, taken = sample_bytes.get(name, 0.0), out.setdefault(name, [])
        for doc in docs:
            if left <= 0 and not whole:
                break
            key = text_key(doc.text)
            if key in seen:
                continue
            seen.add(key)
            if left > 0 and split_of(doc.id, val, test) == "train":
                text = doc.text[: int(left)]
                left -= len(text.encode())
                taken.append(text)
    return out


@dataclass(frozen=True)
class ShardTask:
    """Everything a worker process needs to prepare one shard into ``root`` (picklable)."""

    source: Source
    shard: ShardPlan
    root: Path
    val: float
    test: float
    encoder: DocumentEncoder
    vocab_size: int
    tokenizer_hash: str
    n_units: int  # how many units the plan saw: a listing that changed since is refused
    spill: Optional[Path] = None  # a capped source's documents, read once (:class:`CappedRead`)


def _documents(task: ShardTask, units: Optional[list[Any]]) -> Iterator[Document]:
    source, shard = task.source, task.shard
    if task.spill is not None:
        yield from spilled_documents(task.spill, shard.units)
        return
    assert units is not None
    if len(units) != task.n_units:
        raise BamError(f"source {source.name!r} now has {len(units)} input units, not the {task.n_units} the data "
                       "stage planned with; its files changed while it ran: run `python -m bam_pipeline stage=data` "
                       "again")
    for k, u in enumerate(shard.units):
        docs = source.read(units[u])
        if k == len(shard.units) - 1 and shard.last_docs is not None:
            docs = itertools.islice(docs, shard.last_docs)
        yield from (d for d in docs if d.text.strip())


def build_shard(task: ShardTask) -> dict[str, Any]:
    """Prepare one shard (see the module docstring); returns its record: its files with their checksums and
    counts, and the copies it dropped. Runs in a worker process or in the stage's own."""
    t0 = time.time()
    source, shard = task.source, task.shard
    writers = {s: ShardWriter(shard_file(task.root, source.name, s, shard.index), task.vocab_size) for s in SPLITS}
    copies: list[bytes] = []  # keys of the copies this shard dropped (of texts it keeps)
    kept: dict[str, list[bytes]] = {s: [] for s in SPLITS}  # keys of the texts it keeps, by split
    units = None if task.spill is not None else source.units()  # a spilled source is not read again
    try:
        batch: list[tuple[str, str, bytes, str]] = []

        def flush() -> None:
            tokens = task.encoder([b[1] for b in batch])
            for split in SPLITS:
                rows = [i for i, b in enumerate(batch) if b[3] == split]
                if rows:
                    kept[split].extend(batch[i][2] for i in rows)
                    writers[split].write([batch[i][0] for i in rows], [tokens[i] for i in rows],
                                         [batch[i][2] for i in rows], [len(batch[i][1].encode()) for i in rows])
            batch.clear()

        for doc, key in first_copies(_documents(task, units), copies):
            batch.append((doc.id, doc.text, key, split_of(doc.id, task.val, task.test)))
            if len(batch) >= BATCH_DOCS:
                flush()
        if batch:
            flush()
        counts = {s: w.close() for s, w in writers.items()}
        copies_file, kept_file = copies_path(task.root, shard), kept_path(task.root, shard)
        for path, keys in ((copies_file, copies), (kept_file, [k for s in SPLITS for k in kept[s]])):
            with atomic_path(path) as tmp:
                np.array(keys, dtype=f"S{KEY_BYTES}").tofile(tmp)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    return {
        "source": source.name, "index": shard.index, "plan": shard.to_dict(),
        "units": [f"unit {u}" if units is None else source.unit_name(units[u])
                  for u in dict.fromkeys((shard.units[0], shard.units[-1]))],
        "tokenizer_hash": task.tokenizer_hash, "duplicates": len(copies),
        "copies": {"file": str(copies_file.relative_to(task.root)), "sha256": sha256_file(copies_file)},
        "kept": {"file": str(kept_file.relative_to(task.root)), "sha256": sha256_file(kept_file)},
        "splits": {s: {"file": str(shard_file(Path(), source.name, s, shard.index)),
                       "sha256": sha256_file(shard_file(task.root, source.name, s, shard.index)), **asdict(c)}
                   for s, c in counts.items()},
        "wall_time_s": round(time.time() - t0, 2), "pid": os.getpid(),
    }
