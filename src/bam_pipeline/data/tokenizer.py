"""The run's tokenizer: a byte-level BPE trained with Hugging Face ``tokenizers``, a given file, or
the tokenizer of an imported seed checkpoint (:class:`SeedTokenizer`).

Byte-level pre-tokenisation maps every byte to a symbol, so any text round-trips exactly. The
end-of-document token is ``EOS`` (a checkpoint's own: its ``eos_token_id``). A run tokenises with
literal special-token text kept as text (:func:`as_run_tokenizer`); ``tokenizer_hash`` of that
form identifies the tokenizer across stages.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from bam_pipeline.errors import BamError

EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [EOS, PAD]


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with ``vocab_size`` entries (256 byte symbols + specials + merges)."""
    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise BamError(f"tokenizer.vocab_size={vocab_size} is too small; byte-level BPE needs at least 259")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str | Path, eos_token: str = EOS) -> Tokenizer:
    """A tokenizer.json given by path; it must contain the end-of-document token ``eos_token``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise BamError(f"tokenizer file {path} does not exist; set data.tokenizer.path to a tokenizer.json or null to train one")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise BamError(f"cannot read tokenizer {path}: {e}; give a Hugging Face tokenizer.json") from None
    if tok.token_to_id(eos_token) is None:
        raise BamError(
            f"tokenizer {path} has no end-of-document token {eos_token!r}; set data.tokenizer.eos_token to its own"
        )
    return tok


def eos_id(tok: Tokenizer, eos_token: str = EOS) -> int:
    return tok.token_to_id(eos_token)


def _byte_symbols() -> dict[str, int]:
    """The byte-level alphabet (GPT-2's ``bytes_to_unicode``, which ``tokenizers``' ByteLevel uses): symbol -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes)}


def token_byte_lengths(tok: Tokenizer) -> np.ndarray | None:
    """(V,) int64: the UTF-8 bytes of text each token id stands for, where ``tok`` is byte-level (its decoder is
    ``ByteLevel``: every token a string of byte symbols, so a text's bytes are its tokens' bytes summed); 0 for
    the special tokens (end of document, padding, a BOS: no text). None for another kind of tokenizer."""
    decoder = json.loads(tok.to_str()).get("decoder") or {}
    kinds = [d.get("type") for d in decoder.get("decoders", [decoder])]
    if "ByteLevel" not in kinds:
        return None
    symbols = _byte_symbols()
    added = tok.get_added_tokens_decoder()
    out = np.zeros(tok.get_vocab_size(with_added_tokens=True), dtype=np.int64)
    for token, i in tok.get_vocab(with_added_tokens=True).items():
        if i in added:
            out[i] = 0 if added[i].special else len(token.encode())
        elif all(ch in symbols for ch in token):
            out[i] = len(token)
        else:
            return None  # a token outside the byte alphabet: not a byte-level vocabulary
    return out


def as_run_tokenizer(tok: Tokenizer) -> Tokenizer:
    """A copy of ``tok`` as a run uses it: a literal ``<|endoftext|>`` inside a document is text, not
    a special token (only the document boundaries the data stage adds are)."""
    run = Tokenizer.from_str(tok.to_str())
    run.encode_special_tokens = True
    return run


def tokenizer_hash(tok: Tokenizer) -> str:
    """sha256 of the tokenizer's canonical JSON."""
    return hashlib.sha256(tok.to_str().encode()).hexdigest()


@dataclass(frozen=True)
class SeedTokenizer:
    """The tokenizer an imported seed checkpoint defines: the data stage tokenises with it (its
    post-processor included, e.g. a BOS per document) instead of training one."""

    tokenizer: Tokenizer  # the run form (as_run_tokenizer)
    eos_id: int
    eos_token: str
    identity: dict[str, Any]  # what identifies it in the prepared data's hash: checkpoint, files, eos

    @property
    def hash(self) -> str:
        return tokenizer_hash(self.tokenizer)

    def encoder(self) -> "DocumentEncoder":
        return DocumentEncoder(self.tokenizer.to_str(), self.eos_id, post_process=True)

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.encoder()(texts)


@dataclass(frozen=True)
class DocumentEncoder:
    """Texts to token ids as the data stage stores them, each document ending with ``eos_id``; picklable (its
    tokenizer as JSON) for the stage's worker processes, which build the tokenizer once each.

    ``post_process``: an imported checkpoint's tokenizer, whose post-processor adds its special tokens (a
    BOS); a trained or given tokenizer.json has none to add."""

    tokenizer_json: str
    eos_id: int
    post_process: bool = False

    def __call__(self, texts: list[str]) -> list[list[int]]:
        tok = _run_tokenizer(self.tokenizer_json)
        if self.post_process:
            from bam_pipeline.interop.hf_tokenizer import encode_documents

            return encode_documents(tok, texts, self.eos_id)
        return [e.ids + [self.eos_id] for e in tok.encode_batch(texts)]


_BUILT: dict[str, Tokenizer] = {}


def _run_tokenizer(tokenizer_json: str) -> Tokenizer:
    """The run form of a tokenizer given as JSON, built once per process (``encode_special_tokens`` is not
    part of the JSON, so it is set again: :func:`as_run_tokenizer`)."""
    key = hashlib.sha256(tokenizer_json.encode()).hexdigest()
    if key not in _BUILT:
        _BUILT.clear()
        _BUILT[key] = as_run_tokenizer(Tokenizer.from_str(tokenizer_json))
    return _BUILT[key]
