"""A Hugging Face model directory's own tokenizer: ``tokenizer.json`` (or a SentencePiece ``tokenizer.model``
converted by transformers, or the tokenizer transformers builds from a GGUF file's metadata), its
end-of-document id, the check that every id has an embedding row, and per-document encoding with the
tokenizer's own post-processor.

The tokenizer is exactly the directory's ``tokenizer.json``: its normaliser, pre-tokeniser and
post-processor (e.g. Llama 3's BOS at the start of every document) are applied as the file says.
The end-of-document id is ``eos_token_id`` from ``config.json``, else from
``generation_config.json`` (a GGUF file: from the config transformers builds from it); when it is a
list, its first element. A caller may name another end-of-document token by its text (``eos_token``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from bam_pipeline.errors import BamError, ConfigError
from bam_pipeline.interop.hf_config import CONFIG_FILE
from bam_pipeline.interop.hf_gguf import find_gguf, gguf_config, gguf_tokenizer

TOKENIZER_FILE = "tokenizer.json"
SENTENCEPIECE_FILE = "tokenizer.model"
GENERATION_CONFIG_FILE = "generation_config.json"
# what transformers reads besides tokenizer.model when it converts one
SENTENCEPIECE_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json")
EOS_SOURCES = (CONFIG_FILE, GENERATION_CONFIG_FILE)


@dataclass(frozen=True)
class HFModelTokenizer:
    """The tokenizer and the end-of-document token a Hugging Face model directory defines."""

    tokenizer: Tokenizer
    eos_id: int
    eos_token: str
    eos_source: str | None  # the file eos_token_id was read from; None when the caller named the token
    converted_from_sentencepiece: bool
    files: tuple[Path, ...]  # the files read: tokenizer file(s) and the eos source (for a manifest)


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


def _convert_sentencepiece(model_dir: Path) -> Tokenizer:
    """transformers' fast-tokenizer conversion of ``tokenizer.model`` (its post-processor included)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise BamError(
            f"{model_dir} has only a SentencePiece {SENTENCEPIECE_FILE}; converting it needs transformers "
            "(pip install 'bam-pipeline[hf]'), or save its tokenizer.json with transformers and add it"
        ) from None
    try:
        fast = AutoTokenizer.from_pretrained(str(model_dir), use_fast=True)
    except Exception as e:  # transformers raises many types (ImportError, ValueError, OSError, ...)
        raise BamError(f"transformers could not convert {model_dir / SENTENCEPIECE_FILE} to a tokenizer.json "
                       f"({_one_line(e)}); install sentencepiece, or add the checkpoint's tokenizer.json") from None
    backend = getattr(fast, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise BamError(f"transformers gave no fast tokenizer for {model_dir / SENTENCEPIECE_FILE}; "
                       "add the checkpoint's tokenizer.json")
    return backend


def load_tokenizer(model_dir: Path) -> tuple[Tokenizer, bool]:
    """The directory's (or GGUF file's) tokenizer, and whether it was converted from SentencePiece."""
    gguf = find_gguf(model_dir)
    if gguf is not None:
        return gguf_tokenizer(gguf), False
    path = model_dir / TOKENIZER_FILE
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path)), False
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise BamError(f"cannot read {path} ({_one_line(e)}); re-download the checkpoint") from None
    if (model_dir / SENTENCEPIECE_FILE).is_file():
        return _convert_sentencepiece(model_dir), True
    raise BamError(f"{model_dir} has no {TOKENIZER_FILE} (nor a SentencePiece {SENTENCEPIECE_FILE}); "
                   "add the checkpoint's tokenizer files")


def _eos_id(eos: object, path: Path, fix: str) -> int | None:
    """An ``eos_token_id`` value as one id (a list's first element), None when unset; refuses a non-id."""
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if isinstance(eos, int) and not isinstance(eos, bool) and eos >= 0:
        return eos
    if eos is not None:
        raise BamError(f"{path} has eos_token_id={eos!r}, not a token id; fix the checkpoint's {fix}")
    return None


def end_of_document_id(model_dir: Path) -> tuple[int, str]:
    """``eos_token_id`` (its first element when a list) and the file it came from."""
    gguf = find_gguf(model_dir)
    if gguf is not None:
        eos = _eos_id(gguf_config(gguf).get("eos_token_id"), gguf, "tokenizer.ggml.eos_token_id")
        if eos is None:
            raise BamError(f"{gguf} names no tokenizer.ggml.eos_token_id in its metadata; name the end-of-document "
                           "token by its text (seed.eos_token)")
        return eos, gguf.name
    for name in EOS_SOURCES:
        path = model_dir / name
        if not path.is_file():
            continue
        try:
            eos = _eos_id(json.loads(path.read_text()).get("eos_token_id"), path, name)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise BamError(f"{path} is not a JSON object ({_one_line(e)}); re-download the checkpoint") from None
        if eos is not None:
            return eos, name
    raise BamError(f"{model_dir} names no eos_token_id in {' or '.join(EOS_SOURCES)}; "
                   "the end-of-document token is taken from the checkpoint, so add it there")


def check_vocabulary(tokenizer: Tokenizer, embedding_rows: int) -> None:
    """Refuse a tokenizer whose largest id has no embedding row (more rows than ids is fine)."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    token, top = max(vocab.items(), key=lambda kv: kv[1])
    if top >= embedding_rows:
        raise BamError(f"tokenizer id {top} ({token!r}) has no row in the model's {embedding_rows}-row embedding; "
                       "the tokenizer does not belong to this checkpoint")


def named_token_id(tokenizer: Tokenizer, token: str, model_dir: Path) -> int:
    """The id of ``token`` (its text) in the checkpoint's tokenizer; a :class:`ConfigError` on ``eos_token``
    naming the tokenizer's special tokens when it has no such token."""
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        special = [t.content for _, t in sorted(tokenizer.get_added_tokens_decoder().items()) if t.special]
        listed = ", ".join(special[:8]) + (", ..." if len(special) > 8 else "") if special else "none"
        raise ConfigError("eos_token", token, f"the tokenizer of {model_dir} has no such token (its special "
                                              f"tokens: {listed}); name one of its tokens, or null for the "
                                              "checkpoint's own")
    return token_id


def load_hf_model_tokenizer(model_dir: Path, embedding_rows: int, eos_token: str | None = None) -> HFModelTokenizer:
    """The directory's tokenizer and end-of-document token, checked against ``embedding_rows``.
    ``eos_token``: the end-of-document token by its text instead of the checkpoint's ``eos_token_id``."""
    tokenizer, converted = load_tokenizer(model_dir)
    check_vocabulary(tokenizer, embedding_rows)
    gguf = find_gguf(model_dir)
    if eos_token is not None:
        eos_id, source, token = named_token_id(tokenizer, eos_token, gguf or model_dir), None, eos_token
    else:
        eos_id, source = end_of_document_id(model_dir)
        token = tokenizer.id_to_token(eos_id)
        if token is None:
            raise BamError(f"eos_token_id={eos_id} from {source} is not a token of the checkpoint's tokenizer; "
                           "the tokenizer does not belong to this checkpoint")
    if gguf is not None:
        files: tuple[Path, ...] = (gguf,)
    else:
        read = (SENTENCEPIECE_FILE, *SENTENCEPIECE_SIDE_FILES, CONFIG_FILE) if converted else (TOKENIZER_FILE,)
        files = tuple(model_dir / f for f in dict.fromkeys((*read, *((source,) if source else ())))
                      if (model_dir / f).is_file())
    return HFModelTokenizer(tokenizer, eos_id, token, source, converted, files)


def encode_documents(tokenizer: Tokenizer, texts: Sequence[str], eos_id: int) -> list[list[int]]:
    """Each text as one document: the tokenizer's encoding with its post-processor (special
    tokens such as a BOS), then ``eos_id`` unless the post-processor already ended with it."""
    out = []
    for enc in tokenizer.encode_batch(list(texts), add_special_tokens=True):
        ids = list(enc.ids)
        if not ids or ids[-1] != eos_id:
            ids.append(eos_id)
        out.append(ids)
    return out
