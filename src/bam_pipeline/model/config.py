"""Model configuration: one JSON-serialisable dataclass, its router and RoPE-scaling choices, and
the named presets.

A dense model is the special case ``attn_experts == ffn_experts == 1``. A mixture is the same
backbone with more experts and a :class:`RouterConfig` for each kind of router.

**Serialisation** (:func:`config_dict`, behind every ``to_dict``): the fields that existed when configs
were first hashed are always written; every field added later is declared with :func:`added_later`
(``omit_at_default`` in its field metadata) and written only when it differs from its default, so a
config that does not use it serialises, and hashes, as before. A new option is one such field.

The backbone options beyond BAM's own block (an explicit head width, q/k/v biases, LayerNorm,
a logit scale, scaled RoPE and its precision, a sliding-window bound) exist so that imported checkpoints map onto
the model exactly (:mod:`bam_pipeline.interop`). The routing options of the ablations:
- ``router_scope``: ``layer`` (every MoE layer routes its own tokens) or ``model`` (one routing
  decision for the whole model: layer 0's routers decide, every later layer reuses its gates and
  experts and has no router of its own);
- ``joint_router``: one router per layer, ``layers.{i}.router.weight`` (E, D), whose logits both
  the attention and the FFN turn into gates with their own rule (needs E_a = E_f and a parallel
  block, where both read the same input);
- ``attn_lb_coef``: weight of the load-balancing loss of top-k attention routers (soft attention
  routing has none: it uses every expert).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

KV_MODES = ("expert", "shared")
ROUTER_RULES = ("soft", "topk", "hash", "expert_choice")  # the gating rules a RouterConfig.kind names
FFN_ONLY_KINDS = ("hash", "expert_choice")  # router kinds that only the MoE FFN implements
ROUTER_SCOPES = ("layer", "model")
NORM_KINDS = ("rmsnorm", "layernorm")
ROPE_PRECISIONS = ("float64", "float32")
# RoPE scaling kinds and the fields each one reads
ROPE_SCALINGS = {
    "none": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len"),
}

OMIT_AT_DEFAULT = "omit_at_default"  # field metadata: written only when it differs from its default


def added_later(default: Any) -> Any:
    """A config field added after configs were first hashed: :func:`config_dict` leaves it out at its
    ``default``, so configs that do not use it keep their serialisation and hash."""
    return field(default=default, metadata={OMIT_AT_DEFAULT: True})


def config_dict(config: Any) -> dict[str, Any]:
    """The config dataclass ``config`` as a JSON-ready dict in field order, nested configs as their
    dicts; a field declared :func:`added_later` only when it differs from its default."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.metadata.get(OMIT_AT_DEFAULT) and value == f.default:
            continue
        out[f.name] = config_dict(value) if dataclasses.is_dataclass(value) else value
    return out


@dataclass(frozen=True)
class RouterConfig:
    """How a router turns its logits into gates (see :mod:`bam_pipeline.model.routing`).

    - ``soft``: every expert, weighted by the router softmax (BAM's attention routing);
    - ``topk``: the ``k`` most probable experts, weighted by their softmax probability, or by the
      probability renormalised over the chosen ``k`` when ``renormalize`` (BTX's gate);
    - ``hash`` (FFN only): no learned router; a fixed table maps each token id to one expert with
      gate 1 (Roller et al. 2021);
    - ``expert_choice`` (FFN only): each expert takes the ``capacity * N / E`` tokens of the batch
      with the highest softmax probability for it (Zhou et al. 2022), gate = that probability; in
      eval mode a token goes to expert e iff its probability reaches the expert's threshold, a
      running estimate (momentum ``threshold_momentum``) of the capacity-th score seen in training.
    ``capacity`` and ``threshold_momentum`` apply to ``expert_choice`` only (added later: written when
    not at their defaults).
    """

    kind: str = "topk"
    k: int = 1
    renormalize: bool = False
    capacity: float = added_later(1.0)
    threshold_momentum: float = added_later(0.9)

    def __post_init__(self) -> None:
        if self.kind not in ROUTER_RULES:
            raise ConfigError("kind", self.kind, f"use one of {', '.join(ROUTER_RULES)}")
        if self.k < 1:
            raise ConfigError("k", self.k, "must be at least 1")
        if self.kind in FFN_ONLY_KINDS and self.k != 1:
            raise ConfigError("k", self.k, f"{self.kind} routing does not pick k experts per token; leave k at 1"
                              + (" and set capacity" if self.kind == "expert_choice" else ""))
        if not (math.isfinite(self.capacity) and self.capacity > 0):
            raise ConfigError("capacity", self.capacity, "must be a positive number (tokens per expert x E / N)")
        if not 0.0 <= self.threshold_momentum < 1.0:
            raise ConfigError("threshold_momentum", self.threshold_momentum, "must be in [0, 1)")
        if self.kind != "expert_choice":
            for f in dataclasses.fields(self):
                if f.name in EXPERT_CHOICE_ONLY and getattr(self, f.name) != f.default:
                    raise ConfigError(f.name, getattr(self, f.name),
                                      f"applies to kind=expert_choice only, not {self.kind}")

    @property
    def learned(self) -> bool:
        """Whether the router has a learned weight (every kind but ``hash``)."""
        return self.kind != "hash"

    def active(self, n_experts: int) -> float:
        """Experts one token uses out of ``n_experts``; under expert choice the mean, ``capacity``."""
        if self.kind == "soft":
            return n_experts
        if self.kind == "expert_choice":
            return min(self.capacity, float(n_experts))
        return 1 if self.kind == "hash" else min(self.k, n_experts)

    def describe(self) -> str:
        """``soft``, ``top-1``, ``top-2 renormalised``, ``hash``, ``expert-choice at capacity 1``."""
        if self.kind == "soft":
            return "soft"
        if self.kind == "hash":
            return "hash"
        if self.kind == "expert_choice":
            return f"expert-choice at capacity {self.capacity:g}"
        return f"top-{self.k}" + (" renormalised" if self.renormalize else "")

    def to_dict(self) -> dict[str, Any]:
        """:func:`config_dict`: every field, the expert-choice ones only away from their defaults."""
        return config_dict(self)


EXPERT_CHOICE_ONLY = ("capacity", "threshold_momentum")  # RouterConfig fields only kind=expert_choice reads


SOFT = RouterConfig(kind="soft")
TOP1 = RouterConfig(kind="topk", k=1)


@dataclass(frozen=True)
class RopeScaling:
    """How RoPE's inverse frequencies are rescaled for a longer context (transformers' ``rope_type``).

    - ``none``: ``theta ** (-2j / hd)`` as is;
    - ``linear``: every frequency divided by ``factor`` (position interpolation);
    - ``llama3``: Llama 3.1's rule: wavelengths above ``original_max_seq_len / low_freq_factor`` are
      divided by ``factor``, those below ``original_max_seq_len / high_freq_factor`` kept, and the
      band between interpolated smoothly.
    The fields a kind does not read keep their defaults.
    """

    kind: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ROPE_SCALINGS:
            raise ConfigError("kind", self.kind, f"use one of {', '.join(ROPE_SCALINGS)}")
        for f in dataclasses.fields(self)[1:]:
            if f.name not in ROPE_SCALINGS[self.kind] and getattr(self, f.name) != f.default:
                raise ConfigError(f.name, getattr(self, f.name), f"has no effect with kind={self.kind!r}; leave it out")
        if not (math.isfinite(self.factor) and self.factor > 0):
            raise ConfigError("factor", self.factor, "must be a positive number")
        if self.kind == "llama3":
            if not 0 < self.low_freq_factor < self.high_freq_factor:
                raise ConfigError(
                    "high_freq_factor", self.high_freq_factor,
                    f"must exceed low_freq_factor={self.low_freq_factor}, which must be positive",
                )
            if self.original_max_seq_len <= 0:
                raise ConfigError("original_max_seq_len", self.original_max_seq_len, "must be positive for llama3")

    def describe(self) -> str:
        """``none``, ``linear x4``, ``llama3 x8``."""
        return self.kind if self.kind == "none" else f"{self.kind} x{self.factor:g}"


NO_ROPE_SCALING = RopeScaling()


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a parallel-attention transformer, dense or mixture.

    ``d_ff`` is the SwiGLU *hidden* width (paper Table 8's "FFN dimension" is twice this).
    ``head_dim_override`` fixes the head width when it is not ``d_model // n_heads``. ``qkv_bias``
    adds a bias to the q, k and v projections. ``norm_kind`` is ``rmsnorm`` or ``layernorm``
    (mean-centred, scale only, no bias). ``logit_scale`` multiplies the output logits.
    ``sliding_window`` records that the source model attends over at most that many positions:
    the model then refuses a ``max_seq_len`` above it, so full causal attention stays exact.
    ``rope_precision`` is the dtype RoPE's frequencies and angles are computed in before the
    float32 cos/sin tables: ``float64`` (ours), or ``float32`` as transformers (and the reference
    Llama code) computes them, so an imported model rotates exactly as it was trained.
    """

    vocab_size: int = 4096
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    d_ff: int = 384
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    parallel_residual: bool = True
    init_std: float = 0.02
    # Mixture of attention (E = 1: plain attention)
    attn_experts: int = 1
    attn_kv: str = "expert"
    attn_router: RouterConfig = SOFT
    # Mixture-of-experts FFN (E = 1: plain SwiGLU FFN)
    ffn_experts: int = 1
    ffn_router: RouterConfig = TOP1
    # Auxiliary loss weights (docs/paper.md section 4: not stated by the paper; OLMoE/BTX choices)
    lb_coef: float = 0.01
    z_coef: float = 0.001
    # Routing layouts of the ablations (module docstring)
    router_scope: str = added_later("layer")
    joint_router: bool = added_later(False)
    attn_lb_coef: float = added_later(0.0)
    # Backbone options of imported checkpoints (module docstring)
    head_dim_override: int | None = added_later(None)
    qkv_bias: bool = added_later(False)
    norm_kind: str = added_later("rmsnorm")
    logit_scale: float = added_later(1.0)
    rope_scaling: RopeScaling = added_later(NO_ROPE_SCALING)
    rope_precision: str = added_later("float64")
    sliding_window: int | None = added_later(None)
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        for key, kind in (("attn_router", RouterConfig), ("ffn_router", RouterConfig), ("rope_scaling", RopeScaling)):
            value = getattr(self, key)  # from_dict and replace() may pass plain mappings
            if isinstance(value, dict):
                try:
                    object.__setattr__(self, key, kind(**value))
                except ConfigError as e:
                    raise e.under(key) from None
        for k in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            if getattr(self, k) <= 0:
                raise ConfigError(k, getattr(self, k), "must be positive")
        if self.head_dim_override is None and self.d_model % self.n_heads:
            raise ConfigError("d_model", self.d_model, f"must be divisible by n_heads={self.n_heads}")
        if self.head_dim_override is not None and self.head_dim_override <= 0:
            raise ConfigError("head_dim_override", self.head_dim_override,
                              "must be positive, or null for d_model // n_heads")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError("n_kv_heads", self.n_kv_heads, f"must divide n_heads={self.n_heads}")
        if self.head_dim % 2:
            if self.head_dim_override is None:
                raise ConfigError("d_model", self.d_model, f"gives head_dim={self.head_dim}; RoPE needs an even head_dim")
            raise ConfigError("head_dim_override", self.head_dim, "is odd; RoPE needs an even head_dim")
        if self.rope_precision not in ROPE_PRECISIONS:
            raise ConfigError("rope_precision", self.rope_precision, f"use one of {', '.join(ROPE_PRECISIONS)}")
        if self.norm_kind not in NORM_KINDS:
            raise ConfigError("norm_kind", self.norm_kind, f"use one of {', '.join(NORM_KINDS)}")
        if not (math.isfinite(self.logit_scale) and self.logit_scale > 0):
            raise ConfigError("logit_scale", self.logit_scale, "must be a positive number")
        if self.sliding_window is not None and self.max_seq_len > self.sliding_window:
            raise ConfigError(
                "max_seq_len", self.max_seq_len,
                f"exceeds sliding_window={self.sliding_window}: the model is exact only while every position "
                "sees the whole context; use a max_seq_len of at most the window",
            )
        for k in ("attn_experts", "ffn_experts"):
            if getattr(self, k) < 1:
                raise ConfigError(k, getattr(self, k), "must be at least 1")
        if self.attn_kv not in KV_MODES:
            raise ConfigError("attn_kv", self.attn_kv, f"use one of {', '.join(KV_MODES)}")
        for key, n in (("attn_router", self.attn_experts), ("ffn_router", self.ffn_experts)):
            router = getattr(self, key)
            if n > 1 and router.kind == "topk" and router.k > n:
                raise ConfigError(f"{key}.k", router.k, f"must be at most the number of experts ({n})")
        if self.attn_router.kind in FFN_ONLY_KINDS:
            raise ConfigError("attn_router.kind", self.attn_router.kind,
                              "routes the FFN only; attention routing is soft or topk")
        if self.router_scope not in ROUTER_SCOPES:
            raise ConfigError("router_scope", self.router_scope, f"use one of {', '.join(ROUTER_SCOPES)}")
        if not (math.isfinite(self.attn_lb_coef) and self.attn_lb_coef >= 0):
            raise ConfigError("attn_lb_coef", self.attn_lb_coef, "must be a number >= 0")
        if self.joint_router:
            if self.attn_experts != self.ffn_experts or self.attn_experts < 2:
                raise ConfigError("joint_router", self.joint_router,
                                  f"needs as many attention as FFN experts, at least 2 (got {self.attn_experts} "
                                  f"attention, {self.ffn_experts} FFN)")
            if self.ffn_router.kind in FFN_ONLY_KINDS:
                raise ConfigError("joint_router", self.joint_router,
                                  f"shares learned logits; ffn_router.kind={self.ffn_router.kind} has none to share")
            if not self.parallel_residual:
                raise ConfigError("joint_router", self.joint_router, "needs parallel blocks (attention and FFN "
                                                                     "reading one input)")

    # ---- derived -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads if self.head_dim_override is None else self.head_dim_override

    @property
    def kv_experts(self) -> int:
        """Number of K/V projection sets per layer: one per expert, or one shared."""
        return self.attn_experts if self.attn_kv == "expert" else 1

    @property
    def attn_active_experts(self) -> int:
        """Attention experts one token uses (soft routing uses all of them)."""
        return self.attn_router.active(self.attn_experts)

    @property
    def ffn_active_experts(self) -> int:
        """FFN experts one token uses."""
        return self.ffn_router.active(self.ffn_experts)

    @property
    def is_dense(self) -> bool:
        return self.attn_experts == 1 and self.ffn_experts == 1

    # ---- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """:func:`config_dict`: every field, those added later (the backbone options of imported
        checkpoints, the routing options of the ablations) only away from their defaults."""
        return config_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(unknown[0], d[unknown[0]], f"is not a model config key; known keys: {', '.join(sorted(known))}")
        return cls(**d)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def dense(self) -> "ModelConfig":
        """The dense backbone of this config (one attention expert, one FFN expert, default routers)."""
        return self.replace(attn_experts=1, attn_kv="expert", attn_router=SOFT, ffn_experts=1, ffn_router=TOP1,
                            router_scope="layer", joint_router=False, attn_lb_coef=0.0)

    def routes_at(self, layer: int) -> bool:
        """Whether block ``layer`` makes its own routing decision (and holds its routers)."""
        return self.router_scope == "layer" or layer == 0

    @property
    def routing_layers(self) -> int:
        """How many blocks hold routers: every block, or block 0 alone (``router_scope=model``)."""
        return self.n_layers if self.router_scope == "layer" else 1


# Named presets. ``bam-590m`` and ``bam-2b`` are paper Table 8 as docs/paper.md section 5 reads it:
# hidden width = "FFN dimension" / 2, no biases, one norm per block. Context length is not stated by
# the paper; 2048 is this project's documented choice.
PRESETS: dict[str, ModelConfig] = {
    "smoke": ModelConfig(
        name="smoke", vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64
    ),
    "tiny": ModelConfig(
        name="tiny", vocab_size=4096, d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=384,
        max_seq_len=256, tie_embeddings=True,
    ),
    "small": ModelConfig(
        name="small", vocab_size=8192, d_model=256, n_layers=6, n_heads=8, n_kv_heads=8, d_ff=768,
        max_seq_len=512, tie_embeddings=True,
    ),
    "bam-590m": ModelConfig(
        name="bam-590m", vocab_size=256000, d_model=1024, n_layers=6, n_heads=8, n_kv_heads=8, d_ff=2048,
        max_seq_len=2048, tie_embeddings=False,
    ),
    "bam-2b": ModelConfig(
        name="bam-2b", vocab_size=256000, d_model=2304, n_layers=18, n_heads=18, n_kv_heads=6, d_ff=9216,
        max_seq_len=2048, tie_embeddings=True,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset, optionally with fields overridden (e.g. ``vocab_size`` from the tokenizer)."""
    if name not in PRESETS:
        raise ConfigError("preset", name, f"is not a model preset; known presets: {', '.join(PRESETS)}")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise ConfigError(unknown[0], overrides[unknown[0]], "is not a model config key")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
