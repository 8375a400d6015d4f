"""Mixture of Attention (BAM): E attention experts computed in one fused attention call.

E = 1 is plain grouped-query attention with no router. With E > 1 a router
(:mod:`~bam_pipeline.model.routing`) on the normed input gives each expert a gate and the output is
``sum_e gate_e * Attn_e(h)``:
- ``soft`` (BAM default): ``gate = softmax(router(h))``, every expert used;
- ``topk``: ``gate_e = probs_e`` for the k chosen experts and 0 otherwise. The gate is the full
  softmax probability, *not* renormalised over the chosen experts (as BAM's FFN gate): with
  renormalisation top-1 gates would be constantly 1 and the router would get no gradient.
  All E experts are still computed and the unchosen ones are zero-weighted (correct, not cheaper).

Fusion: E experts x H heads is one attention with E*H query heads. Expert KV gives E*KV K/V heads
(head order expert-major, so GQA groups stay inside their expert); shared KV gives KV heads shared
by E*H query heads, with query heads ordered (kv head, expert, head in group) so that
``scaled_dot_product_attention(enable_gqa=True)``'s grouping (query head i -> kv head i // group)
pairs each query head with its own K/V head. The reordering is done on the weights, not the
activations. Projections are single matmuls over the stacked weights; the gate is applied before
the output projection, so ``sum_e gate_e * (o_e @ wo_e)`` is one matmul over the concatenated
``gate_e * o_e``.

RoPE: the fused Q and K weights also reorder each head's columns from the stored half-split layout
to the interleaved one, so the rotation is one complex multiply per tensor
(:func:`~bam_pipeline.model.layers.apply_rotary_interleaved`). q and k get the same permutation
of their head dims, so every score ``q . k``, and hence the output, is unchanged; V and O keep the
stored order.

Biases (``cfg.qkv_bias``): ``bq`` (E, H*hd), ``bk`` and ``bv`` (E_kv, KV*hd) are added to the
projections before RoPE, as in Qwen2. The fused q and k biases get the same head reordering and
interleave permutation as their weight columns; V's keeps the stored order. The half-split rotation's six passes over the E-times-larger q and k would cost about
what the fusion saves (docs/measurements.md; ``make bench`` row (2) compares fused and loop).

Incremental decoding: given a layer's :class:`~bam_pipeline.model.kv_cache.LayerKV`, the new
tokens are rotated at their own positions, their fused keys and values (after RoPE, in the fused
head order) are appended to the cache, and the queries attend over every cached position under
the step's mask instead of the causal flag. Everything else is the same code.

Shape legend: B batch, T sequence (new tokens when decoding), S cached positions, N = B*T,
D d_model, E experts, H query heads per expert, KV K/V heads per expert set, hd head dim,
g = H // KV query heads per K/V head.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BamError
from .config import ModelConfig
from .kv_cache import LayerKV
from .layers import RotaryEmbedding
from .routing import Router, Routing


class AttentionOutput(NamedTuple):
    out: torch.Tensor  # (B, T, D)
    routing: Routing | None  # the router's decision for the B*T tokens; None when E = 1


def _project(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``x @ w`` (N, out) for x (N, D) and w (D, out), plus the bias b (out,) when there is one."""
    return x @ w if b is None else torch.addmm(b, x, w)


class MixtureOfAttention(nn.Module):
    """E attention experts (stacked weights ``wq``, ``wk``, ``wv``, ``wo``; biases ``bq``, ``bk``,
    ``bv`` when ``cfg.qkv_bias``) with an optional router."""

    def __init__(self, cfg: ModelConfig, *, own_router: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        E, D, H, KV, hd = cfg.attn_experts, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # own_router=False: the block hands this layer its routing (joint router, router_scope=model)
        self.router = Router(D, E, cfg.attn_router) if E > 1 and own_router else None
        self.wq = nn.Parameter(torch.empty(E, D, H * hd))
        self.wk = nn.Parameter(torch.empty(cfg.kv_experts, D, KV * hd))
        self.wv = nn.Parameter(torch.empty(cfg.kv_experts, D, KV * hd))
        self.wo = nn.Parameter(torch.empty(E, H * hd, D))
        for p in self.parameters():
            nn.init.normal_(p, mean=0.0, std=cfg.init_std)
        biases = cfg.qkv_bias
        self.bq = nn.Parameter(torch.zeros(E, H * hd)) if biases else None
        self.bk = nn.Parameter(torch.zeros(cfg.kv_experts, KV * hd)) if biases else None
        self.bv = nn.Parameter(torch.zeros(cfg.kv_experts, KV * hd)) if biases else None
        self.rope = RotaryEmbedding(hd, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling,
                                    getattr(torch, cfg.rope_precision))

    @property
    def _lead(self) -> int:
        """Outer head-group count of the fused query layout: 1 (expert-major) or KV (shared KV)."""
        shared = self.cfg.attn_kv == "shared" and self.cfg.attn_experts > 1
        return self.cfg.n_kv_heads if shared else 1

    def forward(self, h: torch.Tensor, kv: LayerKV | None = None, *, routing: Routing | None = None
                ) -> AttentionOutput:
        """``h`` (B, T, D) normed input -> gated sum of the experts' causal attention outputs; with
        ``kv``, ``h`` holds the new tokens of a decoding step and attends over the cache as well.
        ``routing``: the gates decided elsewhere (a joint router, or layer 0's), else this layer's router's."""
        cfg = self.cfg
        B, T, D = h.shape
        E, H, KV, hd, lead = cfg.attn_experts, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, self._lead
        x = h.reshape(B * T, D)  # (N, D)

        # Fused query weight (D, E*H*hd), columns ordered (lead, E, H/lead, hd/2, 2): query heads
        # (lead, E, H/lead), and within a head the stored half-split (2, hd/2) made interleaved.
        half = hd // 2
        wq = self.wq.view(E, D, lead, H // lead, 2, half).permute(1, 2, 0, 3, 5, 4).reshape(D, E * H * hd)
        bq = None if self.bq is None else self.bq.view(E, lead, H // lead, 2, half).permute(1, 0, 2, 4, 3).reshape(-1)
        q = _project(x, wq, bq).view(B, T, E * H, hd)  # (B, T, E*H, hd)
        n_kv = cfg.kv_experts * KV
        # Fused key weight (D, E_kv*KV*hd), columns (E_kv, KV, hd/2, 2): interleaved like the queries.
        wk = self.wk.view(-1, D, KV, 2, half).permute(1, 0, 2, 4, 3).reshape(D, n_kv * hd)
        bk = None if self.bk is None else self.bk.view(-1, KV, 2, half).permute(0, 1, 3, 2).reshape(-1)
        k = _project(x, wk, bk).view(B, T, n_kv, hd)  # (B, T, E_kv*KV, hd)
        bv = None if self.bv is None else self.bv.reshape(-1)
        v = _project(x, self.wv.transpose(0, 1).reshape(D, n_kv * hd), bv).view(B, T, n_kv, hd)

        if kv is None:
            q, k = self.rope.interleaved(q), self.rope.interleaved(k)
            keys, values, mask = k.transpose(1, 2), v.transpose(1, 2), None  # (B, E_kv*KV, T, hd)
        else:
            q, k = self.rope.interleaved_at(q, kv.step.positions), self.rope.interleaved_at(k, kv.step.positions)
            keys, values = kv.append(k.transpose(1, 2), v.transpose(1, 2))  # (B, E_kv*KV, S, hd)
            mask = kv.step.mask  # (B, 1, T, S)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2),  # (B, E*H, T, hd)
            keys,
            values,
            attn_mask=mask,
            is_causal=mask is None,
            enable_gqa=n_kv != E * H,
        )  # (B, E*H, T, hd)
        o = o.transpose(1, 2).reshape(B * T, lead, E, H * hd // lead)  # (N, lead, E, H*hd/lead)

        if routing is None and self.router is not None:
            routing = self.router(h)
        if routing is None and E > 1:
            raise BamError("this attention layer has no router of its own; pass the routing its block decided")
        if routing is not None:
            gates = routing.dense_gates().to(o.dtype)  # (N, E)
            o = o * gates[:, None, :, None]
        # Fused output weight (E*H*hd, D) with rows in the same (lead, E, H/lead, hd) order.
        wo = self.wo.view(E, lead, H * hd // lead, D).transpose(0, 1).reshape(E * H * hd, D)
        out = o.reshape(B * T, E * H * hd) @ wo  # (N, D)
        return AttentionOutput(out.view(B, T, D), routing)


def mixture_of_attention_loop(attn: MixtureOfAttention, h: torch.Tensor) -> AttentionOutput:
    """Reference: the same mixture as ``attn(h)``, one expert at a time (tests and benchmarks)."""
    cfg = attn.cfg
    B, T, D = h.shape
    H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    x = h.reshape(B * T, D)  # (N, D)
    routing = None if attn.router is None else attn.router(h)
    gates = None if routing is None else routing.dense_gates().to(h.dtype)
    out = torch.zeros_like(x)
    for e in range(cfg.attn_experts):
        e_kv = e if cfg.kv_experts > 1 else 0
        bq, bk, bv = (None if b is None else b[i] for b, i in ((attn.bq, e), (attn.bk, e_kv), (attn.bv, e_kv)))
        q = attn.rope(_project(x, attn.wq[e], bq).view(B, T, H, hd)).transpose(1, 2)  # (B, H, T, hd)
        k = attn.rope(_project(x, attn.wk[e_kv], bk).view(B, T, KV, hd)).transpose(1, 2)  # (B, KV, T, hd)
        v = _project(x, attn.wv[e_kv], bv).view(B, T, KV, hd).transpose(1, 2)
        k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)  # (B, H, T, hd)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
        y = o.transpose(1, 2).reshape(B * T, H * hd) @ attn.wo[e]  # (N, D)
        out = out + (y if gates is None else gates[:, e : e + 1] * y)
    return AttentionOutput(out.view(B, T, D), routing)
