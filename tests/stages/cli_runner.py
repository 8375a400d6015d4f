"""Run the real CLI (`python -m bam_pipeline`) as a subprocess, on the smoke experiment by default, or
in this process (the same entry point, faster) for commands that stop before training."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent  # on the subprocesses' PYTHONPATH: pause_callback for `paused`
# a seed to stop mid-way (:func:`paused` holds it at its first checkpoint): 32 steps, a checkpoint every 4
SEED_ARGS = ("stage=seed", "budget.seed.tokens=8192", "train.val_every=4")


@dataclass
class Result:
    returncode: int
    out: str  # stdout + stderr

    def ok(self) -> "Result":
        assert self.returncode == 0, self.out[-4000:]
        return self


def cli(root: Path, *args: str, timeout: float = 300, check: bool = False, env: dict[str, str] | None = None) -> Result:
    """Run `python -m bam_pipeline <args> experiment=smoke logger=none` with stages under ``root`` (and
    ``env`` added to the environment)."""
    cmd = [sys.executable, "-m", "bam_pipeline", *_with_defaults(args)]
    p = subprocess.run(cmd, cwd=REPO, env=_env(root, env), capture_output=True, text=True, timeout=timeout)
    r = Result(p.returncode, p.stdout + p.stderr)
    return r.ok() if check else r


def _env(root: Path, env: dict[str, str] | None) -> dict[str, str]:
    """A CLI subprocess's environment: stages under ``root``, hubs and wandb offline, ``env`` added."""
    path = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "BAM_STAGES_DIR": str(root), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "WANDB_MODE": "offline", "PYTHONPATH": path, **(env or {})}


def _with_defaults(args: tuple[str, ...]) -> list[str]:
    out = list(args)
    if not any(a.startswith("experiment=") for a in args):
        out.append("experiment=smoke")
    if not any(a.startswith("logger=") for a in args):
        out.append("logger=none")
    return out


def cli_here(root: Path, *args: str, env: dict[str, str] | None = None, check: bool = False) -> Result:
    """`python -m bam_pipeline <args>` run in this process: its exit code and its stdout + stderr (the
    same entry point as :func:`cli`, without an interpreter start per call; signals, kills and
    several processes need :func:`cli`)."""
    from bam_pipeline.cli import main

    saved_env, saved_argv = dict(os.environ), sys.argv
    saved_signals = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    os.environ.update({"BAM_STAGES_DIR": str(root), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                       **(env or {})})
    sys.argv = ["bam_pipeline", *_with_defaults(args)]
    out = io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv = saved_argv
        for s, handler in saved_signals.items():
            signal.signal(s, handler)
    r = Result(code, out.getvalue())
    return r.ok() if check else r


def start(root: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start the CLI in its own process group (output captured as text), without waiting."""
    return subprocess.Popen([sys.executable, "-m", "bam_pipeline", *_with_defaults(args)], cwd=REPO,
                            env=_env(root, env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def paused(scratch: Path, *, go: Path | None = None, send: str | None = None, only: str | None = None
           ) -> tuple[str, Callable[[], bool]]:
    """The override that holds a training stage at its first complete checkpoint until a stop signal (or
    ``go`` appears; or ``send``, a signal's name, which it sends itself there), and the test of whether it got
    there (tests/stages/pause_callback.py); ``only``: just the stage whose working directory holds it."""
    ready = scratch / "paused-at-checkpoint"
    ready.unlink(missing_ok=True)
    extra = ("" if go is None else f",go:'{go}'") + ("" if send is None else f",send:{send}") + (
        "" if only is None else f",only:'{only}'")
    return f"+callbacks.pause={{_target_:pause_callback.PauseAfterCheckpoint,ready:'{ready}'{extra}}}", ready.exists


def checkpointed(work: Path) -> Callable[[], bool]:
    """Whether the stage working in ``work`` (``stages/<run>/.work/<stage>/<name>``) has written a
    complete checkpoint (a file, or a sharded directory with its ``meta.pt``)."""
    from bam_pipeline.training.job import complete_checkpoint

    return lambda: any(complete_checkpoint(p) for p in (work / "checkpoints").glob("*.ckpt"))


def signal_when(p: subprocess.Popen, ready: Callable[[], bool], sig: int, *, settle_s: float = 0.3,
                timeout_s: float = 300) -> Result:
    """Send ``sig`` to the process group of ``p`` once ``ready()`` (then ``settle_s`` later); wait. With
    :func:`paused`'s test as ``ready`` the process waits for the signal: give ``settle_s=0``."""
    import time

    deadline = time.time() + timeout_s
    while not ready() and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    if not ready():
        os.killpg(p.pid, signal.SIGKILL)
        raise AssertionError(f"never ready; the command said:\n{p.communicate()[0][-3000:]}")
    time.sleep(settle_s)
    os.killpg(p.pid, sig)
    out, _ = p.communicate(timeout=timeout_s)
    return Result(p.returncode, out)


def kill_when_checkpointed(root: Path, args: list[str], stage_dir: str) -> None:
    """Start the CLI, SIGKILL its whole process group once the stage wrote its first complete
    checkpoint (held there by :func:`paused`); the stage must not look finished."""
    hold, ready = paused(root.parent)
    r = signal_when(start(root, *args, hold), ready, signal.SIGKILL, settle_s=0)
    assert r.returncode == -signal.SIGKILL
    assert not (root / "smoke" / stage_dir).exists(), "a killed stage must not look finished"
