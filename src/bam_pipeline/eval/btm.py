"""The BTM (Branch-Train-Merge) baseline at eval: the dense experts kept apart and ensembled, each
token's next-token distribution the mixture of theirs weighted by the posterior over experts given
the document's prefix; the prior over experts, estimated on validation data; the ensemble's
inference FLOPs.

    p(x_t | x_<t) = sum_j w_j(t) p_j(x_t | x_<t),   w_j(t) ∝ π_j prod_{s<t, s in x_t's document} p_j(x_s | x_<s)

Only the experts' probabilities of the *observed* tokens enter: the ensemble's probability of
x_t is the weighted sum of each expert's probability of that one token, and the weights depend
only on the experts' probabilities of the earlier observed tokens. So each expert's log-prob of
the observed tokens (a gather from its log-softmax) gives the ensemble's likelihood exactly; the
full mixed distribution over the vocabulary is needed only to sample from the ensemble.

Documents: a token stream packs documents, each ending with the end-of-document token. The token
after it starts a new document, whose posterior starts again from the prior; so does the first
token of every row (the experts see nothing before it either). Everything is computed in log
space in float64.

Legend: N experts, B rows, T tokens per row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from bam_pipeline.errors import BamError
from bam_pipeline.model.config import ModelConfig
from bam_pipeline.model.counting import flops_per_token


@dataclass(frozen=True)
class Ensemble:
    """The ensemble's log-probability of each observed token and the posterior weights it used."""

    log_probs: torch.Tensor  # (B, T) float64: log p(x_t | x_<t)
    weights: torch.Tensor  # (N, B, T) float64: w_j(t), summing to 1 over the experts


def _check(expert_log_probs: torch.Tensor, tokens: torch.Tensor, log_prior: torch.Tensor) -> None:
    if expert_log_probs.dim() != 3 or expert_log_probs.shape[1:] != tokens.shape or tokens.numel() == 0:
        raise BamError(f"expert log-probs must be (experts, rows, tokens) over non-empty tokens (rows, tokens), got "
                       f"{tuple(expert_log_probs.shape)} and {tuple(tokens.shape)}")
    if log_prior.shape != (expert_log_probs.shape[0],):
        raise BamError(f"the log-prior needs one value per expert ({expert_log_probs.shape[0]}), got shape "
                       f"{tuple(log_prior.shape)}")
    if not (torch.isfinite(expert_log_probs).all() and torch.isfinite(log_prior).all()):
        raise BamError("expert log-probs and the log-prior must be finite (log-softmax of finite logits); "
                       "check the experts' outputs for NaN or inf")


def document_starts(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, T) bool: True where a token begins a document (the first of its row, or one after ``eos_id``)."""
    starts = torch.ones_like(tokens, dtype=torch.bool)  # (B, T)
    starts[:, 1:] = tokens[:, :-1] == eos_id
    return starts


def ensemble_log_probs(expert_log_probs: torch.Tensor, tokens: torch.Tensor, log_prior: torch.Tensor, *,
                       eos_id: int) -> Ensemble:
    """The BTM ensemble on observed tokens.

    ``expert_log_probs`` (N, B, T): expert j's log p_j(tokens[b, t] | what precedes it);
    ``tokens`` (B, T): the observed tokens, to find document boundaries; ``log_prior`` (N,): log π,
    normalised here. The posterior is carried from token to token normalised (a Bayes filter), so
    it never drifts however long or improbable a document is.
    """
    _check(expert_log_probs, tokens, log_prior)
    lp = expert_log_probs.double()  # (N, B, T)
    n, b, t_len = lp.shape
    prior = (log_prior.double() - torch.logsumexp(log_prior.double(), 0)).to(lp.device)[:, None].expand(n, b)  # (N, B)
    starts = document_starts(tokens, eos_id).to(lp.device)  # (B, T)
    log_w = torch.empty_like(lp)  # (N, B, T)
    out = torch.empty(b, t_len, dtype=lp.dtype, device=lp.device)  # (B, T)
    post = prior
    for t in range(t_len):
        post = torch.where(starts[:, t], prior, post)  # (N, B) log w_j(t)
        log_w[:, :, t] = post
        joint = post + lp[:, :, t]  # (N, B)
        out[:, t] = torch.logsumexp(joint, 0)
        post = joint - out[:, t]
    return Ensemble(out, log_w.exp())


def estimate_log_prior(expert_log_probs: torch.Tensor, tokens: torch.Tensor, *, eos_id: int) -> torch.Tensor:
    """Log-prior (N,) over experts from validation rows: the mean over documents of the posterior at
    each document's end, each computed from a uniform prior.

    That mean is one EM step for the mixture weights of a mixture of experts over documents, started
    from uniform. It gives every expert some weight (a share of documents each expert explains best
    would give an expert that never wins none, so the ensemble could never use it), and it moves
    smoothly with the data. Every document piece of a row counts once, including the pieces cut
    by a row's edges.
    """
    n = expert_log_probs.shape[0]
    uniform = torch.full((n,), -math.log(n), dtype=torch.float64, device=expert_log_probs.device)
    _check(expert_log_probs, tokens, uniform)
    lp = expert_log_probs.double().reshape(n, -1)  # (N, B*T)
    doc = torch.cumsum(document_starts(tokens, eos_id).reshape(-1).long(), 0).to(lp.device) - 1  # (B*T,) document index
    n_docs = int(doc[-1]) + 1
    evidence = torch.zeros(n, n_docs, dtype=lp.dtype, device=lp.device).index_add_(1, doc, lp)  # (N, docs)
    joint = uniform[:, None] + evidence  # (N, docs)
    log_post = joint - torch.logsumexp(joint, 0)  # (N, docs)
    return torch.logsumexp(log_post, 1) - math.log(n_docs)


def ensemble_flops_per_token(experts: Sequence[ModelConfig], seq_len: int | None = None) -> float:
    """Forward FLOPs per token of the BTM ensemble: every expert runs its whole forward pass on every
    token, so the sum over experts, N times a dense model's when they share one config. The
    posterior update (O(N) per token) is not counted, like norms and softmaxes."""
    if not experts:
        raise BamError("a BTM ensemble needs at least one expert model")
    return sum(flops_per_token(cfg, seq_len).total for cfg in experts)
