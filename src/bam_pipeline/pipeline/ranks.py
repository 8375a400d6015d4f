"""Which process of a distributed launch this is, and waiting for rank 0's work.

Under DDP every process runs the whole command (Lightning re-launches it, or torchrun/SLURM start
all ranks). Training stages run on every rank; stages that only write files (data, mix, eval)
run on global rank 0 while the other ranks wait for the result to appear.
"""

from __future__ import annotations

import os
import time
from typing import Callable, TypeVar

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
