"""The shipped Hydra configs (``bam_pipeline/conf/``, package data) and loading one option of a
config group by name, through Hydra, so that an option's defaults list applies and a user's own
config directory (``hydra.searchpath=[file://...]``) is searched as the command line was."""

from __future__ import annotations

import functools
from pathlib import Path

from omegaconf import DictConfig

from bam_pipeline.errors import BamError

PRIMARY = "config"


def conf_dir() -> Path:
    """The shipped ``conf/`` directory, inside the installed package."""
    return Path(__file__).resolve().parents[1] / "conf"


def _searchpath_overrides() -> list[str]:
    """The running app's ``hydra.searchpath`` overrides (none outside an app)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [o for o in HydraConfig.get().overrides.hydra if o.split("=", 1)[0].lstrip("+~") == "hydra.searchpath"]


def search_dirs() -> list[Path]:
    """The local directories Hydra searches for configs: the user's ``file://`` search path, then ours."""
    from hydra.core.hydra_config import HydraConfig

    user = list(HydraConfig.get().searchpath) if HydraConfig.initialized() else []
    return [*(Path(str(e)[len("file://"):]) for e in user if str(e).startswith("file://")), conf_dir()]


def group_options(group: str) -> list[str]:
    """Names of a group's options (``<name>.yaml`` in ``<dir>/<group>/`` of every search directory)."""
    return sorted({p.stem for d in search_dirs() for p in (d / group).glob("*.yaml")})


def load_option(group: str, name: str) -> DictConfig:
    """Option ``name`` of config ``group``, composed by Hydra (its defaults list applied, interpolations
    left in place); a BamError listing the known options when there is none of that name. Composed
    once per process and search path (a read-only copy is returned)."""
    return _compose_option(group, name, tuple(_searchpath_overrides()))


@functools.lru_cache(maxsize=None)
def _compose_option(group: str, name: str, searchpath: tuple[str, ...]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import MissingConfigException
    from omegaconf import OmegaConf

    overrides = [f"{group}={name}", *searchpath]
    try:
        if GlobalHydra.instance().is_initialized():
            option = compose(PRIMARY, overrides=overrides)[group]
        else:
            with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
                option = compose(PRIMARY, overrides=overrides)[group]
        OmegaConf.set_readonly(option, True)
        return option
    except MissingConfigException:
        raise BamError(f"unknown {group} {name!r}; known: {', '.join(group_options(group))} "
                       f"(or add {group}/{name}.yaml to a config directory)") from None
