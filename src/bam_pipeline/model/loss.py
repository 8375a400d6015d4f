"""The language-model objective: next-token negative log-likelihood, in one function that training,
evaluation and the tests share."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def next_token_nll(logits: torch.Tensor, targets: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """NLL (nats, float32) of ``targets`` (B, T) under ``logits`` (B, T, V); positions whose target
    is ``IGNORE_INDEX`` are left out. ``reduction`` is ``mean`` (per predicted token), ``sum``, or ``none``
    (one value per position, (B*T,), 0 at ignored positions)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction=reduction)
