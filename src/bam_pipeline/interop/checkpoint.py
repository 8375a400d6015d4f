"""One call from a local Hugging Face checkpoint directory to our dense model: config mapped,
weights streamed into our layout, files read listed (for a manifest's hashes)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from bam_pipeline.interop.hf_config import CONFIG_FILE, read_config_file, to_model_config
from bam_pipeline.interop.hf_weights import read_weights, weight_files
from bam_pipeline.mixing.upcycle import StateDict
from bam_pipeline.model.config import ModelConfig


@dataclass(frozen=True)
class HFCheckpoint:
    """A converted checkpoint: its architecture's name, our config and state dict, the files read."""

    path: Path
    architecture: str
    config: ModelConfig
    state_dict: StateDict
    files: tuple[Path, ...]


def import_checkpoint(model_dir: str | Path, *, dtype: torch.dtype | None = None, max_seq_len: int | None = None,
                      name: str = "hf") -> HFCheckpoint:
    """Convert the checkpoint in ``model_dir`` (a local directory, see
    :func:`~bam_pipeline.interop.hub.resolve_checkpoint` for hub ids).

    ``dtype``: the weights' dtype in our state dict (default: the checkpoint's). ``max_seq_len``:
    the context the model runs at (default: the checkpoint's ``max_position_embeddings``).
    ``name``: the :class:`ModelConfig` name. Raises :class:`~bam_pipeline.errors.BamError` with one
    line for anything it cannot convert exactly, before reading any weight where it can tell (a
    :class:`~bam_pipeline.errors.ConfigError` on ``dtype`` for a weight that dtype cannot hold).
    The config is ``config.json``'s, with the head untied where transformers unties it.
    """
    model_dir = Path(model_dir)
    mapped = to_model_config(read_config_file(model_dir), max_seq_len=max_seq_len, name=name)
    files = weight_files(model_dir)
    config, state = read_weights(files, mapped.model, mapped.architecture, dtype)
    return HFCheckpoint(model_dir, mapped.architecture.name, config, state,
                        (model_dir / CONFIG_FILE, *files.paths))
