"""Parameter and FLOP counting: pure functions of a ModelConfig (plus the sequence length).

Parameters follow the state-dict layout of docs/architecture.md exactly (q/k/v biases only with
``qkv_bias``, one norm per parallel block, routers only where a layer has more than one expert of
that kind).

FLOP convention (forward pass, per token):
- 2 FLOPs per multiply-add of every matmul the token actually uses: Q/O projections of each
  *active* attention expert, K/V projections of each active expert (expert KV) or once (shared
  KV), the attention and FFN routers, the active FFN experts and the LM head;
- attention scores (q.k) and the weighted sum of values (p.v) over the causal context: a token
  at position t (1-based) attends to t positions, so the average context of a length-T sequence
  is ``(T + 1) / 2`` (what a causal kernel that skips masked blocks computes);
- norms, softmaxes, the SwiGLU nonlinearity, RoPE, the q/k/v bias additions, the logit scale and
  the embedding lookup are not counted (they are O(D) per token, not matmuls).
Training FLOPs are 3x forward (backward = 2x forward).

Two conventions of FLOPs per token (:data:`FLOP_CONVENTIONS`): ``total`` counts everything above, the LM
head included (the default everywhere: budgets, ``stage=info``, the manifests' training FLOPs);
``non_embedding`` leaves out the LM head (the embedding lookup is never counted), as scaling-law papers
count compute. A compute-matched budget (``budget.moe.flops``) matches either.

Top-k attention: budgets (compute-matched runs, ``flops_per_token``) count what an ideal sparse
kernel computes, as the paper's compute-matched Table 6 assumes: the Q and O projections and the
attention of the k chosen experts, and the K/V projections of *every* expert set (a later token may
route to any expert and needs its keys and values for every earlier position). Our fused
implementation computes every expert and zero-weights the unchosen ones (:mod:`bam_pipeline.model.attention`):
``flops_per_token(..., implementation=True)`` counts that, for throughput efficiency. Soft routing
computes every expert either way. Active *parameters* stay those of each token's own experts.
Expert choice uses ``capacity`` experts per token on average (parameters rounded to an integer).
Routers: a hash router has no weight and costs nothing; a joint router is one (E, D) matrix per
layer; under ``router_scope=model`` only layer 0 has routers.

Model FLOPs utilisation (:func:`mfu`) divides the training FLOPs of the tokens processed per second
by the peak of the devices doing it: :data:`PEAK_TFLOPS`, dense (no sparsity) bfloat16 tensor-core
figures from the vendors' data sheets, matched by a substring of the device's name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..errors import BamError
from .config import ModelConfig

TRAINING_FLOPS_MULTIPLIER = 3
FLOP_CONVENTIONS = ("total", "non_embedding")  # with the LM head, without it (module docstring)

# Dense bfloat16 peak TFLOP/s per device, by a substring of torch.cuda.get_device_name().
PEAK_TFLOPS = {
    "B200": 2250.0,
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
}


def device_peak_tflops(device_name: str) -> float | None:
    """:data:`PEAK_TFLOPS` for a device name, the longest matching entry first (``H100 PCIe`` before ``H100``)."""
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in device_name:
            return PEAK_TFLOPS[key]
    return None


def mfu(tokens_per_s: float, train_flops_per_token: float, peak_tflops_per_device: float, devices: int = 1) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the peak of ``devices`` devices."""
    return tokens_per_s * train_flops_per_token / (peak_tflops_per_device * 1e12 * devices)


@dataclass(frozen=True)
class LayerParamCount:
    """Parameters of one block (every block of a config is identical). ``attention`` and
    ``attention_active`` include the q/k/v biases, also given alone in ``attention_bias`` and
    ``attention_bias_active`` (FLOPs count the projection weights only)."""

    attention: int
    attention_active: int
    attention_bias: int
    attention_bias_active: int
    ffn: int
    ffn_active: int
    routers: int
    norms: int
    experts: int  # in stacked tensors of more than one expert: what ``freeze_experts`` keeps fixed

    @property
    def total(self) -> int:
        return self.attention + self.ffn + self.routers + self.norms

    @property
    def active(self) -> int:
        return self.attention_active + self.ffn_active + self.routers + self.norms


@dataclass(frozen=True)
class ParamCount:
    """Total parameters and parameters active per token.

    ``embedding`` is tok_emb plus lm_head (counted once when tied); it is part of both ``total``
    and ``active``. ``final_norm`` is the last norm vector.
    """

    total: int
    active: int
    embedding: int
    final_norm: int
    per_layer: LayerParamCount
    n_layers: int

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding

    @property
    def active_non_embedding(self) -> int:
        return self.active - self.embedding


@dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs per token, split by where they are spent (summed over layers)."""

    attention_proj: int
    attention_scores: float
    routers: int
    ffn: int
    lm_head: int
    seq_len: int

    @property
    def attention(self) -> float:
        return self.attention_proj + self.attention_scores

    @property
    def non_embedding(self) -> float:
        """Without the LM head: paper Table 7's convention (the embedding lookup is never counted)."""
        return self.attention + self.routers + self.ffn

    @property
    def total(self) -> float:
        return self.non_embedding + self.lm_head

    def counted(self, convention: str = "total") -> float:
        """The FLOPs per token one of :data:`FLOP_CONVENTIONS` counts: ``total`` or ``non_embedding``."""
        if convention not in FLOP_CONVENTIONS:
            raise BamError(f"unknown FLOP convention {convention!r}; use one of {', '.join(FLOP_CONVENTIONS)}")
        return self.total if convention == "total" else self.non_embedding


def layer_params(cfg: ModelConfig) -> LayerParamCount:
    """Parameters of one block of ``cfg``: total and used by one token."""
    d, q_width, kv_width = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    qo = 2 * d * q_width  # wq + wo of one attention expert
    kv = 2 * d * kv_width  # wk + wv of one K/V set
    q_bias, kv_bias = (q_width, 2 * kv_width) if cfg.qkv_bias else (0, 0)  # bq of an expert; bk + bv of a set
    active_kv_sets = cfg.attn_active_experts if cfg.attn_kv == "expert" else 1
    ffn_expert = 3 * d * cfg.d_ff  # w1, w3: (D, F); w2: (F, D)
    routers = router_params(cfg)
    bias = cfg.attn_experts * q_bias + cfg.kv_experts * kv_bias
    # stacked tensors with E > 1 (an averaged tensor, E = 1, is not an expert): Q/O (+ bq), K/V (+ bk, bv), FFN
    experts = ((cfg.attn_experts * (qo + q_bias) if cfg.attn_experts > 1 else 0)
               + (cfg.kv_experts * (kv + kv_bias) if cfg.kv_experts > 1 else 0)
               + (cfg.ffn_experts * ffn_expert if cfg.ffn_experts > 1 else 0))
    bias_active = cfg.attn_active_experts * q_bias + active_kv_sets * kv_bias
    return LayerParamCount(
        attention=cfg.attn_experts * qo + cfg.kv_experts * kv + bias,
        attention_active=cfg.attn_active_experts * qo + active_kv_sets * kv + bias_active,
        attention_bias=bias,
        attention_bias_active=bias_active,
        ffn=cfg.ffn_experts * ffn_expert,
        ffn_active=round(cfg.ffn_active_experts * ffn_expert),
        routers=routers,
        norms=d * (1 if cfg.parallel_residual else 2),
        experts=experts,
    )


def router_params(cfg: ModelConfig) -> int:
    """Router weights of one block that decides (module docstring): attention and FFN routers, or one
    joint router; a hash router has none."""
    if cfg.joint_router:
        return cfg.d_model * cfg.attn_experts
    attn = cfg.d_model * cfg.attn_experts if cfg.attn_experts > 1 else 0
    ffn = cfg.d_model * cfg.ffn_experts if cfg.ffn_experts > 1 and cfg.ffn_router.learned else 0
    return attn + ffn


def count_params(cfg: ModelConfig) -> ParamCount:
    """Total and per-token active parameters of ``cfg`` (routers and shared K/V count once; under
    ``router_scope=model`` ``per_layer.routers`` are block 0's alone)."""
    layer = layer_params(cfg)
    embedding = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    final_norm = cfg.d_model
    unrouted = (cfg.n_layers - cfg.routing_layers) * layer.routers  # blocks that reuse block 0's routing
    return ParamCount(
        total=embedding + final_norm + cfg.n_layers * layer.total - unrouted,
        active=embedding + final_norm + cfg.n_layers * layer.active - unrouted,
        embedding=embedding,
        final_norm=final_norm,
        per_layer=layer,
        n_layers=cfg.n_layers,
    )


def average_causal_context(seq_len: int) -> float:
    """Mean number of positions a token attends to in a causal sequence of ``seq_len``."""
    return (seq_len + 1) / 2


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None, *, implementation: bool = False,
                    full_scores: bool = False) -> FlopCount:
    """Forward FLOPs per token of ``cfg`` on sequences of ``seq_len`` (default ``cfg.max_seq_len``).
    Top-k attention: what an ideal sparse kernel computes (budgets), or with ``implementation`` what
    our fused attention computes (every expert; module docstring). ``full_scores`` counts all ``T``
    positions of every query's row, the causal mask's upper half included: what a kernel that does
    not skip masked blocks computes (PyTorch's CPU flash attention below 512 positions, whose one key
    block spans the whole sequence; ``make bench`` row (4) measures it)."""
    t = cfg.max_seq_len if seq_len is None else seq_len
    if t <= 0:
        raise BamError(f"seq_len must be a positive number of tokens, got {t}; pass the training context length")
    layer = layer_params(cfg)
    d, q_width, kv_width = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    # experts whose Q, O and attention are computed; every K/V set is (soft: all used; top-k: later
    # tokens may pick any expert; dense and shared KV: the one set)
    computed = cfg.attn_experts if implementation else cfg.attn_active_experts
    proj = computed * 2 * d * q_width + cfg.kv_experts * 2 * d * kv_width
    # q.k and p.v: per computed expert, every query head does head_dim multiply-adds per context position
    scores = 2 * 2 * computed * q_width * (t if full_scores else average_causal_context(t))
    return FlopCount(
        attention_proj=cfg.n_layers * 2 * proj,
        attention_scores=cfg.n_layers * scores,
        routers=cfg.routing_layers * 2 * layer.routers,
        ffn=cfg.n_layers * 2 * layer.ffn_active,
        lm_head=2 * cfg.d_model * cfg.vocab_size,
        seq_len=t,
    )


def training_flops_per_token(cfg: ModelConfig, seq_len: int | None = None, *, implementation: bool = False,
                             full_scores: bool = False, convention: str = "total") -> float:
    """Forward + backward FLOPs per token: 3x the forward pass (ideal kernel, or ``implementation``;
    ``full_scores``: masked scores counted too), counted as ``convention`` says (:data:`FLOP_CONVENTIONS`)."""
    return TRAINING_FLOPS_MULTIPLIER * flops_per_token(cfg, seq_len, implementation=implementation,
                                                       full_scores=full_scores).counted(convention)


def architecture_summary(cfg: ModelConfig) -> str:
    """One line naming the backbone and its mixture layout."""
    block = "parallel" if cfg.parallel_residual else "sequential"
    emb = "tied" if cfg.tie_embeddings else "untied"
    options = [
        f"hd={cfg.head_dim}" if cfg.head_dim_override is not None else "",
        "q/k/v bias" if cfg.qkv_bias else "",
        "LayerNorm" if cfg.norm_kind == "layernorm" else "",
        f"RoPE {cfg.rope_scaling.describe()}" if cfg.rope_scaling.kind != "none" else "",
        f"logit scale {cfg.logit_scale:g}" if cfg.logit_scale != 1.0 else "",
        f"window {cfg.sliding_window}" if cfg.sliding_window is not None else "",
    ]
    parts = [
        f"{block} blocks, L={cfg.n_layers}, D={cfg.d_model}, H={cfg.n_heads}/KV={cfg.n_kv_heads}, "
        f"F={cfg.d_ff}, V={cfg.vocab_size} ({emb})" + "".join(f", {o}" for o in options if o)
    ]
    if cfg.attn_experts > 1:
        parts.append(f"attention {cfg.attn_experts} experts ({cfg.attn_router.describe()}, {cfg.attn_kv} KV)")
    if cfg.ffn_experts > 1:
        parts.append(f"FFN {cfg.ffn_experts} experts ({cfg.ffn_router.describe()})")
    if cfg.joint_router:
        parts.append("one router per layer shared by attention and FFN")
    if cfg.router_scope == "model":
        parts.append("layer 0 routes for every layer")
    return "; ".join(parts) if len(parts) > 1 else parts[0] + "; dense"


def describe(cfg: ModelConfig, seq_len: int | None = None) -> dict[str, Any]:
    """Rows for ``stage=info``: architecture, parameter counts and FLOPs per token (raw numbers)."""
    params = count_params(cfg)
    flops = flops_per_token(cfg, seq_len)
    implemented = flops_per_token(cfg, seq_len, implementation=True)
    return {
        "name": cfg.name,
        "architecture": architecture_summary(cfg),
        "params_total": params.total,
        "params_active": params.active,
        "params_embedding": params.embedding,
        "params_non_embedding": params.non_embedding,
        "params_per_layer": asdict(params.per_layer),
        "seq_len": flops.seq_len,
        "flops_per_token_forward": flops.total,
        "flops_per_token_attention": flops.attention,
        "flops_per_token_ffn": flops.ffn,
        "flops_per_token_lm_head": flops.lm_head,
        "flops_per_token_training": training_flops_per_token(cfg, seq_len),
        "flops_per_token_forward_implementation": implemented.total,
        "flops_per_token_attention_implementation": implemented.attention,
    }
