"""A mixture variant: the one declaration of how the mix stage turns dense models into a mixture.

``conf/mix/<name>.yaml`` holds a variant's difference from ``conf/mix_base.yaml``; its file name is
its name. Everything else about a variant is derived here, once: which dense models it reads, the
origin of every expert, the mixture's architecture (:meth:`MixVariant.layout`) and its display name.

Methods (PAPER.md sections 1, 3 and 7):
- ``bam``: attention and FFN experts copied from [seed (when ``include_seed``), domain experts...];
  with shared KV the K/V projections are averaged into one set; everything else averaged;
- ``btx``: FFN experts copied, attention and everything else averaged (one attention expert);
- ``sparse_upcycle``: every FFN expert a copy of the seed's FFN, everything else the seed's;
- ``dense``: the seed alone (the dense baseline continues it on the mixture data).
``extra_seed_ffn_experts`` appends that many copies of the seed's FFN to the FFN experts (BTX
parameter-matched: [seed, code, law, math, seed, seed], top-3).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

from bam_pipeline.errors import ConfigError
from bam_pipeline.model.config import KV_MODES, SOFT, TOP1, ModelConfig, RouterConfig

METHODS = ("bam", "btx", "sparse_upcycle", "dense")
ROUTER_INITS = ("normal", "zeros", "uniform")
SEED = "seed"
METHOD_NAMES = {"bam": "BAM", "btx": "BTX", "sparse_upcycle": "Sparse upcycling", "dense": "Dense"}


@dataclass(frozen=True)
class MixVariant:
    """One mixture variant (see the module docstring); validated on construction."""

    name: str
    method: str = "bam"
    display: str | None = None  # the report's name; None: derived from the options
    kv: str = "expert"  # attention K/V (bam): one set per expert, or one shared set (averaged)
    attn_router: RouterConfig = SOFT
    ffn_router: RouterConfig = TOP1
    include_seed: bool = True  # the seed joins as a generalist expert (PAPER.md section 1)
    extra_seed_ffn_experts: int = 0
    router_init: str = "normal"
    router_std: float = 0.02

    def __post_init__(self) -> None:
        for key in ("attn_router", "ffn_router"):
            if isinstance(getattr(self, key), dict):
                object.__setattr__(self, key, RouterConfig(**getattr(self, key)))
        for key, allowed in (("method", METHODS), ("kv", KV_MODES), ("router_init", ROUTER_INITS)):
            if getattr(self, key) not in allowed:
                raise ConfigError(key, getattr(self, key), f"use one of {', '.join(allowed)}")
        if self.extra_seed_ffn_experts < 0:
            raise ConfigError("extra_seed_ffn_experts", self.extra_seed_ffn_experts, "must be >= 0")
        if self.router_std < 0:
            raise ConfigError("router_std", self.router_std, "must be >= 0")

    # ---- what it is made of ------------------------------------------------------------------
    def backbone_models(self, domains: Sequence[str]) -> list[str]:
        """The dense models averaged into the non-expert weights (embeddings, norms, head)."""
        if self.method in ("sparse_upcycle", "dense"):
            return [SEED]
        return ([SEED] if self.include_seed else []) + list(domains)

    def models(self, domains: Sequence[str]) -> list[str]:
        """Every dense model whose weights the mixture reads (the backbone's, and the seed for its copies)."""
        names = self.backbone_models(domains)
        return names + [SEED] if self.extra_seed_ffn_experts and SEED not in names else names

    @property
    def uses_branches(self) -> bool:
        """Whether the mix stage reads the domain experts (bam, btx) or the seed alone."""
        return self.method in ("bam", "btx")

    def expert_origins(self, domains: Sequence[str]) -> dict[str, list[str]]:
        """The dense model each expert is copied from, per router kind (``attn``, ``ffn``), in expert
        order; a kind with one (averaged) expert or none is left out."""
        mixed = self.backbone_models(domains)
        extra = [SEED] * self.extra_seed_ffn_experts
        if self.method == "bam":
            return {"attn": mixed, "ffn": mixed + extra}
        if self.method == "btx":
            return {"ffn": mixed + extra}
        if self.method == "sparse_upcycle":
            n_mixed = len(domains) + (1 if self.include_seed else 0)
            return {"ffn": [SEED] * (n_mixed + self.extra_seed_ffn_experts)}
        return {}

    def expert_names(self, domains: Sequence[str]) -> dict[str, list[str]]:
        """Expert names per router kind: the origin, numbered from its second copy (``seed+1``)."""
        out = {}
        for kind, origins in self.expert_origins(domains).items():
            seen: dict[str, int] = {}
            names = []
            for o in origins:
                names.append(o if o not in seen else f"{o}+{seen[o]}")
                seen[o] = seen.get(o, 0) + 1
            out[kind] = names
        return out

    def layout(self, dense_cfg: ModelConfig, n_domains: int) -> ModelConfig:
        """The mixture's architecture built from ``n_domains`` experts; needs no weights, so ``stage=info``
        and compute-matched budgets use it before any model exists."""
        if not dense_cfg.is_dense:
            raise ConfigError("model", dense_cfg.name, "upcycling starts from a dense model (one expert per layer)")
        if self.method != "dense" and n_domains + self.include_seed == 0:
            raise ConfigError("include_seed", self.include_seed,
                              "with no domain experts there is nothing to mix; set include_seed=true or add domains")
        origins = self.expert_origins([f"d{i}" for i in range(n_domains)])
        if self.method == "dense":
            return dense_cfg.replace(name=f"{dense_cfg.name}-{self.name}")
        n_attn, n_ffn = len(origins.get("attn", [])) or 1, len(origins["ffn"])
        if n_ffn < 2:
            raise ConfigError("method", self.method, f"needs at least 2 FFN experts, got {n_ffn}; add domain "
                                                     "experts, set include_seed=true, or use method=dense")
        for key, router, n in (("attn_router", self.attn_router, n_attn), ("ffn_router", self.ffn_router, n_ffn)):
            if n > 1 and router.kind == "topk" and router.k > n:
                raise ConfigError(f"{key}.k", router.k, f"must be at most the number of experts ({n})")
        return dense_cfg.replace(
            name=f"{dense_cfg.name}-{self.name}",
            attn_experts=n_attn,
            attn_kv=self.kv if n_attn > 1 else "expert",
            attn_router=self.attn_router if n_attn > 1 else SOFT,
            ffn_experts=n_ffn,
            ffn_router=self.ffn_router,
        )

    def function_gaps(self, mixture: ModelConfig) -> list[str]:
        """Why a mixture of identical experts (every expert a copy of the seed) would not compute the
        seed's function, one reason per router; empty when it would (PAPER.md section 10).

        Averaging identical models and a gated sum whose gates sum to one (soft routing, renormalised
        top-k) are exact; a top-k gate that is the full-softmax probability scales the chosen experts'
        output by that probability, about k/E when the router starts near uniform.
        """
        gaps = []
        for kind, router, n in (("attention", mixture.attn_router, mixture.attn_experts),
                                ("FFN", mixture.ffn_router, mixture.ffn_experts)):
            if n > 1 and router.kind == "topk" and not router.renormalize and router.k < n:
                gaps.append(f"the {kind} gate is the full-softmax probability of the top-{router.k} of {n} experts, "
                            f"not renormalised, so their output starts scaled by about {router.k}/{n}")
        return gaps

    # ---- how it is named ---------------------------------------------------------------------
    def qualifiers(self) -> list[str]:
        """What sets this variant apart from its method's defaults, in words."""
        out = []
        if self.method == "bam":
            out.append(f"{self.kv} KV")
            if self.attn_router != SOFT:
                out.append(f"{self.attn_router.describe()} attention")
        if self.method != "dense":
            if self.ffn_router != TOP1:
                out.append(f"{self.ffn_router.describe()} FFN")
            if not self.include_seed:
                out.append("no seed expert")
            if self.extra_seed_ffn_experts:
                out.append(f"+{self.extra_seed_ffn_experts} seed FFN copies")
            if self.router_init != "normal":
                out.append(f"{self.router_init} routers")
        return out

    def display_name(self, *, compute_matched: bool = False) -> str:
        """``BAM (expert KV)``; compute-matched: ``BAM CM (expert KV)``."""
        if self.display:
            base, paren, rest = self.display.partition(" (")
        else:
            q = self.qualifiers()
            base, paren, rest = METHOD_NAMES[self.method], " (" if q else "", ", ".join(q) + ")" if q else ""
        return f"{base}{' CM' if compute_matched else ''}{paren}{rest}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
