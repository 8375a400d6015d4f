"""Where the shipped Hydra configs live, and loading one option of a config group by name."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from bam_pipeline.errors import BamError


def conf_dir() -> Path:
    """The `conf/` directory: $BAM_CONF_DIR, else the repository's (the package is installed editable)."""
    env = os.environ.get("BAM_CONF_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "conf"


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def load_group(group: str, name: str) -> DictConfig:
    """conf/<group>/<name>.yaml, or a BamError listing the known options."""
    path = conf_dir() / group / f"{name}.yaml"
    if not path.is_file():
        raise BamError(f"unknown {group} {name!r}; known: {', '.join(group_options(group))} "
                       f"(or add conf/{group}/{name}.yaml)")
    return OmegaConf.load(path)
