"""One call from a local Hugging Face checkpoint to our dense model: a model directory (config mapped,
safetensors weights streamed into our layout) or a GGUF file (config, weights dequantised by transformers
and tokenizer read through transformers, then the same mapping); the files read listed (for a manifest's
hashes). Back out is :mod:`~bam_pipeline.interop.hf_export`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bam_pipeline.interop.hf_config import CONFIG_FILE, read_config_file, to_model_config
from bam_pipeline.interop.hf_gguf import find_gguf, gguf_config, gguf_contents, read_gguf_tensors
from bam_pipeline.interop.hf_weights import convert_weights, read_weights, weight_files
from bam_pipeline.model.state_dict import StateDict
from bam_pipeline.model.config import ModelConfig


@dataclass(frozen=True)
class ImportedHFModel:
    """A converted Hugging Face model: the path it was given (a directory, or a GGUF file or its directory),
    its architecture's name, our config and state dict, the files read, the config's bookkeeping fields
    (transformers' ``_`` fields and special-token ids, recorded, not used) and, for a GGUF file, how many
    tensors it stored in each ggml type."""

    hf_model_dir: Path
    architecture: str
    config: ModelConfig
    state_dict: StateDict
    files: tuple[Path, ...]
    bookkeeping: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, int] | None = None  # GGUF only: ggml type -> tensors stored in it

    @property
    def format(self) -> str:
        return "safetensors" if self.quantization is None else "gguf"


def checkpoint_config(path: Path) -> dict[str, Any]:
    """The config of the checkpoint at ``path``: its ``config.json``, or the one transformers builds from a
    GGUF file's metadata (see :func:`~bam_pipeline.interop.hf_gguf.find_gguf` for which paths are GGUF)."""
    gguf = find_gguf(path)
    return gguf_config(gguf) if gguf is not None else read_config_file(path)


def import_hf_model(hf_model_dir: str | Path, *, dtype: torch.dtype | None = None, max_seq_len: int | None = None,
                    name: str = "hf") -> ImportedHFModel:
    """Convert the Hugging Face checkpoint at ``hf_model_dir``: a local model directory (see
    :func:`~bam_pipeline.interop.hub.resolve_hf_model_dir` for hub ids), a GGUF file, or a directory
    holding one GGUF file and no config.json.

    ``dtype``: the weights' dtype in our state dict (default: the dtype it stores them in; float32 for a
    GGUF file, which transformers dequantises to float32). ``max_seq_len``: the context the model runs at
    (default: its ``max_position_embeddings``). ``name``: the :class:`ModelConfig` name. Raises
    :class:`~bam_pipeline.errors.BamError` with one line for anything it cannot convert exactly, before
    reading any weight where it can tell (a :class:`~bam_pipeline.errors.ConfigError` on ``dtype`` for a
    weight that dtype cannot hold). The config is ``config.json``'s, with the head untied where
    transformers unties it.
    """
    hf_model_dir = Path(hf_model_dir)
    gguf = find_gguf(hf_model_dir)
    if gguf is not None:
        contents = gguf_contents(gguf)  # refuses a type transformers cannot dequantise, before reading any
        mapped = to_model_config(gguf_config(gguf), max_seq_len=max_seq_len, name=name)
        config, state = convert_weights(read_gguf_tensors(gguf), gguf, mapped.model, mapped.architecture, dtype)
        return ImportedHFModel(hf_model_dir, mapped.architecture.name, config, state, (gguf,), mapped.bookkeeping,
                               contents.quantization)
    mapped = to_model_config(read_config_file(hf_model_dir), max_seq_len=max_seq_len, name=name)
    files = weight_files(hf_model_dir)
    config, state = read_weights(files, mapped.model, mapped.architecture, dtype)
    return ImportedHFModel(hf_model_dir, mapped.architecture.name, config, state,
                           (hf_model_dir / CONFIG_FILE, *files.paths), mapped.bookkeeping)
