"""Configuration of a bam-pipeline model exported for transformers (``trust_remote_code=True``).

A parallel- or sequential-residual transformer whose attention is a mixture of attention experts
(soft or top-k routed; one K/V projection per expert or one shared) and whose FFN is a mixture
of SwiGLU experts (top-k routed, gates renormalised or not, soft, hashed by token id, or expert
choice with per-expert thresholds). Routing is decided per layer or by layer 0 for every layer,
by separate attention and FFN routers or by one joint router per layer. One expert of a kind and
no router is the plain layer. Written by bam-pipeline's Hugging Face export; self-contained.
"""

from __future__ import annotations

from typing import Any

try:
    from transformers import PreTrainedConfig
except ImportError:  # transformers < 5.1 spells it PretrainedConfig
    from transformers import PretrainedConfig as PreTrainedConfig

ROUTER_KINDS = ("soft", "topk", "hash", "expert_choice")
FFN_ONLY_KINDS = ("hash", "expert_choice")
ROUTER_SCOPES = ("layer", "model")
ROPE_KINDS = ("none", "linear", "llama3")


def _router(value: dict[str, Any] | None, name: str) -> dict[str, Any]:
    router = {"kind": "soft", "k": 1, "renormalize": False, "capacity": 1.0, "threshold_momentum": 0.9,
              **(value or {})}
    if router["kind"] not in ROUTER_KINDS or int(router["k"]) < 1:
        raise ValueError(f"{name}={router!r}: kind must be one of {ROUTER_KINDS} and k at least 1")
    return router


class BamConfig(PreTrainedConfig):
    """Every field the forward pass reads (see ``modeling_bam.py``).

    ``rotary``: ``theta``, the frequency ``scaling`` (``kind`` none / linear / llama3 with
    ``factor``, ``low_freq_factor``, ``high_freq_factor``, ``original_max_seq_len``) and the
    ``precision`` (float64 or float32) the angles are computed in before their float32 cos/sin.
    ``attn_router`` / ``ffn_router``: ``kind`` (soft: every expert, softmax gates; topk: the ``k``
    most probable experts, gated by their softmax probability or, with ``renormalize``, by it
    renormalised over the k; FFN only: hash, the expert a token id's table entry names, gate 1;
    expert_choice, every expert whose threshold the token's probability reaches, with ``capacity``
    and ``threshold_momentum`` read in training mode). ``router_scope``: ``layer`` (every layer
    routes) or ``model`` (layer 0 routes for every layer); ``joint_router``: one router per layer
    whose logits both kinds gate.
    """

    model_type = "bam"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        vocab_size: int = 4096,
        hidden_size: int = 128,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 4,
        head_dim: int = 32,
        intermediate_size: int = 384,
        max_position_embeddings: int = 256,
        rotary: dict[str, Any] | None = None,
        norm_kind: str = "rmsnorm",
        norm_eps: float = 1e-5,
        parallel_residual: bool = True,
        qkv_bias: bool = False,
        logit_scale: float = 1.0,
        attn_experts: int = 1,
        attn_kv: str = "expert",
        attn_router: dict[str, Any] | None = None,
        ffn_experts: int = 1,
        ffn_router: dict[str, Any] | None = None,
        router_scope: str = "layer",
        joint_router: bool = False,
        tie_word_embeddings: bool = False,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.rotary = {"theta": 10000.0, "precision": "float64", **(rotary or {})}
        self.rotary["scaling"] = {"kind": "none", **self.rotary.get("scaling", {})}
        if self.rotary["scaling"]["kind"] not in ROPE_KINDS or self.rotary["precision"] not in ("float64", "float32"):
            raise ValueError(f"rotary={self.rotary!r}: scaling kind must be one of {ROPE_KINDS}, "
                             "precision float64 or float32")
        if norm_kind not in ("rmsnorm", "layernorm"):
            raise ValueError(f"norm_kind={norm_kind!r} must be rmsnorm or layernorm")
        if attn_kv not in ("expert", "shared"):
            raise ValueError(f"attn_kv={attn_kv!r} must be expert or shared")
        self.norm_kind = norm_kind
        self.norm_eps = norm_eps
        self.parallel_residual = parallel_residual
        self.qkv_bias = qkv_bias
        self.logit_scale = logit_scale
        self.attn_experts = attn_experts
        self.attn_kv = attn_kv
        self.attn_router = _router(attn_router, "attn_router")
        self.ffn_experts = ffn_experts
        self.ffn_router = _router(ffn_router, "ffn_router")
        if self.attn_router["kind"] in FFN_ONLY_KINDS:
            raise ValueError(f"attn_router kind {self.attn_router['kind']!r} routes the FFN only")
        if router_scope not in ROUTER_SCOPES:
            raise ValueError(f"router_scope={router_scope!r} must be one of {ROUTER_SCOPES}")
        if joint_router and (attn_experts != ffn_experts or self.ffn_router["kind"] in FFN_ONLY_KINDS):
            raise ValueError("joint_router needs as many attention as FFN experts and a learned FFN router")
        self.router_scope = router_scope
        self.joint_router = joint_router
        self.tie_word_embeddings = tie_word_embeddings
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(**kwargs)

    @property
    def kv_experts(self) -> int:
        """K/V projection sets per layer: one per attention expert, or one shared."""
        return self.attn_experts if self.attn_kv == "expert" else 1

    def routes_at(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` makes its own routing decision (and holds its routers)."""
        return self.router_scope == "layer" or layer_idx == 0
