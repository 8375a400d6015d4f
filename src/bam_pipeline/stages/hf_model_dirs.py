"""The Hugging Face model directories a run reads (``seed.path``, ``branch.<domain>.path``): resolved
once per command (a hub id downloaded), their architecture, and their tokenizer in the form a run uses;
under ``seed=hf`` the data stage tokenises with the seed's. Importing one as an artifact is
:mod:`bam_pipeline.stages.imports`."""

from __future__ import annotations

import functools
from typing import Any

from bam_pipeline.data.tokenizer import SeedTokenizer, as_run_tokenizer
from bam_pipeline.errors import BamError
from bam_pipeline.interop.hf_config import CONFIG_FILE, read_config_file, to_model_config
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
    """Size and modification time of every file of the directory: what changes when it does."""
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(src.path.iterdir()) if p.is_file()}


def hf_dense_config(ref: HFModelRef, max_seq_len: int) -> ModelConfig:
    """The model's dense architecture (from its config.json), running at ``max_seq_len``."""
    src = resolve(ref)
    return to_model_config(read_config_file(src.path), max_seq_len=max_seq_len, name=short_name(ref)).model


def short_name(ref: HFModelRef) -> str:
    return str(ref.path).rstrip("/").split("/")[-1]


def hf_model_tokenizer(ref: HFModelRef) -> SeedTokenizer:
    """The model's tokenizer in the form a run uses, with its end-of-document token and identity."""
    src = resolve(ref)
    rows = read_config_file(src.path).get("vocab_size")
    if not isinstance(rows, int):
        raise BamError(f"{src.path / CONFIG_FILE} has no integer vocab_size; re-download the checkpoint")
    tok = load_hf_model_tokenizer(src.path, rows)
    identity = {**source_record(ref, src), "files": {f.name: sha256_file(f) for f in tok.files}, "eos_id": tok.eos_id,
                "eos_token": tok.eos_token, "converted_from_sentencepiece": tok.converted_from_sentencepiece}
    return SeedTokenizer(as_run_tokenizer(tok.tokenizer), tok.eos_id, tok.eos_token, identity)


def seed_tokenizer(ctx: RunContext) -> SeedTokenizer | None:
    """The imported seed's tokenizer under ``seed=hf`` (the data stage tokenises with it), else None."""
    return hf_model_tokenizer(ctx.seed.hf_model) if ctx.seed.kind == "hf" else None
