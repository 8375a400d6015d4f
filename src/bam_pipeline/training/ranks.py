"""Which process of a distributed launch this is, how many there are, whether the machine has the
devices a ``trainer:`` config asks for, and waiting for rank 0's work.

Under DDP every process runs the whole command (Lightning re-launches it, or torchrun/SLURM start
all ranks). Training stages run on every rank; stages that only write files (data, mix, eval)
run on global rank 0 while the other ranks wait for the result to appear.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Mapping, TypeVar

from bam_pipeline.errors import BamError, ConfigError

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


def finish_distributed() -> None:
    """End this process's part of a distributed launch cleanly: every rank meets at a barrier, then
    leaves the process group (no rank exits while another still talks to it)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


GPU_ACCELERATORS = ("gpu", "cuda")
ACCELERATORS = ("cpu", *GPU_ACCELERATORS, "mps", "auto")


def _precisions() -> set[str]:
    import typing

    from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT

    return {str(v) for arm in typing.get_args(_PRECISION_INPUT) for v in typing.get_args(arm)}


def check_trainer(trainer_cfg: Mapping[str, Any], *, here: bool, precision: bool = True) -> None:
    """The ``trainer:`` settings are values Lightning accepts and, when they will run ``here``, name
    devices this machine has; a ConfigError naming the key otherwise (before any stage does work).
    ``precision=False`` leaves the precision to the process that runs the job (checking it imports Lightning,
    seconds that a sweep's launcher need not spend)."""
    if here:
        import torch

    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if accelerator not in ACCELERATORS:
        raise ConfigError("accelerator", accelerator, f"use one of {', '.join(ACCELERATORS)}")
    if here and accelerator in GPU_ACCELERATORS and not torch.cuda.is_available():
        raise ConfigError("accelerator", accelerator, "no CUDA GPU is visible on this machine; use trainer=cpu "
                                                      "(or trainer=ddp_cpu for two CPU processes)")
    if here and accelerator == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("accelerator", accelerator, "Apple MPS is not available here; use trainer=cpu")
    devices = trainer_cfg.get("devices", 1)
    ok = devices == "auto" or devices == -1 or (isinstance(devices, int) and not isinstance(devices, bool)
                                                 and devices >= 1)
    ok = ok or (isinstance(devices, (list, tuple)) and bool(devices) and all(isinstance(d, int) for d in devices))
    ok = ok or (isinstance(devices, str) and all(p.strip().isdigit() for p in devices.split(",") if p.strip())
                and any(p.strip() for p in devices.split(",")))
    if not ok:
        raise ConfigError("devices", devices, "use a positive number of devices, a list of device ids, or auto")
    if here and accelerator in GPU_ACCELERATORS and isinstance(devices, int) and devices > torch.cuda.device_count():
        raise ConfigError("devices", devices, f"this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    nodes = trainer_cfg.get("num_nodes", 1)
    if not isinstance(nodes, int) or isinstance(nodes, bool) or nodes < 1:
        raise ConfigError("num_nodes", nodes, "must be a positive integer")
    value = str(trainer_cfg.get("precision", "32-true"))
    if precision and value not in _precisions():
        raise ConfigError("precision", value, f"use one of {', '.join(sorted(_precisions()))}")


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
