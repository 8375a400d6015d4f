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
    """Seconds spent in training steps, validation and checkpoint writing during one fit, and the training
    tokens/s (and MFU where a peak is known) of each logging window put into ``pl_module.last_train``.

    No host sync per step: a step's time is taken on the host, and the device is waited for only where a
    window of ``log_every`` optimizer steps closes (the step that logs, and before a validation), its queued
    work then counted in that window. On a CPU that is each step's own time, as before.

    It must come before the callback that writes the train log (that one reads ``last_train``).
    """

    def __init__(self, tokens_per_batch: int, train_flops_per_token: float, peak: float | None,
                 log_every: int = 1) -> None:
        self.tokens_per_batch = tokens_per_batch  # every process's micro-batch tokens together
        self.flops_per_token = train_flops_per_token
        self.peak = peak
        self.log_every = log_every
        self.seconds = {"train": 0.0, "validation": 0.0, "checkpoint": 0.0}
        self._t0: float | None = None
        self._window = [0.0, 0]  # seconds, tokens since the last logging step

    def _sync(self, trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        closes = (batch_idx + 1) % trainer.accumulate_grad_batches == 0 and (
            step % self.log_every == 0 or step == trainer.max_steps)
        if closes:
            self._sync(trainer)  # the window's queued device work, counted in it
        self._add_step()
        if closes:
            seconds, tokens = self._window
            self._window = [0.0, 0]
            if seconds > 0:
                tok_s = tokens / seconds
                pl_module.last_train["tokens_per_s"] = tok_s
                pl_module.log("tok_s", tok_s)
                if self.peak is not None:
                    util = mfu(tok_s, self.flops_per_token, self.peak, trainer.world_size)
                    pl_module.last_train["mfu"] = util
                    pl_module.log("mfu", util)

    def _add_step(self) -> None:
        dt = time.perf_counter() - self._t0
        self.seconds["train"] += dt
        self._window[0] += dt
        self._window[1] += self.tokens_per_batch

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.training:
            self._sync(trainer)  # training's queued work belongs to training, not to the validation
        self._t0 = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        self._sync(trainer)
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
