"""The ``train:`` and ``trainer:`` config sections as typed, validated specs (defaults live in
``conf/config.yaml`` and ``conf/trainer/``); :mod:`~bam_pipeline.training.parallel` builds the
Lightning strategy a :class:`TrainerSpec` names."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

from bam_pipeline.errors import ConfigError
from bam_pipeline.model.loss import LossChunking
from bam_pipeline.training.ranks import check_trainer, world_size


@dataclass(frozen=True)
class TrainSettings:
    """Optimiser, batch layout and bookkeeping shared by every training stage."""

    seed: int  # RNG seed for init, data order and routers
    seq_len: int
    batch_size: int  # sequences per device per step
    accumulate: int
    lr: float  # the seed's (pretraining) peak learning rate
    branch_lr_scale: float
    moe_lr_scale: float
    warmup_frac: float
    warmup_steps_max: int
    min_lr_ratio: float
    weight_decay: float
    betas: tuple[float, float]
    grad_clip: float
    val_every: int
    val_tokens: int
    log_every: int
    num_workers: int
    keep_host_memory: bool
    chunked_loss_above: int  # vocabulary x tokens per micro-batch above which the LM loss is chunked
    loss_chunk_logits: int  # logits one chunk of the chunked loss holds
    compile: bool  # transformer blocks under torch.compile
    peak_tflops: Optional[float]  # one device's peak for model FLOPs utilisation (null: the known-device table)
    moe_dispatch: str = "auto"  # MoE experts: grouped_mm, the loop, or auto (a probe on CUDA: training/dispatch.py)

    def __post_init__(self) -> None:
        positive = ("seq_len", "batch_size", "accumulate", "val_every", "log_every", "warmup_steps_max")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(key, getattr(self, key), "must be a positive integer")
        for key in ("lr", "branch_lr_scale", "moe_lr_scale"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(key, value, "must be a positive number")
        for key in ("warmup_frac", "min_lr_ratio"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(key, getattr(self, key), "must be a fraction in [0, 1]")
        for key in ("weight_decay", "grad_clip"):
            if not getattr(self, key) >= 0:
                raise ConfigError(key, getattr(self, key), "must be >= 0 (0: none)")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError("betas", list(self.betas), "must be two numbers in [0, 1), e.g. [0.9, 0.95]")
        if self.val_tokens < 0:
            raise ConfigError("val_tokens", self.val_tokens, "must be >= 0 (0: no validation)")
        if 0 < self.val_tokens < self.seq_len + 1:
            raise ConfigError("val_tokens", self.val_tokens,
                              f"must be 0 (no validation) or at least one sequence (seq_len + 1 = {self.seq_len + 1})")
        if self.num_workers < 0:
            raise ConfigError("num_workers", self.num_workers, "must be >= 0")
        if self.chunked_loss_above < 0:
            raise ConfigError("chunked_loss_above", self.chunked_loss_above, "must be >= 0 (0: always chunk)")
        if self.peak_tflops is not None and not (math.isfinite(self.peak_tflops) and self.peak_tflops > 0):
            raise ConfigError("peak_tflops", self.peak_tflops, "must be a positive number of TFLOP/s, or null")
        if self.moe_dispatch not in ("auto", "grouped", "loop"):
            raise ConfigError("moe_dispatch", self.moe_dispatch, "use auto (measure on the first CUDA step), "
                                                                 "grouped or loop")
        if self.loss_chunk_logits < 1:
            raise ConfigError("loss_chunk_logits", self.loss_chunk_logits, "must be a positive number of logits")

    @property
    def loss_chunking(self) -> LossChunking:
        """When training and eval compute the LM loss in chunks (:mod:`bam_pipeline.model.loss`)."""
        return LossChunking(above=self.chunked_loss_above, chunk_logits=self.loss_chunk_logits)

    @property
    def sequences_per_step(self) -> int:
        """Sequences per optimizer step on one device."""
        return self.batch_size * self.accumulate


STRATEGIES = ("auto", "ddp", "fsdp", "fsdp2")
SHARDED = ("fsdp", "fsdp2")
FSDP2_PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")


@dataclass(frozen=True)
class TrainerSpec:
    """The ``trainer:`` section: devices, processes, precision, strategy and per-block checkpointing."""

    accelerator: str
    devices: Any  # an integer, a list or comma-separated string of device ids, or auto / -1
    num_nodes: int
    strategy: str
    precision: str
    activation_checkpointing: bool

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError("strategy", self.strategy, f"use one of {', '.join(STRATEGIES)}")
        check_trainer(self.flags(), here=False)
        if self.strategy == "fsdp2" and self.precision not in FSDP2_PRECISIONS:
            raise ConfigError("precision", self.precision, f"use one of {', '.join(FSDP2_PRECISIONS)} with fsdp2")

    def flags(self) -> dict[str, Any]:
        """The Lightning Trainer flags that need no object: accelerator, devices, nodes, precision."""
        return {k: getattr(self, k) for k in ("accelerator", "devices", "num_nodes", "precision")}

    @property
    def world_size(self) -> int:
        return world_size(self.flags())

    @property
    def sharded(self) -> bool:
        """Parameters, gradients and optimizer state sharded over the processes (fsdp, fsdp2)."""
        return self.strategy in SHARDED

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
