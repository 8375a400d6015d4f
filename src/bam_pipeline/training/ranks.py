"""Which process of a distributed launch this is, how many there are, and waiting for rank 0's work.

Under DDP every process runs the whole command (Lightning re-launches it, or torchrun/SLURM start
all ranks). Training stages run on every rank; stages that only write files (data, mix, eval)
run on global rank 0 while the other ranks wait for the result to appear.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Mapping, TypeVar

from bam_pipeline.errors import BamError

T = TypeVar("T")
RANK_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


def is_rank_zero() -> bool:
    """True unless a launcher marked this process as another rank than global rank 0."""
    return all(int(os.environ.get(var, "0") or 0) == 0 for var in RANK_VARS)


def wait_for(get: Callable[[], T | None], what: str, timeout_s: float = 6 * 3600, poll_s: float = 2.0) -> T:
    """Poll ``get`` until it returns something (rank 0 finished ``what``)."""
    deadline = time.monotonic() + timeout_s
    while (found := get()) is None:
        if time.monotonic() > deadline:
            raise BamError(f"waited {timeout_s:.0f} s for rank 0 to finish {what}; check rank 0's output")
        time.sleep(poll_s)
    return found


def world_size(trainer_cfg: Mapping[str, Any]) -> int:
    """Processes a ``trainer:`` config launches: devices per node (an integer, a list or a
    comma-separated string of device ids, or ``auto``/-1 for every visible accelerator) x nodes."""
    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, str) and "," in devices:  # "0,1": these device ids
        devices = [d for d in devices.split(",") if d.strip()]
    if isinstance(devices, str) and devices.lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices > 0:
        n = devices
    elif isinstance(devices, (list, tuple)):
        n = len(devices)
    else:  # "auto" or -1: every visible accelerator
        import torch

        n = torch.cuda.device_count() if trainer_cfg.get("accelerator") in ("gpu", "cuda", "auto") else 1
        n = max(1, n)
    return n * int(trainer_cfg.get("num_nodes", 1))
