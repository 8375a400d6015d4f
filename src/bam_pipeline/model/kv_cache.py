"""The key/value cache of incremental decoding: every layer's rotated keys and values for a batch
of sequences, preallocated up to a capacity, and the positions and attention mask of each step.

A layer caches the K/V heads its fused attention computes (:mod:`~bam_pipeline.model.attention`):
``E_kv * KV`` heads, i.e. one K/V set per attention expert under expert KV and **one per layer**
under shared KV (and for a single attention expert, as in dense models and BTX). That is the
paper's inference argument for shared KV, and :meth:`KVCache.bytes_per_token` measures it from
the tensors themselves.

Batches are left-padded: ``valid`` marks the real tokens. A token's rotary position is the number
of real tokens before it in its own sequence, so a padded sequence is computed as if it were
alone. A query attends to the real tokens at or before it; a padding query attends to itself only
(every row of the mask has one allowed key, so no softmax row is empty and no NaN can reach the
real tokens through the cached values).

Shape legend: B batch, T new tokens of a step, S = start + T cached positions after the step,
C capacity, n_kv = E_kv * KV cached heads per layer, hd head dim.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..errors import BamError
from .config import ModelConfig


class DecodeStep(NamedTuple):
    """Where the T tokens of one forward call go: after ``start`` cached positions."""

    start: int
    positions: torch.Tensor  # (B, T) int64 rotary position of each new token
    mask: torch.Tensor  # (B, 1, T, S) bool, True where a new token may attend


class LayerKV(NamedTuple):
    """One layer's cache tensors and the current step (what its attention reads and writes)."""

    keys: torch.Tensor  # (B, n_kv, C, hd)
    values: torch.Tensor  # (B, n_kv, C, hd)
    step: DecodeStep

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the step's ``k``, ``v`` (B, n_kv, T, hd); returns every cached key and value
        up to and including them, (B, n_kv, S, hd) each (views of the cache)."""
        start, end = self.step.start, self.step.start + k.shape[2]
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        return self.keys[:, :, :end], self.values[:, :, :end]


class KVCache:
    """Keys and values of every layer of one model for ``batch`` sequences of up to ``capacity``
    positions (prompt padding included), allocated once."""

    def __init__(self, cfg: ModelConfig, batch: int, capacity: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        if not 0 < capacity <= cfg.max_seq_len:
            raise BamError(
                f"a KV cache of {capacity} positions does not fit the model's context of max_seq_len="
                f"{cfg.max_seq_len}; shorten the prompt or generate fewer new tokens"
            )
        n_kv = cfg.kv_experts * cfg.n_kv_heads
        shape = (batch, n_kv, capacity, cfg.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)  # (B, C)
        self.capacity = capacity
        self.length = 0

    @classmethod
    def for_model(cls, model: nn.Module, batch: int, capacity: int) -> "KVCache":
        """A cache for ``model`` (a :class:`~bam_pipeline.model.BAMTransformer`) in its dtype and device."""
        weight = model.tok_emb.weight
        return cls(model.cfg, batch, capacity, dtype=weight.dtype, device=weight.device)

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    def advance(self, valid: torch.Tensor) -> DecodeStep:
        """Register T new tokens, ``valid`` (B, T) bool marking the real ones (False: left padding),
        and return their step: positions and attention mask over every cached position."""
        batch, n_new = valid.shape
        start, end = self.length, self.length + n_new
        if batch != self.batch:
            raise BamError(f"a step of {batch} sequences does not fit a KV cache of {self.batch}; "
                           "start a new cache for a new batch")
        if end > self.capacity:
            raise BamError(f"{n_new} more tokens after {start} exceed the KV cache's capacity of {self.capacity} "
                           "positions; allocate the cache for the prompt plus every new token")
        self.valid[:, start:end] = valid
        seen = self.valid[:, :end]  # (B, S)
        positions = (seen.long().cumsum(-1) - 1).clamp(min=0)[:, start:end]  # (B, T)
        query = torch.arange(start, end, device=valid.device)[:, None]  # (T, 1)
        key = torch.arange(end, device=valid.device)[None, :]  # (1, S)
        mask = (key <= query) & (seen[:, None, :] | (key == query))  # (B, T, S)
        self.length = end
        return DecodeStep(start, positions, mask[:, None])

    def layer(self, index: int, step: DecodeStep) -> LayerKV:
        """Layer ``index``'s cache for ``step``."""
        return LayerKV(self.keys[index], self.values[index], step)

    @property
    def nbytes(self) -> int:
        """Bytes held by the key and value tensors of every layer."""
        return sum(t.nbytes for t in (*self.keys, *self.values))

    def bytes_per_token(self) -> float:
        """Cache bytes per cached token of one sequence, from the tensors: ``nbytes / (B * C)``."""
        return self.nbytes / (self.batch * self.capacity)
