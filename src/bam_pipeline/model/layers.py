"""Building blocks shared by attention and FFN: the norms (RMSNorm, scale-only LayerNorm), rotary
embedding and its frequency scalings, SwiGLU math.

RoPE comes in two layouts of the same rotation. The stored weights (and the reference
:func:`apply_rotary`) use the half-split layout, where frequency ``j`` rotates the pair
``(x[j], x[j + hd/2])``. The fused attention permutes its Q and K weight columns to the
interleaved layout, pair ``j`` at ``(x[2j], x[2j+1])``, and rotates with one complex multiply
(:func:`apply_rotary_interleaved`): one elementwise pass forward and one backward instead of the
half-split's chunk, neg, cat, two muls and an add. The same permutation of the head dims of q and
k leaves every score ``q . k`` unchanged, so the attention output is the same.

Shape legend: B batch, T sequence, N = B*T tokens, D d_model, hd head dim, F SwiGLU hidden width.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BamError
from .config import NO_ROPE_SCALING, ModelConfig, RopeScaling


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale and no bias, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).type_as(x)


class LayerNorm(nn.Module):
    """Mean-centred layer norm with a learned scale and no bias (Cohere's), computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        centred = x32 - x32.mean(-1, keepdim=True)
        normed = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).type_as(x)


def make_norm(cfg: ModelConfig) -> RMSNorm | LayerNorm:
    """The norm ``cfg.norm_kind`` names, over ``d_model`` with ``cfg.norm_eps``."""
    return (RMSNorm if cfg.norm_kind == "rmsnorm" else LayerNorm)(cfg.d_model, cfg.norm_eps)


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling = NO_ROPE_SCALING,
                             dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """RoPE's ``head_dim / 2`` inverse frequencies, rescaled by ``scaling``, computed in ``dtype``.

    Frequency ``j`` is ``theta ** (-2j / head_dim)``; ``linear`` divides all of them by the factor;
    ``llama3`` divides those whose wavelength exceeds ``original / low_freq_factor``, keeps those
    below ``original / high_freq_factor`` and blends the band between (transformers'
    ``_compute_llama3_parameters``, the same operations in the same order).
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=dtype) / head_dim)  # (hd/2,)
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    if scaling.kind == "llama3":
        old_len, low, high = scaling.original_max_seq_len, scaling.low_freq_factor, scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / scaling.factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, blended, scaled)
    return inv_freq


def rotary_tables(
    head_dim: int, max_seq_len: int, theta: float, scaling: RopeScaling = NO_ROPE_SCALING,
    precision: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (max_seq_len, head_dim), float32, in the half-split layout.

    Frequency ``j`` (of ``head_dim / 2``) rotates the pair ``(x[j], x[j + head_dim / 2])``.
    Frequencies, angles and their cos/sin are computed in ``precision``.
    """
    inv_freq = rope_inverse_frequencies(head_dim, theta, scaling, precision)  # (hd/2,)
    angles = torch.outer(torch.arange(max_seq_len, dtype=precision), inv_freq)  # (S, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (S, hd)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, T, heads, hd) by position; ``cos``/``sin`` are (T, hd). Math in float32."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)  # (B, T, heads, hd/2) each
    rotated = torch.cat([-x2, x1], dim=-1)  # (B, T, heads, hd)
    cos = cos[:, None, :]  # (T, 1, hd)
    sin = sin[:, None, :]
    return (x32 * cos + rotated * sin).type_as(x)


def apply_rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, T, heads, hd) in the interleaved layout, pair ``j`` = ``(x[2j], x[2j+1])``,
    by ``cos``/``sin`` half-split tables (their two halves are equal), (T, hd) for positions shared
    by the batch or (B, T, hd) per sequence; float32 math.

    The pair is one complex number and the rotation one complex multiply by ``cos + i sin``.
    """
    B, T, heads, hd = x.shape
    half = hd // 2
    turn = torch.complex(cos[..., None, :half].float(), sin[..., None, :half].float())  # ([B,] T, 1, hd/2)
    pairs = torch.view_as_complex(x.float().reshape(B, T, heads, half, 2))  # (B, T, heads, hd/2)
    return torch.view_as_real(pairs * turn).reshape(B, T, heads, hd).type_as(x)


class RotaryEmbedding(nn.Module):
    """Precomputed RoPE tables up to ``max_seq_len``; non-persistent buffers (not in the state dict)."""

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, head_dim: int, max_seq_len: int, theta: float, scaling: RopeScaling = NO_ROPE_SCALING,
                 precision: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        self._table_args = (head_dim, max_seq_len, theta, scaling, precision)
        cos, sin = rotary_tables(*self._table_args)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @torch.no_grad()
    def reset_tables(self) -> None:
        """Compute the tables into the buffers again: for a loader that allocates buffers empty and fills
        only the state dict (transformers does, for the exported model)."""
        for buffer, table in zip((self.cos, self.sin), rotary_tables(*self._table_args)):
            buffer.copy_(table)

    def tables(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (seq_len, hd) for positions ``0 .. seq_len-1``; refuses too long a sequence."""
        if seq_len > self.max_seq_len:
            raise BamError(
                f"sequence length {seq_len} exceeds the model's max_seq_len={self.max_seq_len}; "
                "use shorter sequences or a config with a larger max_seq_len"
            )
        return self.cos[:seq_len], self.sin[:seq_len]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` (B, T, heads, hd), half-split layout, for positions ``0 .. T-1``."""
        return apply_rotary(x, *self.tables(x.shape[1]))

    def interleaved(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` (B, T, heads, hd), interleaved layout, for positions ``0 .. T-1``."""
        return apply_rotary_interleaved(x, *self.tables(x.shape[1]))

    def interleaved_at(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` (B, T, heads, hd), interleaved layout, token ``(b, t)`` at ``positions[b, t]``
        (B, T) int64, each below ``max_seq_len`` (incremental decoding: every sequence's own positions
        after left padding; :class:`~bam_pipeline.model.kv_cache.KVCache` never exceeds the context)."""
        return apply_rotary_interleaved(x, self.cos[positions], self.sin[positions])  # tables (B, T, hd)


def run_eager(reason: str):
    """``torch.compiler.disable`` as a decorator, with ``reason`` where this torch takes one (newer ones name it
    in Dynamo's graph-break report; the package supports torch 2.5, whose ``disable`` has no such argument)."""
    if "reason" in inspect.signature(torch.compiler.disable).parameters:
        return torch.compiler.disable(reason=reason)
    return torch.compiler.disable(recursive=True)


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on ``x`` run in: autocast's where it is on for ``x``'s device, else ``x``'s.

    Under ``bf16-mixed`` training the residual stream is float32 while every matmul runs in
    bfloat16. A block casts its normed input to this dtype once, so its projections share one copy
    instead of autocast casting it for each; ``grouped_mm`` is not on autocast's cast lists, so the
    grouped MoE path casts its weights to it itself.
    """
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One SwiGLU expert: ``(silu(x @ w1) * (x @ w3)) @ w2`` for x (N, D), w1/w3 (D, F), w2 (F, D)."""
    return (F.silu(x @ w1) * (x @ w3)) @ w2
