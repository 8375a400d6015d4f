"""The training stages, planned apart and trained by one shared path (:func:`train`).

seed   : random init -> trained on the seed mixture               -> seed/main
         (seed=hf: a Hugging Face model imported instead, :mod:`~bam_pipeline.stages.imports`)
branch : seed -> trained on <domain> + general text               -> branch/<domain>
         (budget.branch.tokens=0: a copy of the seed; branch=hf: an imported expert)
moe    : mix/<variant> -> trained on the moe mixture              -> moe/<variant>[_cm]
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

from bam_pipeline.data.mixtures import stage_mixture
from bam_pipeline.data.prepare import PreparedData
from bam_pipeline.model.config import ModelConfig
from bam_pipeline.stages.context import RunContext, require_domain
from bam_pipeline.stages.hf_model_dirs import seed_tokenizer, short_name
from bam_pipeline.stages.imports import plan_import, run_import
from bam_pipeline.stages.inputs import Plan, building, data_input, fresh_artifact, open_data, require
from bam_pipeline.store.artifacts import MODEL_CONFIG, WEIGHTS, Artifact, publish, read_artifact, read_model_config
from bam_pipeline.store.artifacts import write_manifest
from bam_pipeline.store.layout import CM_SUFFIX
from bam_pipeline.training.budget import Budget, plan_budget
from bam_pipeline.training.job import TrainJob, train_and_publish


@dataclass
class TrainPlan(Plan):
    job: TrainJob | None = None


def _budget(ctx: RunContext, tokens: int, model_cfg: ModelConfig, match: str = "data",
            reference: ModelConfig | None = None, flops: str = "total") -> Budget:
    return plan_budget(tokens, model_cfg, seq_len=ctx.train.seq_len, tokens_per_step=ctx.tokens_per_step,
                       match=match, reference=reference, flops=flops)


def _plan(ctx: RunContext, job: TrainJob, inputs: dict[str, Artifact], about: dict) -> TrainPlan:
    return TrainPlan(job.stage, job.name, ctx.layout.artifact(job.stage, job.name), job.identity(inputs), inputs,
                     about, job)


def plan_seed(ctx: RunContext, prepared: PreparedData | None) -> Plan:
    if ctx.seed.kind == "hf":
        about = {"display": f"Seed ({short_name(ctx.seed.hf_model)})", "role": "seed"}
        return plan_import(ctx, "seed", "main", ctx.seed.hf_model, ctx.seed.dtype, {}, about, ctx.seed.eos_token)
    model_cfg = ctx.model.dense_config(prepared.vocab_size)
    job = TrainJob("seed", "main", ctx.layout, model_cfg, None, stage_mixture("seed", ctx.data),
                   _budget(ctx, ctx.budget.seed.tokens, model_cfg), ctx.train.lr, ctx.train,
                   precision=ctx.trainer.precision, devices=ctx.world_size)
    return _plan(ctx, job, {"data": data_input(prepared)}, {"display": "Seed", "role": "seed"})


def plan_branch(ctx: RunContext, prepared: PreparedData, domain: str) -> Plan:
    proportions = stage_mixture("branch", ctx.data, domain)
    seed = require(ctx, "seed", "main", prepared)
    about = {"display": f"{domain.capitalize()} expert", "role": "expert", "domain": domain}
    if domain in ctx.branch.imports:
        return plan_import(ctx, "branch", domain, ctx.branch.imports[domain], ctx.seed.dtype, {"seed": seed}, about)
    if ctx.budget.branch.tokens == 0:
        about["display"] += " (a copy of the seed)"
        config = {"copy_of": "seed", "inputs": {"seed": seed.hash}}
        return Plan("branch", domain, ctx.layout.artifact("branch", domain), config, {"seed": seed}, about)
    model_cfg = read_model_config(seed)
    job = TrainJob("branch", domain, ctx.layout, model_cfg, seed, proportions,
                   _budget(ctx, ctx.budget.branch.tokens, model_cfg), ctx.train.lr * ctx.train.branch_lr_scale,
                   ctx.train, precision=ctx.trainer.precision, devices=ctx.world_size)
    return _plan(ctx, job, {"data": data_input(prepared), "seed": seed}, about)


def parse_moe_name(name: str, match: str) -> tuple[str, str, str]:
    """(variant, match, artifact name) of a moe run: ``<v>_cm`` or match=compute is compute-matched;
    the dense baseline is compute-matched by definition (docs/paper.md section 7) and keeps its name."""
    if name.endswith(CM_SUFFIX):
        name, match = name[: -len(CM_SUFFIX)], "compute"
    if name == "dense":
        match = "compute"
    suffix = CM_SUFFIX if match == "compute" and name != "dense" else ""
    return name, match, name + suffix


def plan_moe(ctx: RunContext, prepared: PreparedData, name: str) -> TrainPlan:
    variant_name, match, art_name = parse_moe_name(name, ctx.budget.moe.match)
    variant = ctx.variant(variant_name)
    mix = require(ctx, "mix", variant_name, prepared)
    model_cfg = read_model_config(mix)
    reference = None
    if match == "compute":  # the model whose FLOPs set the budget (budget.moe.reference, default btx)
        reference = ctx.variant(ctx.budget.moe.reference).layout(model_cfg.dense(), len(ctx.data.domains))
    budget = _budget(ctx, ctx.budget.moe.tokens, model_cfg, match, reference, ctx.budget.moe.flops)
    job = TrainJob("moe", art_name, ctx.layout, model_cfg, mix, stage_mixture("moe", ctx.data), budget,
                   ctx.train.lr * ctx.train.moe_lr_scale, ctx.train, freeze_experts=variant.freeze_experts,
                   precision=ctx.trainer.precision, devices=ctx.world_size)
    about = {"display": variant.display_name(compute_matched=art_name.endswith(CM_SUFFIX)),
             "role": "dense" if variant.method == "dense" else "mixture", "variant": variant_name, "match": match,
             **({"flops": budget.flops} if match == "compute" else {}),
             "experts": (mix.manifest.get("about") or {}).get("experts")}
    return _plan(ctx, job, {"data": data_input(prepared), "mix": mix}, about)


def train(ctx: RunContext, plan: TrainPlan, prepared: PreparedData) -> Artifact | None:
    """Skip a fresh artifact, else train the plan's job and publish it (the artifact on rank 0)."""
    done = fresh_artifact(plan, ctx.pipeline.on_stale)
    if done is not None:
        return done
    job = plan.job
    with building(ctx, plan):
        print(f"{plan.label}: training {job.budget.tokens:,} tokens ({job.budget.steps} steps, "
              f"{job.budget.match}-matched) on {', '.join(f'{k} {v:.0%}' for k, v in job.proportions.items())}")
        return train_and_publish(job, prepared=prepared, trainer_spec=ctx.trainer, logger_cfg=ctx.logger, callback_cfgs=ctx.callbacks,
                                 inputs=plan.inputs, describe={"about": plan.about})


def copy_seed(ctx: RunContext, plan: Plan, prepared: PreparedData) -> Artifact:
    """Publish the seed's weights as a branch expert trained on zero tokens."""
    done = fresh_artifact(plan, ctx.pipeline.on_stale)
    if done is not None:
        return done
    seed = plan.inputs["seed"]
    seed.verify()
    with building(ctx, plan), publish(plan.out) as tmp:
        for name in (WEIGHTS, MODEL_CONFIG):
            shutil.copyfile(seed.path / name, tmp / name)
        write_manifest(tmp, stage=plan.stage, name=plan.name, run=ctx.run, config=plan.config, inputs=plan.inputs,
                       tokenizer_hash=prepared.tokenizer_hash, metrics={}, tokens=0, flops=0.0, about=plan.about)
    print(f"{plan.label}: a copy of the seed (budget.branch.tokens=0) -> {plan.out}")
    return read_artifact(plan.out)


def run_seed(ctx: RunContext) -> Artifact | None:
    if ctx.seed.kind == "hf":  # an import needs no prepared data: its tokenizer is the imported model's
        tok = seed_tokenizer(ctx)
        return run_import(ctx, plan_seed(ctx, None), ctx.seed.hf_model, ctx.seed.dtype, tokenizer=tok.hash,
                          end_of_document={"id": tok.eos_id, "token": tok.eos_token})
    prepared = open_data(ctx)
    return train(ctx, plan_seed(ctx, prepared), prepared)


def run_branch(ctx: RunContext, domain: str | None = None) -> Artifact | None:
    domain = domain or require_domain(ctx)
    prepared = open_data(ctx)
    plan = plan_branch(ctx, prepared, domain)
    if domain in ctx.branch.imports:
        return run_import(ctx, plan, ctx.branch.imports[domain], ctx.seed.dtype, tokenizer=prepared.tokenizer_hash,
                          like=read_model_config(plan.inputs["seed"]))
    if not isinstance(plan, TrainPlan):
        return copy_seed(ctx, plan, prepared)
    return train(ctx, plan, prepared)


def run_moe(ctx: RunContext, name: str | None = None) -> Artifact | None:
    prepared = open_data(ctx)
    return train(ctx, plan_moe(ctx, prepared, name or ctx.mix_name), prepared)
