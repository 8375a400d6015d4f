"""Hydra entry point, ``python -m bam_pipeline stage=<name> [overrides]`` (stages: :data:`bam_pipeline.stages.STAGES`),
and the error boundary: a user's error (BamError, or a command line Hydra cannot compose) prints one line and
exits 2; a stop signal exits 128 + its number (Ctrl-C: 130); anything else is a bug and prints one line pointing at a
file with the traceback. In a sweep (``-m``) a job's error fails that job only: the sweep goes on, and at its end
prints one line per failed job (:mod:`bam_pipeline.sweeps`); a stop signal still stops the whole sweep.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator, Optional

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from bam_pipeline.config.files import PRIMARY, conf_dir
from bam_pipeline.config.overrides import check_appended_keys, describe, merged_assignments
from bam_pipeline.errors import BamError
from bam_pipeline.processes import apply_job_settings
from bam_pipeline.sweeps import JobFailed, SweepFailed, announce

os.environ.setdefault("WANDB_SILENT", "true")
UNEXPECTED_EXIT = 1
FULL_ERROR = "HYDRA_FULL_ERROR"  # "1": Hydra raises its errors instead of printing them (and exiting 1)
_users_full_error: list[Optional[str]] = []  # while main() has set FULL_ERROR: [the user's value (None: unset)]
# while main() respells the command line for Hydra: [(the user's argv, {Hydra's spelling: the user's})]
_users_argv: list[tuple[list[str], dict[str, str]]] = []


# The loggers of Lightning's banners (GPU available, tips, "Initializing distributed"). Importing Lightning sets
# its package loggers back to INFO, and the stages import it late, so the modules that log are quieted too.
LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning", "lightning.pytorch.utilities.rank_zero",
                     "lightning.fabric.utilities.rank_zero", "lightning.fabric.utilities.distributed")


def quiet_lightning() -> None:
    """Keep Lightning's per-Trainer banners (GPU available, tips) out of the stage output."""
    for name in LIGHTNING_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def fail_job(message: str, code: int = 2) -> None:
    """:func:`fail`, except in a job of a sweep: there the job fails (Hydra records the raised
    :class:`JobFailed`), and the sweep goes on to its next job and names this one when it ends."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        fail(message, code)
    announce(int(hydra_cfg.job.num), message)
    raise JobFailed(message, code)


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
    """Checks the stages root and the run's name before Hydra creates its own output directory in the run."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _check_root_and_run(config)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _check_root_and_run(config)


def _check_root_and_run(config: DictConfig) -> None:
    from bam_pipeline.store.layout import check_run_name

    try:
        check_run_name(str(config.run))
    except BamError as e:
        fail(str(e))
    check_stages_root(Path(str(config.paths.root)))


class AppendedKeysCheck(Callback):
    """Refuses a key appended on the command line (``+domian=code``) that the config does not have: no
    stage would read it. Before Hydra makes a directory for a run; each job of a sweep is checked by
    :func:`app` (an error raised here would end the sweep instead of failing the job)."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        message = check_appended_keys(config)
        if message is not None:
            fail(message)


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
    fail_job(f"unexpected {type(error).__name__}{': ' + first if first else ''} (a bug in bam-pipeline, not in your "
             f"input; the traceback is in {path}; please report it)", UNEXPECTED_EXIT)


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name=PRIMARY)
def app(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from bam_pipeline.stages import RunContext, stage_named
    from bam_pipeline.training import preemption
    from bam_pipeline.ranks import RankStopped, finish_distributed

    quiet_lightning()
    preemption.install()
    hydra_cfg = HydraConfig.get()
    with _users_full_error_for_the_stage(), _users_argv_for_the_stage():
        try:
            if hydra_cfg.mode == RunMode.MULTIRUN:  # a single run's were checked before Hydra made its directory
                appended = check_appended_keys(OmegaConf.create({"hydra": hydra_cfg}))
                if appended is not None:
                    raise BamError(appended)
            stage = stage_named(str(cfg.stage))
            ctx = RunContext.from_config(cfg, choices=hydra_cfg.runtime.choices,
                                         overrides=tuple(as_typed(o) for o in hydra_cfg.overrides.task))
            stage.run(ctx)
            finish_distributed(ctx.trainer.collective_timeout_s)
        except Exception as e:
            stop = preemption.stop_behind(e)  # a stop signal another handler turned into this error
            if stop is not None:
                fail(str(stop), stop.exit_code)
            if isinstance(e, preemption.Stopped):
                fail(str(e), e.exit_code)  # a stop signal stops a whole sweep too
            if isinstance(e, RankStopped):  # rank 0 prints why, for every rank
                sys.exit(e.exit_code)
            if isinstance(e, BamError):
                fail_job(str(e), e.exit_code)
            report_unexpected(e)


def main() -> None:
    """Runs the app; a command line Hydra cannot parse or compose (an unknown group option or key, a bad
    override) is one error line and exit code 2 instead of Hydra's report. HYDRA_FULL_ERROR=1 set by the user
    keeps Hydra's full traces. A mapping assigned to a section whose entries are the user's reaches Hydra as a
    merge (:func:`~bam_pipeline.config.overrides.merged_assignments`); the stage sees the command as typed."""
    apply_job_settings()  # a job of hydra/launcher=local: its cores, and dying with the launcher
    users = os.environ.get(FULL_ERROR)
    if users == "1":
        with _failed_jobs_reported(), _hydras_argv():
            app()
        return
    _users_full_error.append(users)
    try:
        with _full_error("1"), _failed_jobs_reported(), _hydras_argv():  # Hydra raises what it would print; main()
            app()                                                         # says it in one line
    except KeyboardInterrupt:  # Ctrl-C before the stage installed its handler (while Hydra composes, say)
        fail("stopped by SIGINT before the stage started; nothing was written; re-run the same command",
             128 + signal.SIGINT)
    except Exception as e:
        message = describe(e, sys.argv[1:])
        if message is not None:
            fail(message)
        from hydra._internal.utils import run_and_report

        run_and_report(functools.partial(_raise, e))  # not the command line's fault: Hydra's own report, as without us
    finally:
        _users_full_error.pop()


@contextmanager
def _failed_jobs_reported() -> Iterator[None]:
    """A sweep whose jobs did not all succeed: one ``error:`` line per failed job, and its exit code; an error
    of the sweep itself (a launcher's setting; a stop signal, which the local launcher raises once its jobs
    stopped): its line and exit code."""
    try:
        yield
    except SweepFailed as e:
        print(f"sweep: {e}", file=sys.stderr)
        for line in e.lines():
            print(f"error: {line}", file=sys.stderr)
        sys.exit(e.exit_code)
    except BamError as e:  # from the sweep's own process (a launcher's setting, a stop signal), not from a job
        fail(str(e), e.exit_code)


@contextmanager
def _full_error(value: Optional[str]) -> Iterator[None]:
    """HYDRA_FULL_ERROR set to ``value`` (None: unset) inside; as it was before, after."""
    before = os.environ.get(FULL_ERROR)
    _set_full_error(value)
    try:
        yield
    finally:
        _set_full_error(before)


def _users_full_error_for_the_stage():
    """The stage (and any process it starts) sees the user's HYDRA_FULL_ERROR, not main()'s; main()'s is back
    for the next job of a sweep, which Hydra composes after this one."""
    return _full_error(_users_full_error[-1]) if _users_full_error else nullcontext()


@contextmanager
def _hydras_argv() -> Iterator[None]:
    """sys.argv as Hydra reads it (:func:`merged_assignments`) inside; the user's, after."""
    users = sys.argv
    hydras = [users[0], *merged_assignments(users[1:])]
    _users_argv.append((users, {h: u for h, u in zip(hydras, users) if h != u}))
    sys.argv = hydras
    try:
        yield
    finally:
        sys.argv = users
        _users_argv.pop()


@contextmanager
def _users_argv_for_the_stage() -> Iterator[None]:
    """The stage sees the command line as the user typed it (commands it prints, provenance it writes)."""
    if not _users_argv:
        yield
        return
    hydras, sys.argv = sys.argv, _users_argv[-1][0]
    try:
        yield
    finally:
        sys.argv = hydras


def users_environment() -> dict[str, str]:
    """This process's environment with the user's HYDRA_FULL_ERROR, not main()'s (for the processes a launcher
    starts: each is a command of its own)."""
    env = dict(os.environ)
    if _users_full_error:
        env.pop(FULL_ERROR, None)
        if _users_full_error[-1] is not None:
            env[FULL_ERROR] = _users_full_error[-1]
    return env


def as_typed(override: str) -> str:
    """An override of this job as the user typed it, where main() respelt it for Hydra."""
    return _users_argv[-1][1].get(override, override) if _users_argv else override


def _set_full_error(value: Optional[str]) -> None:
    if value is None:
        os.environ.pop(FULL_ERROR, None)
    else:
        os.environ[FULL_ERROR] = value


def _raise(error: BaseException) -> None:
    raise error


if __name__ == "__main__":
    main()
