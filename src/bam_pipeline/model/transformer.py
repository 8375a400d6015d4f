"""The transformer: Block (parallel or sequential residual), BAMTransformer, its outputs.

Forward contract (docs/architecture.md): ``BAMTransformer(cfg)(idx)`` with idx (B, T) int64 returns
``ModelOutput(logits (B, T, V), aux_loss (scalar), routing (one LayerRouting per layer))`` where
``aux_loss = sum_layers(lb_coef * lb_loss + z_coef * z_loss)`` (0 for dense FFNs; attention routers
have no auxiliary loss). ``BAMTransformer.loss(idx, targets)`` adds the next-token NLL
(:func:`~bam_pipeline.model.loss.next_token_nll`); the training objective is
``lm_loss + output.aux_loss``.

Incremental decoding: ``BAMTransformer(cfg)(idx, cache=cache, valid=valid)`` runs the new tokens
``idx`` (B, T) after those already in ``cache`` (:class:`~bam_pipeline.model.kv_cache.KVCache`),
``valid`` (B, T) marking real tokens (False: left padding; default all real), and returns their
logits; the cache then holds them too (:mod:`~bam_pipeline.model.generation` decodes with it).

Initialisation: every weight (embedding, projections, stacked experts, routers, head) is drawn
from N(0, cfg.init_std), without residual-depth scaling; norm scales start at 1 and q/k/v biases
(``cfg.qkv_bias``) at 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bam_pipeline.errors import BamError
from bam_pipeline.model.attention import MixtureOfAttention
from bam_pipeline.model.config import ModelConfig
from bam_pipeline.model.kv_cache import KVCache, LayerKV
from bam_pipeline.model.layers import make_norm
from bam_pipeline.model.loss import next_token_nll
from bam_pipeline.model.moe import MoEFeedForward
from bam_pipeline.model.routing import Routing


@dataclass
class LayerRouting:
    """One block's routing record."""

    attn: Routing | None  # the attention router's decision for the B*T tokens (None: one expert)
    ffn: Routing | None  # the FFN router's decision (None: one expert)
    ffn_counts: torch.Tensor | None  # (E_f,) token assignments per FFN expert
    lb_loss: torch.Tensor  # scalar load-balancing loss (0 for a dense FFN)
    z_loss: torch.Tensor  # scalar router z-loss (0 for a dense FFN)

    @property
    def attn_probs(self) -> torch.Tensor | None:
        """(B*T, E_a) float32 attention router softmax, or None."""
        return None if self.attn is None else self.attn.probs

    @property
    def ffn_probs(self) -> torch.Tensor | None:
        """(B*T, E_f) float32 FFN router softmax, or None."""
        return None if self.ffn is None else self.ffn.probs


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V)
    aux_loss: torch.Tensor  # scalar
    routing: list[LayerRouting]


class Block(nn.Module):
    """Parallel: ``y = x + attn(h) + ffn(h)``, ``h = norm(x)`` (BAM). Sequential: pre-norm per branch."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.parallel = cfg.parallel_residual
        self.norm = make_norm(cfg)
        self.attn = MixtureOfAttention(cfg)
        self.ffn_norm = None if self.parallel else make_norm(cfg)
        self.ffn = MoEFeedForward(cfg)

    def forward(self, x: torch.Tensor, kv: LayerKV | None = None) -> tuple[torch.Tensor, LayerRouting]:
        h = self.norm(x)
        attn = self.attn(h, kv)
        if self.ffn_norm is None:
            ffn = self.ffn(h)
            y = x + attn.out + ffn.out
        else:
            x = x + attn.out
            ffn = self.ffn(self.ffn_norm(x))
            y = x + ffn.out
        return y, LayerRouting(attn.routing, ffn.routing, ffn.counts, ffn.lb_loss, ffn.z_loss)


class BAMTransformer(nn.Module):
    """Token embedding, ``n_layers`` blocks, final norm, LM head (tied to the embedding or not),
    logits multiplied by ``cfg.logit_scale`` when it is not 1."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        nn.init.normal_(self.tok_emb.weight, mean=0.0, std=cfg.init_std)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=cfg.init_std)

    @property
    def output_weight(self) -> torch.Tensor:
        """The (V, D) output projection: ``lm_head.weight``, or ``tok_emb.weight`` itself when tied."""
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, idx: torch.Tensor, *, cache: KVCache | None = None, valid: torch.Tensor | None = None,
                last_only: bool = False) -> ModelOutput:
        """Logits of ``idx`` (B, T); with ``cache``, of new tokens after the cached ones (module docstring).
        ``last_only``: logits of the last position only, (B, 1, V) (decoding needs no more; a prompt's
        full (B, T, V) logits can dwarf the model at a large vocabulary)."""
        x = self.tok_emb(idx)  # (B, T, D)
        step = None
        if cache is not None:
            step = cache.advance(torch.ones_like(idx, dtype=torch.bool) if valid is None else valid)
        elif valid is not None:
            raise BamError("valid= marks the left padding of a KV-cached batch; pass cache= as well, or leave "
                           "padding out of a forward without a cache")
        routing = []
        aux = x.new_zeros((), dtype=torch.float32)
        for i, block in enumerate(self.layers):
            x, r = block(x, None if step is None else cache.layer(i, step))
            routing.append(r)
            aux = aux + self.cfg.lb_coef * r.lb_loss + self.cfg.z_coef * r.z_loss
        if last_only:
            x = x[:, -1:]  # (B, 1, D)
        logits = F.linear(self.norm(x), self.output_weight)  # (B, T, V)
        if self.cfg.logit_scale != 1.0:
            logits = logits * self.cfg.logit_scale
        return ModelOutput(logits, aux, routing)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, *, reduction: str = "mean"
             ) -> tuple[torch.Tensor, ModelOutput]:
        """Next-token NLL of ``targets`` (B, T) given ``idx`` (B, T), and the model output."""
        out = self(idx)
        return next_token_nll(out.logits, targets, reduction=reduction), out
