"""Sweeps (``-m``: Hydra's multirun) that run every valid job.

A job that fails (a user error in its config or inputs, a bug, a config Hydra cannot compose) is
recorded, and the sweep goes on with the next job. When every job has had its turn, the sweep raises
:class:`SweepFailed`, and the CLI prints one ``error:`` line per failed job, naming its number, its
overrides as one would type them, and its error; it exits 2 when every failure is a user error, else 1.
A stop signal (SIGTERM, SIGINT) is no failed job: it still stops the whole sweep.

The same code path under every launcher: the sweeper (:func:`sweep_every_job`) runs in the command's
process and reads each job's outcome from the ``JobReturn`` its launcher hands back (made in this
process by Hydra's basic launcher, pickled back by submitit for ``submitit_local`` and
``hydra/launcher=slurm``, made by ``hydra/launcher=local`` from each job process's exit code and log:
:mod:`bam_pipeline.launcher`).
A failed job's app raises :class:`JobFailed` (its message and exit code, picklable), which Hydra's
``run_job`` records as that job's return value. Hydra finds the sweeper as a plugin
(``hydra_plugins.bam_pipeline_sweeper.EveryJobSweeper``, chosen by ``conf/hydra/sweeper/every_job.yaml``).
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence

from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from bam_pipeline.errors import BamError

USER_ERROR, UNEXPECTED = 2, 1


class JobFailed(BamError):
    """One job of a sweep failed with ``message`` (its one-line error, without ``error:``) and would have
    exited with ``exit_code`` as a single run."""

    def __init__(self, message: str, exit_code: int = USER_ERROR) -> None:
        super().__init__(message, exit_code)  # both in args: pickled back from a submitit job as they were
        self.message, self.exit_code = message, exit_code

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class FailedJob:
    number: int  # Hydra's job number (hydra.job.num: the folder of its logs under the sweep directory)
    overrides: tuple[str, ...]
    message: str
    exit_code: int

    def line(self) -> str:
        return f"job {self.number} ({command_line(self.overrides)}) failed: {self.message}"


class SweepFailed(BamError):
    """Some jobs of a sweep failed (the others ran to the end): one line for each."""

    def __init__(self, failed: Sequence[FailedJob], jobs: int) -> None:
        self.failed, self.jobs = tuple(failed), jobs
        self.exit_code = USER_ERROR if all(f.exit_code == USER_ERROR for f in failed) else UNEXPECTED
        n = len(self.failed)
        super().__init__(f"{n} of {jobs} jobs failed; the other {jobs - n} ran" if n < jobs else
                         f"all {jobs} jobs failed")

    def lines(self) -> list[str]:
        return [f.line() for f in self.failed]


def command_line(overrides: Sequence[str]) -> str:
    """A job's overrides as one would type them in a shell (each quoted where the shell needs it)."""
    return " ".join(shlex.quote(o) for o in overrides)


def announce(number: int, message: str) -> None:
    """Says a job's failure as the sweep goes on (in the job's own output: the terminal under the basic
    launcher, the job's log under submitit); not an ``error:`` line, which the end of the sweep prints."""
    print(f"[job {number}] failed: {message}", file=sys.stderr, flush=True)


def outcome(ret: JobReturn, number: int) -> Optional[FailedJob]:
    """The failure a launcher's JobReturn holds, or None for a job that completed."""
    if ret.status == JobStatus.COMPLETED:
        return None
    error = ret._return_value  # its property would print Hydra's own report and raise the error
    overrides = tuple(str(o) for o in ret.overrides or ())
    if isinstance(error, BamError):  # JobFailed: what the job's app said (anything else escaped its boundary)
        return FailedJob(number, overrides, str(error), error.exit_code)
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return FailedJob(number, overrides, f"unexpected {type(error).__name__}{': ' + first if first else ''} (a bug in "
                     "bam-pipeline; please report it)", UNEXPECTED)


def sweep_every_job(sweeper: Any, arguments: List[str]) -> list[Sequence[JobReturn]]:
    """``BasicSweeper.sweep`` (the same jobs, numbers, batches and folders) for ``sweeper``, a BasicSweeper,
    except that a failed job does not end the sweep: every job runs, then :class:`SweepFailed` names the
    failed ones. A job whose config cannot be composed (``mix=bam,bamm``) is a failed job too, found before
    its batch is launched; the composable jobs around it run under their own numbers."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    assert sweeper.config is not None and sweeper.launcher is not None and sweeper.hydra_context is not None
    parser = OverridesParser.create(config_loader=sweeper.hydra_context.config_loader)
    sweeper.overrides = sweeper.split_arguments(parser.parse_overrides([*sweeper._parse_config(), *arguments]),
                                                sweeper.max_batch_size)
    sweep_dir = Path(str(sweeper.config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(sweeper.config, sweep_dir / "multirun.yaml")

    failed: list[FailedJob] = []
    returns: list[Sequence[JobReturn]] = []
    first = 0
    while not sweeper.is_done():
        batch = sweeper.get_job_batch()
        returns.append(_launch(sweeper, batch, first, failed))
        first += len(batch)
    if failed:
        raise SweepFailed(sorted(failed, key=lambda f: f.number), first)
    return returns


def _launch(sweeper: Any, batch: Sequence[Sequence[str]], first: int, failed: list[FailedJob]) -> list[JobReturn]:
    """Launches the batch's composable jobs, each run of consecutive ones under its first job's number (one
    launch after the other: only a job that cannot be composed splits a batch; a launcher with
    ``launch_numbered``, hydra/launcher=local, gets them all at once, numbered); adds every failed job to
    ``failed``."""
    runs: list[tuple[int, list[Sequence[str]]]] = []
    for number, overrides in enumerate(batch, first):
        message = _composition_error(sweeper, overrides)
        if message is None:
            if runs and runs[-1][0] + len(runs[-1][1]) == number:
                runs[-1][1].append(overrides)
            else:
                runs.append((number, [overrides]))
            continue
        announce(number, message)
        failed.append(FailedJob(number, tuple(overrides), message, USER_ERROR))
    numbered = [(start + i, o) for start, jobs in runs for i, o in enumerate(jobs)]
    if hasattr(sweeper.launcher, "launch_numbered"):  # one launch for them all (hydra/launcher=local: side by side)
        returned = list(sweeper.launcher.launch_numbered(numbered)) if numbered else []
    else:
        returned = [ret for start, jobs in runs for ret in sweeper.launcher.launch(jobs, initial_job_idx=start)]
    for (number, _), ret in zip(numbered, returned):
        failure = outcome(ret, number)
        if failure is not None:
            failed.append(failure)
    return returned


def _composition_error(sweeper: Any, overrides: Sequence[str]) -> Optional[str]:
    """The one-line message for a job whose config Hydra cannot compose (an unknown group option or key, a
    bad value for a typed key), else None."""
    from hydra.errors import HydraException

    from bam_pipeline.config.overrides import describe

    try:
        sweeper.hydra_context.config_loader.load_sweep_config(master_config=sweeper.config,
                                                              sweep_overrides=list(overrides))
    except HydraException as e:  # anything else (a stop signal, a bug) is not this job's: it ends the sweep
        return describe(e, overrides) or " ".join(str(e).split())
    return None
