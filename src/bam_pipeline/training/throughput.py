"""Where a training stage's wall time goes, and how fast its training steps are.

:class:`PhaseTimer` splits a fit into training steps (from a batch's start to its end: forward,
backward, optimizer step), validation and checkpoint writing; the job adds publishing. Training
tokens/s counts training steps only, so validation and checkpoints no longer dilute it. On GPUs
(or wherever ``train.peak_tflops`` is set) it also logs model FLOPs utilisation: the training FLOPs
of the tokens processed over the peak of every device taking part
(:func:`bam_pipeline.model.counting.mfu`, its table of known devices).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from bam_pipeline.model.counting import device_peak_tflops, mfu


def peak_tflops(override: float | None) -> float | None:
    """Peak TFLOP/s of one device of this process: ``override`` (``train.peak_tflops``), else the
    table's figure for this GPU, else None (a CPU or a GPU not in the table: no MFU logged)."""
    if override is not None:
        return override
    return device_peak_tflops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None


class PhaseTimer(Callback):
    """Seconds spent in training steps, validation and checkpoint writing during one fit, and each
    step's training tokens/s (and MFU where a peak is known) put into ``pl_module.last_train``.

    It must come before the callback that writes the train log (that one reads ``last_train``).
    """

    def __init__(self, tokens_per_batch: int, train_flops_per_token: float, peak: float | None) -> None:
        self.tokens_per_batch = tokens_per_batch  # every process's micro-batch tokens together
        self.flops_per_token = train_flops_per_token
        self.peak = peak
        self.seconds = {"train": 0.0, "validation": 0.0, "checkpoint": 0.0}
        self._t0: float | None = None

    def _sync(self, trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(trainer)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(trainer)
        dt = time.perf_counter() - self._t0
        self.seconds["train"] += dt
        tok_s = self.tokens_per_batch / dt
        pl_module.last_train["tokens_per_s"] = tok_s
        pl_module.log("tok_s", tok_s, prog_bar=True)
        if self.peak is not None:
            util = mfu(tok_s, self.flops_per_token, self.peak, trainer.world_size)
            pl_module.last_train["mfu"] = util
            pl_module.log("mfu", util)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        self.seconds["validation"] += time.perf_counter() - self._t0

    def add_checkpoint(self, seconds: float) -> None:
        self.seconds["checkpoint"] += seconds

    def split(self, total: float, publish: float) -> dict[str, Any]:
        """The manifest's wall-time split: train, validation, checkpoint, publish and the rest
        (start-up, data loading, process launch) of ``total`` seconds."""
        parts = {f"{k}_s": round(v, 2) for k, v in self.seconds.items()}
        parts["publish_s"] = round(publish, 2)
        parts["other_s"] = round(max(0.0, total - sum(self.seconds.values()) - publish), 2)
        parts["total_s"] = round(total, 2)
        return parts
