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

from bam_pipeline.config.files import load_option
from bam_pipeline.config.reading import plain, read_section
from bam_pipeline.data.spec import DataSpec, read_data_spec
from bam_pipeline.errors import BamError, ConfigError
from bam_pipeline.eval.spec import EvalSpec
from bam_pipeline.mixing.variant import MixVariant
from bam_pipeline.model.config import ModelConfig, preset
from bam_pipeline.store.files import canonical_hash
from bam_pipeline.store.layout import RunLayout
from bam_pipeline.training.budget import BudgetSettings
from bam_pipeline.training.ranks import world_size
from bam_pipeline.training.settings import TrainSettings

ON_STALE = ("rebuild", "refuse")
# Overrides that select what a command works on; hints drop them and name their own.
SELECTORS = ("stage", "domain", "mix")


@dataclass(frozen=True)
class ModelSpec:
    """The ``model:`` section: a preset, the run's context length and field overrides."""

    preset: str
    seq_len: int
    overrides: dict[str, Any]

    def __post_init__(self) -> None:
        if self.seq_len < 1:
            raise ConfigError("seq_len", self.seq_len, "must be a positive number of tokens")
        self.dense_config()  # every override is checked now, not when the first model is built

    def dense_config(self, vocab_size: int | None = None) -> ModelConfig:
        """The seed's architecture: the preset with its overrides, the run's context length and, once
        data is prepared, the tokenizer's vocabulary size."""
        overrides = dict(self.overrides)
        if vocab_size is not None:
            overrides["vocab_size"] = vocab_size
        try:
            return preset(self.preset, max_seq_len=self.seq_len, **overrides)
        except ConfigError as e:
            raise (e if e.key == "preset" else e.under("overrides")) from None


@dataclass(frozen=True)
class PipelineSpec:
    """The ``pipeline:`` section: what ``stage=all`` builds, and what a stale artifact gets."""

    mix_variants: tuple[str, ...]
    moe_runs: tuple[str, ...]
    on_stale: str

    def __post_init__(self) -> None:
        if self.on_stale not in ON_STALE:
            raise ConfigError("on_stale", self.on_stale, f"use one of {', '.join(ON_STALE)}")


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
    trainer: dict[str, Any]  # passed to lightning.Trainer as is
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
            trainer=plain(cfg.trainer),
            logger=plain(cfg.logger) if cfg.get("logger") else None,
            domain=domain_name or choices.get("domain"),
            mix_name=str(choices.get("mix") or "bam"),
            mix_node=cfg.get("mix"),
            overrides=tuple(overrides),
            experiment=cfg.get("experiment_name"),
            config_hash=canonical_hash(plain(cfg)),
        )
        ctx.variant(ctx.mix_name)  # the selected variant is valid before any work
        return ctx

    # ---- settings derived from several sections ------------------------------------------------
    @property
    def run(self) -> str:
        return self.layout.run

    @cached_property
    def world_size(self) -> int:
        return world_size(self.trainer)

    @property
    def tokens_per_step(self) -> int:
        return self.train.sequences_per_step * self.train.seq_len * self.world_size

    def variant(self, name: str) -> MixVariant:
        """Mixture variant ``name``: the selected one with this command's overrides, another from its file."""
        node = self.mix_node if name == self.mix_name and self.mix_node is not None else load_option("mix", name)
        return read_section(MixVariant, node, "mix", name=name)

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
