"""Upcycling: dense state dicts in, one mixture state dict (and its ModelConfig) out.

Pure functions over the state-dict layout of docs/architecture.md. Dense models have E = 1, so an
expert tensor ``(1, ...)`` of each source model is concatenated along the expert dim; tensors that
are not experts are uniformly averaged; routers are freshly initialised from a seeded generator.

Methods (PAPER.md sections 1, 3 and 7):
- ``bam``: attention experts (wq, wk, wv, wo) and FFN experts (w1, w2, w3) copied from the models
  in order [seed (when ``include_seed``), expert_1, ..., expert_N]; with shared KV the K/V
  projections are averaged into one set; everything else averaged.
- ``btx``: FFN experts copied, attention and everything else averaged (one attention expert).
- ``sparse_upcycle``: every FFN expert a copy of the seed's FFN, everything else the seed's.
- ``dense``: the uniform average of the models (one model: that model).
``extra_seed_ffn_experts`` appends that many copies of the seed's FFN to the FFN experts
(BTX parameter-matched: [seed, code, law, math, seed, seed], top-3).

Routers are returned in the dtype of the dense models, so a mixture state dict has one dtype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from bam_pipeline.errors import BamError
from bam_pipeline.model.config import ATTN_ROUTINGS, FFN_GATES, KV_MODES, ModelConfig

StateDict = dict[str, Tensor]

METHODS = ("bam", "btx", "sparse_upcycle", "dense")
ROUTER_INITS = ("normal", "zeros", "uniform")

# The mix stage's variants: name -> keyword arguments of :func:`upcycle`.
MIX_VARIANTS: dict[str, dict[str, Any]] = {
    "bam": {"method": "bam", "kv": "expert", "attn_routing": "soft", "ffn_top_k": 1, "ffn_gate": "softmax"},
    "bam_kv_shared": {"method": "bam", "kv": "shared", "attn_routing": "soft", "ffn_top_k": 1, "ffn_gate": "softmax"},
    "bam_attn_top1": {"method": "bam", "kv": "expert", "attn_routing": "top1", "ffn_top_k": 1, "ffn_gate": "softmax"},
    "bam_attn_top2": {"method": "bam", "kv": "expert", "attn_routing": "top2", "ffn_top_k": 1, "ffn_gate": "softmax"},
    "btx": {"method": "btx", "ffn_top_k": 1, "ffn_gate": "softmax"},
    # 3 domain experts + 3 copies of the seed FFN (the seed itself + 2 more): with F = 2D the two
    # extra FFN experts hold as many parameters as BAM's three extra attention experts.
    "btx_matched": {"method": "btx", "ffn_top_k": 3, "ffn_gate": "softmax", "extra_seed_ffn_experts": 2},
    "sparse_upcycle": {"method": "sparse_upcycle", "ffn_top_k": 1, "ffn_gate": "softmax"},
    "dense": {"method": "dense"},
}

_ATTN_EXPERT_KEYS = ("wq", "wo")
_KV_KEYS = ("wk", "wv")
_FFN_KEYS = ("w1", "w2", "w3")
_VOCAB_KEYS = ("tok_emb.weight", "lm_head.weight")


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
        if ea > 1:
            shapes[p + "attn.router.weight"] = (ea, d)
        if not cfg.parallel_residual:
            shapes[p + "ffn_norm.weight"] = (d,)
        shapes[p + "ffn.w1"] = (ef, d, f)
        shapes[p + "ffn.w3"] = (ef, d, f)
        shapes[p + "ffn.w2"] = (ef, f, d)
        if ef > 1:
            shapes[p + "ffn.router.weight"] = (ef, d)
    shapes["norm.weight"] = (d,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes


def check_mixable(models: Sequence[Mapping[str, Tensor]], labels: Sequence[str], dense_cfg: ModelConfig) -> None:
    """Refuse dense models that cannot be mixed: raise BamError naming the first mismatching tensor."""
    if not models:
        raise BamError("no dense models to mix; give the seed and/or at least one domain expert")
    if not dense_cfg.is_dense:
        raise BamError(
            f"upcycling starts from a dense config, got attn_experts={dense_cfg.attn_experts}, "
            f"ffn_experts={dense_cfg.ffn_experts}; pass the dense backbone (ModelConfig.dense())"
        )
    want = expected_shapes(dense_cfg)
    for model, label in zip(models, labels, strict=True):
        routers = sorted(k for k in model if k.endswith("router.weight"))
        if routers:
            raise BamError(
                f"{label} is not a dense model: it has router tensor {routers[0]!r}; "
                "upcycle from dense (E = 1) checkpoints"
            )
        missing, unexpected = sorted(set(want) - set(model)), sorted(set(model) - set(want))
        if missing or unexpected:
            raise BamError(
                f"{label} does not have the dense layout of the config: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}; mix checkpoints of one architecture "
                "(n_layers, tie_embeddings, parallel_residual)"
            )
        for key, shape in want.items():
            got = tuple(model[key].shape)
            if got != shape:
                vocab_differs = key in _VOCAB_KEYS and got[:1] != shape[:1]
                why = "different vocabularies" if vocab_differs else "different architectures"
                raise BamError(
                    f"cannot mix: tensor {key!r} has shape {got} in {label} but {shape} in the dense config "
                    f"({why}); mix checkpoints branched from one seed with one tokenizer"
                )
    first, first_label = models[0], labels[0]
    for model, label in zip(models[1:], labels[1:]):
        for key in want:
            if model[key].dtype != first[key].dtype:
                raise BamError(
                    f"cannot mix: tensor {key!r} is {first[key].dtype} in {first_label} but {model[key].dtype} "
                    f"in {label}; convert all models to one dtype first"
                )


def average(tensors: Sequence[Tensor]) -> Tensor:
    """Uniform mean of same-shape tensors, computed in float32, returned in their dtype."""
    return torch.stack([t.float() for t in tensors]).mean(dim=0).to(tensors[0].dtype)


def average_state_dicts(models: Sequence[Mapping[str, Tensor]]) -> StateDict:
    """Key-wise uniform average of state dicts with one layout."""
    return {key: average([m[key] for m in models]) for key in models[0]}


def stack_experts(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate ``(1, ...)`` expert tensors along the expert dim: ``(len(tensors), ...)``."""
    return torch.cat(list(tensors), dim=0)


def init_router(
    n_experts: int, d_model: int, *, init: str, std: float, generator: torch.Generator, dtype: torch.dtype
) -> Tensor:
    """A fresh router weight ``(E, D)``: N(0, std), zeros, or U(-std, std); drawn in float32."""
    if init == "zeros":
        return torch.zeros(n_experts, d_model, dtype=dtype)
    if init == "normal":
        w = torch.randn(n_experts, d_model, generator=generator) * std
    else:
        w = (torch.rand(n_experts, d_model, generator=generator) * 2 - 1) * std
    return w.to(dtype)


def assemble_mixture(
    mix_cfg: ModelConfig,
    backbone: Mapping[str, Tensor],
    attn_sources: Sequence[Mapping[str, Tensor]],
    ffn_sources: Sequence[Mapping[str, Tensor]],
    *,
    router_init: str,
    router_std: float,
    generator_seed: int,
) -> StateDict:
    """Build the mixture state dict of ``mix_cfg``.

    Attention expert j comes from ``attn_sources[j]`` (K/V averaged over them when shared), FFN
    expert i from ``ffn_sources[i]``, every other tensor from ``backbone``. Routers are drawn in
    layout order (per layer: attention, then FFN) from one generator seeded with ``generator_seed``.
    """
    generator = torch.Generator().manual_seed(generator_seed)
    dtype = backbone["tok_emb.weight"].dtype
    out: StateDict = {}
    for key, shape in expected_shapes(mix_cfg).items():
        module, _, name = key.rpartition(".")
        if key.endswith("router.weight"):
            out[key] = init_router(*shape, init=router_init, std=router_std, generator=generator, dtype=dtype)
        elif module.endswith("attn") and name in _ATTN_EXPERT_KEYS:
            out[key] = stack_experts([s[key] for s in attn_sources])
        elif module.endswith("attn") and name in _KV_KEYS:
            kvs = [s[key] for s in attn_sources]
            out[key] = stack_experts(kvs) if mix_cfg.attn_kv == "expert" else average(kvs)
        elif module.endswith("ffn") and name in _FFN_KEYS:
            out[key] = stack_experts([s[key] for s in ffn_sources])
        else:
            out[key] = backbone[key].clone()
    return out


def _check_options(
    method: str, kv: str, attn_routing: str, ffn_gate: str, router_init: str, extra_seed_ffn_experts: int
) -> None:
    for name, value, allowed in (
        ("method", method, METHODS),
        ("kv", kv, KV_MODES),
        ("attn_routing", attn_routing, ATTN_ROUTINGS),
        ("ffn_gate", ffn_gate, FFN_GATES),
        ("router_init", router_init, ROUTER_INITS),
    ):
        if value not in allowed:
            raise BamError(f"unknown upcycling {name}={value!r}; use one of {', '.join(allowed)}")
    if extra_seed_ffn_experts < 0:
        raise BamError(f"extra_seed_ffn_experts must be >= 0, got {extra_seed_ffn_experts}")


def mixture_layout(
    method: str,
    n_experts: int,
    dense_cfg: ModelConfig,
    *,
    include_seed: bool = True,
    kv: str = "expert",
    attn_routing: str = "soft",
    ffn_top_k: int = 1,
    ffn_gate: str = "softmax",
    extra_seed_ffn_experts: int = 0,
) -> ModelConfig:
    """The mixture config :func:`upcycle` builds from the seed and ``n_experts`` domain experts.

    Needs no weights: ``stage=info`` and compute-matched budgets use it before any model exists.
    """
    _check_options(method, kv, attn_routing, ffn_gate, "normal", extra_seed_ffn_experts)
    n_models = n_experts + (1 if include_seed else 0)
    if n_models == 0:
        raise BamError("no dense models to mix: include_seed=false and no domain experts; give at least one model")
    if method == "dense":
        return dense_cfg
    n_attn = n_models if method == "bam" else 1
    n_ffn = n_models + extra_seed_ffn_experts
    if n_ffn < 2:
        raise BamError(
            f"{method} needs at least 2 FFN experts, got {n_ffn}; "
            "give more domain experts, set include_seed=true, or use method=dense"
        )
    if not 1 <= ffn_top_k <= n_ffn:
        raise BamError(f"ffn_top_k={ffn_top_k} must be between 1 and the number of FFN experts ({n_ffn})")
    return dense_cfg.with_mixture(
        attn_experts=n_attn,
        attn_routing=attn_routing if n_attn > 1 else "soft",
        attn_kv=kv if n_attn > 1 else "expert",
        ffn_experts=n_ffn,
        ffn_top_k=ffn_top_k,
        ffn_gate=ffn_gate,
    )


def upcycle(
    method: str,
    seed: Mapping[str, Tensor],
    experts: Sequence[Mapping[str, Tensor]],
    dense_cfg: ModelConfig,
    *,
    include_seed: bool = True,
    kv: str = "expert",
    attn_routing: str = "soft",
    ffn_top_k: int = 1,
    ffn_gate: str = "softmax",
    extra_seed_ffn_experts: int = 0,
    router_init: str = "normal",
    router_std: float = 0.02,
    generator_seed: int = 0,
) -> tuple[ModelConfig, StateDict]:
    """Mix dense models into one mixture: returns ``(mixture_cfg, mixture_state_dict)``.

    The mixed models are ``[seed] + experts`` (``experts`` alone when ``include_seed=False``).
    ``kv`` and ``attn_routing`` apply to ``bam`` (the only method with several attention experts);
    the FFN options apply to ``bam``, ``btx`` and ``sparse_upcycle``; ``dense`` takes none of them.
    """
    _check_options(method, kv, attn_routing, ffn_gate, router_init, extra_seed_ffn_experts)
    mix_cfg = mixture_layout(
        method, len(experts), dense_cfg, include_seed=include_seed, kv=kv, attn_routing=attn_routing,
        ffn_top_k=ffn_top_k, ffn_gate=ffn_gate, extra_seed_ffn_experts=extra_seed_ffn_experts,
    )
    labels = ["the seed"] + [f"expert {i + 1}" for i in range(len(experts))]
    check_mixable([seed, *experts], labels, dense_cfg)
    models = ([seed] if include_seed else []) + list(experts)

    averaged = average_state_dicts(models)
    if method == "dense":
        return dense_cfg, averaged

    seed_copies = [seed] * extra_seed_ffn_experts
    if method == "bam":
        attn_sources, ffn_sources, backbone = models, models + seed_copies, averaged
    elif method == "btx":
        attn_sources, ffn_sources, backbone = [averaged], models + seed_copies, averaged
    else:  # sparse_upcycle
        attn_sources, ffn_sources, backbone = [seed], [seed] * (len(models) + extra_seed_ffn_experts), seed
    state = assemble_mixture(
        mix_cfg,
        backbone,
        attn_sources,
        ffn_sources,
        router_init=router_init,
        router_std=router_std,
        generator_seed=generator_seed,
    )
    return mix_cfg, state


def upcycle_variant(
    variant: str,
    seed: Mapping[str, Tensor],
    experts: Sequence[Mapping[str, Tensor]],
    dense_cfg: ModelConfig,
    **overrides: Any,
) -> tuple[ModelConfig, StateDict]:
    """:func:`upcycle` with the keyword arguments of ``MIX_VARIANTS[variant]`` (``overrides`` win)."""
    if variant not in MIX_VARIANTS:
        raise BamError(f"unknown mix variant {variant!r}; use one of {', '.join(MIX_VARIANTS)}")
    return upcycle(seed=seed, experts=experts, dense_cfg=dense_cfg, **{**MIX_VARIANTS[variant], **overrides})
