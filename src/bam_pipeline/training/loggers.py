"""External experiment loggers (wandb offline by default, CSV, none), built from `conf/logger/`."""

from __future__ import annotations

from pathlib import Path
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
        if logger_cfg.get("offline", False):
            # Lightning's offline=True only sets WANDB_MODE, which wandb reads once per process: after an
            # earlier run in this process (the report of one seed, say) the next would try to log in
            extra["mode"] = "offline"
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


def is_wandb(logger_cfg: dict | None) -> bool:
    return bool(logger_cfg) and str(logger_cfg.get("_target_", "")).endswith("WandbLogger")


def log_report(logger_cfg: dict | None, *, run: str, files: list[Path], metrics_rows: list[dict]) -> Path | None:
    """Log the eval report to wandb (its own run in the run's group): the HTML page, the plots, the
    metrics table, and every file as a `report` artifact. Returns the wandb run directory, or None
    when the wandb logger is off."""
    if not is_wandb(logger_cfg):
        return None
    import wandb

    save_dir = Path(logger_cfg.get("save_dir") or ".")
    save_dir.mkdir(parents=True, exist_ok=True)
    wb = wandb.init(project=logger_cfg.get("project"), entity=logger_cfg.get("entity"), dir=str(save_dir),
                    group=run, job_type="report", name=f"{run}-report",
                    mode="offline" if logger_cfg.get("offline", True) else "online")
    try:
        payload: dict[str, Any] = {}
        for f in files:
            if f.suffix == ".png":
                payload[f"report/{f.stem}"] = wandb.Image(str(f))
            elif f.suffix == ".html":
                payload["report/page"] = wandb.Html(f.read_text())
        if metrics_rows:
            columns = sorted({k for r in metrics_rows for k in r if not isinstance(r[k], (dict, list))})
            payload["report/metrics"] = wandb.Table(columns=columns,
                                                    data=[[r.get(c) for c in columns] for r in metrics_rows])
        wb.log(payload)
        artifact = wandb.Artifact(f"{run}-report", type="report")
        for f in files:
            artifact.add_file(str(f))
        wb.log_artifact(artifact)
        return Path(wb.dir).parent
    finally:
        wb.finish()
