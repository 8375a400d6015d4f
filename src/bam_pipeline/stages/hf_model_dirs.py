"""The Hugging Face model directories (or GGUF files) a run reads (``seed.path``, ``branch.<domain>.path``):
resolved once per command (a hub id downloaded), their architecture, and their tokenizer in the form a run
uses; under ``seed=hf`` the data stage tokenises with the seed's, ending documents with ``seed.eos_token``
where it is set. Importing one as an artifact is :mod:`bam_pipeline.stages.imports`."""

from __future__ import annotations

import functools
from typing import Any

from bam_pipeline.data.tokenizer import SeedTokenizer, as_run_tokenizer
from bam_pipeline.errors import BamError, ConfigError
from bam_pipeline.interop.hf_config import to_model_config
from bam_pipeline.interop.hf_import import checkpoint_config
from bam_pipeline.interop.hf_tokenizer import load_hf_model_tokenizer
from bam_pipeline.interop.hub import HFModelDir, resolve_hf_model_dir
from bam_pipeline.model.config import ModelConfig
from bam_pipeline.stages.context import HFModelRef, RunContext
from bam_pipeline.store.files import sha256_file


@functools.lru_cache(maxsize=None)
def resolve(ref: HFModelRef) -> HFModelDir:
    """The model's local directory (a hub id downloaded once per command) and the commit it is at."""
    return resolve_hf_model_dir(str(ref.path), ref.revision)


def source_record(ref: HFModelRef, src: HFModelDir) -> dict[str, Any]:
    return {"given": ref.path, "path": str(src.path), "repo_id": src.repo_id, "revision": src.revision}


def fingerprint(src: HFModelDir) -> dict[str, list[int]]:
    """Size and modification time of every file of the directory (of the file, for a GGUF file): what changes
    when it does."""
    files = [src.path] if src.path.is_file() else sorted(p for p in src.path.iterdir() if p.is_file())
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}


def hf_dense_config(ref: HFModelRef, max_seq_len: int) -> ModelConfig:
    """The model's dense architecture (from its config.json or GGUF metadata), running at ``max_seq_len``."""
    src = resolve(ref)
    return to_model_config(checkpoint_config(src.path), max_seq_len=max_seq_len, name=short_name(ref)).model


def short_name(ref: HFModelRef) -> str:
    """The model's name in messages and the report: the last part of its path or hub id (a GGUF file's stem)."""
    return str(ref.path).rstrip("/").split("/")[-1].removesuffix(".gguf")


@functools.lru_cache(maxsize=None)
def hf_model_tokenizer(ref: HFModelRef, eos_token: str | None = None) -> SeedTokenizer:
    """The model's tokenizer in the form a run uses, with its end-of-document token (``eos_token`` by its
    text, else the checkpoint's) and identity; built once per command (its files' sha256 are read once)."""
    src = resolve(ref)
    rows = checkpoint_config(src.path).get("vocab_size")
    if not isinstance(rows, int):
        raise BamError(f"the config of {src.path} has no integer vocab_size; re-download the checkpoint")
    tok = load_hf_model_tokenizer(src.path, rows, eos_token)
    identity = {**source_record(ref, src), "files": {f.name: sha256_file(f) for f in tok.files}, "eos_id": tok.eos_id,
                "eos_token": tok.eos_token, "converted_from_sentencepiece": tok.converted_from_sentencepiece}
    return SeedTokenizer(as_run_tokenizer(tok.tokenizer), tok.eos_id, tok.eos_token, identity)


def seed_tokenizer(ctx: RunContext) -> SeedTokenizer | None:
    """The imported seed's tokenizer under ``seed=hf`` (the data stage tokenises with it), else None."""
    if ctx.seed.kind != "hf":
        return None
    try:
        return hf_model_tokenizer(ctx.seed.hf_model, ctx.seed.eos_token)
    except ConfigError as e:  # seed.eos_token names no token of the checkpoint's tokenizer
        raise e.under("seed") from None
