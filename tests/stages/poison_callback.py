"""A Lightning callback that makes one weight NaN right after optimizer step ``step``, as a diverging update
would (given to the CLI with ``+callbacks.poison={_target_:poison_callback.PoisonAfter,step:<n>}``). Lightning
runs checkpoint callbacks last, so the step's periodic checkpoint sees the poisoned weights."""

from __future__ import annotations

import math

import torch
from lightning.pytorch.callbacks import Callback


class PoisonAfter(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.norm.weight[0] = math.nan  # the final norm: every position's logits
