"""Arrow storage of tokenised splits and memory-mapped token streams.

Layout under a prepared-data directory: ``tokens/<source>/<split>/`` is a ``datasets`` dataset
saved with ``save_to_disk``, one row per document: ``id`` (string) and ``ids`` (token ids,
uint16 when the vocabulary fits, else int32) ending with the end-of-document token. Reading it
back memory-maps the Arrow file; the flattened ``ids`` column is the packed token stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from bam_pipeline.errors import BamError

if TYPE_CHECKING:
    from bam_pipeline.data.prepare import PreparedData

TOKENS_DIR = "tokens"


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "int32"


def split_dir(root: Path, source: str, split: str) -> Path:
    return Path(root) / TOKENS_DIR / source / split


def write_split(
    root: Path,
    source: str,
    split: str,
    ids: list[str],
    texts: list[str],
    encode: Callable[[list[str]], list[list[int]]],
    vocab_size: int,
    progress: bool,
) -> int:
    """Tokenise one split with a batched ``datasets`` map, save it; returns its token count."""
    import datasets

    features = datasets.Features({"id": datasets.Value("string"), "ids": datasets.List(datasets.Value(token_dtype(vocab_size)))})
    ds = datasets.Dataset.from_dict({"id": ids, "text": texts})
    ds = ds.map(
        lambda batch: {"ids": encode(batch["text"])},
        batched=True,
        batch_size=256,
        remove_columns=["text"],
        features=features,
        desc=f"tokenising {source}/{split}",
    )
    ds.save_to_disk(str(split_dir(root, source, split)))
    return int(sum(len(chunk.flatten()) for chunk in ds.data.column("ids").chunks))


class TokenStream:
    """The concatenated token ids of one stored split, memory-mapped (zero-copy Arrow chunks)."""

    def __init__(self, root: Path, source: str, split: str):
        import datasets

        path = split_dir(root, source, split)
        if not path.is_dir():
            raise BamError(f"no stored tokens for {source}/{split} in {root}; run `python -m bam_pipeline stage=data`")
        ds = datasets.load_from_disk(str(path))
        self._chunks = [c.flatten().to_numpy(zero_copy_only=True) for c in ds.data.column("ids").chunks]
        self._chunks = [c for c in self._chunks if len(c)]
        self._ends = np.cumsum([len(c) for c in self._chunks], dtype=np.int64)
        self.dataset = ds

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def document_ends(self) -> np.ndarray:
        """(D,) int64 stream position just past each stored document, in stored order."""
        import pyarrow.compute as pc

        lengths = pc.list_value_length(self.dataset.data.column("ids")).to_numpy(zero_copy_only=False)
        return np.cumsum(lengths, dtype=np.int64)

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
    stream = TokenStream(prepared.dir, source, split)
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
        counts = TokenStream(prepared.dir, source, split).token_counts(prepared.vocab_size)
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
    stream = TokenStream(prepared.dir, source, split)
    positions = np.arange(tokens.numel(), dtype=np.int64)
    documents = np.searchsorted(stream.document_ends(), positions, side="right").reshape(tokens.shape)
    return EvalSequences(tokens, torch.from_numpy(documents), list(stream.dataset["id"]))
