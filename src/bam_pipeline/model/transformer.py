"""The transformer: Block (parallel or sequential residual), BAMTransformer, its outputs.

Forward contract (docs/architecture.md): ``BAMTransformer(cfg)(idx)`` with idx (B, T) int64 returns
``ModelOutput(logits (B, T, V), aux_loss (scalar), routing (one LayerRouting per layer))`` where
``aux_loss = sum_layers(lb_coef * lb_loss + z_coef * z_loss)`` (0 for dense FFNs; attention routers
have no auxiliary loss). ``BAMTransformer.loss(idx, targets)`` adds the next-token NLL
(:mod:`~bam_pipeline.model.loss`), from the logits or, when a
:class:`~bam_pipeline.model.loss.LossChunking` says so, chunked from the final hidden states without
the whole logits (then ``ModelOutput.logits`` is None); the training objective is
``lm_loss + output.aux_loss``.

Initialisation: every weight (embedding, projections, stacked experts, routers, head) is drawn
from N(0, cfg.init_std), without residual-depth scaling; norm scales start at 1 and q/k/v biases
(``cfg.qkv_bias``) at 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bam_pipeline.model.attention import MixtureOfAttention
from bam_pipeline.model.config import ModelConfig
from bam_pipeline.model.layers import make_norm, matmul_dtype
from bam_pipeline.model.loss import LossChunking, chunked_next_token_nll, next_token_nll
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
    logits: torch.Tensor | None  # (B, T, V); None from a chunked loss
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

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, LayerRouting]:
        h = self.norm(x)
        h = h.to(matmul_dtype(h))  # under autocast: one copy in the matmul dtype for every projection
        attn = self.attn(h)
        if self.ffn_norm is None:
            ffn = self.ffn(h)
            y = x + attn.out + ffn.out
        else:
            x = x + attn.out
            h = self.ffn_norm(x)
            ffn = self.ffn(h.to(matmul_dtype(h)))
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

    def balance_globally(self, on: bool = True) -> None:
        """Load-balancing statistics f_i over the global batch of every process (data-parallel
        training), or each process's own (:mod:`~bam_pipeline.model.moe`)."""
        for module in self.modules():
            if isinstance(module, MoEFeedForward):
                module.global_balance = on

    @property
    def output_weight(self) -> torch.Tensor:
        """The (V, D) output projection: ``lm_head.weight``, or ``tok_emb.weight`` itself when tied."""
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    def hidden(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[LayerRouting]]:
        """The final normed hidden states (B, T, D) of ``idx`` (B, T), the aux loss and the routing."""
        x = self.tok_emb(idx)  # (B, T, D)
        routing = []
        aux = x.new_zeros((), dtype=torch.float32)
        for block in self.layers:
            x, r = block(x)
            routing.append(r)
            aux = aux + self.cfg.lb_coef * r.lb_loss + self.cfg.z_coef * r.z_loss
        return self.norm(x), aux, routing

    def forward(self, idx: torch.Tensor) -> ModelOutput:
        h, aux, routing = self.hidden(idx)
        logits = F.linear(h, self.output_weight)  # (B, T, V)
        if self.cfg.logit_scale != 1.0:
            logits = logits * self.cfg.logit_scale
        return ModelOutput(logits, aux, routing)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, *, reduction: str = "mean",
             chunking: LossChunking | None = None) -> tuple[torch.Tensor, ModelOutput]:
        """Next-token NLL of ``targets`` (B, T) given ``idx`` (B, T), and the model output. With
        ``chunking``, above its size the loss is chunked and the output has no logits."""
        chunk = None if chunking is None else chunking.chunk_tokens(self.cfg.vocab_size, targets.numel())
        if chunk is None:
            out = self(idx)
            return next_token_nll(out.logits, targets, reduction=reduction), out
        h, aux, routing = self.hidden(idx)
        nll = chunked_next_token_nll(h, self.output_weight, targets, chunk=chunk, logit_scale=self.cfg.logit_scale,
                                     reduction=reduction)
        return nll, ModelOutput(None, aux, routing)
