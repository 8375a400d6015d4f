"""stage=mix: upcycle the seed (and the domain experts the variant reads) into a mixture, no training."""

from __future__ import annotations

from bam_pipeline.data.prepare import PreparedData
from bam_pipeline.errors import BamError
from bam_pipeline.mixing.upcycle import upcycle
from bam_pipeline.mixing.variant import SEED
from bam_pipeline.stages.context import RunContext
from bam_pipeline.stages.inputs import Plan, building, fresh_artifact, open_data, require
from bam_pipeline.store.artifacts import Artifact, load_state, publish, read_artifact, save_model, try_read_artifact
from bam_pipeline.store.artifacts import write_manifest
from bam_pipeline.store.files import canonical_hash
from bam_pipeline.training.ranks import is_rank_zero, wait_for


def plan_mix(ctx: RunContext, prepared: PreparedData, name: str) -> Plan:
    """Inputs, identity and description of mix/<name>: the seed, and the domain experts only when the
    variant copies from them."""
    variant = ctx.variant(name)
    domains = list(ctx.data.domains)
    inputs = {"seed": require(ctx, "seed", "main", ctx.cmd("stage=seed"), prepared)}
    if variant.uses_branches:
        for d in domains:
            inputs[f"branch/{d}"] = require(ctx, "branch", d, ctx.cmd(f"stage=branch domain={d}"), prepared)
    config = {"mix": variant.to_dict(), "domains": domains, "inputs": {k: a.hash for k, a in inputs.items()}}
    origin_label = {SEED: "seed", **{d: f"branch/{d}" for d in domains}}
    about = {
        "display": f"Untrained {variant.display_name()}", "role": "untrained", "variant": name,
        "method": variant.method, "experts": variant.expert_names(domains),
        "expert_origins": {kind: [origin_label[o] for o in origins]
                           for kind, origins in variant.expert_origins(domains).items()},
    }
    return Plan("mix", name, ctx.layout.artifact("mix", name), config, inputs, about)


def run_mix(ctx: RunContext, name: str | None = None) -> Artifact:
    name = name or ctx.mix_name
    prepared = open_data(ctx)
    plan = plan_mix(ctx, prepared, name)
    if not is_rank_zero():  # rank 0 builds it; the other ranks wait for exactly that artifact
        def built() -> Artifact | None:
            art = try_read_artifact(plan.out)
            return art if art is not None and art.manifest.get("config_hash") == canonical_hash(plan.config) else None

        return wait_for(built, plan.label)
    done = fresh_artifact(plan, ctx.pipeline.on_stale)
    if done is not None:
        return done
    with building(ctx, plan):
        return _build_mix(ctx, plan, prepared)


def _build_mix(ctx: RunContext, plan: Plan, prepared: PreparedData) -> Artifact:
    name = plan.name
    variant = ctx.variant(name)
    dense_cfg, seed_state = load_state(plan.inputs["seed"])
    states = {SEED: seed_state}
    for key, art in plan.inputs.items():
        if key.startswith("branch/"):
            cfg_d, states[key.split("/", 1)[1]] = load_state(art)
            if cfg_d != dense_cfg:
                raise BamError(f"{key} has another architecture than the seed ({art.path}); re-run "
                               f"`{ctx.cmd(f'stage=branch domain={art.name}')}`")
    mix_cfg, state = upcycle(variant, states, dense_cfg, list(ctx.data.domains), generator_seed=ctx.train.seed)
    with publish(plan.out) as tmp:
        save_model(tmp, mix_cfg, state)
        write_manifest(tmp, stage="mix", name=name, run=ctx.run, config=plan.config, inputs=plan.inputs,
                       tokenizer_hash=prepared.tokenizer_hash, metrics={}, tokens=0, flops=0.0, about=plan.about)
    sources = "the seed alone" if not variant.uses_branches else f"seed + {', '.join(ctx.data.domains)}"
    print(f"{plan.label}: built from {sources} -> {plan.out}")
    return read_artifact(plan.out)
