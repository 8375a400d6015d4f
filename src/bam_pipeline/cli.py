"""Hydra entry point: `python -m bam_pipeline stage=<data|seed|branch|mix|moe|eval|all|info> [overrides]`.

User errors (BamError) print one line and exit non-zero; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from bam_pipeline.conf_files import conf_dir  # noqa: E402
from bam_pipeline.errors import BamError  # noqa: E402

STAGES = ("data", "seed", "branch", "mix", "moe", "eval", "all", "info")


def _domain(cfg: DictConfig) -> str | None:
    d = cfg.get("domain")
    if d is None:
        return None
    return d.get("name") if isinstance(d, DictConfig) else str(d)


def run_data(cfg: DictConfig):
    from bam_pipeline.data.prepare import open_current, prepare_data, print_stats_table
    from bam_pipeline.pipeline.ranks import is_rank_zero, wait_for
    from bam_pipeline.pipeline.stages import run_dir

    out = run_dir(cfg) / "data"
    if not is_rank_zero():  # other ranks of a distributed launch wait for rank 0's data
        def ready():
            try:
                return open_current(cfg.data, out)
            except BamError:
                return None

        return wait_for(ready, "the data stage")
    prepared = prepare_data(cfg.data, out)
    print_stats_table(prepared)
    return prepared


def run_eval(cfg: DictConfig) -> None:
    from bam_pipeline.eval.report import build_report, print_summary, report_files
    from bam_pipeline.pipeline.loggers import log_report
    from bam_pipeline.eval.runner import run_eval as evaluate
    from bam_pipeline.pipeline.artifacts import canonical_hash
    from bam_pipeline.pipeline.ranks import is_rank_zero
    from bam_pipeline.pipeline.stages import run_dir

    if not is_rank_zero():
        return
    metrics_path = evaluate(cfg, run_dir(cfg))
    command = "python -m bam_pipeline " + " ".join(sys.argv[1:])
    build_report(run_dir(cfg), command=command,
                 config_hash=canonical_hash(OmegaConf.to_container(cfg, resolve=True)))
    logger_cfg = OmegaConf.to_container(cfg.logger, resolve=True) if cfg.get("logger") else None
    wandb_dir = log_report(logger_cfg, run=cfg.run, files=report_files(run_dir(cfg)),
                           metrics_rows=json.loads(Path(metrics_path).read_text())["rows"])
    if wandb_dir is not None:
        print(f"report logged to wandb ({wandb_dir})")
    print_summary(run_dir(cfg))


def run_info(cfg: DictConfig) -> None:
    from bam_pipeline.pipeline.info import print_info
    from bam_pipeline.pipeline.stages import dense_model_config

    print_info(dense_model_config(cfg), OmegaConf.to_container(cfg.mix, resolve=True), n_domains=len(cfg.data.domains),
               seq_len=int(cfg.model.seq_len))


def run_all(cfg: DictConfig) -> None:
    from bam_pipeline.pipeline import stages as S

    t0 = time.perf_counter()
    run_data(cfg)
    S.run_seed(cfg)
    for d in cfg.data.domains:
        S.run_branch(cfg, d)
    for v in cfg.pipeline.mix_variants:
        S.run_mix(cfg, v)
    for name in cfg.pipeline.moe_runs:
        S.run_moe(cfg, name)
    run_eval(cfg)
    print(f"pipeline finished in {time.perf_counter() - t0:.0f} s")


def quiet_lightning() -> None:
    """Keep Lightning's per-Trainer banners (GPU available, tips) out of the stage output."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)


def dispatch(cfg: DictConfig) -> None:
    from bam_pipeline.pipeline import stages as S

    quiet_lightning()

    stage = cfg.stage
    if stage not in STAGES:
        raise BamError(f"unknown stage {stage!r}; choose one of: {', '.join(STAGES)}")
    if stage == "info":
        run_info(cfg)
    elif stage == "data":
        run_data(cfg)
    elif stage == "seed":
        S.run_seed(cfg)
    elif stage == "branch":
        S.run_branch(cfg, _domain(cfg))
    elif stage == "mix":
        S.run_mix(cfg, cfg.mix.variant)
    elif stage == "moe":
        S.run_moe(cfg, cfg.mix.variant)
    elif stage == "eval":
        run_eval(cfg)
    else:
        run_all(cfg)


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def app(cfg: DictConfig) -> None:
    try:
        dispatch(cfg)
    except BamError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
