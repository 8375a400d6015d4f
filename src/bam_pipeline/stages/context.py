"""The run as the stages see it: every config section read once into its typed spec, the run's
layout, the selected domain and mixture variant, and the command hints of error messages.

A section's spec lives in the package that acts on it, in that package's spec module or in the
module named for the section: ``data.spec`` (data), ``eval.spec`` (eval, downstream),
``training.settings`` (train, trainer), ``training.budget`` (budget), ``interop.hf_export``
(export). The sections only the stages read (model, seed, branch, pipeline, info, generate) have
their specs here.

:meth:`RunContext.from_config` is the config boundary: a bad value anywhere ends here, in one
:class:`~bam_pipeline.errors.ConfigError` line, before any stage does work.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Optional

from omegaconf import DictConfig, open_dict

from bam_pipeline.config.files import group_options, load_option
from bam_pipeline.config.reading import plain, read_section
from bam_pipeline.data.spec import DataSpec, read_data_spec
from bam_pipeline.errors import BamError, ConfigError
from bam_pipeline.eval.spec import DownstreamSpec, EvalSpec
from bam_pipeline.interop.hf_export import ExportSpec
from bam_pipeline.mixing.variant import MixVariant
from bam_pipeline.model.config import ModelConfig, preset
from bam_pipeline.model.generation import Sampling
from bam_pipeline.store.files import canonical_hash
from bam_pipeline.store.layout import CM_SUFFIX, RunLayout, check_run_name, seed_run_name
from bam_pipeline.training.budget import BudgetSettings
from bam_pipeline.training.memory import parse_bytes
from bam_pipeline.ranks import check_trainer
from bam_pipeline.training.settings import BatchSplit, TrainerSpec, TrainSettings

ON_STALE = ("rebuild", "refuse")
TRAINING_STAGES = ("seed", "branch", "moe", "all")  # the stages that run the trainer's devices here
SHARED_STAGES = ("eval", "downstream")  # ... and those that split their scoring over them
EVAL_STAGES = ("eval", "all")
# Overrides that select what a command works on; hints drop them and name their own.
SELECTORS = ("stage", "domain", "mix", "artifact", "data.part", "data.parts")


# ModelConfig fields a model override may not set, and why.
NOT_OVERRIDABLE = {
    "max_seq_len": "set model.seq_len instead",
    "vocab_size": "the vocabulary size comes from the run's tokenizer",
    "name": "the model's name comes from its preset",
    **dict.fromkeys(("attn_experts", "attn_kv", "attn_router", "ffn_experts", "ffn_router", "router_scope",
                     "joint_router", "attn_lb_coef"),
                    "the seed is dense; mixtures come from mix=<variant>"),
}


@dataclass(frozen=True)
class ModelSpec:
    """The ``model:`` section: a preset, the run's context length and field overrides."""

    preset: str
    seq_len: int
    overrides: dict[str, Any]

    def __post_init__(self) -> None:
        if self.seq_len < 1:
            raise ConfigError("seq_len", self.seq_len, "must be a positive number of tokens")
        for key in self.overrides:
            if key in NOT_OVERRIDABLE:
                raise ConfigError(f"overrides.{key}", self.overrides[key], NOT_OVERRIDABLE[key])
        self.dense_config()  # every override is checked now, not when the first model is built

    def dense_config(self, vocab_size: int | None = None) -> ModelConfig:
        """The seed's architecture: the preset with its overrides (each type-checked), the run's context
        length and, once data is prepared, the tokenizer's vocabulary size."""
        base = preset(self.preset).to_dict()
        fixed = {"max_seq_len": self.seq_len, **({"vocab_size": vocab_size} if vocab_size is not None else {})}
        return read_section(ModelConfig, {**base, **self.overrides}, "overrides", **fixed)


DTYPES = ("float32", "bfloat16", "float16")
SEED_KINDS = ("pretrain", "hf")


@dataclass(frozen=True)
class HFModelRef:
    """A Hugging Face model directory as the config names it: a local path or a hub id, at a revision."""

    path: Optional[str]
    revision: Optional[str] = None


@dataclass(frozen=True)
class SeedSpec:
    """The ``seed:`` section: pretrain the seed, or import a Hugging Face model as the seed."""

    kind: str
    path: Optional[str]
    revision: Optional[str]
    dtype: Optional[str]  # the imported weights' dtype; null: the stored one
    eos_token: Optional[str] = None  # the end-of-document token by its text; null: the checkpoint's eos_token_id

    def __post_init__(self) -> None:
        if self.kind not in SEED_KINDS:
            raise ConfigError("kind", self.kind, "use seed=pretrain or seed=hf")
        if self.kind == "hf" and not self.path:
            raise ConfigError("path", self.path, "seed=hf needs seed.path=<a local checkpoint directory, a .gguf "
                                                 "file or a hub id>")
        if self.kind == "pretrain" and (self.path or self.revision or self.dtype):
            raise ConfigError("path", self.path, "applies to seed=hf; with seed=pretrain leave path, revision "
                                                 "and dtype unset")
        if self.kind == "pretrain" and self.eos_token is not None:
            raise ConfigError("eos_token", self.eos_token, "applies to seed=hf; with seed=pretrain the "
                                                           "end-of-document token is data.tokenizer.eos_token")
        if self.eos_token is not None and (not isinstance(self.eos_token, str) or not self.eos_token):
            raise ConfigError("eos_token", self.eos_token, "name the token by its text, e.g. "
                                                           "seed.eos_token='<|endoftext|>', or null for the "
                                                           "checkpoint's own")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError("dtype", self.dtype, f"use one of {', '.join(DTYPES)} or null (the checkpoint's)")

    @property
    def hf_model(self) -> HFModelRef:
        return HFModelRef(self.path, self.revision)


@dataclass(frozen=True)
class BranchSpec:
    """The ``branch:`` section: train every domain expert, or import some (``branch.<domain>.path``)."""

    kind: str
    imports: dict[str, HFModelRef]  # domain -> its Hugging Face model, for the imported domains

    @classmethod
    def read(cls, node: Any) -> "BranchSpec":
        data = plain(node) or {}
        kind = data.get("kind")
        if kind not in ("train", "hf"):
            raise ConfigError("branch.kind", kind, "use branch=train or branch=hf")
        imports = {}
        for domain, ref in data.items():
            if domain != "kind":
                ref = read_section(HFModelRef, ref, f"branch.{domain}")
                if ref.path:
                    imports[domain] = ref
        if kind == "hf" and not imports:
            raise ConfigError("branch.kind", kind, "branch=hf imports the domains given a branch.<domain>.path; "
                                                   "set one, or use branch=train")
        return cls(kind, imports)


@dataclass(frozen=True)
class PipelineSpec:
    """The ``pipeline:`` section: what ``stage=all`` builds, and what a stale artifact gets."""

    mix_variants: tuple[str, ...]
    moe_runs: tuple[str, ...]
    on_stale: str
    wait_s: float  # how long to wait for an input another run is building (the prepared data)
    seeds: Optional[tuple[int, ...]] = None  # train seeds to run the experiment with (null: train.seed alone)

    def __post_init__(self) -> None:
        if self.seeds is not None:
            seeds = tuple(self.seeds)
            if not seeds or len(set(seeds)) != len(seeds) or any(not isinstance(x, int) or x < 0 for x in seeds):
                raise ConfigError("seeds", list(seeds), "use distinct non-negative integers, e.g. "
                                                        "pipeline.seeds=[0,1,2], or null for train.seed alone")
            object.__setattr__(self, "seeds", seeds)
        if self.on_stale not in ON_STALE:
            raise ConfigError("on_stale", self.on_stale, f"use one of {', '.join(ON_STALE)}")
        if not self.wait_s > 0:
            raise ConfigError("wait_s", self.wait_s, "must be a positive number of seconds")


@dataclass(frozen=True)
class InfoSpec:
    """The ``info:`` section: the device memory ``stage=info`` checks a configuration against, and
    the file of speeds ``make bench`` measured on this machine (projected wall times)."""

    device_memory: str
    speeds: str

    def __post_init__(self) -> None:
        try:
            if parse_bytes(self.device_memory) <= 0:
                raise ValueError(self.device_memory)
        except ValueError:
            raise ConfigError("device_memory", self.device_memory, "use a size such as 80GB, 141GB or 24GiB") from None

    @property
    def device_bytes(self) -> int:
        return parse_bytes(self.device_memory)


@dataclass(frozen=True)
class GenerateSpec:
    """The ``generate:`` config section (``stage=generate``; defaults in ``conf/generate/default.yaml``).

    One of ``prompt`` (a text) and ``prompts_file`` (a text file, one prompt per line, or a ``.jsonl``
    file, one JSON string or ``{"prompt": ...}`` object per line)."""

    prompt: Optional[str] = None
    prompts_file: Optional[str] = None
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0  # seeds sampling (one generator for the whole command)
    stop_at_eos: bool = True  # stop a continuation at the end-of-document token
    batch_size: int = 8  # prompts decoded together (left-padded)
    output: Optional[str] = None  # also write the continuations (ids and text) to this JSONL file

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError("max_new_tokens", self.max_new_tokens, "must be a positive number of tokens")
        if self.batch_size < 1:
            raise ConfigError("batch_size", self.batch_size, "must be a positive integer")
        if self.seed < 0:
            raise ConfigError("seed", self.seed, "must be a non-negative integer")
        try:
            self.sampling
        except BamError:
            key, value = (("temperature", self.temperature) if not (math.isfinite(self.temperature)
                                                                    and self.temperature >= 0)
                          else ("top_p", self.top_p))
            why = "must be a number >= 0 (0 is greedy)" if key == "temperature" else "must be in (0, 1] (1: every token)"
            raise ConfigError(key, value, why) from None

    @property
    def sampling(self) -> Sampling:
        return Sampling(temperature=self.temperature, top_p=self.top_p)


@dataclass(frozen=True)
class RunContext:
    """One command's view of the run (see the module docstring)."""

    stage: str
    layout: RunLayout
    model: ModelSpec
    seed: SeedSpec
    branch: BranchSpec
    data: DataSpec
    train: TrainSettings
    budget: BudgetSettings
    eval: EvalSpec
    pipeline: PipelineSpec
    info: InfoSpec
    trainer: TrainerSpec  # devices, strategy, precision (training.parallel builds Lightning's strategy)
    logger: Optional[dict[str, Any]]  # a Hydra-instantiable Lightning logger, or None
    callbacks: dict[str, dict[str, Any]]  # name -> a Hydra-instantiable Lightning callback (`callbacks:`)
    domain: Optional[str]  # `domain=<name>`: the branch to train
    mix_name: str  # `mix=<name>`: the selected variant
    mix_node: Any  # its config, with the command's overrides
    overrides: tuple[str, ...]  # the command's own overrides, for hints
    experiment: Optional[str]
    config_hash: str  # of the whole resolved config (the report's provenance)
    source: Optional[DictConfig] = field(default=None, compare=False, repr=False)  # the composed config
    choices: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    artifact: Optional[str] = None  # `artifact=<label>`: the model stage=export / generate work on
    export: ExportSpec = field(default_factory=ExportSpec)
    generate: GenerateSpec = field(default_factory=GenerateSpec)
    downstream: DownstreamSpec = field(default_factory=DownstreamSpec)
    results_dir: Path = Path("docs")  # `paths.results`: the repository's docs/, where stage=results writes

    @classmethod
    def from_config(cls, cfg: DictConfig, *, choices: Mapping[str, Any], overrides: tuple[str, ...] = ()
                    ) -> "RunContext":
        """Read every section of the composed config. ``choices`` are Hydra's group choices
        (``HydraConfig.get().runtime.choices``); ``overrides`` the command line's task overrides."""
        check_run_name(str(cfg.run))
        domain = cfg.get("domain")
        domain_name = None if domain is None else str(domain.get("name") if isinstance(domain, DictConfig) else domain)
        ctx = cls(
            stage=str(cfg.stage),
            layout=RunLayout(Path(str(cfg.paths.run_dir)),
                             None if cfg.paths.get("data_dir") is None else Path(str(cfg.paths.data_dir))),
            model=read_section(ModelSpec, cfg.model, "model"),
            seed=read_section(SeedSpec, cfg.seed, "seed"),
            branch=BranchSpec.read(cfg.branch),
            data=read_data_spec(cfg.data),
            train=read_section(TrainSettings, cfg.train, "train"),
            budget=read_section(BudgetSettings, cfg.budget, "budget"),
            eval=read_section(EvalSpec, cfg.eval, "eval"),
            pipeline=read_section(PipelineSpec, cfg.pipeline, "pipeline"),
            info=read_section(InfoSpec, cfg.info, "info"),
            trainer=read_section(TrainerSpec, cfg.trainer, "trainer"),
            logger=plain(cfg.logger) if cfg.get("logger") else None,
            callbacks=read_callbacks(cfg.get("callbacks")),
            domain=domain_name or choices.get("domain"),
            mix_name=str(choices.get("mix") or "bam"),
            mix_node=cfg.get("mix"),
            overrides=tuple(overrides),
            experiment=cfg.get("experiment_name"),
            config_hash=canonical_hash(plain(cfg)),
            source=cfg,
            choices=dict(choices),
            artifact=None if cfg.get("artifact") is None else str(cfg.artifact),
            export=read_section(ExportSpec, cfg.get("export"), "export"),
            generate=read_section(GenerateSpec, cfg.get("generate"), "generate"),
            downstream=read_section(DownstreamSpec, cfg.get("downstream"), "downstream"),
            results_dir=Path(str(cfg.paths.get("results") or "docs")),
        )
        ctx.check()
        return ctx

    # ---- several training seeds ----------------------------------------------------------------
    @property
    def seeds(self) -> tuple[int, ...]:
        """The training seeds this command covers: ``pipeline.seeds``, else the run's own ``train.seed``."""
        return self.pipeline.seeds or (self.train.seed,)

    def for_seed(self, seed: int) -> "RunContext":
        """This run with training seed ``seed``: itself for its own ``train.seed``, else the run
        ``<run>-seed<seed>`` beside it, reading this run's prepared data (store.layout)."""
        if seed == self.train.seed:
            return self
        if self.source is None:
            raise BamError("this run context was not read from a config; cannot derive another seed's run")
        name = seed_run_name(self.run, seed)
        cfg = copy.deepcopy(self.source)
        with open_dict(cfg):
            cfg.run = name
            cfg.paths.run_dir = str(self.layout.run_dir.parent / name)
            cfg.paths.data_dir = str(self.layout.data.resolve())
            cfg.train.seed = seed
            cfg.pipeline.seeds = None
        own = tuple(o for o in self.overrides if o.split("=", 1)[0].lstrip("+~") not in ("run", "train.seed",
                                                                                         "pipeline.seeds"))
        return RunContext.from_config(cfg, choices=self.choices, overrides=(*own, f"run={name}", f"train.seed={seed}"))

    def check(self) -> None:
        """Checks across sections (each section checked its own values when it was read)."""
        import torch

        unknown = sorted(set(self.branch.imports) - set(self.data.domains))
        if unknown:
            raise ConfigError(f"branch.{unknown[0]}.path", self.branch.imports[unknown[0]].path,
                              f"{unknown[0]} is not a domain of this run ({', '.join(self.data.domains)})")
        if self.train.seq_len > self.model.seq_len:
            raise ConfigError("train.seq_len", self.train.seq_len,
                              f"exceeds the model's context model.seq_len={self.model.seq_len}; set model.seq_len")
        try:
            # the stages that start the trainer's devices here: training, and eval split over several devices
            check_trainer(self.trainer.flags(), here=self.stage in TRAINING_STAGES or (
                self.stage in SHARED_STAGES and self.trainer.world_size > 1))
        except ConfigError as e:
            raise e.under("trainer") from None
        if self.stage in (*TRAINING_STAGES, "info"):
            self.batch_split  # the global batch splits evenly over this run's devices (else one line saying how)
        if self.stage in EVAL_STAGES and self.eval.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("eval.device", self.eval.device, "no CUDA GPU is visible; use eval.device=auto or cpu")
        variants = group_options("mix")
        named = [("pipeline.mix_variants", v) for v in self.pipeline.mix_variants]
        named += [("pipeline.moe_runs", v.removesuffix(CM_SUFFIX)) for v in self.pipeline.moe_runs]
        named += [("budget.moe.reference", self.budget.moe.reference)]
        for key, name in named:
            if name not in variants:
                raise ConfigError(key, name, f"no mix variant of that name (known: {', '.join(variants)})")
        dense = self.model.dense_config()
        for name in dict.fromkeys([self.mix_name, *self.pipeline.mix_variants]):
            variant = self.variant(name)
            try:  # a variant that cannot be laid out over this run's domains fails now, naming its key
                variant.layout(dense, len(self.data.domains))
            except ConfigError as e:
                raise e.under(self._variant_key(name)) from None

    # ---- settings derived from several sections ------------------------------------------------
    @property
    def run(self) -> str:
        return self.layout.run

    @cached_property
    def world_size(self) -> int:
        return self.trainer.world_size

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step over every device (``train.global_batch_tokens``)."""
        return self.train.step_tokens

    @cached_property
    def batch_split(self) -> BatchSplit:
        """The global batch over this run's devices: each one's micro-batch and accumulation."""
        try:
            return self.train.split(self.world_size)
        except ConfigError as e:
            raise e.under("train") from None

    def variant(self, name: str) -> MixVariant:
        """Mixture variant ``name``: the selected one with this command's overrides, another from its file."""
        node = self.mix_node if name == self.mix_name and self.mix_node is not None else load_option("mix", name)
        return read_section(MixVariant, node, self._variant_key(name), name=name)

    def _variant_key(self, name: str) -> str:
        """How errors name a variant's settings: ``mix`` (the selected one), else ``mix/<name>``."""
        return "mix" if name == self.mix_name else f"mix/{name}"

    # ---- messages ---------------------------------------------------------------------------
    def cmd(self, args: str) -> str:
        """The command line that produces something: ``args`` plus this command's own overrides
        (experiment, run, paths, ...) other than what selects the stage."""
        own = [o for o in self.overrides if o.split("=", 1)[0].lstrip("+~") not in SELECTORS]
        if not self.overrides and self.experiment:
            own = [f"experiment={self.experiment}"]
        return " ".join(["python -m bam_pipeline", args, *own])


def read_callbacks(node: Any) -> dict[str, dict[str, Any]]:
    """The ``callbacks:`` section: name -> a node with ``_target_``; a null entry is switched off."""
    data = plain(node) or {}
    if not isinstance(data, dict):
        raise ConfigError("callbacks", data, "must map names to callbacks, e.g. "
                                             "+callbacks.lr={_target_: lightning.pytorch.callbacks.LearningRateMonitor}")
    for name, entry in data.items():
        if entry is not None and not (isinstance(entry, dict) and isinstance(entry.get("_target_"), str)):
            raise ConfigError(f"callbacks.{name}", entry, "must name a Lightning callback class as _target_, "
                                                          "or be null to switch it off")
    return {name: entry for name, entry in data.items() if entry is not None}


def require_domain(ctx: RunContext) -> str:
    """The branch domain this command names; a BamError saying how to name one."""
    if not ctx.domain:
        known = ",".join(ctx.data.domains)
        raise BamError(f"stage=branch needs a domain: add domain=<name> (this run's domains: {known}), "
                       f"or sweep them all with `python -m bam_pipeline -m stage=branch domain={known}`")
    if ctx.domain not in ctx.data.domains:
        raise BamError(f"unknown branch domain {ctx.domain!r}; known domains: {', '.join(ctx.data.domains)} "
                       "(data.domains)")
    return ctx.domain
