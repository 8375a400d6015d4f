"""Configs and run contexts composed in-process from the shipped config, as the command line composes them
(no subprocess: planning needs no devices)."""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bam_pipeline.config.files import conf_dir
from bam_pipeline.config.overrides import merged_assignments
from bam_pipeline.stages.context import RunContext


def compose_config(*overrides: str, hydra_cfg: bool = False):
    """The composed config of ``overrides`` (with Hydra's own node when ``hydra_cfg``)."""
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose("config", overrides=merged_assignments(overrides), return_hydra_config=hydra_cfg)


def run_context(*overrides: str) -> RunContext:
    """The run context of a command (``stage=info`` unless given)."""
    if not any(o.startswith("stage=") for o in overrides):
        overrides = ("stage=info", *overrides)
    cfg = compose_config(*overrides, hydra_cfg=True)
    choices = cfg.hydra.runtime.choices
    return RunContext.from_config(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), choices=choices,
                                  overrides=overrides)
