"""Hydra entry point, ``python -m bam_pipeline stage=<name> [overrides]`` (stages: :data:`bam_pipeline.stages.STAGES`),
and the error boundary: a user's error (BamError) prints one line and exits non-zero.
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from bam_pipeline.config.files import PRIMARY, conf_dir
from bam_pipeline.errors import BamError

os.environ.setdefault("WANDB_SILENT", "true")


def quiet_lightning() -> None:
    """Keep Lightning's per-Trainer banners (GPU available, tips) out of the stage output."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name=PRIMARY)
def app(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from bam_pipeline.stages import RunContext, stage_named

    quiet_lightning()
    hydra_cfg = HydraConfig.get()
    try:
        stage = stage_named(str(cfg.stage))
        ctx = RunContext.from_config(cfg, choices=hydra_cfg.runtime.choices, overrides=tuple(hydra_cfg.overrides.task))
        stage.run(ctx)
    except BamError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
