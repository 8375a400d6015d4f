"""The model's state-dict layout (docs/architecture.md, "Model state-dict layout"): every key and its
shape for a config (:func:`expected_shapes`, in the model's order), and which tensors are stacked
experts (:data:`EXPERT_TENSORS`). Upcycling assembles this layout, the import fills it, the export
and every consumer check against it, and training freezes the expert tensors it names.

An expert tensor's leading dim counts what its group says: attention experts (``wq``, ``wo``,
``bq``: ``E_a``), K/V sets (``wk``, ``wv``, ``bk``, ``bv``: ``E_kv``, one per attention expert under
expert KV, one under shared KV) or FFN experts (``w1``, ``w3``, ``w2``: ``E_f``); a dense model has 1.
"""

from __future__ import annotations

from torch import Tensor

from .config import ModelConfig

StateDict = dict[str, Tensor]

ATTN_EXPERT_TENSORS = ("attn.wq", "attn.wo", "attn.bq")  # (E_a, ...): one per attention expert
KV_TENSORS = ("attn.wk", "attn.wv", "attn.bk", "attn.bv")  # (E_kv, ...): one per K/V set
FFN_EXPERT_TENSORS = ("ffn.w1", "ffn.w3", "ffn.w2")  # (E_f, ...): one per FFN expert
EXPERT_TENSORS = ATTN_EXPERT_TENSORS + KV_TENSORS + FFN_EXPERT_TENSORS  # key suffixes of every stacked expert tensor


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The state-dict layout of docs/architecture.md for ``cfg``: key -> shape, in the model's order."""
    d, q, kv, f = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.d_ff
    ea, ekv, ef = cfg.attn_experts, cfg.kv_experts, cfg.ffn_experts
    shapes: dict[str, tuple[int, ...]] = {"tok_emb.weight": (cfg.vocab_size, d)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes[p + "norm.weight"] = (d,)
        shapes[p + "attn.wq"] = (ea, d, q)
        shapes[p + "attn.wk"] = (ekv, d, kv)
        shapes[p + "attn.wv"] = (ekv, d, kv)
        shapes[p + "attn.wo"] = (ea, q, d)
        if cfg.qkv_bias:
            shapes[p + "attn.bq"] = (ea, q)
            shapes[p + "attn.bk"] = (ekv, kv)
            shapes[p + "attn.bv"] = (ekv, kv)
        own = cfg.routes_at(i) and not cfg.joint_router  # the attention and FFN hold their own routers
        if ea > 1 and own:
            shapes[p + "attn.router.weight"] = (ea, d)
        if not cfg.parallel_residual:
            shapes[p + "ffn_norm.weight"] = (d,)
        shapes[p + "ffn.w1"] = (ef, d, f)
        shapes[p + "ffn.w3"] = (ef, d, f)
        shapes[p + "ffn.w2"] = (ef, f, d)
        if ef > 1 and own:
            if cfg.ffn_router.kind == "hash":
                shapes[p + "ffn.router.table"] = (cfg.vocab_size,)
            else:
                shapes[p + "ffn.router.weight"] = (ef, d)
            if cfg.ffn_router.kind == "expert_choice":
                shapes[p + "ffn.router.threshold"] = (ef,)
        if cfg.joint_router and cfg.routes_at(i):
            shapes[p + "router.weight"] = (ea, d)
    shapes["norm.weight"] = (d,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes
