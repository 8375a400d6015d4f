"""Stop signals: SIGTERM (what SLURM sends on preemption and at the time limit), SIGUSR1, and SIGINT
(Ctrl-C in a terminal, sent to the whole foreground process group).

Outside training, any of them stops the command at once with one line and exit code 128 + the
signal's number (143 for SIGTERM, 130 for Ctrl-C), leaving nothing half-written (publishing is
atomic). While a stage trains, the signal is only recorded: Lightning stops at the end of the current step,
:class:`~bam_pipeline.training.job.CheckpointOnStop` saves a resumable ``stop-step=<n>.ckpt``, and the job ends with the same
one line and exit code; running the same command again resumes from it.

Under SLURM with Lightning's auto-requeue (the SLURM environment it detects), SIGUSR1 is
Lightning's: it saves an ``hpc_ckpt_<n>.ckpt`` and requeues the job (``scontrol requeue``), and the
requeued job resumes from the newest complete checkpoint. Submitit's own requeue is off in
``hydra/launcher/slurm``, so nothing requeues twice.
"""

from __future__ import annotations

# No Lightning import at the top: every command installs these handlers, and one refused for its config would
# otherwise wait seconds for Lightning; the stop-checkpoint callback is training.job.CheckpointOnStop

import os
import signal
import threading

from bam_pipeline.errors import Stopped


_state: dict[str, object] = {"training": False, "received": None, "raised": None}


def slurm_requeues() -> bool:
    """Whether Lightning's SLURM environment will handle SIGUSR1 (save, requeue) in this process."""
    if "SLURM_NTASKS" not in os.environ:  # not under srun: Lightning's detection says no; spare its import (seconds)
        return False
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return SLURMEnvironment.detect()


def _handler(signum: int, frame) -> None:
    if _state["training"]:
        if _state["received"] is None:
            _state["received"] = signum
            if signum != signal.SIGTERM:
                os.kill(os.getpid(), signal.SIGTERM)  # Lightning's stop-at-step-end runs on SIGTERM
        return
    _state["raised"] = signum
    raise _stopped(signum)


def _stopped(signum: int) -> Stopped:
    name = signal.Signals(signum).name
    return Stopped(signum, f"stopped by {name}; nothing half-written was kept; re-run the same command to continue")


def stop_behind(error: BaseException) -> Stopped | None:
    """The stop signal behind ``error``, if one was raised in this process and ``error`` is not it.

    The handler raises :class:`Stopped` wherever the program happens to be. Inside a library's bare
    ``except:`` it turns into another error: dill, imported lazily while data is published, catches it
    and falls back to ``from version import ...``, a ``ModuleNotFoundError``. Inside one of our own
    ``except Exception`` handlers that name a cause (a malformed tokenizer file, say) it would become
    that handler's message. The command was still stopped by the signal (publishing is atomic either
    way), so it is reported as the stop it was."""
    signum = _state["raised"]
    if isinstance(error, Stopped) or signum is None:
        return None
    return _stopped(int(signum))


def install() -> None:
    """Make SIGTERM, SIGINT (a :class:`KeyboardInterrupt` no more) and SIGUSR1 (unless Lightning's SLURM
    requeue owns it) stop with one line."""
    _state.update(training=False, received=None, raised=None)  # a new command: no stop seen yet
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    if not slurm_requeues():
        signal.signal(signal.SIGUSR1, _handler)


def defer(on: bool) -> None:
    """While a fit runs (``on``), record a stop signal for Lightning to act on at the end of the step."""
    _state["training"] = on
    if on:
        _state["received"] = None


def received() -> int:
    """The stop signal recorded while training (SIGTERM when Lightning saw it first)."""
    return int(_state["received"] or signal.SIGTERM)
