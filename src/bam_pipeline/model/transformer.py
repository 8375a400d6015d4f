"""The transformer: Block (parallel or sequential residual), BAMTransformer, its outputs.

Forward contract (docs/architecture.md): ``BAMTransformer(cfg)(idx)`` with idx (B, T) int64 returns
``ModelOutput(logits (B, T, V), aux_loss (scalar), routing (one LayerRouting per layer))`` where
``aux_loss = sum_layers(lb_coef * lb_loss + z_coef * z_loss + attn_lb_coef * attn_lb_loss)`` (0 for
dense FFNs; ``attn_lb_loss`` is the load balancing of a top-k attention router, None for soft attention
routing and unless ``cfg.attn_lb_coef`` is set). ``BAMTransformer.loss(idx, targets)`` adds the next-token NLL
(:mod:`~bam_pipeline.model.loss`), from the logits or, when a
:class:`~bam_pipeline.model.loss.LossChunking` says so, chunked from the final hidden states without
the whole logits (then ``ModelOutput.logits`` is None); the training objective is
``lm_loss + output.aux_loss``.

Incremental decoding: ``BAMTransformer(cfg)(idx, cache=cache, valid=valid)`` runs the new tokens
``idx`` (B, T) after those already in ``cache`` (:class:`~bam_pipeline.model.kv_cache.KVCache`),
``valid`` (B, T) marking real tokens (False: left padding; default all real), and returns their
logits; the cache then holds them too (:mod:`~bam_pipeline.model.generation` decodes with it).

Routing layouts (:class:`~bam_pipeline.model.config.ModelConfig`): with ``joint_router`` each block
has one router, ``router`` (E, D), whose logits the attention and the FFN gate with their own rules;
with ``router_scope=model`` block 0 decides and every later block reuses its routing (its gates and
experts; later blocks hold no routers and add no auxiliary loss). The token ids reach every block
for hash routing.

Initialisation: every weight (embedding, projections, stacked experts, routers, head) is drawn
from N(0, cfg.init_std), without residual-depth scaling; norm scales start at 1 and q/k/v biases
(``cfg.qkv_bias``) at 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BamError
from .attention import MixtureOfAttention
from .config import ModelConfig
from .kv_cache import KVCache, LayerKV
from .layers import make_norm, matmul_dtype
from .loss import LossChunking, chunked_next_token_nll, next_token_nll
from .moe import MoEFeedForward
from .routing import Router, Routing, global_counts, load_balancing_loss, route, router_logits


@dataclass
class LayerRouting:
    """One block's routing record."""

    attn: Routing | None  # the attention router's decision for the B*T tokens (None: one expert)
    ffn: Routing | None  # the FFN router's decision (None: one expert)
    ffn_counts: torch.Tensor | None  # (E_f,) token assignments per FFN expert
    lb_loss: torch.Tensor  # scalar load-balancing loss (0 for a dense FFN)
    z_loss: torch.Tensor  # scalar router z-loss (0 for a dense FFN)
    attn_lb_loss: torch.Tensor | None = None  # scalar load balancing of a top-k attention router

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
    """Parallel: ``y = x + attn(h) + ffn(h)``, ``h = norm(x)`` (BAM). Sequential: pre-norm per branch.
    Block ``layer`` holds routers only where it decides (``cfg.routes_at``); a joint router is its own."""

    def __init__(self, cfg: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.parallel = cfg.parallel_residual
        self.decides = cfg.routes_at(layer)
        self.global_balance = False  # attention f_i over every process (BAMTransformer.balance_globally)
        own = self.decides and not cfg.joint_router
        self.norm = make_norm(cfg)
        self.attn = MixtureOfAttention(cfg, own_router=own)
        self.ffn_norm = None if self.parallel else make_norm(cfg)
        self.ffn = MoEFeedForward(cfg, own_router=own)
        self.router = Router(cfg.d_model, cfg.ffn_experts, cfg.ffn_router) if cfg.joint_router and self.decides \
            else None
        if self.router is not None:
            nn.init.normal_(self.router.weight, mean=0.0, std=cfg.init_std)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None, shared: LayerRouting | None = None,
                kv: LayerKV | None = None) -> tuple[torch.Tensor, LayerRouting]:
        """``x`` (B, T, D); ``token_ids`` (B, T) for hash routing; ``shared``: block 0's routing to reuse;
        ``kv``: this layer's KV cache of a decoding step."""
        h = self.norm(x)
        h = h.to(matmul_dtype(h))  # under autocast: one copy in the matmul dtype for every projection
        attn_routing = ffn_routing = None
        if shared is not None:
            attn_routing, ffn_routing = shared.attn, shared.ffn
        elif self.router is not None:  # joint: one set of logits, each kind's gating rule
            logits = router_logits(h, self.router.weight)
            attn_routing, ffn_routing = route(self.cfg.attn_router, logits), route(self.cfg.ffn_router, logits)
        attn = self.attn(h, kv, routing=attn_routing)
        decides = shared is None
        if self.ffn_norm is None:
            ffn = self.ffn(h, token_ids, routing=ffn_routing, decides=decides)
            y = x + attn.out + ffn.out
        else:
            x = x + attn.out
            h = self.ffn_norm(x)
            ffn = self.ffn(h.to(matmul_dtype(h)), token_ids, routing=ffn_routing, decides=decides)
            y = x + ffn.out
        attn_lb = None
        if decides and self.cfg.attn_lb_coef and attn.routing is not None and self.cfg.attn_router.kind == "topk":
            attn_lb = load_balancing_loss(attn.routing.probs, global_counts(attn.routing.counts(), self.global_balance))
        return y, LayerRouting(attn.routing, ffn.routing, ffn.counts, ffn.lb_loss, ffn.z_loss, attn_lb)


class BAMTransformer(nn.Module):
    """Token embedding, ``n_layers`` blocks, final norm, LM head (tied to the embedding or not),
    logits multiplied by ``cfg.logit_scale`` when it is not 1."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        nn.init.normal_(self.tok_emb.weight, mean=0.0, std=cfg.init_std)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=cfg.init_std)

    def balance_globally(self, on: bool = True) -> None:
        """Load-balancing statistics f_i over the global batch of every process (data-parallel
        training), or each process's own (:mod:`~bam_pipeline.model.moe`)."""
        for module in self.modules():
            if isinstance(module, (MoEFeedForward, Block)):  # FFN and top-k attention load balancing
                module.global_balance = on

    @property
    def output_weight(self) -> torch.Tensor:
        """The (V, D) output projection: ``lm_head.weight``, or ``tok_emb.weight`` itself when tied."""
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    def hidden(self, idx: torch.Tensor, *, cache: KVCache | None = None, valid: torch.Tensor | None = None,
               last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[LayerRouting]]:
        """The final normed hidden states (B, T, D) of ``idx`` (B, T), the aux loss and the routing;
        ``cache``, ``valid`` and ``last_only`` as in :meth:`forward`."""
        x = self.tok_emb(idx)  # (B, T, D)
        step = None
        if cache is not None:
            step = cache.advance(torch.ones_like(idx, dtype=torch.bool) if valid is None else valid)
        elif valid is not None:
            raise BamError("valid= marks the left padding of a KV-cached batch; pass cache= as well, or leave "
                           "padding out of a forward without a cache")
        routing = []
        aux = x.new_zeros((), dtype=torch.float32)
        shared = None  # block 0's routing, reused by every block under router_scope=model
        for i, block in enumerate(self.layers):
            x, r = block(x, idx, shared, None if step is None else cache.layer(i, step))
            routing.append(r)
            aux = aux + self.cfg.lb_coef * r.lb_loss + self.cfg.z_coef * r.z_loss
            if r.attn_lb_loss is not None:
                aux = aux + self.cfg.attn_lb_coef * r.attn_lb_loss
            if self.cfg.router_scope == "model" and shared is None:
                shared = r
        if last_only:
            x = x[:, -1:]  # (B, 1, D)
        return self.norm(x), aux, routing

    def forward(self, idx: torch.Tensor, *, cache: KVCache | None = None, valid: torch.Tensor | None = None,
                last_only: bool = False) -> ModelOutput:
        """Logits of ``idx`` (B, T); with ``cache``, of new tokens after the cached ones (module docstring).
        ``last_only``: logits of the last position only, (B, 1, V) (decoding needs no more; a prompt's
        full (B, T, V) logits can dwarf the model at a large vocabulary)."""
        h, aux, routing = self.hidden(idx, cache=cache, valid=valid, last_only=last_only)
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
