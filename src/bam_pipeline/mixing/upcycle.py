"""Upcycling: dense state dicts in, one mixture state dict (and its ModelConfig) out.

Pure functions over the model's state-dict layout (:mod:`~bam_pipeline.model.state_dict`). Dense
models have E = 1, so an expert tensor ``(1, ...)`` of each source model is concatenated along the
expert dim; tensors that are not experts are uniformly averaged; routers are freshly initialised
from a seeded generator. Which model each expert comes from, and which models are averaged, is the
variant's declaration (:class:`~bam_pipeline.mixing.variant.MixVariant`).

Routers are returned in the dtype of the dense models, so a mixture state dict has one dtype
(floating tensors; a hash router's table is int64).

Routing options of the ablations: routers exist only in the blocks that decide
(``ModelConfig.routes_at``); a joint router is ``layers.{i}.router.weight``; a hash router is the
buffer ``ffn.router.table`` (V,) int64 (:func:`hash_table`: balanced from token frequencies, or
random), the same table in every block; an expert-choice router adds ``ffn.router.threshold`` (E,),
NaN (not yet estimated) until the moe stage trains it. ``router_init=hidden`` routers are built from
the seed's mean hidden states per origin (:func:`hidden_router_weights`), computed apart
(:mod:`bam_pipeline.mixing.hidden`) and passed in, so upcycling stays a pure function.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from bam_pipeline.errors import BamError
from bam_pipeline.mixing.variant import SEED, MixVariant
from bam_pipeline.model.config import ModelConfig
from bam_pipeline.model.state_dict import (
    ATTN_EXPERT_TENSORS, FFN_EXPERT_TENSORS, KV_TENSORS, StateDict, expected_shapes,
)

_VOCAB_KEYS = ("tok_emb.weight", "lm_head.weight")


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
                "(n_layers, tie_embeddings, parallel_residual, qkv_bias)"
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


def hash_table(vocab_size: int, n_experts: int, *, kind: str, frequencies: Tensor | None = None,
               generator: torch.Generator | None = None) -> Tensor:
    """A token id -> expert table (V,) int64. ``balanced``: ids sorted by ``frequencies`` (V,),
    most frequent first (ties: lower id first), assigned to experts round-robin, so every expert
    gets an equal share of the ids and, as near as the ids allow, of the tokens. ``random``: every
    id drawn uniformly from ``generator``."""
    if kind == "random":
        return torch.randint(n_experts, (vocab_size,), generator=generator)
    if kind != "balanced":
        raise BamError(f"unknown hash table {kind!r}; use balanced or random")
    if frequencies is None or tuple(frequencies.shape) != (vocab_size,):
        got = None if frequencies is None else tuple(frequencies.shape)
        raise BamError(f"a balanced hash table needs the training frequency of each of the {vocab_size} token ids, "
                       f"got {got}")
    order = torch.argsort(-frequencies.double(), stable=True)  # (V,) ids, most frequent first
    table = torch.empty(vocab_size, dtype=torch.int64)
    table[order] = torch.arange(vocab_size) % n_experts
    return table


def hidden_router_weights(
    mix_cfg: ModelConfig, origins: Mapping[str, Sequence[str]], hidden: Mapping[str, Mapping[str, Tensor]],
    *, std: float, dtype: torch.dtype,
) -> StateDict:
    """Router weights from mean hidden states (``router_init=hidden``): key -> (E, D).

    ``origins`` gives each router kind's expert origins (``attn``, ``ffn``); ``hidden[origin][kind]``
    is the mean router input (L, D) at every layer for that origin's tokens. Row e of a layer's
    router is its expert's origin's mean at that layer; the (E, D) matrix is then scaled so that its
    RMS is ``std``, the RMS of an N(0, std) router. One scale for the whole matrix keeps the rows'
    geometry: a component common to every row adds the same logit to every expert, which the
    softmax ignores.
    """
    out: StateDict = {}
    for key, shape in expected_shapes(mix_cfg).items():
        if not key.endswith("router.weight"):
            continue
        layer = int(key.split(".")[1])
        kind = "ffn" if ".ffn." in key else "attn"  # a joint router reads the block's one input
        missing = [o for o in origins[kind] if o not in hidden]
        if missing:
            raise BamError(f"router_init=hidden needs the mean hidden states of {missing}; compute them from "
                           "the seed on those sources' validation tokens")
        rows = torch.stack([hidden[o][kind][layer].float() for o in origins[kind]])  # (E, D)
        rms = rows.pow(2).mean().sqrt()
        out[key] = (rows * (std / rms) if rms > 0 else torch.zeros_like(rows)).to(dtype)
    return out


def assemble_mixture(
    mix_cfg: ModelConfig,
    backbone: Mapping[str, Tensor],
    attn_sources: Sequence[Mapping[str, Tensor]],
    ffn_sources: Sequence[Mapping[str, Tensor]],
    *,
    router_init: str,
    router_std: float,
    generator_seed: int,
    routers: Mapping[str, Tensor] | None = None,
    table: Tensor | None = None,
) -> StateDict:
    """Build the mixture state dict of ``mix_cfg``.

    Attention expert j comes from ``attn_sources[j]`` (K/V averaged over them when shared), FFN
    expert i from ``ffn_sources[i]``, every other tensor from ``backbone``. Routers given in
    ``routers`` are used as they are; the others are drawn in layout order (per layer: attention,
    then FFN, then a joint router) from one generator seeded with ``generator_seed``. A hash router
    gets ``table``; an expert-choice router's thresholds start at NaN (not yet estimated).
    """
    generator = torch.Generator().manual_seed(generator_seed)
    dtype = backbone["tok_emb.weight"].dtype
    out: StateDict = {}
    for key, shape in expected_shapes(mix_cfg).items():
        if key.endswith("router.weight") and routers is not None and key in routers:
            out[key] = routers[key]
        elif key.endswith("router.weight"):
            out[key] = init_router(*shape, init=router_init, std=router_std, generator=generator, dtype=dtype)
        elif key.endswith("router.table"):
            if table is None:
                raise BamError(f"{key}: a hash router needs its token -> expert table")
            out[key] = table.to(torch.int64).clone()
        elif key.endswith("router.threshold"):
            out[key] = torch.full(shape, float("nan"), dtype=dtype)
        elif key.endswith(ATTN_EXPERT_TENSORS):
            out[key] = stack_experts([s[key] for s in attn_sources])
        elif key.endswith(KV_TENSORS):
            kvs = [s[key] for s in attn_sources]
            out[key] = stack_experts(kvs) if mix_cfg.attn_kv == "expert" else average(kvs)
        elif key.endswith(FFN_EXPERT_TENSORS):
            out[key] = stack_experts([s[key] for s in ffn_sources])
        else:
            out[key] = backbone[key].clone()
    return out


def upcycle(
    variant: MixVariant,
    models: Mapping[str, Mapping[str, Tensor]],
    dense_cfg: ModelConfig,
    domains: Sequence[str],
    *,
    generator_seed: int = 0,
    token_frequencies: Tensor | None = None,
    hidden: Mapping[str, Mapping[str, Tensor]] | None = None,
) -> tuple[ModelConfig, StateDict]:
    """Mix dense models into one mixture: returns ``(mixture_cfg, mixture_state_dict)``.

    ``models`` maps a dense model's name (``seed`` or a domain) to its state dict; it must hold
    ``variant.models(domains)``. The mixture's layout is ``variant.layout(dense_cfg, len(domains))``.
    ``token_frequencies`` (V,) feed a balanced hash table; ``hidden`` maps each expert origin to its
    mean hidden states (:func:`bam_pipeline.mixing.hidden.hidden_means`) for ``router_init=hidden``.
    """
    mix_cfg = variant.layout(dense_cfg, len(domains))
    names = variant.models(domains)
    missing = [n for n in names if n not in models]
    if missing:
        raise BamError(f"mix variant {variant.name!r} needs the dense models {names}; missing {missing}")
    check_mixable([models[n] for n in names], names, dense_cfg)
    backbone_models = [models[n] for n in variant.backbone_models(domains)]
    if variant.method == "dense":
        return mix_cfg, {k: v.clone() for k, v in models[SEED].items()}
    backbone = average_state_dicts(backbone_models) if variant.uses_branches else dict(models[SEED])
    origins = variant.expert_origins(domains)
    attn_sources = [models[o] for o in origins["attn"]] if "attn" in origins else [backbone]
    dtype = backbone["tok_emb.weight"].dtype
    routers = None
    if variant.router_init == "hidden":
        if hidden is None:
            raise BamError(f"mix variant {variant.name!r} (router_init=hidden) needs the seed's mean hidden states")
        routers = hidden_router_weights(mix_cfg, origins, hidden, std=variant.router_std, dtype=dtype)
    table = None
    if mix_cfg.ffn_router.kind == "hash":
        table = hash_table(mix_cfg.vocab_size, mix_cfg.ffn_experts, kind=variant.hash_table,
                           frequencies=token_frequencies,
                           generator=torch.Generator().manual_seed(generator_seed + 1))
    state = assemble_mixture(
        mix_cfg,
        backbone,
        attn_sources,
        [models[o] for o in origins["ffn"]],
        router_init="normal" if variant.router_init == "hidden" else variant.router_init,
        router_std=variant.router_std,
        generator_seed=generator_seed,
        routers=routers,
        table=table,
    )
    return mix_cfg, state
