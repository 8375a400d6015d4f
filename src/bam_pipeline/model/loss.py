"""The language-model objective: next-token negative log-likelihood, in one place that training,
evaluation and the tests share.

Two ways to compute the same number:
- :func:`next_token_nll` from the logits ``(B, T, V)``;
- :func:`chunked_next_token_nll` from the final hidden states ``(B, T, D)`` and the output weight
  ``(V, D)``, a chunk of tokens at a time, so that at most ``chunk`` x V logits exist at once (the
  whole logits of a 256k vocabulary are gigabytes per batch). Its forward pass also computes the
  gradients of the hidden states and of the weight chunk by chunk, and its backward pass only
  scales them: the same three matmuls as the plain loss, no recomputation.
:class:`LossChunking` says when the chunked form is used: above a number of logits per call.
Both compute the log-softmax in float32; positions whose target is ``IGNORE_INDEX`` are left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError

IGNORE_INDEX = -100
REDUCTIONS = ("mean", "sum")


def next_token_nll(logits: torch.Tensor, targets: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """NLL (nats, float32) of ``targets`` (B, T) under ``logits`` (B, T, V); positions whose target
    is ``IGNORE_INDEX`` are left out. ``reduction`` is ``mean`` (per predicted token), ``sum``, or ``none``
    (one value per position, (B*T,), 0 at ignored positions)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction=reduction)


@dataclass(frozen=True)
class LossChunking:
    """When the loss is chunked: when vocabulary x tokens of one call exceeds ``above`` (0: always),
    in chunks of at most ``chunk_logits`` logits (at least one token per chunk)."""

    above: int
    chunk_logits: int

    def __post_init__(self) -> None:
        if self.above < 0:
            raise ConfigError("above", self.above, "must be >= 0 (0: always chunk)")
        if self.chunk_logits < 1:
            raise ConfigError("chunk_logits", self.chunk_logits, "must be a positive number of logits")

    def chunk_tokens(self, vocab_size: int, n_tokens: int) -> int | None:
        """Tokens per chunk for ``n_tokens`` tokens over ``vocab_size`` classes, or None: not chunked."""
        if vocab_size * n_tokens <= self.above:
            return None
        return max(1, self.chunk_logits // vocab_size)


class _ChunkedNll(torch.autograd.Function):
    """Summed NLL of N tokens from hidden (N, D) and weight (V, D), chunk by chunk; the gradients
    are computed in the forward pass (only where an input needs one) and scaled in place in the
    backward (no second weight-sized buffer)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scale: float,
                chunk: int) -> torch.Tensor:
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if want_h else None  # (N, D)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None  # (V, D)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]  # (c, D)
            t = targets[start : start + chunk]  # (c,)
            logits = F.linear(h, weight)  # (c, V) in the matmul dtype (autocast's, if on)
            matmul_dtype = logits.dtype
            logits = (logits * scale if scale != 1.0 else logits).float()
            keep = t != IGNORE_INDEX  # (c,)
            picked = t.clamp_min(0)[:, None]  # (c, 1)
            target_logit = logits.gather(1, picked)[:, 0]  # (c,)
            # log-sum-exp and softmax in place of the logits: no second (c, V) buffer
            top = logits.amax(dim=-1, keepdim=True)  # (c, 1)
            exp = logits.sub_(top).exp_()  # (c, V) exp(logits - max)
            norm = exp.sum(dim=-1, keepdim=True)  # (c, 1)
            lse = (top + norm.log())[:, 0]  # (c,)
            total += ((lse - target_logit) * keep).sum()
            if want_h or want_w:
                # d(sum nll)/d logits = softmax - one_hot, zero on ignored rows; times the logit scale
                g = exp.div_(norm)  # (c, V) softmax
                g.scatter_add_(1, picked, torch.full_like(lse, -1.0)[:, None])
                g.mul_((keep * scale)[:, None])
                g = g.to(matmul_dtype)
                if want_h:
                    grad_h[start : start + chunk] = g @ weight  # (c, D)
                if want_w:  # (V, D), accumulated in place where the dtypes allow
                    if g.dtype == h.dtype == torch.float32:
                        grad_w.addmm_(g.t(), h)
                    else:
                        grad_w += (g.t() @ h).float()
                del g
            del logits, exp  # before the next chunk's logits exist: one chunk at a time
        ctx.grads = (grad_h, grad_w)  # our own tensors, scaled in place and handed out once
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if ctx.grads is None:
            raise RuntimeError("the chunked LM loss's backward ran twice; it keeps no graph to retain")
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        if grad_h is not None:
            grad_h.mul_(grad_out.to(grad_h.dtype))
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_out.float()).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None


def _per_token_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scale: float,
                   chunk: int) -> torch.Tensor:
    """(N,) float32 NLL of each of N tokens (0 where ignored), a chunk of logits at a time; for
    evaluation (per-token and per-document losses), so no gradient flows through it."""
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        raise ValueError("the chunked loss gives per-token values (reduction='none') without gradients; "
                         "train with reduction 'mean' or 'sum', or evaluate under torch.no_grad()")
    out = torch.empty(targets.shape, dtype=torch.float32, device=hidden.device)  # (N,)
    for start in range(0, hidden.shape[0], chunk):
        t = targets[start : start + chunk]  # (c,)
        logits = F.linear(hidden[start : start + chunk], weight)  # (c, V)
        logits = (logits * scale if scale != 1.0 else logits).float()
        target_logit = logits.gather(1, t.clamp_min(0)[:, None])[:, 0]  # (c,)
        out[start : start + chunk] = (torch.logsumexp(logits, dim=-1) - target_logit) * (t != IGNORE_INDEX)
        del logits
    return out


def chunked_next_token_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, chunk: int,
                           logit_scale: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """The NLL :func:`next_token_nll` gives for ``logits = logit_scale * hidden @ weight.T``, from
    ``hidden`` (B, T, D) and ``weight`` (V, D), holding at most ``chunk`` tokens' logits at a time."""
    flat_targets = targets.reshape(-1)  # (N,)
    if reduction == "none":
        return _per_token_nll(hidden.reshape(-1, hidden.shape[-1]), weight, flat_targets, float(logit_scale),
                              int(chunk)).view(targets.shape)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS} or none, got {reduction!r}")
    total = _ChunkedNll.apply(hidden.reshape(-1, hidden.shape[-1]), weight, flat_targets, float(logit_scale),
                              int(chunk))
    if reduction == "sum":
        return total
    return total / (flat_targets != IGNORE_INDEX).sum()
