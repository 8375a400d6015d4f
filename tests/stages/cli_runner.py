"""Run the real CLI (`python -m bam_pipeline`) as a subprocess, on the smoke experiment by default."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Result:
    returncode: int
    out: str  # stdout + stderr

    def ok(self) -> "Result":
        assert self.returncode == 0, self.out[-4000:]
        return self


def cli(root: Path, *args: str, timeout: float = 300, check: bool = False) -> Result:
    """Run `python -m bam_pipeline <args> experiment=smoke logger=none` with stages under ``root``."""
    env = {**os.environ, "BAM_STAGES_DIR": str(root), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "bam_pipeline", *args]
    if not any(a.startswith("experiment=") for a in args):
        cmd.append("experiment=smoke")
    if not any(a.startswith("logger=") for a in args):
        cmd.append("logger=none")
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    r = Result(p.returncode, p.stdout + p.stderr)
    return r.ok() if check else r
