"""Stage runners: resolve a stage's inputs through manifests, skip or rebuild, train or build, publish.

seed   : random init -> trained on the seed mixture               -> stages/<run>/seed/main/
branch : seed -> trained on <domain> + general text               -> stages/<run>/branch/<domain>/
mix    : seed + every branch -> upcycled mixture (no training)    -> stages/<run>/mix/<variant>/
moe    : mix/<variant> -> trained on the moe mixture              -> stages/<run>/moe/<variant>[_cm]/
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from bam_pipeline.conf_files import load_group
from bam_pipeline.errors import BamError
from bam_pipeline.model.config import ModelConfig, preset
from bam_pipeline.pipeline import artifacts as A
from bam_pipeline.pipeline.budget import Budget, plan_budget
from bam_pipeline.pipeline.lm_module import OptimConfig
from bam_pipeline.pipeline.ranks import is_rank_zero, wait_for
from bam_pipeline.pipeline.schedule import warmup_steps_for
from bam_pipeline.pipeline.train_run import TrainSpec, train_and_publish

CM_SUFFIX = "_cm"


# ---- paths and inputs ----------------------------------------------------------------------
def run_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.run_dir)


def cmd(args: str, cfg: DictConfig) -> str:
    """The command line that produces something, for error messages: ``args`` plus this command's own
    overrides (experiment, run, paths, ...) other than the stage selection."""
    from hydra.core.hydra_config import HydraConfig

    own = [f"experiment={cfg.experiment_name}"] if cfg.get("experiment_name") else []
    if HydraConfig.initialized():
        own = [o for o in HydraConfig.get().overrides.task
               if o.split("=", 1)[0].lstrip("+~") not in ("stage", "domain", "mix")]
    return " ".join(["python -m bam_pipeline", args, *own])


def open_data(cfg: DictConfig):
    """The run's prepared data, refused when it was made from another data config or other sources."""
    from bam_pipeline.data.prepare import open_current

    return open_current(cfg.data, run_dir(cfg) / "data")


def data_input(prepared) -> A.Artifact:
    """The prepared data as a stage input; its hash covers every token and tokenizer file."""
    return A.Artifact(Path(prepared.dir), {"stage": "data", "name": "data", "hash": prepared.manifest["hash"],
                                           "files": {}})


def require(path: Path, producer: str) -> A.Artifact:
    """A finished upstream artifact, or a BamError naming the command that produces it."""
    art = A.try_read_artifact(path)
    if art is None:
        raise BamError(f"missing input {path}: run `{producer}` first")
    return art


def check_tokenizer(art: A.Artifact, prepared) -> None:
    if art.manifest.get("tokenizer_hash") != prepared.tokenizer_hash:
        raise BamError(
            f"{art.path} was trained with another tokenizer than the run's prepared data "
            f"({prepared.dir}); re-run its stage so the whole run shares one tokenizer"
        )


def is_fresh(art: A.Artifact, stage_config: dict) -> bool:
    return art.manifest.get("config_hash") == A.canonical_hash(stage_config)


def fresh_artifact(out_dir: Path, stage_config: dict, inputs: dict[str, A.Artifact], label: str,
                   on_stale: str) -> A.Artifact | None:
    """The existing artifact when its config and inputs are unchanged (a skip), else None.

    Prints why a stale artifact is rebuilt, or refuses with the override that forces it.
    """
    art = A.try_read_artifact(out_dir)
    if art is None:
        return None
    if is_fresh(art, stage_config):
        print(f"{label}: up to date in {out_dir}, skipping (delete it to retrain)")
        return art
    old_inputs = art.manifest.get("inputs", {})
    changed = [k for k, a in inputs.items() if old_inputs.get(k, {}).get("hash") != a.hash]
    old_cfg = art.manifest.get("config", {})
    keys = sorted(k for k in set(old_cfg) | set(stage_config) if k != "inputs" and old_cfg.get(k) != stage_config.get(k))
    why = "; ".join(filter(None, [f"inputs changed: {', '.join(changed)}" if changed else "",
                                  f"config changed: {', '.join(keys)}" if keys else ""]))
    if on_stale == "refuse":
        raise BamError(f"{label} is stale ({why}); re-run with pipeline.on_stale=rebuild to rebuild it")
    print(f"{label}: stale ({why}), rebuilding")
    return None


# ---- training settings ---------------------------------------------------------------------
def world_size(trainer_cfg: DictConfig) -> int:
    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, str) and "," in devices:  # "0,1": these device ids
        devices = [d for d in devices.split(",") if d.strip()]
    if isinstance(devices, str) and devices.lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices > 0:
        n = devices
    elif isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        n = len(devices)
    else:  # "auto" or -1: every visible accelerator
        import torch

        n = torch.cuda.device_count() if trainer_cfg.get("accelerator") in ("gpu", "cuda", "auto") else 1
        n = max(1, n)
    return n * int(trainer_cfg.get("num_nodes", 1))


def dense_model_config(cfg: DictConfig, vocab_size: int | None = None) -> ModelConfig:
    """The seed's architecture: the `model=` preset with its overrides, the run's context length and,
    once data is prepared, the tokenizer's vocabulary size."""
    overrides = dict(cfg.model.get("overrides") or {})
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    return preset(cfg.model.preset, max_seq_len=int(cfg.model.seq_len), **overrides)


def _train_spec(cfg: DictConfig, *, stage: str, name: str, model_cfg: ModelConfig, init_state, proportions,
                budget: Budget, lr: float) -> TrainSpec:
    t = cfg.train
    optim = OptimConfig(
        lr=lr, total_steps=budget.steps,
        warmup_steps=warmup_steps_for(budget.steps, t.warmup_frac, t.warmup_steps_max),
        min_lr_ratio=t.min_lr_ratio, weight_decay=t.weight_decay, betas=tuple(t.betas),
    )
    return TrainSpec(
        stage=stage, name=name, run=cfg.run, run_dir=run_dir(cfg), model_cfg=model_cfg, init_state=init_state,
        proportions=proportions, budget=budget, optim=optim, seq_len=int(t.seq_len), batch_size=int(t.batch_size),
        accumulate=int(t.accumulate), seed=int(t.seed), grad_clip=float(t.grad_clip), val_every=int(t.val_every),
        val_tokens=int(t.val_tokens), log_every=int(t.log_every), num_workers=int(t.num_workers),
        keep_host_memory=bool(t.keep_host_memory),
    )


def _tokens_per_step(cfg: DictConfig) -> int:
    t = cfg.train
    return int(t.batch_size) * int(t.seq_len) * int(t.accumulate) * world_size(cfg.trainer)


def _stage_config(spec: TrainSpec, inputs: dict[str, A.Artifact]) -> dict[str, Any]:
    """What a trained stage's result depends on (not the logger or device layout)."""
    return {
        "model": spec.model_cfg.to_dict(),
        "proportions": spec.proportions,
        "budget": asdict(spec.budget),
        "optim": asdict(spec.optim),
        "train": {k: getattr(spec, k) for k in ("seq_len", "batch_size", "accumulate", "seed", "grad_clip")},
        # windows and row order are seeded by (seed, stage, source name); stages built when they
        # were seeded otherwise are stale
        "data_order": "seed,stage,source",
        "inputs": {k: a.hash for k, a in inputs.items()},
    }


def _train(cfg: DictConfig, spec: TrainSpec, prepared, inputs: dict[str, A.Artifact]) -> A.Artifact | None:
    out_dir = run_dir(cfg) / spec.stage / spec.name
    label = spec.stage if spec.stage == "seed" else f"{spec.stage}/{spec.name}"
    stage_config = _stage_config(spec, inputs)
    done = fresh_artifact(out_dir, stage_config, inputs, label, cfg.pipeline.on_stale)
    if done is not None:
        return done
    print(f"{label}: training {spec.budget.tokens:,} tokens ({spec.budget.steps} steps, {spec.budget.match}-matched) "
          f"on {', '.join(f'{k} {v:.0%}' for k, v in spec.proportions.items())}")
    return train_and_publish(
        spec, prepared=prepared, trainer_cfg=OmegaConf.to_container(cfg.trainer, resolve=True),
        logger_cfg=OmegaConf.to_container(cfg.logger, resolve=True) if cfg.get("logger") else None,
        stage_config=stage_config, inputs=inputs, out_dir=out_dir,
    )


# ---- stages --------------------------------------------------------------------------------
def run_seed(cfg: DictConfig) -> A.Artifact | None:
    from bam_pipeline.data.mixtures import stage_mixture

    prepared = open_data(cfg)
    model_cfg = dense_model_config(cfg, prepared.vocab_size)
    budget = plan_budget(int(cfg.budget.seed.tokens), model_cfg, seq_len=int(cfg.train.seq_len),
                         tokens_per_step=_tokens_per_step(cfg))
    spec = _train_spec(cfg, stage="seed", name="main", model_cfg=model_cfg, init_state=None,
                       proportions=stage_mixture("seed", cfg.data), budget=budget, lr=float(cfg.train.lr))
    return _train(cfg, spec, prepared, {"data": data_input(prepared)})


def seed_artifact(cfg: DictConfig, prepared) -> A.Artifact:
    art = require(run_dir(cfg) / "seed" / "main", cmd("stage=seed", cfg))
    check_tokenizer(art, prepared)
    return art


def branch_artifact(cfg: DictConfig, prepared, domain: str) -> A.Artifact:
    art = require(run_dir(cfg) / "branch" / domain, cmd(f"stage=branch domain={domain}", cfg))
    check_tokenizer(art, prepared)
    return art


def run_branch(cfg: DictConfig, domain: str | None) -> A.Artifact | None:
    from bam_pipeline.data.mixtures import stage_mixture

    if not domain:
        known = ",".join(cfg.data.domains)
        raise BamError(f"stage=branch needs a domain: add domain=<name> (this run's domains: {known}), "
                       f"or sweep them all with `python -m bam_pipeline -m stage=branch domain={known}`")
    prepared = open_data(cfg)
    proportions = stage_mixture("branch", cfg.data, domain)
    seed = seed_artifact(cfg, prepared)
    model_cfg, state = A.load_state(seed)
    budget = plan_budget(int(cfg.budget.branch.tokens), model_cfg, seq_len=int(cfg.train.seq_len),
                         tokens_per_step=_tokens_per_step(cfg))
    spec = _train_spec(cfg, stage="branch", name=domain, model_cfg=model_cfg, init_state=state,
                       proportions=proportions, budget=budget,
                       lr=float(cfg.train.lr) * float(cfg.train.branch_lr_scale))
    return _train(cfg, spec, prepared, {"data": data_input(prepared), "seed": seed})


def mix_settings(cfg: DictConfig, variant: str) -> dict[str, Any]:
    """The mix config of a variant: the selected `mix=` (with its overrides) or conf/mix/<variant>.yaml."""
    if cfg.get("mix") is not None and cfg.mix.variant == variant:
        return OmegaConf.to_container(cfg.mix, resolve=True)
    return OmegaConf.to_container(load_group("mix", variant), resolve=True)


def run_mix(cfg: DictConfig, variant: str) -> A.Artifact:
    from bam_pipeline.pipeline.mixing import build_mixture

    prepared = open_data(cfg)
    settings = mix_settings(cfg, variant)
    seed = seed_artifact(cfg, prepared)
    domains = list(cfg.data.domains)
    branches = {d: branch_artifact(cfg, prepared, d) for d in domains}
    inputs = {"seed": seed, **{f"branch/{d}": a for d, a in branches.items()}}
    stage_config = {"mix": settings, "domains": domains, "inputs": {k: a.hash for k, a in inputs.items()}}
    out_dir = run_dir(cfg) / "mix" / variant
    if not is_rank_zero():  # rank 0 builds it; the other ranks wait for exactly that artifact
        def built() -> A.Artifact | None:
            art = A.try_read_artifact(out_dir)
            return art if art is not None and is_fresh(art, stage_config) else None

        return wait_for(built, f"mix/{variant}")
    done = fresh_artifact(out_dir, stage_config, inputs, f"mix/{variant}", cfg.pipeline.on_stale)
    if done is not None:
        return done
    dense_cfg, seed_state = A.load_state(seed)
    experts = []
    for d, art in branches.items():
        cfg_d, state_d = A.load_state(art)
        if cfg_d != dense_cfg:
            raise BamError(f"branch/{d} has another architecture than the seed ({art.path}); re-run "
                           f"`{cmd(f'stage=branch domain={d}', cfg)}`")
        experts.append(state_d)
    mix_cfg, state = build_mixture(settings, seed_state, experts, dense_cfg, generator_seed=int(cfg.train.seed))
    with A.publish(out_dir) as tmp:
        A.save_model(tmp, mix_cfg, state)
        A.write_manifest(tmp, stage="mix", name=variant, run=cfg.run, config=stage_config, inputs=inputs,
                         tokenizer_hash=prepared.tokenizer_hash, metrics={}, tokens=0, flops=0.0)
    sources = "the seed alone" if settings["method"] == "dense" else f"seed + {', '.join(domains)}"
    print(f"mix/{variant}: built from {sources} -> {out_dir}")
    return A.read_artifact(out_dir)


def parse_moe_name(name: str, match: str) -> tuple[str, str, str]:
    """(variant, match, artifact name) of a moe run: `bam_cm` or match=compute -> compute-matched."""
    if name.endswith(CM_SUFFIX):
        name, match = name[: -len(CM_SUFFIX)], "compute"
    if name == "dense":  # the dense baseline is compute-matched by definition (PAPER.md s.7)
        match = "compute"
    suffix = CM_SUFFIX if match == "compute" and name != "dense" else ""
    return name, match, name + suffix


def reference_config(cfg: DictConfig, prepared, dense_cfg: ModelConfig) -> ModelConfig:
    """The model whose FLOPs set a compute-matched budget (budget.moe.reference, default btx)."""
    from bam_pipeline.pipeline.mixing import mixture_config

    ref = str(cfg.budget.moe.reference)
    return mixture_config(mix_settings(cfg, ref), dense_cfg, n_domains=len(cfg.data.domains))


def run_moe(cfg: DictConfig, name: str) -> A.Artifact | None:
    from bam_pipeline.data.mixtures import stage_mixture

    variant, match, art_name = parse_moe_name(name, str(cfg.budget.moe.match))
    prepared = open_data(cfg)
    mix = require(run_dir(cfg) / "mix" / variant, cmd(f"stage=mix mix={variant}", cfg))
    check_tokenizer(mix, prepared)
    model_cfg, state = A.load_state(mix)
    dense_cfg = model_cfg.dense()
    reference = reference_config(cfg, prepared, dense_cfg) if match == "compute" else None
    budget = plan_budget(int(cfg.budget.moe.tokens), model_cfg, seq_len=int(cfg.train.seq_len),
                         tokens_per_step=_tokens_per_step(cfg), match=match, reference=reference)
    spec = _train_spec(cfg, stage="moe", name=art_name, model_cfg=model_cfg, init_state=state,
                       proportions=stage_mixture("moe", cfg.data), budget=budget,
                       lr=float(cfg.train.lr) * float(cfg.train.moe_lr_scale))
    return _train(cfg, spec, prepared, {"data": data_input(prepared), "mix": mix})
