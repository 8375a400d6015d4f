"""One lock per stage output, so two runs never build the same artifact at once.

A lock is a small JSON file (``RunLayout.lock(stage, name)``) naming its holder: host, pid, the
SLURM job (when there is one), when it was taken and when it was last renewed. It is created
atomically (written aside, then hard-linked into place, which fails if it exists) and renewed by a
background thread while held (a lease). A lock is **stale**, and is taken over, when its process is
gone on this host (on this host its process decides, also between the jobs of one SLURM allocation that
``hydra/launcher=local`` runs side by side), when it was taken on another host by this SLURM job (a requeued
job is never blocked by its own dead lock) or its SLURM job no longer runs, or when it was not renewed for
:data:`LEASE_S` seconds. Otherwise the
second run of a stage stops at once with one line naming the holder, or, for an input another
process is building (the prepared data, in a parallel sweep), waits for it with a progress line.

Locks are advisory and on the filesystem: on a network filesystem the hard-link create is atomic,
and the lease covers holders on other hosts whose process cannot be checked.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from bam_pipeline.errors import BamError

LEASE_S = 600.0  # a holder that has not renewed its lock for this long is gone
RENEW_S = 60.0


def slurm_job() -> str | None:
    """This process's SLURM job (array jobs as ``<job>_<task>``), or None outside SLURM."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    slurm_job: str | None
    started: float
    renewed: float

    @classmethod
    def me(cls) -> "Holder":
        now = time.time()
        return cls(socket.gethostname(), os.getpid(), slurm_job(), now, now)

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job}" if self.slurm_job else ""
        return f"pid {self.pid} on {self.host}{job}, since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started))}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _process_started(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), where /proc tells (Linux); else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime, in clock ticks after boot
    except (OSError, IndexError, ValueError, StopIteration):
        return None


def _slurm_job_running(job: str) -> bool | None:
    """Whether SLURM still runs (or queues) ``job``; None where ``squeue`` cannot tell."""
    if shutil.which("squeue") is None:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return False if "Invalid job id" in out.stderr else None
    return bool(out.stdout.strip())


def stale_reason(holder: Holder, now: float | None = None) -> str | None:
    """Why the lock ``holder`` left can be taken over, or None while it is held."""
    now = time.time() if now is None else now
    me = Holder.me()
    if holder.host == me.host:  # its process can be asked: alive or not decides (in a SLURM job too, where the
        if not _pid_alive(holder.pid):  # jobs of a local sweep share SLURM_JOB_ID)
            return f"its process {holder.pid} is gone"
        started = _process_started(holder.pid)
        if started is not None and started > holder.started + 5.0:
            return f"its process {holder.pid} is gone (the pid now names a process started after the lock)"
    elif holder.slurm_job and holder.slurm_job == me.slurm_job:
        return f"it is this SLURM job's own ({holder.slurm_job}), left before a requeue"
    if holder.slurm_job and _slurm_job_running(holder.slurm_job) is False:
        return f"its SLURM job {holder.slurm_job} no longer runs"
    if now - holder.renewed > LEASE_S:
        return f"it was not renewed for {now - holder.renewed:.0f} s"
    return None


def read_holder(path: Path) -> Holder | None:
    """The holder recorded in a lock file; None when there is no lock (or it vanished meanwhile)."""
    try:
        return Holder(**json.loads(Path(path).read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):  # not written by us: treat as taken long ago by nobody
        return Holder("?", -1, None, 0.0, 0.0)


class StageLock:
    """The lock on one stage output, held while building it (a context manager)."""

    def __init__(self, path: Path, what: str) -> None:
        self.path, self.what = Path(path), what
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self.holder: Holder | None = None

    def _write(self, holder: Holder, *, create: bool) -> None:
        """Write the holder record: ``create`` the lock atomically (fails if it exists), else replace it."""
        tmp = self.path.with_name(f".{self.path.name}.{holder.pid}.tmp")
        tmp.write_text(json.dumps(asdict(holder)))
        try:
            if create:
                os.link(tmp, self.path)
            else:
                os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)

    def _mine(self) -> bool:
        current = read_holder(self.path)
        return self.holder is not None and current is not None and \
            (current.host, current.pid, current.started) == (self.holder.host, self.holder.pid, self.holder.started)

    def try_acquire(self) -> Holder | None:
        """Take the lock (taking over a stale one, saying so); returns the live holder instead when
        someone else holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            mine = Holder.me()
            try:
                self._write(mine, create=True)
            except FileExistsError:
                holder = read_holder(self.path)
                if holder is None:
                    continue  # released meanwhile
                why = stale_reason(holder)
                if why is None:
                    return holder
                print(f"{self.what}: taking over the lock of {holder.describe()} ({why})")
                self.path.unlink(missing_ok=True)
                continue
            self.holder = mine
            self._renewer = threading.Thread(target=self._renew, daemon=True, name=f"lock {self.what}")
            self._renewer.start()
            return None

    def acquire(self) -> None:
        """Take the lock, or a BamError naming the holder."""
        holder = self.try_acquire()
        if holder is not None:
            raise BamError(f"{self.what} is being built by another run ({holder.describe()}); wait for it to "
                           f"finish, or if that process is gone, delete {self.path}")

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_S):
            if not self._mine():
                return  # taken over: keep out of its way
            self.holder = Holder(**{**asdict(self.holder), "renewed": time.time()})
            self._write(self.holder, create=False)

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=5)
        if self._mine():
            self.path.unlink(missing_ok=True)
        self.holder = None

    def __enter__(self) -> "StageLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def wait_while_held(path: Path, what: str, *, timeout_s: float, poll_s: float = 2.0,
                    say: Callable[[str], None] = print, every_s: float = 30.0) -> None:
    """Wait while another live process holds the lock at ``path`` (a progress line every ``every_s``);
    a BamError after ``timeout_s``."""
    start, last = time.monotonic(), None
    while (holder := read_holder(path)) is not None and stale_reason(holder) is None:
        if holder.pid == os.getpid() and holder.host == socket.gethostname():
            return  # this process holds it
        now = time.monotonic()
        if now - start > timeout_s:
            raise BamError(f"waited {timeout_s:.0f} s for {what}, which {holder.describe()} is building; "
                           f"raise pipeline.wait_s, or if that process is gone, delete {path}")
        if last is None or now - last >= every_s:
            say(f"{what} is being built by {holder.describe()}; waiting ({now - start:.0f} s so far)")
            last = now
        time.sleep(poll_s)
