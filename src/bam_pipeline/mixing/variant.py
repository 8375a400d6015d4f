"""A mixture variant: the one declaration of how the mix stage turns dense models into a mixture.

``conf/mix/<name>.yaml`` holds a variant's difference from ``conf/mix_base.yaml``; its file name is
its name. Everything else about a variant is derived here, once: which dense models it reads, the
origin of every expert, the mixture's architecture (:meth:`MixVariant.layout`) and its display name.

Methods (docs/paper.md sections 1, 3 and 7):
- ``bam``: attention and FFN experts copied from [seed (when ``include_seed``), domain experts...];
  with shared KV the K/V projections are averaged into one set; everything else averaged;
- ``btx``: FFN experts copied, attention and everything else averaged (one attention expert);
- ``sparse_upcycle``: every FFN expert a copy of the seed's FFN, everything else the seed's;
- ``dense``: the seed alone (the dense baseline continues it on the mixture data).
``extra_seed_ffn_experts`` appends that many copies of the seed's FFN to the FFN experts (BTX
parameter-matched: [seed, code, law, math, seed, seed], top-3).

Options of the ablations (defaults in ``conf/mix_base.yaml``; :meth:`MixVariant.to_dict` leaves
them out where they are inert, so the variants that do not use them keep their identity):
- ``freeze_experts``: the moe stage trains only the routers and the averaged (non-expert) weights;
  every stacked expert tensor with E > 1 stays bit-identical (no gradient, no optimizer state);
- ``router_scope``: ``layer`` or ``model`` (layer 0's routers decide for every layer);
- ``joint_router``: one router per layer shared by attention and FFN (their expert counts must match);
- ``hash_table`` (``ffn_router.kind=hash``): ``balanced`` (token ids sorted by their frequency in
  the run's moe training mixture, assigned to experts round-robin) or ``random`` (uniform draws);
- ``router_init=hidden``: router row of expert e = the mean normed hidden state (the router's
  input) of the seed at that layer on the validation tokens of e's origin (its domain; general text
  for the seed), at most ``router_init_tokens`` per source, the (E, D) matrix scaled so its RMS is
  ``router_std`` (mergekit-moe's "hidden" mode);
- ``attn_lb_coef``: load-balancing weight of top-k attention routers.
The balanced hash table and hidden-state routers read the prepared data (:attr:`reads_data`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

from bam_pipeline.errors import ConfigError
from bam_pipeline.model.config import FFN_ONLY_KINDS, KV_MODES, ROUTER_SCOPES, SOFT, TOP1, ModelConfig, RouterConfig

METHODS = ("bam", "btx", "sparse_upcycle", "dense")
ROUTER_INITS = ("normal", "zeros", "uniform", "hidden")
HASH_TABLES = ("balanced", "random")
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
    include_seed: bool = True  # the seed joins as a generalist expert (docs/paper.md section 1)
    extra_seed_ffn_experts: int = 0
    router_init: str = "normal"
    router_std: float = 0.02
    # options of the ablations (module docstring)
    freeze_experts: bool = False
    router_scope: str = "layer"
    joint_router: bool = False
    hash_table: str = "balanced"
    router_init_tokens: int = 32768
    attn_lb_coef: float = 0.01

    def __post_init__(self) -> None:
        for key in ("attn_router", "ffn_router"):
            if isinstance(getattr(self, key), dict):
                object.__setattr__(self, key, RouterConfig(**getattr(self, key)))
        for key, allowed in (("method", METHODS), ("kv", KV_MODES), ("router_init", ROUTER_INITS),
                             ("router_scope", ROUTER_SCOPES), ("hash_table", HASH_TABLES)):
            if getattr(self, key) not in allowed:
                raise ConfigError(key, getattr(self, key), f"use one of {', '.join(allowed)}")
        if self.extra_seed_ffn_experts < 0:
            raise ConfigError("extra_seed_ffn_experts", self.extra_seed_ffn_experts, "must be >= 0")
        if self.router_std < 0:
            raise ConfigError("router_std", self.router_std, "must be >= 0")
        if self.attn_router.kind in FFN_ONLY_KINDS:
            raise ConfigError("attn_router.kind", self.attn_router.kind,
                              "routes the FFN only; attention routing is soft or topk")
        if self.router_init_tokens < 1:
            raise ConfigError("router_init_tokens", self.router_init_tokens, "must be a positive number of tokens")
        if self.attn_lb_coef < 0:
            raise ConfigError("attn_lb_coef", self.attn_lb_coef, "must be >= 0")
        if self.hash_table != "balanced" and self.ffn_router.kind != "hash":
            raise ConfigError("hash_table", self.hash_table, "applies to ffn_router.kind=hash only")
        if self.joint_router and self.method != "bam":
            raise ConfigError("joint_router", self.joint_router,
                              f"shares one router between attention and FFN experts; method={self.method} has no "
                              "attention experts (use method=bam)")
        if self.freeze_experts and self.method == "dense":
            raise ConfigError("freeze_experts", self.freeze_experts, "method=dense has no experts to freeze")

    @property
    def reads_data(self) -> bool:
        """Whether the mix stage reads the prepared data: for a balanced hash table (token frequencies)
        or hidden-state routers (the seed's hidden states on validation tokens)."""
        if self.method == "dense":
            return False
        balanced_hash = self.ffn_router.kind == "hash" and self.hash_table == "balanced"
        return balanced_hash or self.router_init == "hidden"

    def hidden_sources(self, domains: Sequence[str], general: str) -> dict[str, str]:
        """Expert origin -> the data source whose validation tokens give its hidden-state router row:
        a domain's own, general text for the seed (``router_init=hidden``)."""
        origins = {o for kind in self.expert_origins(domains).values() for o in kind}
        return {o: general if o == SEED else o for o in sorted(origins)}

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
        if self.joint_router and n_attn != n_ffn:
            raise ConfigError("joint_router", self.joint_router,
                              f"needs as many attention as FFN experts; this variant has {n_attn} attention and "
                              f"{n_ffn} FFN experts (extra_seed_ffn_experts={self.extra_seed_ffn_experts})")
        if self.joint_router and self.ffn_router.kind in FFN_ONLY_KINDS:
            raise ConfigError("joint_router", self.joint_router,
                              f"shares learned logits; ffn_router.kind={self.ffn_router.kind} has none to share")
        if self.joint_router and not dense_cfg.parallel_residual:
            raise ConfigError("joint_router", self.joint_router,
                              "needs parallel blocks, where attention and FFN read one input")
        attn_topk = n_attn > 1 and self.attn_router.kind == "topk"
        return dense_cfg.replace(
            name=f"{dense_cfg.name}-{self.name}",
            attn_experts=n_attn,
            attn_kv=self.kv if n_attn > 1 else "expert",
            attn_router=self.attn_router if n_attn > 1 else SOFT,
            ffn_experts=n_ffn,
            ffn_router=self.ffn_router,
            router_scope=self.router_scope,
            joint_router=self.joint_router,
            attn_lb_coef=self.attn_lb_coef if attn_topk else 0.0,
        )

    def function_gaps(self, mixture: ModelConfig) -> list[str]:
        """Why a mixture of identical experts (every expert a copy of the seed) would not compute the
        seed's function, one reason per router; empty when it would (docs/paper.md section 10).

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
            if n > 1 and router.kind == "expert_choice":
                gaps.append(f"under expert choice a token gets 0..{n} FFN experts, each gated by its softmax "
                            "probability, so the gates need not sum to one")
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
            if self.ffn_router.kind == "expert_choice":
                out.append(f"expert-choice FFN, capacity {self.ffn_router.capacity:g}")
            elif self.ffn_router != TOP1:
                out.append(f"{self.ffn_router.describe()} FFN")
            if not self.include_seed:
                out.append("no seed expert")
            if self.extra_seed_ffn_experts:
                n = self.extra_seed_ffn_experts
                out.append(f"+{n} seed FFN cop{'y' if n == 1 else 'ies'}")
            if self.router_init == "hidden":
                out.append("hidden-state routers")
            elif self.router_init != "normal":
                out.append(f"{self.router_init} routers")
            if self.ffn_router.kind == "hash" and self.hash_table != "balanced":
                out.append(f"{self.hash_table} hash table")
            if self.joint_router:
                out.append("joint attention/FFN router")
            if self.router_scope == "model":
                out.append("one routing for all layers")
            if self.freeze_experts:
                out.append("frozen experts")
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
        """Every field, except the options of the ablations where inert (at their defaults; the
        attention load-balancing weight unless attention is top-k routed), so variants that do not
        use them keep the identity they had before the options existed."""
        out = dataclasses.asdict(self)
        out["attn_router"], out["ffn_router"] = self.attn_router.to_dict(), self.ffn_router.to_dict()
        for f in dataclasses.fields(self):
            if f.name not in ABLATION_OPTIONS:
                continue
            if f.name == "attn_lb_coef":
                inert = not (self.method == "bam" and self.attn_router.kind == "topk")
            else:
                inert = getattr(self, f.name) == f.default
            if inert:
                del out[f.name]
        return out


ABLATION_OPTIONS = ("freeze_experts", "router_scope", "joint_router", "hash_table", "router_init_tokens",
                    "attn_lb_coef")
