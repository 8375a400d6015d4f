"""The run as the stages see it: every config section read once into its typed spec, the run's
layout, the selected domain and mixture variant, and the command hints of error messages.

:meth:`RunContext.from_config` is the config boundary: a bad value anywhere ends here, in one
:class:`~bam_pipeline.errors.ConfigError` line, before any stage does work.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Optional

from omegaconf import DictConfig

from bam_pipeline.config.files import group_options, load_option
from bam_pipeline.config.reading import plain, read_section
from bam_pipeline.data.spec import DataSpec, read_data_spec
from bam_pipeline.errors import BamError, ConfigError
from bam_pipeline.eval.spec import EvalSpec
from bam_pipeline.mixing.variant import MixVariant
from bam_pipeline.model.config import ModelConfig, preset
from bam_pipeline.store.files import canonical_hash
from bam_pipeline.store.layout import CM_SUFFIX, RunLayout
from bam_pipeline.training.budget import BudgetSettings
from bam_pipeline.training.memory import InfoSpec
from bam_pipeline.training.parallel import TrainerSpec
from bam_pipeline.training.ranks import check_trainer
from bam_pipeline.training.settings import TrainSettings

ON_STALE = ("rebuild", "refuse")
TRAINING_STAGES = ("seed", "branch", "moe", "all")  # the stages that run the trainer's devices here
EVAL_STAGES = ("eval", "all")
# Overrides that select what a command works on; hints drop them and name their own.
SELECTORS = ("stage", "domain", "mix")


# ModelConfig fields a model override may not set, and why.
NOT_OVERRIDABLE = {
    "max_seq_len": "set model.seq_len instead",
    "vocab_size": "the vocabulary size comes from the run's tokenizer",
    "name": "the model's name comes from its preset",
    **dict.fromkeys(("attn_experts", "attn_kv", "attn_router", "ffn_experts", "ffn_router"),
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


@dataclass(frozen=True)
class PipelineSpec:
    """The ``pipeline:`` section: what ``stage=all`` builds, and what a stale artifact gets."""

    mix_variants: tuple[str, ...]
    moe_runs: tuple[str, ...]
    on_stale: str
    wait_s: float  # how long to wait for an input another run is building (the prepared data)

    def __post_init__(self) -> None:
        if self.on_stale not in ON_STALE:
            raise ConfigError("on_stale", self.on_stale, f"use one of {', '.join(ON_STALE)}")
        if not self.wait_s > 0:
            raise ConfigError("wait_s", self.wait_s, "must be a positive number of seconds")


@dataclass(frozen=True)
class RunContext:
    """One command's view of the run (see the module docstring)."""

    stage: str
    layout: RunLayout
    model: ModelSpec
    data: DataSpec
    train: TrainSettings
    budget: BudgetSettings
    eval: EvalSpec
    pipeline: PipelineSpec
    info: InfoSpec
    trainer: TrainerSpec  # devices, strategy, precision (training.parallel builds Lightning's strategy)
    logger: Optional[dict[str, Any]]  # a Hydra-instantiable Lightning logger, or None
    domain: Optional[str]  # `domain=<name>`: the branch to train
    mix_name: str  # `mix=<name>`: the selected variant
    mix_node: Any  # its config, with the command's overrides
    overrides: tuple[str, ...]  # the command's own overrides, for hints
    experiment: Optional[str]
    config_hash: str  # of the whole resolved config (the report's provenance)

    @classmethod
    def from_config(cls, cfg: DictConfig, *, choices: Mapping[str, Any], overrides: tuple[str, ...] = ()
                    ) -> "RunContext":
        """Read every section of the composed config. ``choices`` are Hydra's group choices
        (``HydraConfig.get().runtime.choices``); ``overrides`` the command line's task overrides."""
        domain = cfg.get("domain")
        domain_name = None if domain is None else str(domain.get("name") if isinstance(domain, DictConfig) else domain)
        ctx = cls(
            stage=str(cfg.stage),
            layout=RunLayout(Path(str(cfg.paths.run_dir))),
            model=read_section(ModelSpec, cfg.model, "model"),
            data=read_data_spec(cfg.data),
            train=read_section(TrainSettings, cfg.train, "train"),
            budget=read_section(BudgetSettings, cfg.budget, "budget"),
            eval=read_section(EvalSpec, cfg.eval, "eval"),
            pipeline=read_section(PipelineSpec, cfg.pipeline, "pipeline"),
            info=read_section(InfoSpec, cfg.info, "info"),
            trainer=read_section(TrainerSpec, cfg.trainer, "trainer"),
            logger=plain(cfg.logger) if cfg.get("logger") else None,
            domain=domain_name or choices.get("domain"),
            mix_name=str(choices.get("mix") or "bam"),
            mix_node=cfg.get("mix"),
            overrides=tuple(overrides),
            experiment=cfg.get("experiment_name"),
            config_hash=canonical_hash(plain(cfg)),
        )
        ctx.check()
        return ctx

    def check(self) -> None:
        """Checks across sections (each section checked its own values when it was read)."""
        import torch

        if self.train.seq_len > self.model.seq_len:
            raise ConfigError("train.seq_len", self.train.seq_len,
                              f"exceeds the model's context model.seq_len={self.model.seq_len}; set model.seq_len")
        try:
            check_trainer(self.trainer.flags(), here=self.stage in TRAINING_STAGES)
        except ConfigError as e:
            raise e.under("trainer") from None
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
        return self.train.sequences_per_step * self.train.seq_len * self.world_size

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
