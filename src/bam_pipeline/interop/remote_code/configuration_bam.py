"""The configuration of a bam-pipeline model for transformers: under ``model``, every field of its
``ModelConfig`` (``config.py`` beside this file, which checks them); transformers' size names read it."""

from __future__ import annotations

import dataclasses
from typing import Any

try:
    from transformers import PreTrainedConfig
except ImportError:  # transformers < 5.1 spells it PretrainedConfig
    from transformers import PretrainedConfig as PreTrainedConfig

from .config import ModelConfig

SIZE_NAMES = {"vocab_size": "vocab_size", "hidden_size": "d_model", "num_hidden_layers": "n_layers",
              "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads", "intermediate_size": "d_ff",
              "max_position_embeddings": "max_seq_len", "tie_word_embeddings": "tie_embeddings"}


class BamConfig(PreTrainedConfig):
    model_type = "bam"

    def __init__(self, model: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.model = dataclasses.asdict(ModelConfig.from_dict(model or {}))
        super().__init__(**kwargs)

    def __getattr__(self, name: str) -> Any:
        if name in SIZE_NAMES and "model" in self.__dict__:
            return self.model[SIZE_NAMES[name]]
        raise AttributeError(name)
