"""External experiment loggers (wandb offline by default, CSV, none), built from `conf/logger/`."""

from __future__ import annotations

from typing import Any

from hydra.utils import instantiate


def make_logger(logger_cfg: dict | None, *, run: str, stage: str, name: str, config: dict[str, Any]):
    """A Lightning logger for one stage run, or None when `logger=none`."""
    if not logger_cfg or "_target_" not in logger_cfg:
        return None
    target = logger_cfg["_target_"]
    extra: dict[str, Any] = {"name": f"{stage}-{name}"}
    if target.endswith("WandbLogger"):
        extra.update(group=run, job_type=stage, config=config)
    elif target.endswith("CSVLogger"):
        extra.update(name=f"{stage}/{name}")
    return instantiate({**logger_cfg, **extra}, _convert_="all")


def close_logger(logger) -> None:
    """Finish the logger's run even after an exception, so each stage (and sweep job) gets its own run."""
    if logger is None:
        return
    if type(logger).__name__ == "WandbLogger":
        import wandb

        wandb.finish()
    else:
        logger.finalize("success")
