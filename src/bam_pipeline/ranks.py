"""Which process of a distributed launch this is, how many there are, whether the machine has the
devices a ``trainer:`` config asks for, the waits of one rank on the others, and work split across ranks.

Under DDP every process runs the whole command (Lightning re-launches it, or torchrun/SLURM start
all ranks). Training stages run on every rank; stages that only write files (data, mix) run on
global rank 0 while the other ranks wait for the result to appear; eval and downstream split their
scoring over the ranks (:meth:`Ranks.run_shares`) and rank 0 alone writes their results.

Every wait on another rank is bounded by ``trainer.collective_timeout_s`` (the process group's
timeout) and fails with one line that names the waiting rank, what it waited for and that setting
(:meth:`Ranks.waiting`). The object collectives go through a gloo group (the default group itself
when it is gloo), so that a timeout or a lost rank raises in Python on GPUs too, where an NCCL
watchdog would abort the process without a word.
"""

from __future__ import annotations

import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

from bam_pipeline.errors import BamError, ConfigError

T = TypeVar("T")
R = TypeVar("R")
RANK_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
TIMEOUT_KEY = "trainer.collective_timeout_s"
DEFAULT_TIMEOUT_S = 3600.0  # conf/trainer/*.yaml; Lightning's own default is 1800 s


def is_rank_zero() -> bool:
    """True unless a launcher marked this process as another rank than global rank 0."""
    return all(int(os.environ.get(var, "0") or 0) == 0 for var in RANK_VARS)


def this_rank() -> int:
    """This process's global rank as its launcher's environment gives it (0 outside a distributed launch)."""
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var):
            return int(os.environ[var])
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def timed_out_message(rank: int, what: str, timeout_s: float) -> str:
    """The one line of a wait on another rank that outlasted ``trainer.collective_timeout_s``."""
    return (f"rank {rank} waited longer than {TIMEOUT_KEY}={timeout_s:g} s for {what}; raise {TIMEOUT_KEY} "
            "if that work takes longer on this machine, or look in the other ranks' output for one that hangs")


def wait_for(get: Callable[[], T | None], what: str, timeout_s: float = DEFAULT_TIMEOUT_S, poll_s: float = 2.0) -> T:
    """Poll ``get`` until it returns something (rank 0 finished ``what``); a BamError after ``timeout_s``
    (``trainer.collective_timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while (found := get()) is None:
        if time.monotonic() > deadline:
            raise BamError(timed_out_message(this_rank(), f"rank 0 to finish {what}", timeout_s))
        time.sleep(poll_s)
    return found


class RankStopped(BamError):
    """This rank stops because another rank failed and rank 0 prints why: the command's error boundary
    exits with its code and prints nothing more (one line for the whole launch)."""

    def __init__(self) -> None:
        super().__init__("another rank failed; rank 0 prints why")


def assign_shares(costs: Sequence[float], world: int) -> list[int]:
    """The rank that computes each unit of work: longest first, each to the rank with the least work so far
    (the lowest such rank on a tie). Deterministic, so every rank computes the same assignment."""
    owners = [0] * len(costs)
    loads = [0.0] * world
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        owners[i] = rank
        loads[rank] += costs[i]
    return owners


@dataclass(frozen=True)
class Shared:
    """The results of :meth:`Ranks.run_shares`, in the units' order, and the rank that computed each."""

    results: list[Any]
    owners: list[int]

    def by_rank(self, labels: Sequence[str]) -> dict[str, list[str]]:
        """Rank -> the labels of the units it computed (every rank of the launch, empty lists included)."""
        out: dict[str, list[str]] = {}
        for label, owner in zip(labels, self.owners):
            out.setdefault(str(owner), []).append(label)
        return out


@dataclass(frozen=True)
class Ranks:
    """The processes of this launch as the stages see them: this one's global and local rank, how many there
    are, the timeout of every wait on another rank, and the gloo group the object collectives use (None: the
    default group, or no group at all with one process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    timeout_s: float = DEFAULT_TIMEOUT_S
    group: Any = None

    @property
    def is_zero(self) -> bool:
        return self.rank == 0

    def device(self, device: Any) -> Any:
        """``device`` (a torch.device) as this rank uses it: a CUDA device becomes this rank's own GPU."""
        import torch

        if self.world > 1 and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

    @contextmanager
    def waiting(self, what: str) -> Iterator[None]:
        """A wait on the other ranks for ``what``: torch's errors become one line naming this rank, ``what`` and
        ``trainer.collective_timeout_s``."""
        try:
            yield
        except BamError:
            raise
        except Exception as e:  # gloo's RuntimeError / DistError: a timeout, or a rank that went away
            detail = " ".join(str(e).split())
            detail = re.sub(r"\[[^\]]*\.(?:cc|cpp|h):\d+\] ", "", detail).split(". This is typically")[0]
            if "timeout" in detail.lower() or "timed out" in detail.lower():
                raise BamError(timed_out_message(self.rank, what, self.timeout_s)) from None
            raise BamError(f"rank {self.rank} lost another rank while waiting for {what} ({detail[:160]}); that "
                           f"rank's output says why it stopped (a wait fails after {TIMEOUT_KEY}="
                           f"{self.timeout_s:g} s at the latest)") from None

    def barrier(self, what: str) -> None:
        """Every rank waits here until all have come (``what``: what the others are waited for)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        with self.waiting(what):  # gloo's own barrier: bounded by the group's timeout, and quiet when it fails
            dist.barrier(group=self.group)

    def gather(self, obj: Any, what: str) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        with self.waiting(what):
            dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj: T, what: str) -> T:
        """Rank 0's ``obj`` on every rank (the others pass anything)."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_zero else None]
        with self.waiting(what):
            dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def run_shares(self, units: Sequence[T], costs: Sequence[float], compute: Callable[[T], R], what: str) -> Shared:
        """``compute(unit)`` of every unit, each on one rank (:func:`assign_shares` by ``costs``), the results
        gathered on every rank. A BamError on any rank stops every rank: rank 0 raises it (prefixed with the
        rank it came from), the others :class:`RankStopped`. With one process: a loop, errors raised as they come."""
        owners = assign_shares(costs, self.world)
        if self.world == 1:
            return Shared([compute(u) for u in units], owners)
        mine: dict[int, Any] = {}
        failure = None
        for i, unit in enumerate(units):
            if owners[i] != self.rank:
                continue
            try:
                mine[i] = compute(unit)
            except BamError as e:
                failure = str(e)
                break
            except Exception as e:  # a bug: its one line goes to rank 0 with the others' results
                failure = (f"unexpected {type(e).__name__}: {' '.join(str(e).split())[:200]} (a bug in "
                           "bam-pipeline; run the command on one device for its traceback, and please report it)")
                break
        parts = self.gather((mine, failure), what)
        failed = [(r, f) for r, (_, f) in enumerate(parts) if f is not None]
        if failed:
            if not self.is_zero:  # outlive rank 0, which prints why: a wait it never joins ends when it exits
                try:
                    self.barrier("rank 0 to report the failure")
                except BamError:
                    pass
                raise RankStopped()
            rank, message = failed[0]
            raise BamError(message if rank == 0 else f"rank {rank}: {message}")
        results: dict[int, Any] = {}
        for part, _ in parts:
            results.update(part)
        return Shared([results[i] for i in range(len(units))], owners)


_JOINED: dict[int, Ranks] = {}  # id of the default process group -> this process's ranks in it (one gloo group each)


def current_ranks(timeout_s: float = DEFAULT_TIMEOUT_S) -> Ranks:
    """The ranks of the process group this process belongs to (one process when there is none); the gloo group
    for object collectives made on first use (a collective: every rank calls this at the same point)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return Ranks(timeout_s=timeout_s)
    key = id(dist.group.WORLD)
    if key in _JOINED:
        return _JOINED[key]
    group = None
    if dist.get_backend() != "gloo":  # NCCL's timeouts abort the process; gloo's raise
        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    ranks = Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0") or 0), timeout_s, group)
    _JOINED.clear()
    _JOINED[key] = ranks
    return ranks


def join_ranks(trainer_cfg: Mapping[str, Any], timeout_s: float) -> Ranks:
    """The ranks a stage that splits its work (eval, downstream) runs on: one process for a one-device
    ``trainer:``; otherwise the process group this process is in (a training stage's, or torchrun's and
    SLURM's ranks), started with Lightning Fabric's launcher when there is none yet: it re-runs this command
    in one process per further device, and every process joins a process group with ``timeout_s``."""
    if world_size(trainer_cfg) == 1:
        return Ranks(timeout_s=timeout_s)
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        from lightning.fabric import Fabric
        from lightning.fabric.strategies import DDPStrategy

        Fabric(accelerator=str(trainer_cfg.get("accelerator", "auto")), devices=trainer_cfg.get("devices", 1),
               num_nodes=int(trainer_cfg.get("num_nodes", 1)),
               strategy=DDPStrategy(timeout=timedelta(seconds=timeout_s))).launch()
    return current_ranks(timeout_s)


def finish_distributed(timeout_s: float | None = None) -> None:
    """End this process's part of a distributed launch cleanly: every rank meets at a barrier, then
    leaves the process group (no rank exits while another still talks to it)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        current_ranks(timeout_s if timeout_s is not None else DEFAULT_TIMEOUT_S).barrier(
            "every rank to finish the command")
        _JOINED.clear()
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
