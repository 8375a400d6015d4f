"""Model configuration: one YAML/JSON-serialisable dataclass, the named presets, mixture layouts.

A dense model is the special case ``attn_experts == ffn_experts == 1``. Mixture layouts are the
same dataclass with more experts (see :meth:`ModelConfig.with_mixture`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

ATTN_ROUTINGS = ("soft", "top1", "top2")
KV_MODES = ("expert", "shared")
FFN_GATES = ("softmax", "renorm")


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
    attn_routing: str = "soft"
    attn_kv: str = "expert"
    # Mixture-of-experts FFN (E = 1: plain SwiGLU FFN)
    ffn_experts: int = 1
    ffn_top_k: int = 1
    ffn_gate: str = "softmax"
    # Auxiliary loss weights (PAPER.md section 4: not stated by the paper; OLMoE/BTX choices)
    lb_coef: float = 0.01
    z_coef: float = 0.001
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"invalid model config: {msg}")

        for k in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            need(getattr(self, k) > 0, f"{k} must be positive, got {getattr(self, k)}")
        need(self.d_model % self.n_heads == 0, f"d_model={self.d_model} not divisible by n_heads={self.n_heads}")
        need(self.n_heads % self.n_kv_heads == 0, f"n_heads={self.n_heads} not divisible by n_kv_heads={self.n_kv_heads}")
        need(self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be even for RoPE")
        need(self.attn_experts >= 1, f"attn_experts must be >= 1, got {self.attn_experts}")
        need(self.ffn_experts >= 1, f"ffn_experts must be >= 1, got {self.ffn_experts}")
        need(self.attn_routing in ATTN_ROUTINGS, f"attn_routing must be one of {ATTN_ROUTINGS}, got {self.attn_routing!r}")
        need(self.attn_kv in KV_MODES, f"attn_kv must be one of {KV_MODES}, got {self.attn_kv!r}")
        need(self.ffn_gate in FFN_GATES, f"ffn_gate must be one of {FFN_GATES}, got {self.ffn_gate!r}")
        need(1 <= self.ffn_top_k <= self.ffn_experts, f"ffn_top_k={self.ffn_top_k} must be in [1, ffn_experts={self.ffn_experts}]")
        if self.attn_routing == "top2":
            need(self.attn_experts >= 2, "attn_routing=top2 needs attn_experts >= 2")

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
        return {"soft": self.attn_experts, "top1": 1, "top2": min(2, self.attn_experts)}[self.attn_routing]

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
            raise ValueError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def with_mixture(
        self,
        *,
        attn_experts: int = 1,
        attn_routing: str = "soft",
        attn_kv: str = "expert",
        ffn_experts: int = 1,
        ffn_top_k: int = 1,
        ffn_gate: str = "softmax",
    ) -> "ModelConfig":
        """The same backbone with a mixture layout (E experts in attention and/or FFN)."""
        return self.replace(
            attn_experts=attn_experts,
            attn_routing=attn_routing,
            attn_kv=attn_kv,
            ffn_experts=ffn_experts,
            ffn_top_k=ffn_top_k,
            ffn_gate=ffn_gate,
        )

    def dense(self) -> "ModelConfig":
        """The dense backbone of this config (one attention expert, one FFN expert)."""
        return self.with_mixture()


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
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
