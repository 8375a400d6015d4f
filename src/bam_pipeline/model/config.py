"""Model configuration: one JSON-serialisable dataclass, its router choices, and the named presets.

A dense model is the special case ``attn_experts == ffn_experts == 1``. A mixture is the same
backbone with more experts and a :class:`RouterConfig` for each kind of router.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from bam_pipeline.errors import ConfigError

KV_MODES = ("expert", "shared")
ROUTER_KINDS = ("soft", "topk")


@dataclass(frozen=True)
class RouterConfig:
    """How a router turns its logits into gates (see :mod:`bam_pipeline.model.routing`).

    - ``soft``: every expert, weighted by the router softmax (BAM's attention routing);
    - ``topk``: the ``k`` most probable experts, weighted by their softmax probability, or by the
      probability renormalised over the chosen ``k`` when ``renormalize`` (BTX's gate).
    """

    kind: str = "topk"
    k: int = 1
    renormalize: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ROUTER_KINDS:
            raise ConfigError("kind", self.kind, f"use one of {', '.join(ROUTER_KINDS)}")
        if self.k < 1:
            raise ConfigError("k", self.k, "must be at least 1")

    def active(self, n_experts: int) -> int:
        """Experts one token uses out of ``n_experts``."""
        return n_experts if self.kind == "soft" else min(self.k, n_experts)

    def describe(self) -> str:
        """``soft``, ``top-1``, ``top-2 renormalised``."""
        if self.kind == "soft":
            return "soft"
        return f"top-{self.k}" + (" renormalised" if self.renormalize else "")


SOFT = RouterConfig(kind="soft")
TOP1 = RouterConfig(kind="topk", k=1)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a parallel-attention transformer, dense or mixture.

    ``d_ff`` is the SwiGLU *hidden* width (paper Table 8's "FFN dimension" is twice this).
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
    # Auxiliary loss weights (PAPER.md section 4: not stated by the paper; OLMoE/BTX choices)
    lb_coef: float = 0.01
    z_coef: float = 0.001
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        for key in ("attn_router", "ffn_router"):  # from_dict and replace() may pass plain mappings
            value = getattr(self, key)
            if isinstance(value, dict):
                object.__setattr__(self, key, RouterConfig(**value))
        for k in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            if getattr(self, k) <= 0:
                raise ConfigError(k, getattr(self, k), "must be positive")
        if self.d_model % self.n_heads:
            raise ConfigError("d_model", self.d_model, f"must be divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError("n_kv_heads", self.n_kv_heads, f"must divide n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ConfigError("d_model", self.d_model, f"gives head_dim={self.head_dim}; RoPE needs an even head_dim")
        for k in ("attn_experts", "ffn_experts"):
            if getattr(self, k) < 1:
                raise ConfigError(k, getattr(self, k), "must be at least 1")
        if self.attn_kv not in KV_MODES:
            raise ConfigError("attn_kv", self.attn_kv, f"use one of {', '.join(KV_MODES)}")
        for key, n in (("attn_router", self.attn_experts), ("ffn_router", self.ffn_experts)):
            router = getattr(self, key)
            if n > 1 and router.kind == "topk" and router.k > n:
                raise ConfigError(f"{key}.k", router.k, f"must be at most the number of experts ({n})")

    # ---- derived -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

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
        return dataclasses.asdict(self)

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
        return self.replace(attn_experts=1, attn_kv="expert", attn_router=SOFT, ffn_experts=1, ffn_router=TOP1)


# Named presets. ``bam-590m`` and ``bam-2b`` are paper Table 8 as PAPER.md section 5 reads it:
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
