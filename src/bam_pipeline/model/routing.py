"""Routers: the seam between a layer's experts and the rule that picks them.

A router is a float32 linear map of the normed input to one logit per expert, followed by a
gating rule chosen by :class:`~bam_pipeline.model.config.RouterConfig`:
``logits -> probs (softmax) -> gates and assignments``. Dispatch and combine (attention's
weighted sum, the MoE FFN's sorted dispatch) only read the resulting :class:`Routing`; a new
router kind is a new branch of :func:`route`, not a change to the layers.

Auxiliary losses over a routing: load balancing ``lb = E * sum_i f_i * P_i`` (``f_i`` the
fraction of the N*k assignments routed to expert i, ``P_i`` its mean router probability) and
the router z-loss ``z = mean_tokens(logsumexp(logits)^2)``.

Shape legend: N tokens, D d_model, E experts, k experts per token.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from bam_pipeline.model.config import RouterConfig


class Routing(NamedTuple):
    """One router's decision for N tokens."""

    logits: torch.Tensor  # (N, E) float32
    probs: torch.Tensor  # (N, E) float32 softmax of the logits
    gates: torch.Tensor  # (N, k) float32 weight of each chosen expert; (N, E) = probs for soft routing
    experts: torch.Tensor | None  # (N, k) int64 chosen experts; None = every expert in order (soft)

    def dense_gates(self) -> torch.Tensor:
        """(N, E) weight of every expert: the chosen experts' gates, 0 for the others."""
        if self.experts is None:
            return self.gates
        return torch.zeros_like(self.probs).scatter(-1, self.experts, self.gates)

    def assignments(self) -> torch.Tensor:
        """(N, k) int64 expert of every assignment (all E experts, in order, under soft routing)."""
        if self.experts is not None:
            return self.experts
        n_tokens, n_experts = self.probs.shape
        return torch.arange(n_experts, device=self.probs.device).expand(n_tokens, n_experts)

    def counts(self) -> torch.Tensor:
        """(E,) int64 assignments per expert (each token counted once per chosen expert)."""
        n_tokens, n_experts = self.probs.shape
        if self.experts is None:
            return torch.full((n_experts,), n_tokens, dtype=torch.int64, device=self.probs.device)
        return torch.bincount(self.experts.reshape(-1), minlength=n_experts)


def router_logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """float32 router logits (N, E) for input h (..., D) and router weight (E, D), autocast or not."""
    with torch.autocast(device_type=h.device.type, enabled=False):
        return F.linear(h.reshape(-1, h.shape[-1]).float(), weight.float())


def route(cfg: RouterConfig, logits: torch.Tensor) -> Routing:
    """Apply the gating rule ``cfg`` to router logits (N, E)."""
    # softmax as exp(logits - logsumexp): the same probabilities; torch's CPU softmax over a last
    # dimension of a few experts is slower than these two passes (docs/measurements.md)
    probs = (logits - torch.logsumexp(logits, dim=-1, keepdim=True)).exp()  # (N, E)
    if cfg.kind == "soft":
        return Routing(logits, probs, probs, None)
    gates, experts = probs.topk(min(cfg.k, probs.shape[-1]), dim=-1)  # (N, k) each
    if cfg.renormalize:
        gates = gates / gates.sum(-1, keepdim=True)
    return Routing(logits, probs, gates, experts)


def load_balancing_loss(probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``E * sum_i f_i * P_i`` for router probs (N, E) and assignment counts (E,); gradient via P."""
    n_experts = probs.shape[-1]
    frac = counts.to(probs.dtype) / counts.sum()  # (E,) f_i, no gradient
    return n_experts * (frac * probs.mean(0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """``mean over tokens of logsumexp(logits)^2`` for router logits (N, E)."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


class Router(nn.Module):
    """A bias-free linear router, weight (E, D), with its gating rule."""

    def __init__(self, d_model: int, n_experts: int, cfg: RouterConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))

    def forward(self, h: torch.Tensor) -> Routing:
        """``h`` (..., D) normed input -> the routing of its N tokens."""
        return route(self.cfg, router_logits(h, self.weight))
