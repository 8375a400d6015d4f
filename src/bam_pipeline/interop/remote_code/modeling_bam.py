"""A bam-pipeline model for transformers (``trust_remote_code=True``): Branch-Attend-Mix mixtures of
attention and FFN experts, and the dense models they are built from. Self-contained (torch and
transformers only); written by bam-pipeline's Hugging Face export.

Block: ``h = norm(x)``; parallel ``y = x + attn(h) + ffn(h)`` or sequential
``x = x + attn(h); y = x + ffn(ffn_norm(x))``. Norms are RMSNorm or mean-centred LayerNorm, scale
only, computed in float32. Attention expert ``e`` is grouped-query attention with its own
``wq[e]``, ``wo[e]`` and either its own ``wk[e]``, ``wv[e]`` (expert KV) or the layer's one
shared ``wk[0]``, ``wv[0]`` (shared KV: one K/V set, hence one KV cache, per layer); the output is
``sum_e gate_e * attn_e(h)``. FFN expert ``i`` is SwiGLU ``(silu(x w1) * (x w3)) w2``; the output is
``sum_{i chosen} gate_i * ffn_i(h)``. Logits are multiplied by ``logit_scale``.

Routing (:func:`gate`, :class:`BamRouter`): a router is a bias-free float32 linear map to one logit
per expert, ``P = softmax(logits)``, and a rule: ``soft`` gates every expert with ``P``; ``topk``
the k most probable with ``P`` or, when ``renormalize``, with ``P`` renormalised over the k.
FFN-only rules: ``hash`` has no weight, a token's one expert is ``table[token id]`` (the buffer
``table`` (V,) int64) with gate 1; ``expert_choice`` gates expert e with ``P[:, e]`` for the tokens
it takes: in eval mode every token whose ``P[n, e]`` reaches the buffer ``threshold[e]`` (NaN, not
yet estimated, reads as 1/E), so a token gets 0..E experts and routing is causal; in training mode
each expert's ``min(N, max(1, floor(capacity * N / E)))`` best tokens of the batch, the threshold
moving toward the lowest score taken (momentum ``threshold_momentum``). Layouts: with
``router_scope=model`` block 0 decides and every later block reuses its gates (later blocks hold no
routers); with ``joint_router`` a block has one router, ``router`` (E, D), whose logits attention
and FFN gate with their own rules.

Weights are stacked per expert, ``x @ w[e]`` applying expert ``e``: ``wq`` (E, D, H*hd), ``wk`` and
``wv`` (E_kv, D, KV*hd), ``wo`` (E, H*hd, D), optional biases ``bq`` (E, H*hd), ``bk``/``bv``
(E_kv, KV*hd), routers ``(E, D)``, ``w1``/``w3`` (E, D, F), ``w2`` (E, F, D). Q and K columns use
RoPE's half-split layout (frequency j rotates head dims j and j + hd/2).

RoPE angles are computed from the positions at every call (no buffers): transformers leaves
non-persistent buffers uninitialised when it loads a model, so none are kept. The routers' buffers
(``table``, ``threshold``) are persistent: saved in the safetensors and loaded with the weights,
never re-initialised over loaded values. The KV cache is transformers' ``Cache``; each layer caches
its ``E_kv * KV`` rotated K/V heads. Left-padded batches work as in transformers:
``attention_mask`` marks real tokens and each sequence's positions count its real tokens only.

Shape legend: B batch, T new tokens, S cached positions, D hidden, E experts, H query heads per
expert, KV K/V heads per expert set, hd head dim, F FFN hidden width, N = B*T tokens, V vocabulary.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_bam import BamConfig

# transformers 5.x renamed the cache argument and output field from past_key_values to cache
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class BamNorm(nn.Module):
    """RMSNorm or mean-centred LayerNorm with a learned scale and no bias, in float32."""

    def __init__(self, dim: int, eps: float, kind: str) -> None:
        super().__init__()
        self.eps, self.centred = eps, kind == "layernorm"
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        if self.centred:
            x32 = x32 - x32.mean(-1, keepdim=True)
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).type_as(x)


def inverse_frequencies(head_dim: int, rotary: dict[str, Any]) -> torch.Tensor:
    """RoPE's head_dim/2 inverse frequencies in the configured precision, rescaled as configured."""
    dtype = getattr(torch, rotary["precision"])
    scaling = rotary["scaling"]
    inv_freq = 1.0 / rotary["theta"] ** (torch.arange(0, head_dim, 2, dtype=dtype) / head_dim)  # (hd/2,)
    if scaling["kind"] == "linear":
        return inv_freq / scaling["factor"]
    if scaling["kind"] == "llama3":
        old_len, low, high = scaling["original_max_seq_len"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        factor = scaling["factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, blended, scaled)
    return inv_freq


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, rotary: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (B, 1, T, hd) float32, half-split layout, for ``positions`` (B, T)."""
    inv_freq = inverse_frequencies(head_dim, rotary).to(positions.device)
    angles = positions.to(inv_freq.dtype)[..., None] * inv_freq  # (B, T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, T, hd)
    return angles.cos().float(), angles.sin().float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split RoPE of ``x`` (B, heads, T, hd) in float32."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    return (x32 * cos + torch.cat([-x2, x1], dim=-1) * sin).type_as(x)


Gating = tuple[torch.Tensor, torch.Tensor]  # gates (N, E) float32, 0 outside chosen; chosen (N, E) bool


def gate(rule: dict[str, Any], logits: torch.Tensor) -> Gating:
    """The ``soft`` or ``topk`` rule applied to router logits (N, E)."""
    probs = F.softmax(logits, dim=-1)  # (N, E)
    if rule["kind"] == "soft":
        return probs, torch.ones_like(probs, dtype=torch.bool)
    top, experts = probs.topk(min(int(rule["k"]), probs.shape[-1]), dim=-1)  # (N, k)
    if rule["renormalize"]:
        top = top / top.sum(-1, keepdim=True)
    chosen = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, experts, True)
    return torch.zeros_like(probs).scatter(-1, experts, top), chosen


class BamRouter(nn.Module):
    """A bias-free float32 linear router (E, D) and its rule; a ``hash`` router holds the buffer
    ``table`` (V,) instead of a weight, an ``expert_choice`` router also the buffer ``threshold`` (E,)."""

    def __init__(self, hidden: int, experts: int, rule: dict[str, Any], vocab_size: int) -> None:
        super().__init__()
        self.rule, self.n_experts = rule, experts
        if rule["kind"] == "hash":
            self.weight = None
            self.register_buffer("table", torch.arange(vocab_size) % experts)  # replaced by the checkpoint's
        else:
            self.weight = nn.Parameter(torch.empty(experts, hidden))
        if rule["kind"] == "expert_choice":
            self.register_buffer("threshold", torch.full((experts,), math.nan))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """float32 logits (N, E) of ``x`` (N, D)."""
        return F.linear(x.float(), self.weight.float())

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> Gating:
        """``x`` (N, D) (and ``token_ids`` (N,) for hash routing) -> gates and chosen experts (N, E)."""
        kind = self.rule["kind"]
        if kind == "hash":
            if token_ids is None:
                raise ValueError("hash routing reads the token ids: call the model with input_ids, not inputs_embeds")
            chosen = F.one_hot(self.table[token_ids], self.n_experts).bool()  # (N, E) one expert each
            return chosen.float(), chosen
        logits = self.logits(x)
        if kind != "expert_choice":
            return gate(self.rule, logits)
        probs = F.softmax(logits, dim=-1)  # (N, E)
        if self.training:  # each expert takes its best tokens of the batch (sees later tokens: not causal)
            n = probs.shape[0]
            c = min(n, max(1, math.floor(float(self.rule["capacity"]) * n / self.n_experts)))
            top = probs.detach().topk(c, dim=0).indices  # (c, E)
            chosen = torch.zeros_like(probs, dtype=torch.bool).scatter_(0, top, True)
            self._update_threshold(probs.detach(), chosen)
        else:  # per token: every expert whose threshold its probability reaches
            threshold = torch.nan_to_num(self.threshold.float(), nan=1.0 / self.n_experts)
            chosen = probs >= threshold
        return probs * chosen, chosen

    @torch.no_grad()
    def _update_threshold(self, probs: torch.Tensor, chosen: torch.Tensor) -> None:
        """Move each expert's threshold toward the lowest probability it took in this batch."""
        lowest = torch.where(chosen, probs, torch.inf).amin(0)  # (E,)
        old, m = self.threshold.float(), float(self.rule["threshold_momentum"])
        new = torch.where(torch.isnan(old), lowest, m * old + (1 - m) * lowest)
        self.threshold.copy_(new.to(self.threshold.dtype))


class BamAttention(nn.Module):
    """A mixture of E grouped-query attention experts with expert or shared K/V projections; its own
    router unless the block hands it the gates (joint router, or block 0's under ``router_scope=model``)."""

    def __init__(self, config: BamConfig, layer_idx: int, own_router: bool) -> None:
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        E, E_kv, D = config.attn_experts, config.kv_experts, config.hidden_size
        H, KV, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.router = BamRouter(D, E, config.attn_router, config.vocab_size) if E > 1 and own_router else None
        self.wq = nn.Parameter(torch.empty(E, D, H * hd))
        self.wk = nn.Parameter(torch.empty(E_kv, D, KV * hd))
        self.wv = nn.Parameter(torch.empty(E_kv, D, KV * hd))
        self.wo = nn.Parameter(torch.empty(E, H * hd, D))
        bias = config.qkv_bias
        self.bq = nn.Parameter(torch.zeros(E, H * hd)) if bias else None
        self.bk = nn.Parameter(torch.zeros(E_kv, KV * hd)) if bias else None
        self.bv = nn.Parameter(torch.zeros(E_kv, KV * hd)) if bias else None

    @staticmethod
    def _project(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """``x`` (B, T, D) through every stacked expert ``w`` (E, D, out): (B, T, E, out)."""
        y = torch.einsum("btd,edo->bteo", x, w)
        return y if b is None else y + b

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                cache: Cache | None, routing: Gating | None = None) -> tuple[torch.Tensor, Gating | None]:
        """``h`` (B, T, D) normed input -> (B, T, D) gated sum of the experts' attention, and the gating
        used (``routing`` when given, else this layer's router's; None for one expert)."""
        cfg = self.config
        B, T, D = h.shape
        E, H, KV, hd = cfg.attn_experts, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = self._project(h, self.wq, self.bq).view(B, T, E * H, hd).transpose(1, 2)  # (B, E*H, T, hd)
        k = self._project(h, self.wk, self.bk).view(B, T, -1, hd).transpose(1, 2)  # (B, E_kv*KV, T, hd)
        v = self._project(h, self.wv, self.bv).view(B, T, -1, hd).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, E_kv*KV, S, hd)
        if cfg.kv_experts == 1 and E > 1:  # shared K/V: every expert reads the layer's one set
            k, v = k.repeat(1, E, 1, 1), v.repeat(1, E, 1, 1)  # (B, E*KV, S, hd), heads (expert, kv)
        group = H // KV  # query head (e, j) reads K/V head (e, j // group)
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, E*H, S, hd)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, E*H, T, hd)
        o = o.transpose(1, 2).reshape(B, T, E, H * hd)
        y = torch.einsum("bteo,eod->bted", o, self.wo)  # (B, T, E, D)
        if E == 1:
            return y[:, :, 0], None
        if routing is None:
            routing = self.router(h.reshape(B * T, D))
        gates = routing[0]  # (N, E)
        return (y * gates.view(B, T, E, 1).to(y.dtype)).sum(2), routing


class BamFeedForward(nn.Module):
    """A mixture of E SwiGLU experts (E = 1: one FFN, no router); its own router unless the block
    hands it the gating."""

    def __init__(self, config: BamConfig, own_router: bool) -> None:
        super().__init__()
        E, D, Fh = config.ffn_experts, config.hidden_size, config.intermediate_size
        self.router = BamRouter(D, E, config.ffn_router, config.vocab_size) if E > 1 and own_router else None
        self.w1 = nn.Parameter(torch.empty(E, D, Fh))
        self.w3 = nn.Parameter(torch.empty(E, D, Fh))
        self.w2 = nn.Parameter(torch.empty(E, Fh, D))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return (F.silu(x @ self.w1[e]) * (x @ self.w3[e])) @ self.w2[e]

    def forward(self, h: torch.Tensor, token_ids: torch.Tensor | None,
                routing: Gating | None = None) -> tuple[torch.Tensor, Gating | None]:
        """``h`` (B, T, D) normed input, ``token_ids`` (B, T) -> (B, T, D) gated sum of each token's
        chosen experts (none, under expert choice, gives 0), and the gating used."""
        B, T, D = h.shape
        x = h.reshape(B * T, D)  # (N, D)
        if self.w1.shape[0] == 1:
            return self.expert(0, x).view(B, T, D), None
        if routing is None:
            routing = self.router(x, None if token_ids is None else token_ids.reshape(-1))
        gates, chosen = routing  # (N, E) each
        out = torch.zeros_like(x)
        for e in range(self.w1.shape[0]):
            rows = chosen[:, e].nonzero().squeeze(-1)
            if rows.numel():
                out.index_add_(0, rows, self.expert(e, x[rows]) * gates[rows, e, None].to(x.dtype))
        return out.view(B, T, D), routing


class BamBlock(nn.Module):
    """One block; it holds routers only where it decides (``config.routes_at``), one shared ``router``
    when ``joint_router``."""

    def __init__(self, config: BamConfig, layer_idx: int) -> None:
        super().__init__()
        self.config, self.parallel = config, config.parallel_residual
        decides = config.routes_at(layer_idx)
        own = decides and not config.joint_router
        self.norm = BamNorm(config.hidden_size, config.norm_eps, config.norm_kind)
        self.attn = BamAttention(config, layer_idx, own)
        self.ffn_norm = None if self.parallel else BamNorm(config.hidden_size, config.norm_eps, config.norm_kind)
        self.ffn = BamFeedForward(config, own)
        joint = config.joint_router and decides
        self.router = BamRouter(config.hidden_size, config.ffn_experts, config.ffn_router, config.vocab_size) \
            if joint else None

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor, cache: Cache | None, shared: tuple[Gating | None, Gating | None] | None = None
                ) -> tuple[torch.Tensor, tuple[Gating | None, Gating | None]]:
        """``x`` (B, T, D) -> the block's output and its (attention, FFN) gating; ``shared``: block 0's
        gating to reuse (``router_scope=model``)."""
        h = self.norm(x)
        attn_routing, ffn_routing = shared if shared is not None else (None, None)
        if shared is None and self.router is not None:  # joint: one set of logits, each its own rule
            logits = self.router.logits(h.reshape(-1, h.shape[-1]))
            attn_routing, ffn_routing = gate(self.config.attn_router, logits), gate(self.config.ffn_router, logits)
        attn, attn_routing = self.attn(h, cos, sin, mask, cache, attn_routing)
        if self.ffn_norm is None:
            ffn, ffn_routing = self.ffn(h, token_ids, ffn_routing)
            return x + attn + ffn, (attn_routing, ffn_routing)
        x = x + attn
        ffn, ffn_routing = self.ffn(self.ffn_norm(x), token_ids, ffn_routing)
        return x + ffn, (attn_routing, ffn_routing)


class BamPreTrainedModel(PreTrainedModel):
    config_class = BamConfig
    base_model_prefix = "model"
    _no_split_modules = ["BamBlock"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        """Initialise what the checkpoint did not provide: weights N(0, initializer_range), norms 1,
        biases 0, a hash table ``id % E``, thresholds NaN. transformers marks every loaded tensor
        ``_is_hf_initialized`` and guards ``nn.init``; the buffers are written only where unmarked, so a
        loaded table or threshold is never replaced."""
        std = self.config.initializer_range
        if isinstance(module, BamNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, nn.Embedding | nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, BamRouter):
            if module.weight is not None:
                nn.init.normal_(module.weight, mean=0.0, std=std)
            table, threshold = getattr(module, "table", None), getattr(module, "threshold", None)
            with torch.no_grad():
                if table is not None and not getattr(table, "_is_hf_initialized", False):
                    table.copy_(torch.arange(table.numel(), device=table.device) % module.n_experts)
                if threshold is not None and not getattr(threshold, "_is_hf_initialized", False):
                    threshold.fill_(math.nan)
        elif isinstance(module, BamAttention | BamFeedForward):
            for name, param in module.named_parameters(recurse=False):
                if name in ("bq", "bk", "bv"):
                    nn.init.zeros_(param)
                else:
                    nn.init.normal_(param, mean=0.0, std=std)


class BamModel(BamPreTrainedModel):
    """Embedding, blocks and final norm: the hidden states of the last layer."""

    def __init__(self, config: BamConfig) -> None:
        super().__init__(config)
        self.tok_emb = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(BamBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = BamNorm(config.hidden_size, config.norm_eps, config.norm_kind)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.tok_emb

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.tok_emb = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, Cache | None]:
        """Hidden states (B, T, D) of the T new tokens and the cache holding every position."""
        x = self.tok_emb(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        B, T, _ = x.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=x.device)
        real = attention_mask[:, -(past + T):].bool()  # (B, S) real tokens of every position
        if position_ids is None:
            position_ids = (real.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
        query = torch.arange(past, past + T, device=x.device)[:, None]  # (T, 1)
        key = torch.arange(past + T, device=x.device)[None, :]  # (1, S)
        # causal, no padding keys; a padding query sees itself so no softmax row is empty
        mask = ((key <= query) & (real[:, None, :] | (key == query)))[:, None]  # (B, 1, T, S)
        cos, sin = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rotary)
        shared = None  # block 0's gating, reused by every later block under router_scope=model
        for block in self.layers:
            x, routing = block(x, input_ids, cos, sin, mask, cache, shared)
            if self.config.router_scope == "model" and shared is None:
                shared = routing
        return self.norm(x), cache


class BamForCausalLM(BamPreTrainedModel, GenerationMixin):
    """The language model: :class:`BamModel`, the LM head (tied to the embedding or not), logits
    times ``logit_scale``."""

    _tied_weights_keys = {"lm_head.weight": "model.tok_emb.weight"}

    def __init__(self, config: BamConfig) -> None:
        super().__init__(config)
        self.model = BamModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.tok_emb

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.tok_emb = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                past_key_values: Cache | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None, logits_to_keep: int = 0,
                **kwargs: Any) -> CausalLMOutputWithPast:
        """Logits (B, T, V) of the new tokens (the last ``logits_to_keep`` when it is positive), the
        next-token cross-entropy of ``labels`` (B, T) when given (-100 ignored), and the cache."""
        hidden, cache = self.model(input_ids, attention_mask, position_ids, cache if cache is not None
                                   else past_key_values, inputs_embeds, use_cache)
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)  # (B, T, V)
        if self.config.logit_scale != 1.0:
            logits = logits * self.config.logit_scale
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})
