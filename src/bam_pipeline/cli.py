"""Hydra entry point, ``python -m bam_pipeline stage=<name> [overrides]`` (stages: :data:`bam_pipeline.stages.STAGES`),
and the error boundary: a user's error (BamError) prints one line and exits 2; a stop signal exits
128 + its number; anything else is a bug and prints one line pointing at a file with the traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from bam_pipeline.config.files import PRIMARY, conf_dir
from bam_pipeline.errors import BamError

os.environ.setdefault("WANDB_SILENT", "true")
UNEXPECTED_EXIT = 1


def quiet_lightning() -> None:
    """Keep Lightning's per-Trainer banners (GPU available, tips) out of the stage output."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def check_stages_root(root: Path) -> None:
    """The stages root is (or can be made) a writable directory; else one error line and exit 2."""
    blocker = next((p for p in (root, *root.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        fail(f"cannot write stage outputs under {root}: {blocker} is a file, not a directory; point BAM_STAGES_DIR "
             "(or paths.root) at a writable directory")
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-check-"):
            pass
    except OSError as e:
        fail(f"cannot write stage outputs under {root} ({e.strerror or e}); point BAM_STAGES_DIR (or paths.root) "
             "at a writable directory")


class StagesRootCheck(Callback):
    """Checks the stages root before Hydra creates its own output directory inside it."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        check_stages_root(Path(str(config.paths.root)))

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        check_stages_root(Path(str(config.paths.root)))


def report_unexpected(error: BaseException) -> None:
    """One line naming the error and a file holding its traceback (Hydra's job directory, else a temp file)."""
    from hydra.core.hydra_config import HydraConfig

    text = "".join(traceback.format_exception(error))
    try:
        folder = Path(HydraConfig.get().runtime.output_dir)
        path = folder / f"error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        path.write_text(text)
    except Exception:  # the boundary must not fail in turn: fall back to a temporary file
        with tempfile.NamedTemporaryFile("w", prefix="bam-error-", suffix=".log", delete=False) as f:
            f.write(text)
            path = Path(f.name)
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    fail(f"unexpected {type(error).__name__}{': ' + first if first else ''} (a bug in bam-pipeline, not in your "
         f"input; the traceback is in {path}; please report it)", UNEXPECTED_EXIT)


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name=PRIMARY)
def app(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from bam_pipeline.stages import RunContext, stage_named
    from bam_pipeline.training import preemption
    from bam_pipeline.training.ranks import finish_distributed

    quiet_lightning()
    preemption.install()
    hydra_cfg = HydraConfig.get()
    try:
        stage = stage_named(str(cfg.stage))
        ctx = RunContext.from_config(cfg, choices=hydra_cfg.runtime.choices, overrides=tuple(hydra_cfg.overrides.task))
        stage.run(ctx)
        finish_distributed()
    except Exception as e:
        stop = preemption.stop_behind(e)  # a stop signal another handler turned into this error
        if stop is not None:
            fail(str(stop), stop.exit_code)
        if isinstance(e, BamError):
            fail(str(e), e.exit_code)
        report_unexpected(e)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
