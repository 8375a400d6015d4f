"""Process-level settings a process makes for itself: dying with its parent, and the CPU cores and threads it
was given (by the local sweep launcher, :mod:`bam_pipeline.launcher`). Linux's ``prctl`` and affinity where
the OS has them; a no-op elsewhere."""

from __future__ import annotations

import os
import signal
import sys

# What the local launcher gives a job's process, in its environment: the cores it may run on ("0,1,2")
CORES_ENV = "BAM_JOB_CORES"
# the signal it gets when the launcher dies ("SIGTERM"), so that no job trains on without a sweep to report to,
# and the launcher's pid (a launcher that died before the job could ask for that signal is noticed)
PARENT_DEATH_ENV = "BAM_JOB_PARENT_DEATH_SIGNAL"
PARENT_PID_ENV = "BAM_JOB_PARENT_PID"
# The environment variables that set how many CPU threads a process's libraries use: torch (OpenMP, MKL),
# BLAS, and the tokenizers' Rust thread pool
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS")


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """This process gets ``sig`` when its parent exits (Linux ``PR_SET_PDEATHSIG``; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def available_cores() -> tuple[int, ...]:
    """The CPU cores this process may run on (its affinity where the OS has one, else every core)."""
    if hasattr(os, "sched_getaffinity"):
        return tuple(sorted(os.sched_getaffinity(0)))
    return tuple(range(os.cpu_count() or 1))


def thread_env(threads: int) -> dict[str, str]:
    """The environment that gives a process's libraries ``threads`` CPU threads each."""
    return {name: str(threads) for name in THREAD_ENV}


def apply_job_settings() -> None:
    """In a process the local launcher started (its environment says so): pin it to its cores and die with the
    launcher. Before torch starts its threads; inherited by the processes it starts (DDP ranks, data workers)."""
    cores = os.environ.pop(CORES_ENV, None)
    if cores and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, {int(c) for c in cores.split(",")})
        except OSError:  # a core the OS does not let this process use: run where it may
            pass
    death, parent = os.environ.pop(PARENT_DEATH_ENV, None), os.environ.pop(PARENT_PID_ENV, None)
    if death:
        die_with_parent(signal.Signals[death])
        if parent and os.getppid() != int(parent):  # the launcher died before the line above: as if after it
            os.kill(os.getpid(), signal.Signals[death])
