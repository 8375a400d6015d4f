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
from bam_pipeline.ranks import DEFAULT_TIMEOUT_S, check_trainer, world_size


@dataclass(frozen=True)
class TrainSettings:
    """Optimiser, batch layout and bookkeeping shared by every training stage."""

    seed: int  # RNG seed for init, data order and routers
    seq_len: int
    batch_size: int  # sequences per device per micro-batch (a memory setting: the global batch sets the math)
    global_batch_tokens: Optional[int]  # tokens per optimizer step over every device (None: one micro-batch)
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
        positive = ("seq_len", "batch_size", "val_every", "log_every", "warmup_steps_max")
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
        g = self.global_batch_tokens
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < self.seq_len or g % self.seq_len):
            whole = max(1, round(g / self.seq_len)) * self.seq_len if isinstance(g, (int, float)) else self.seq_len
            raise ConfigError("global_batch_tokens", g, f"must be a whole number of sequences of seq_len="
                                                        f"{self.seq_len} tokens, e.g. {whole}; or null (one micro-batch)")

    @property
    def loss_chunking(self) -> LossChunking:
        """When training and eval compute the LM loss in chunks (:mod:`bam_pipeline.model.loss`)."""
        return LossChunking(above=self.chunked_loss_above, chunk_logits=self.loss_chunk_logits)

    @property
    def step_tokens(self) -> int:
        """Tokens per optimizer step over every device: ``global_batch_tokens``, or one micro-batch of one
        device where that is null (what a one-device run without accumulation trains)."""
        return self.global_batch_tokens if self.global_batch_tokens is not None else self.batch_size * self.seq_len

    @property
    def step_sequences(self) -> int:
        """Sequences per optimizer step over every device."""
        return self.step_tokens // self.seq_len

    def split(self, devices: int) -> "BatchSplit":
        """How ``devices`` processes train :attr:`step_tokens` a step (micro-batch and accumulation); a
        ConfigError saying what to change where they cannot."""
        try:
            return split_batch(self.step_sequences, self.batch_size, devices, self.seq_len)
        except ConfigError as e:
            if self.global_batch_tokens is not None:
                raise
            raise ConfigError("global_batch_tokens", None, f"null, so one micro-batch of one device "
                                                           f"({self.step_tokens} tokens) a step: {e.problem}") from None


@dataclass(frozen=True)
class BatchSplit:
    """One optimizer step's global batch split over ``devices`` processes, each accumulating ``accumulate``
    micro-batches of ``micro_batch`` sequences of ``seq_len`` tokens."""

    devices: int
    micro_batch: int
    accumulate: int
    seq_len: int

    @property
    def step_sequences(self) -> int:
        return self.devices * self.micro_batch * self.accumulate

    @property
    def routing_batch(self) -> int:
        """Sequences one forward sees over every device: what MoE load-balancing statistics are taken over."""
        return self.devices * self.micro_batch

    def to_dict(self) -> dict[str, int]:
        return {"global_batch_tokens": self.step_sequences * self.seq_len, "devices": self.devices,
                "batch_size": self.micro_batch, "accumulate": self.accumulate}


def _divisors(n: int, up_to: int) -> list[int]:
    """The divisors of ``n`` no larger than ``up_to``, ascending."""
    return [d for d in range(1, up_to + 1) if n % d == 0]


def split_batch(step_sequences: int, batch_size: int, devices: int, seq_len: int) -> BatchSplit:
    """``step_sequences`` sequences a step over ``devices`` processes, in micro-batches of ``batch_size``
    sequences, or of a device's whole share where that is smaller (``batch_size`` bounds a forward's memory;
    the global batch is the math). Every device takes the same whole number of micro-batches, or a ConfigError
    (on ``global_batch_tokens``) names the settings that would divide evenly."""
    tokens = step_sequences * seq_len
    if step_sequences % devices:
        fits = _divisors(step_sequences, step_sequences)
        raise ConfigError("global_batch_tokens", tokens,
                          f"its {step_sequences} sequences of {seq_len} tokens do not split evenly over {devices} "
                          f"devices; run on a device count that divides {step_sequences} "
                          f"({', '.join(map(str, fits[:6]))}{', ...' if len(fits) > 6 else ''}) or set "
                          f"train.global_batch_tokens to a multiple of {devices * seq_len} ({devices} devices x "
                          f"{seq_len} tokens)")
    per_device = step_sequences // devices
    micro = min(batch_size, per_device)
    if per_device % micro:
        fits = _divisors(per_device, micro)
        raise ConfigError("global_batch_tokens", tokens,
                          f"gives {per_device} sequences per device per step on {devices} device(s), which "
                          f"micro-batches of train.batch_size={batch_size} do not divide; set train.batch_size to "
                          f"a divisor of {per_device} (e.g. {fits[-1]}) or train.global_batch_tokens to a multiple "
                          f"of {batch_size * devices * seq_len}")
    return BatchSplit(devices, micro, per_device // micro, seq_len)


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
    collective_timeout_s: float = DEFAULT_TIMEOUT_S  # the process group's timeout: every wait on another rank

    def __post_init__(self) -> None:
        if isinstance(self.collective_timeout_s, bool) or not isinstance(self.collective_timeout_s, (int, float)) \
                or not self.collective_timeout_s > 0:
            raise ConfigError("collective_timeout_s", self.collective_timeout_s,
                              "must be a positive number of seconds (how long a rank waits for the others)")
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
