"""Arrow storage of tokenised shards and memory-mapped token streams.

Layout under a prepared-data directory: ``tokens/<source>/<split>/<shard>.arrow`` (:func:`shard_file`), one
Arrow IPC stream file per shard and split (the format ``datasets`` caches in, readable with
``datasets.Dataset.from_file``), one row per document in reading order: ``id`` (string), ``ids`` (token ids,
uint16 when the vocabulary fits, else int32, ending with the end-of-document token), ``key`` (the text's
16-byte key, data/splits.py: what the merge dedupes by) and ``bytes`` (the text's UTF-8 length). A split is
its shards in order (:class:`TokenStream`); reading it memory-maps each file, and the flattened ``ids``
columns are the packed token stream.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from bam_pipeline.data.splits import KEY_BYTES
from bam_pipeline.errors import BamError

if TYPE_CHECKING:
    import pyarrow as pa

    from bam_pipeline.data.prepare import PreparedData

TOKENS_DIR = "tokens"
SHARD_SUFFIX = ".arrow"


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "int32"


def shard_file(root: Path, source: str, split: str, shard: int) -> Path:
    """The file of one shard's documents of one split."""
    return Path(root) / TOKENS_DIR / source / split / f"{shard:05d}{SHARD_SUFFIX}"


def shard_schema(vocab_size: int) -> "pa.Schema":
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("ids", pa.list_(pa.from_numpy_dtype(np.dtype(token_dtype(vocab_size))))),
                      ("key", pa.binary(KEY_BYTES)), ("bytes", pa.int64())])


@dataclass
class SplitCounts:
    """What one shard file holds."""

    documents: int = 0
    bytes: int = 0
    tokens: int = 0

    def add(self, other: "SplitCounts") -> None:
        self.documents += other.documents
        self.bytes += other.bytes
        self.tokens += other.tokens


class ShardWriter:
    """Writes one shard file batch by batch (bounded memory) to a temporary sibling, renamed into place by
    :meth:`close`; :meth:`abort` removes it."""

    def __init__(self, path: Path, vocab_size: int):
        import pyarrow as pa

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        self.schema = shard_schema(vocab_size)
        self._writer = pa.ipc.new_stream(str(self.tmp), self.schema)
        self.counts = SplitCounts()

    def write(self, ids: Sequence[str], tokens: Sequence[Sequence[int]], keys: Sequence[bytes],
              nbytes: Sequence[int]) -> None:
        import pyarrow as pa

        if not ids:
            return
        ids_type = self.schema.field("ids").type
        token_lists = pa.array(tokens, ids_type)  # converted in C, one list per document
        batch = pa.record_batch([pa.array(ids, pa.string()), token_lists, pa.array(keys, pa.binary(KEY_BYTES)),
                                 pa.array(nbytes, pa.int64())], schema=self.schema)
        self._writer.write_batch(batch)
        self.counts.add(SplitCounts(len(ids), int(sum(nbytes)), len(token_lists.values)))

    def write_table(self, table: "pa.Table") -> None:
        import pyarrow.compute as pc

        for batch in table.to_batches():
            self._writer.write_batch(batch)
        self.counts.add(SplitCounts(table.num_rows, int(pc.sum(table.column("bytes")).as_py() or 0),
                                    int(pc.sum(pc.list_value_length(table.column("ids"))).as_py() or 0)))

    def close(self) -> SplitCounts:
        self._writer.close()
        os.replace(self.tmp, self.path)
        return self.counts

    def abort(self) -> None:
        self._writer.close()
        self.tmp.unlink(missing_ok=True)


def read_shard(path: Path) -> "pa.Table":
    """One shard file as an Arrow table memory-mapped from disk (its buffers are the file's pages)."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all()


def filter_shard(src: Path, dst: Path, drop: np.ndarray, vocab_size: int) -> SplitCounts:
    """Write ``src`` without the rows where ``drop`` (a mask) is true to ``dst`` (atomically), one record batch at
    a time: read from the file, not mapped, so that memory holds one batch whatever the shard's size."""
    import pyarrow as pa

    writer = ShardWriter(dst, vocab_size)
    row = 0
    try:
        with pa.OSFile(str(src)) as f:
            for batch in pa.ipc.open_stream(f):
                keep = ~drop[row:row + batch.num_rows]
                row += batch.num_rows
                if len(keep) == batch.num_rows:
                    writer.write_table(pa.Table.from_batches([batch.filter(pa.array(keep))], schema=batch.schema))
        if row != len(drop):
            raise BamError(f"{src} holds {row} documents, its record {len(drop)}; run `python -m bam_pipeline "
                           "stage=data data.rebuild=true`")
        return writer.close()
    except BaseException:
        writer.abort()
        raise


class TokenStream:
    """The concatenated token ids of one stored split: its shard files in order, memory-mapped (zero-copy
    Arrow chunks). Pickled (a DataLoader worker started by spawn) as its files, which the copy maps again."""

    def __init__(self, files: Sequence[Path]):
        self.files = [Path(f) for f in files]
        self._open()

    def _open(self) -> None:
        missing = [f for f in self.files if not f.is_file()]
        if missing:
            raise BamError(f"no stored tokens at {missing[0]}; run `python -m bam_pipeline stage=data`")
        self._tables = [read_shard(f) for f in self.files]
        chunks = [c.flatten().to_numpy(zero_copy_only=True) for t in self._tables for c in t.column("ids").chunks]
        self._chunks = [c for c in chunks if len(c)]
        self._ends = np.cumsum([len(c) for c in self._chunks], dtype=np.int64)

    def __getstate__(self) -> dict:
        return {"files": self.files}

    def __setstate__(self, state: dict) -> None:
        self.files = state["files"]
        self._open()

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def document_ends(self) -> np.ndarray:
        """(D,) int64 stream position just past each stored document, in stored order."""
        import pyarrow.compute as pc

        lengths = [pc.list_value_length(t.column("ids")).to_numpy(zero_copy_only=False) for t in self._tables]
        return np.cumsum(np.concatenate(lengths) if lengths else np.zeros(0, np.int64), dtype=np.int64)

    def documents(self) -> list[list[int]]:
        """Every stored document's token ids, in stored order (for small splits: it reads them all)."""
        return [ids for t in self._tables for ids in t.column("ids").to_pylist()]

    def document(self, i: int) -> np.ndarray:
        """The token ids of the ``i``-th stored document (int64)."""
        ends = self.document_ends()
        start = int(ends[i - 1]) if i else 0
        return self.take(start, int(ends[i]) - start)

    def doc_ids(self) -> list[str]:
        """The split's document ids, in stored order."""
        return [i for t in self._tables for i in t.column("id").to_pylist()]

    def token_counts(self, vocab_size: int) -> np.ndarray:
        """(V,) int64 occurrences of every token id in the split."""
        counts = np.zeros(vocab_size, dtype=np.int64)
        for chunk in self._chunks:
            counts += np.bincount(chunk, minlength=vocab_size)[:vocab_size]
        return counts

    def take(self, start: int, length: int) -> np.ndarray:
        """``length`` tokens from position ``start``, wrapping around the end (int64)."""
        n = len(self)
        if n == 0:
            raise BamError("cannot read tokens from an empty split")
        out = np.empty(length, dtype=np.int64)
        pos, filled = start % n, 0
        while filled < length:
            c = int(np.searchsorted(self._ends, pos, side="right"))
            begin = int(self._ends[c - 1]) if c else 0
            piece = self._chunks[c][pos - begin: pos - begin + length - filled]
            out[filled: filled + len(piece)] = piece
            filled += len(piece)
            pos = (pos + len(piece)) % n
        return out


def load_split_sequences(
    prepared: "PreparedData", source: str, split: str, seq_len: int, max_tokens: int | None = None
) -> torch.Tensor:
    """Non-overlapping packed chunks ``(N, seq_len + 1)`` of a split, in stored order (for eval).

    ``N`` = the number of whole chunks that fit (in at most ``max_tokens`` tokens when given).
    """
    stream = prepared.stream(source, split)
    avail = len(stream) if max_tokens is None else min(len(stream), int(max_tokens))
    n = avail // (seq_len + 1)
    if n == 0 and len(stream) > seq_len:  # the split holds a sequence; the cap does not
        raise BamError(f"at most {max_tokens} tokens of {source}/{split} asked for, fewer than one sequence of "
                       f"{seq_len + 1}; ask for at least {seq_len + 1}")
    if n == 0:
        raise BamError(
            f"{source}/{split} has {len(stream)} tokens, fewer than one sequence of {seq_len + 1}; "
            "lower seq_len or give the source more data"
        )
    return torch.from_numpy(stream.take(0, n * (seq_len + 1)).reshape(n, seq_len + 1))  # (N, seq_len+1)


def mixture_token_frequencies(prepared: "PreparedData", proportions: dict[str, float], split: str = "train"
                              ) -> np.ndarray:
    """(V,) float64 frequency of every token id in a training mixture: each source's relative
    frequencies in ``split``, weighted by its share of the mixture (sums to 1)."""
    freq = np.zeros(prepared.vocab_size, dtype=np.float64)
    total = sum(proportions.values())
    for source, share in proportions.items():
        counts = prepared.stream(source, split).token_counts(prepared.vocab_size)
        if counts.sum():
            freq += (share / total) * counts / counts.sum()
    return freq


@dataclass(frozen=True)
class EvalSequences:
    """Packed eval chunks of a split and the document each of their tokens belongs to."""

    tokens: torch.Tensor  # (N, T+1) int64
    documents: torch.Tensor  # (N, T+1) int64 index into doc_ids
    doc_ids: list[str]  # the split's document ids, in stored order


def load_eval_sequences(prepared: "PreparedData", source: str, split: str, seq_len: int,
                        max_tokens: int | None = None) -> EvalSequences:
    """:func:`load_split_sequences` with each token's document (for per-document losses)."""
    tokens = load_split_sequences(prepared, source, split, seq_len, max_tokens)
    stream = prepared.stream(source, split)
    positions = np.arange(tokens.numel(), dtype=np.int64)
    documents = np.searchsorted(stream.document_ends(), positions, side="right").reshape(tokens.shape)
    return EvalSequences(tokens, torch.from_numpy(documents), stream.doc_ids())
