"""stage=mix: upcycle the seed (and the domain experts the variant reads) into a mixture, no training.

A variant that reads data (``MixVariant.reads_data``: a balanced hash table, hidden-state routers)
takes the prepared data as an input too, so a change of the data makes its mixture stale. The hash
table's frequencies are those of the moe stage's training mixture (the train splits of the general
source and every domain, weighted by their moe shares); hidden-state routers average the seed's
router inputs over at most ``router_init_tokens`` validation tokens of each origin's source.
"""

from __future__ import annotations

import torch

from bam_pipeline.data.mixtures import stage_mixture
from bam_pipeline.data.prepare import PreparedData
from bam_pipeline.data.storage import load_split_sequences, mixture_token_frequencies
from bam_pipeline.errors import BamError
from bam_pipeline.mixing.hidden import hidden_means
from bam_pipeline.mixing.upcycle import upcycle
from bam_pipeline.mixing.variant import SEED, MixVariant
from bam_pipeline.model.config import ModelConfig
from bam_pipeline.stages.context import RunContext
from bam_pipeline.stages.inputs import Plan, building, data_input, fresh_artifact, open_data, require
from bam_pipeline.store.artifacts import Artifact, load_state, publish, read_artifact, save_model, try_read_artifact
from bam_pipeline.store.artifacts import write_manifest
from bam_pipeline.store.files import canonical_hash
from bam_pipeline.ranks import is_rank_zero, wait_for


def plan_mix(ctx: RunContext, prepared: PreparedData, name: str) -> Plan:
    """Inputs, identity and description of mix/<name>: the seed, and the domain experts only when the
    variant copies from them."""
    variant = ctx.variant(name)
    domains = list(ctx.data.domains)
    inputs = {"seed": require(ctx, "seed", "main", prepared)}
    if variant.uses_branches:
        for d in domains:
            inputs[f"branch/{d}"] = require(ctx, "branch", d, prepared)
    if variant.reads_data:
        inputs["data"] = data_input(prepared)
    config = {"mix": variant.to_dict(), "domains": domains, "inputs": {k: a.hash for k, a in inputs.items()}}
    if variant.router_init == "hidden":
        config["seq_len"] = ctx.train.seq_len  # the windows the hidden states are averaged over
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

        return wait_for(built, plan.label, ctx.trainer.collective_timeout_s)
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
    frequencies = hidden = None
    if variant.reads_data and variant.ffn_router.kind == "hash":
        moe_mixture = stage_mixture("moe", ctx.data)
        frequencies = torch.from_numpy(mixture_token_frequencies(prepared, moe_mixture))
    if variant.router_init == "hidden":
        hidden = seed_hidden_means(variant, dense_cfg, seed_state, prepared, ctx)
    mix_cfg, state = upcycle(variant, states, dense_cfg, list(ctx.data.domains), generator_seed=ctx.train.seed,
                             token_frequencies=frequencies, hidden=hidden)
    with publish(plan.out) as tmp:
        save_model(tmp, mix_cfg, state)
        write_manifest(tmp, stage="mix", name=name, run=ctx.run, config=plan.config, inputs=plan.inputs,
                       tokenizer_hash=prepared.tokenizer_hash, metrics={}, tokens=0, flops=0.0, about=plan.about)
    sources = "the seed alone" if not variant.uses_branches else f"seed + {', '.join(ctx.data.domains)}"
    print(f"{plan.label}: built from {sources} -> {plan.out}")
    return read_artifact(plan.out)


def seed_hidden_means(variant: MixVariant, dense_cfg: ModelConfig, seed_state: dict, prepared: PreparedData,
                      ctx: RunContext, batch_size: int = 8) -> dict[str, dict[str, torch.Tensor]]:
    """Expert origin -> the seed's mean router inputs on its source's validation tokens (general text
    for the seed), at most ``variant.router_init_tokens`` tokens in ``train.seq_len`` windows."""
    out = {}
    for origin, source in variant.hidden_sources(list(ctx.data.domains), ctx.data.general).items():
        max_tokens = max(variant.router_init_tokens, ctx.train.seq_len + 1)  # at least one window
        seqs = load_split_sequences(prepared, source, "val", ctx.train.seq_len, max_tokens)
        batches = (seqs[i: i + batch_size, :-1] for i in range(0, len(seqs), batch_size))
        out[origin] = hidden_means(dense_cfg, seed_state, batches)
        print(f"mix/{variant.name}: {origin} router rows from the seed's hidden states on {source}/val "
              f"({seqs[:, :-1].numel():,} tokens)")
    return out
