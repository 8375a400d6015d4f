"""The ``eval:`` config section as one typed, validated spec (defaults in ``conf/eval/default.yaml``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

from bam_pipeline.errors import ConfigError

DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


@dataclass(frozen=True)
class EvalSpec:
    """Which test tokens every model is scored on, in what batches, on which device."""

    max_tokens_per_source: Optional[int]  # test tokens per source and model (null: the whole split)
    batch_size: int  # sequences per forward pass
    seq_len: Optional[int]  # null: each model's max_seq_len
    device: str  # auto = cuda when available, else cpu
    btm: bool  # also score BTM: the seed and the domain experts ensembled at eval (PAPER.md section 10)
    btm_prior_sequences: int  # validation sequences per source that estimate BTM's prior over its models
    resamples: int = 2000  # bootstrap resamples behind every interval of the report (at least 2000)
    # mixtures (labels, e.g. moe/bam) also scored with their soft attention weights forced uniform: is
    # soft attention routing more than averaging the attention experts?
    uniform_attention: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens_per_source is not None and self.max_tokens_per_source <= 0:
            raise ConfigError("max_tokens_per_source", self.max_tokens_per_source, "must be positive or null")
        if self.batch_size < 1:
            raise ConfigError("batch_size", self.batch_size, "must be a positive integer")
        if self.seq_len is not None and self.seq_len < 1:
            raise ConfigError("seq_len", self.seq_len, "must be positive or null (the model's max_seq_len)")
        if self.btm_prior_sequences < 1:
            raise ConfigError("btm_prior_sequences", self.btm_prior_sequences, "must be a positive integer")
        if self.resamples < 2000:
            raise ConfigError("resamples", self.resamples, "use at least 2000 bootstrap resamples for 95% intervals")
        object.__setattr__(self, "uniform_attention", tuple(self.uniform_attention))
        for label in self.uniform_attention:
            if not str(label).startswith(("moe/", "mix/")):
                raise ConfigError("uniform_attention", list(self.uniform_attention),
                                  "name mixtures by label, e.g. [moe/bam]")
        if not DEVICE.match(self.device):
            raise ConfigError("device", self.device, "use auto, cpu, cuda, cuda:<index> or mps")

    def cache_key(self) -> dict[str, Any]:
        """The settings that change results (part of the eval cache key; the device is added apart)."""
        return {"seq_len": self.seq_len, "max_tokens_per_source": self.max_tokens_per_source,
                "batch_size": self.batch_size, "btm_prior_sequences": self.btm_prior_sequences}
