"""One call from a local Hugging Face model directory to our dense model: config mapped, weights
streamed into our layout, files read listed (for a manifest's hashes). Back out is
:mod:`~bam_pipeline.interop.hf_export`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from bam_pipeline.interop.hf_config import CONFIG_FILE, read_config_file, to_model_config
from bam_pipeline.interop.hf_weights import read_weights, weight_files
from bam_pipeline.model.state_dict import StateDict
from bam_pipeline.model.config import ModelConfig


@dataclass(frozen=True)
class ImportedHFModel:
    """A converted Hugging Face model: its directory, its architecture's name, our config and state
    dict, the files read."""

    hf_model_dir: Path
    architecture: str
    config: ModelConfig
    state_dict: StateDict
    files: tuple[Path, ...]


def import_hf_model(hf_model_dir: str | Path, *, dtype: torch.dtype | None = None, max_seq_len: int | None = None,
                    name: str = "hf") -> ImportedHFModel:
    """Convert the Hugging Face model in ``hf_model_dir`` (a local directory, see
    :func:`~bam_pipeline.interop.hub.resolve_hf_model_dir` for hub ids).

    ``dtype``: the weights' dtype in our state dict (default: the dtype it stores them in). ``max_seq_len``:
    the context the model runs at (default: its ``max_position_embeddings``).
    ``name``: the :class:`ModelConfig` name. Raises :class:`~bam_pipeline.errors.BamError` with one
    line for anything it cannot convert exactly, before reading any weight where it can tell (a
    :class:`~bam_pipeline.errors.ConfigError` on ``dtype`` for a weight that dtype cannot hold).
    The config is ``config.json``'s, with the head untied where transformers unties it.
    """
    hf_model_dir = Path(hf_model_dir)
    mapped = to_model_config(read_config_file(hf_model_dir), max_seq_len=max_seq_len, name=name)
    files = weight_files(hf_model_dir)
    config, state = read_weights(files, mapped.model, mapped.architecture, dtype)
    return ImportedHFModel(hf_model_dir, mapped.architecture.name, config, state,
                           (hf_model_dir / CONFIG_FILE, *files.paths))
