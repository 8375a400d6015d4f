"""Routers: the seam between a layer's experts and the rule that picks them.

A router is a float32 linear map of the normed input to one logit per expert, followed by a
gating rule chosen by :class:`~bam_pipeline.model.config.RouterConfig`:
``logits -> probs (softmax) -> gates and assignments``. Dispatch and combine (attention's
weighted sum, the MoE FFN's sorted dispatch) only read the resulting :class:`Routing`; a new
router kind is a new branch of :func:`route`, not a change to the layers.

Auxiliary losses over a routing: load balancing ``lb = E * sum_i f_i * P_i`` (``f_i`` the
fraction of the N*k assignments routed to expert i, ``P_i`` its mean router probability) and
the router z-loss ``z = mean_tokens(logsumexp(logits)^2)``.

Kinds beyond soft and top-k (FFN only):
- ``hash`` (Roller et al. 2021): no learned weight; the router holds a fixed table, the buffer
  ``table`` (V,) int64, token id -> expert, and the MoE layer passes it the token ids. Its
  "logits" and probabilities are the one-hot assignment (float32; not scores), the gate is 1 and
  it has no auxiliary loss. The assignment depends on the token id alone, never on its context.
- ``expert_choice`` (Zhou et al. 2022): probabilities ``P = softmax(logits)`` over experts as
  usual; in training mode each expert takes the ``c = min(N, max(1, floor(capacity * N / E)))``
  tokens of the batch with the highest ``P[:, e]`` (exactly c each; a token gets 0..E experts),
  gate ``P[n, e]``. That choice sees the whole batch, later positions included, so it is not
  causal: a token's routing can depend on the tokens after it. The eval mode therefore routes
  per token: token n goes to expert e iff ``P[n, e] >= threshold[e]``, where the buffer
  ``threshold`` (E,) float32 is an exponential moving average (momentum ``threshold_momentum``)
  of the c-th largest ``P[:, e]`` of every training batch (NaN until the first training batch;
  then the uniform probability 1/E stands in). Expected eval loads then track the capacity, and
  no token's output depends on a later token. Expert choice balances by construction and has no
  load-balancing loss (its z-loss stays).
A routing where a token has a variable number of experts carries ``chosen`` (N, E) bool, with
``gates`` (N, E) zero outside it; the MoE layer dispatches it by the mask.

Shape legend: N tokens, D d_model, E experts, k experts per token.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BamError
from .config import RouterConfig
from .layers import run_eager


class Routing(NamedTuple):
    """One router's decision for N tokens."""

    logits: torch.Tensor  # (N, E) float32
    probs: torch.Tensor  # (N, E) float32 softmax of the logits
    gates: torch.Tensor  # (N, k) float32 weight of each chosen expert; (N, E) = probs for soft routing
    experts: torch.Tensor | None  # (N, k) int64 chosen experts; None = every expert in order (soft)
    chosen: torch.Tensor | None = None  # (N, E) bool token-expert pairs when a token has 0..E experts

    def dense_gates(self) -> torch.Tensor:
        """(N, E) weight of every expert: the chosen experts' gates, 0 for the others."""
        if self.experts is None:
            return self.gates
        return torch.zeros_like(self.probs).scatter(-1, self.experts, self.gates)

    def assignments(self) -> torch.Tensor:
        """(N, k) int64 expert of every assignment (all E experts, in order, under soft routing)."""
        if self.chosen is not None:
            raise BamError("an expert-choice routing gives each token 0..E experts; read its chosen mask")
        if self.experts is not None:
            return self.experts
        n_tokens, n_experts = self.probs.shape
        return torch.arange(n_experts, device=self.probs.device).expand(n_tokens, n_experts)

    def counts(self) -> torch.Tensor:
        """(E,) int64 assignments per expert (each token counted once per chosen expert)."""
        n_tokens, n_experts = self.probs.shape
        if self.chosen is not None:
            return self.chosen.sum(0)
        if self.experts is None:
            return torch.full((n_experts,), n_tokens, dtype=torch.int64, device=self.probs.device)
        flat = self.experts.reshape(-1)  # (N*k,)
        # not bincount: its output size depends on the values (a host read on CUDA, a graph break under compile)
        counts = torch.zeros(n_experts, dtype=torch.int64, device=flat.device)
        return counts.scatter_add_(0, flat, torch.ones_like(flat))


def router_logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """float32 router logits (N, E) for input h (..., D) and router weight (E, D), autocast or not."""
    with torch.autocast(device_type=h.device.type, enabled=False):
        return F.linear(h.reshape(-1, h.shape[-1]).float(), weight.float())


def capacity_tokens(n_tokens: int, n_experts: int, capacity: float) -> int:
    """Tokens each expert takes under expert choice: ``min(N, max(1, floor(capacity * N / E)))``."""
    return min(n_tokens, max(1, math.floor(capacity * n_tokens / n_experts)))


def route(cfg: RouterConfig, logits: torch.Tensor, *, threshold: torch.Tensor | None = None) -> Routing:
    """Apply the gating rule ``cfg`` to router logits (N, E). ``hash``: the logits are the one-hot
    assignment. ``expert_choice``: each expert's top-c tokens of the batch, or, given ``threshold``
    (E,), every expert whose probability reaches its threshold (module docstring)."""
    if cfg.kind == "hash":
        return Routing(logits, logits, torch.ones_like(logits[:, :1]), logits.argmax(-1, keepdim=True))
    # softmax as exp(logits - logsumexp): the same probabilities; torch's CPU softmax over a last
    # dimension of a few experts is slower than these two passes (docs/measurements.md)
    probs = (logits - torch.logsumexp(logits, dim=-1, keepdim=True)).exp()  # (N, E)
    if cfg.kind == "soft":
        return Routing(logits, probs, probs, None)
    if cfg.kind == "expert_choice":
        if threshold is None:
            c = capacity_tokens(probs.shape[0], probs.shape[1], cfg.capacity)
            top = probs.detach().topk(c, dim=0).indices  # (c, E) each expert's tokens
            chosen = torch.zeros_like(probs, dtype=torch.bool).scatter_(0, top, True)
        else:
            chosen = probs.detach() >= threshold.to(probs.dtype)  # per token: causal
        return Routing(logits, probs, probs * chosen, None, chosen)
    gates, experts = probs.topk(min(cfg.k, probs.shape[-1]), dim=-1)  # (N, k) each
    if cfg.renormalize:
        gates = gates / gates.sum(-1, keepdim=True)
    return Routing(logits, probs, gates, experts)


def load_balancing_loss(probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``E * sum_i f_i * P_i`` for router probs (N, E) and assignment counts (E,); gradient via P."""
    n_experts = probs.shape[-1]
    frac = counts.to(probs.dtype) / counts.sum()  # (E,) f_i, no gradient
    return n_experts * (frac * probs.mean(0)).sum()


def global_counts(counts: torch.Tensor, on: bool) -> torch.Tensor:
    """Assignment counts (E,) summed over every process of the default group when ``on`` and
    distributed is initialised (the global batch's f_i, Megatron's global aux loss); else ``counts``."""
    if on and torch.distributed.is_available() and torch.distributed.is_initialized():
        counts = counts.clone()
        torch.distributed.all_reduce(counts)  # (E,) assignments of the global batch
    return counts


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """``mean over tokens of logsumexp(logits)^2`` for router logits (N, E)."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


class Router(nn.Module):
    """A bias-free linear router, weight (E, D), with its gating rule; a ``hash`` router has the
    buffer ``table`` (V,) instead (``vocab_size`` needed), an ``expert_choice`` router also the
    buffer ``threshold`` (E,) (module docstring)."""

    def __init__(self, d_model: int, n_experts: int, cfg: RouterConfig, vocab_size: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_experts = n_experts
        if cfg.kind == "hash":
            if vocab_size is None:
                raise BamError("a hash router needs the vocabulary size for its token -> expert table")
            self.weight = None
            self.register_buffer("table", torch.arange(vocab_size) % n_experts)  # replaced when mixed
        else:
            self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        if cfg.kind == "expert_choice":
            self.register_buffer("threshold", torch.full((n_experts,), math.nan))

    def forward(self, h: torch.Tensor, token_ids: torch.Tensor | None = None) -> Routing:
        """``h`` (..., D) normed input (and, for hash routing, ``token_ids`` (...)) -> the routing of its
        N tokens. An expert-choice router updates its thresholds on every training-mode call."""
        if self.cfg.kind == "hash":
            if token_ids is None:
                raise BamError("hash routing needs the token ids; call the model with them (BAMTransformer does)")
            experts = self.table[token_ids.reshape(-1)]  # (N,)
            return route(self.cfg, F.one_hot(experts, self.n_experts).float())
        logits = router_logits(h, self.weight)
        if self.cfg.kind != "expert_choice":
            return route(self.cfg, logits)
        if not self.training:
            threshold = torch.nan_to_num(self.threshold.float(), nan=1.0 / self.n_experts)
            return route(self.cfg, logits, threshold=threshold)
        routing = route(self.cfg, logits)
        self._update_threshold(routing)
        return routing

    @run_eager("the threshold update asks autograd's engine whether a backward runs it")
    @torch.no_grad()
    def _update_threshold(self, routing: Routing) -> None:
        """Move each expert's threshold toward the lowest probability it took in this batch, except in activation
        checkpointing's recompute of the forward during the backward."""
        if torch._C._current_graph_task_id() != -1:
            return
        lowest = torch.where(routing.chosen, routing.probs.detach(), torch.inf).amin(0)  # (E,) c-th largest
        old = self.threshold.float()
        m = self.cfg.threshold_momentum
        new = torch.where(torch.isnan(old), lowest, m * old + (1 - m) * lowest)
        self.threshold.copy_(new.to(self.threshold.dtype))
