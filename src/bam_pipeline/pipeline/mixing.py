"""The mix stage's bridge from a `conf/mix/<variant>.yaml` to the pure upcycling functions."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from torch import Tensor

from bam_pipeline.model.config import ModelConfig
from bam_pipeline.upcycle import mixture_layout, upcycle

UPCYCLE_KEYS = ("include_seed", "kv", "attn_routing", "ffn_top_k", "ffn_gate", "extra_seed_ffn_experts",
                "router_init", "router_std")


def upcycle_kwargs(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The upcycle() keyword arguments a mix config carries (`variant` and comments aside)."""
    return {k: settings[k] for k in UPCYCLE_KEYS if k in settings}


def build_mixture(settings: Mapping[str, Any], seed: Mapping[str, Tensor], experts: Sequence[Mapping[str, Tensor]],
                  dense_cfg: ModelConfig, *, generator_seed: int) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Mixture (config, state dict) of a variant from the seed and the branch experts.

    The `dense` variant is the seed alone (the dense baseline continues it on the moe mixture).
    """
    method = settings["method"]
    mixed = [] if method == "dense" else list(experts)
    mix_cfg, state = upcycle(method, seed, mixed, dense_cfg, generator_seed=generator_seed, **upcycle_kwargs(settings))
    return mix_cfg.replace(name=f"{dense_cfg.name}-{settings['variant']}"), state


def mixture_config(settings: Mapping[str, Any], dense_cfg: ModelConfig, *, n_domains: int) -> ModelConfig:
    """The architecture a variant would build from ``n_domains`` experts, without any weights."""
    method = settings["method"]
    n = 0 if method == "dense" else n_domains
    cfg = mixture_layout(method, n, dense_cfg, **{k: v for k, v in upcycle_kwargs(settings).items()
                                                  if k not in ("router_init", "router_std")})
    return cfg.replace(name=f"{dense_cfg.name}-{settings['variant']}")
