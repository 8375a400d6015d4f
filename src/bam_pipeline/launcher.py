"""``hydra/launcher=local``: a sweep's jobs side by side on one machine, each in its own device slot.

Hydra's basic launcher runs a sweep's jobs one after another in the command's process. This launcher runs each
job as a fresh ``python -m bam_pipeline <its overrides>`` process (so Lightning's own launch of DDP or FSDP
ranks works inside a job as it does from a shell), as many at once as there are free slots:

- **A slot** is what one job runs on. A GPU job (``trainer.accelerator`` gpu, cuda, or auto on a machine with
  GPUs) gets ``trainer.devices`` GPUs of ``hydra.launcher.devices`` (default: every GPU this process sees) as
  its ``CUDA_VISIBLE_DEVICES``, and the cores that go with them (the cores shared evenly among the GPUs). A
  CPU job gets ``threads`` cores for each of its ``trainer.devices`` processes (``threads``: default the cores
  shared evenly among the batch's processes), pinned to them (``sched_setaffinity``, where the OS has it) and
  told so (``OMP_NUM_THREADS`` and the like: :func:`bam_pipeline.processes.thread_env`). A job waits for a free
  slot; jobs start in their sweep order, a later job passing a waiting one only where it fits and the waiting
  one does not.
- **Logs**: each job's output goes to ``stages/<run>/logs/sweep/<job>.log`` (appended: a rerun adds to it); the
  console has one line per job as it starts, waits, ends or fails, with its time, instead of interleaved
  progress bars.
- **Failure**: a failed job does not stop the others. Its outcome reaches bam-pipeline's sweeper
  (:mod:`bam_pipeline.sweeps`) as a failed ``JobReturn``: its error line (the ``error:`` line of its log, or how it
  died) and its log, so that the sweep's last lines name it with its overrides.
- **Stop**: SIGINT (Ctrl-C) or SIGTERM to the sweep sends SIGTERM to every running job's process group: each
  checkpoints, as it does alone. No waiting job starts, and the sweep exits with 128 + the signal. A second
  signal kills the jobs (SIGKILL). A job dies with the launcher (Linux's parent-death signal), so a killed
  launcher leaves no job running. Rerunning the same command reuses every published artifact and resumes the
  stopped jobs from their checkpoints.

The stage locks (:mod:`bam_pipeline.store.locks`) hold across these processes as across any others: two jobs
never write one artifact, and a job that needs the prepared data another job is building waits for it.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, TextIO

from bam_pipeline.errors import BamError, ConfigError
from bam_pipeline.processes import CORES_ENV, PARENT_DEATH_ENV, thread_env
from bam_pipeline.store.layout import RunLayout
from bam_pipeline.sweeps import UNEXPECTED, USER_ERROR, JobFailed, command_line

POLL_S = 0.2  # how often the launcher looks at its jobs
# Hydra overrides of the sweep that are not a job's: the launcher's, the sweeper's, the sweep's folder and mode
NOT_A_JOBS = re.compile(r"^[+~]*hydra(/launcher|\.launcher|/sweeper|\.sweeper|\.sweep\.|\.mode|\.run\.dir)")


# ---- the launcher's settings ---------------------------------------------------------------------------
@dataclass(frozen=True)
class LocalLauncherSpec:
    """``hydra.launcher`` of ``hydra/launcher=local`` (conf/hydra/launcher/local.yaml)."""

    devices: Optional[tuple[str, ...]]  # GPU ids to share among the jobs; None: every GPU this process sees
    cores: Optional[tuple[int, ...]]  # CPU cores to share; None: those this process may run on
    threads: Optional[int]  # CPU threads per job process; None: the cores shared evenly among the processes
    max_parallel: Optional[int]  # at most this many jobs at once; None: as many as the slots allow

    def __post_init__(self) -> None:
        if self.devices is not None and len(set(self.devices)) != len(self.devices):
            raise ConfigError("devices", ",".join(self.devices), "lists a GPU twice; give each GPU id once")
        if self.cores is not None:
            if not self.cores or any(c < 0 for c in self.cores) or len(set(self.cores)) != len(self.cores):
                raise ConfigError("cores", list(self.cores), "must be distinct core numbers (0, 1, ...), or null for "
                                  "the cores this process may use")
        for key in ("threads", "max_parallel"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise ConfigError(key, value, "must be a positive integer, or null")

    @classmethod
    def read(cls, devices: Any, cores: Any, threads: Any, max_parallel: Any) -> "LocalLauncherSpec":
        """The spec from the launcher's config values; a ConfigError under ``hydra.launcher``."""
        try:
            return cls(devices=None if devices is None else _id_list("devices", devices),
                       cores=None if cores is None else tuple(_int("cores", c, cores) for c in _listed(cores)),
                       threads=None if threads is None else _int("threads", threads, threads),
                       max_parallel=None if max_parallel is None else _int("max_parallel", max_parallel,
                                                                           max_parallel))
        except ConfigError as e:
            raise e.under("hydra.launcher") from None


def _listed(value: Any) -> list[Any]:
    """A setting's values: a list (Hydra's ListConfig too), or a comma-separated string, or one value."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, Iterable) and not isinstance(value, Mapping):
        return list(value)
    return [value]


def _int(key: str, value: Any, whole: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().lstrip("-").isdigit():
        raise ConfigError(key, whole, "must be an integer (or a list of them)")
    return int(value)


def _id_list(key: str, value: Any) -> tuple[str, ...]:
    ids = tuple(str(v).strip() for v in _listed(value))
    if any(not i or "," in i for i in ids):
        raise ConfigError(key, value, "must be a list of GPU ids, e.g. [0,1,2,3]")
    return ids


# ---- slots ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Need:
    """What one job runs on: ``gpus`` GPUs (0: a CPU job) and ``processes`` processes of ``threads`` threads."""

    gpus: int
    processes: int
    threads: int
    cores: int  # cores it is pinned to


@dataclass(frozen=True)
class Slot:
    gpus: tuple[str, ...]
    cores: tuple[int, ...]
    threads: int  # CPU threads per process

    def env(self, machine_has_gpus: bool) -> dict[str, str]:
        """The environment that confines a job's process (and the ranks it starts) to this slot."""
        env = {**thread_env(self.threads), CORES_ENV: ",".join(map(str, self.cores))}
        if self.gpus or machine_has_gpus:  # a CPU job on a GPU machine sees none
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus)
        return env

    def describe(self) -> str:
        cores = _ranges(self.cores)
        what = f"GPU {','.join(self.gpus)}, " if self.gpus else ""
        return f"{what}core{'s' if len(self.cores) > 1 else ''} {cores}, {self.threads} thread{'s' * (self.threads > 1)}"


def _ranges(ids: Sequence[int]) -> str:
    """0,1,2,5 as "0-2,5"."""
    out: list[str] = []
    for i in sorted(ids):
        if out and out[-1].split("-")[-1] == str(i - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{i}"
        else:
            out.append(str(i))
    return ",".join(out)


class Slots:
    """The machine's GPUs and cores not in use by a running job."""

    def __init__(self, gpus: Sequence[str], cores: Sequence[int]) -> None:
        self.gpus, self.cores = tuple(gpus), tuple(sorted(cores))
        self._free_gpus, self._free_cores = list(self.gpus), list(self.cores)

    def take(self, need: Need) -> Optional[Slot]:
        """The lowest free GPUs and cores for ``need``, taken; None while they are not free."""
        if len(self._free_gpus) < need.gpus or len(self._free_cores) < need.cores:
            return None
        gpus, cores = self._free_gpus[:need.gpus], self._free_cores[:need.cores]
        del self._free_gpus[:need.gpus], self._free_cores[:need.cores]
        return Slot(tuple(gpus), tuple(cores), need.threads)

    def give(self, slot: Slot) -> None:
        self._free_gpus = [g for g in self.gpus if g in self._free_gpus or g in slot.gpus]
        self._free_cores = sorted({*self._free_cores, *slot.cores})

    @property
    def idle(self) -> bool:
        return len(self._free_gpus) == len(self.gpus) and len(self._free_cores) == len(self.cores)


def gpu_job(accelerator: str, machine_gpus: int) -> bool:
    """Whether a job with ``trainer.accelerator`` runs on GPUs (auto: where the launcher has some)."""
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and machine_gpus > 0)


def job_need(trainer: dict[str, Any], *, gpus: int, cores: int, threads: int) -> Need:
    """What a job of ``trainer`` (its accelerator, devices, num_nodes) needs of a machine with ``gpus`` GPUs and
    ``cores`` cores, its CPU processes given ``threads`` threads each; a BamError for one that cannot run here."""
    devices, nodes = trainer.get("devices", 1), int(trainer.get("num_nodes", 1) or 1)
    if nodes != 1:
        raise BamError(f"trainer.num_nodes={nodes}: hydra/launcher=local runs jobs on this machine only; use "
                       "hydra/launcher=slurm for jobs across nodes")
    if isinstance(devices, (list, tuple)) or (isinstance(devices, str) and "," in devices):
        raise BamError(f"trainer.devices={devices!r} names devices, but under hydra/launcher=local the launcher "
                       "chooses them (hydra.launcher.devices): give trainer.devices as a count")
    on_gpu = gpu_job(str(trainer.get("accelerator", "auto")), gpus)
    if str(devices) in ("auto", "-1"):
        count = (gpus if on_gpu else 1) if str(devices) == "auto" else (gpus if on_gpu else cores)
    else:
        count = int(devices)
    if on_gpu:
        if gpus == 0:
            raise BamError("a GPU job (trainer.accelerator=gpu), but the launcher has no GPU: none is visible here, "
                           "or hydra.launcher.devices is empty")
        if count > gpus:
            raise BamError(f"the job needs {count} GPUs (trainer.devices={devices}), the launcher has {gpus} "
                           "(hydra.launcher.devices): lower trainer.devices")
        per_gpu = max(1, cores // gpus)
        return Need(gpus=count, processes=count, threads=per_gpu, cores=min(cores, per_gpu * count))
    return Need(gpus=0, processes=count, threads=threads, cores=min(cores, threads * count))


def default_threads(processes: int, cores: int) -> int:
    """CPU threads per process when ``hydra.launcher.threads`` is null: the cores shared evenly among the
    ``processes`` of the batch's CPU jobs (at least 1)."""
    return max(1, cores // max(1, processes))


# ---- jobs -----------------------------------------------------------------------------------------------
@dataclass
class Job:
    number: int  # Hydra's job number
    overrides: list[str]  # as Hydra hands them to the launcher
    command: list[str]  # the job's process
    log: Path
    label: str  # the overrides that tell it from the batch's other jobs, for its status lines
    need: Optional[Need] = None
    problem: Optional[str] = None  # why it cannot run here (then it fails without starting)
    proc: Optional[subprocess.Popen] = None
    slot: Optional[Slot] = None
    started: float = 0.0
    seconds: float = 0.0
    returncode: Optional[int] = None
    waiting_said: bool = False
    _log_file: Optional[TextIO] = field(default=None, repr=False)


def distinguishing(overrides: Sequence[str], varying: set[str]) -> list[str]:
    """The overrides of a job that tell it from the batch's other jobs (``varying``: :func:`varying_keys`)."""
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in varying]


def log_name(number: int, overrides: Sequence[str], varying: set[str]) -> str:
    """A job's log file name: its number and the overrides that tell it from the batch's other jobs."""
    slug = re.sub(r"[^-\w.=,]", "_", "_".join(distinguishing(overrides, varying) or overrides))[:100]
    return f"{number}-{slug}.log" if slug else f"{number}.log"


def varying_keys(batch: Sequence[Sequence[str]]) -> set[str]:
    """The keys whose value differs between the jobs of a batch."""
    values: dict[str, set[str]] = {}
    for overrides in batch:
        for o in overrides:
            key, _, value = o.partition("=")
            values.setdefault(key.lstrip("+~"), set()).add(value)
    return {k for k, v in values.items() if len(v) > 1 or sum(k == o.partition("=")[0].lstrip("+~")
                                                             for b in batch for o in b) < len(batch)}


def hydra_quoted(path: Path) -> str:
    """A path as a Hydra override value (quoted: a path may hold characters Hydra's grammar reads)."""
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


def error_of(log: Path, returncode: int) -> tuple[str, int]:
    """(the one-line error a failed job said, its exit code as a sweep's failed job): the last ``error:`` line of
    its log, else how it ended."""
    said = None
    try:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("error: "):
                said = line[len("error: "):].strip()
    except OSError:
        pass
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        return said or f"killed by {name}", UNEXPECTED
    return said or f"exited with code {returncode}", USER_ERROR if returncode == USER_ERROR else UNEXPECTED


class Console:
    """The launcher's status lines: one per job as it starts, waits, ends or fails."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def say(self, job: Job, what: str, detail: str = "") -> None:
        print(f"[job {job.number}] {what:<8} {job.label}{'  ' + detail if detail else ''}", file=self.out, flush=True)


@dataclass
class LocalLaunch:
    """One batch of a sweep run side by side (:func:`launch_batch` drives it)."""

    jobs: list[Job]
    slots: Slots
    max_parallel: Optional[int]
    console: Console
    machine_has_gpus: bool
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    stop_signal: Optional[int] = None
    killed: bool = False

    def run(self) -> None:
        pending = deque(j for j in self.jobs if j.problem is None)
        for job in self.jobs:
            if job.problem is not None:
                self._write_log(job, f"error: {job.problem}\n")
                job.returncode = USER_ERROR
                self.console.say(job, "failed", f"before starting: {job.problem}")
        running: list[Job] = []
        while pending or running:
            if self.stop_signal is None:
                self._start_what_fits(pending, running)
            for job in [j for j in running if j.proc is not None and j.proc.poll() is not None]:
                running.remove(job)
                self._finished(job)
            if self.stop_signal is not None and pending:
                for job in pending:
                    self.console.say(job, "not run", "the sweep was stopped")
                pending.clear()
            time.sleep(POLL_S if running else 0)

    def _start_what_fits(self, pending: deque[Job], running: list[Job]) -> None:
        for job in list(pending):
            if self.max_parallel is not None and len(running) >= self.max_parallel:
                break
            assert job.need is not None
            slot = self.slots.take(job.need)
            if slot is None:
                if not job.waiting_said and running:
                    job.waiting_said = True
                    self.console.say(job, "waiting", "for a free slot")
                continue
            pending.remove(job)
            self._start(job, slot)
            running.append(job)

    def _start(self, job: Job, slot: Slot) -> None:
        job.slot, job.started = slot, time.monotonic()
        log = self._write_log(job, f"# {time.strftime('%Y-%m-%d %H:%M:%S')} job {job.number} on "
                                   f"{slot.describe()}: {shlex.join(job.command)}\n", keep_open=True)
        env = {**self.env, **slot.env(self.machine_has_gpus), PARENT_DEATH_ENV: "SIGTERM", "PYTHONUNBUFFERED": "1",
               "TQDM_MININTERVAL": "10"}  # progress bars in a log: a line every 10 s, not every step
        job.proc = subprocess.Popen(job.command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True)  # its own group: the launcher signals it
        self.console.say(job, "running", f"({slot.describe()}; log: {job.log})")

    def _finished(self, job: Job) -> None:
        assert job.proc is not None and job.slot is not None
        job.returncode, job.seconds = job.proc.returncode, time.monotonic() - job.started
        if job._log_file is not None:
            job._log_file.close()
        self.slots.give(job.slot)
        if job.returncode == 0:
            self.console.say(job, "done", f"in {job.seconds:.1f} s")
        elif self.stop_signal is not None:
            self.console.say(job, "stopped", f"after {job.seconds:.1f} s (log: {job.log})")
        else:
            message, _ = error_of(job.log, job.returncode)
            self.console.say(job, "failed", f"after {job.seconds:.1f} s: {message} (log: {job.log})")

    def _write_log(self, job: Job, text: str, keep_open: bool = False) -> TextIO:
        job.log.parent.mkdir(parents=True, exist_ok=True)
        f = open(job.log, "a")
        f.write(text)
        f.flush()
        if keep_open:
            job._log_file = f
        else:
            f.close()
        return f

    def stop(self, signum: int) -> None:
        """A stop signal to the sweep: SIGTERM to every running job (each checkpoints), SIGKILL on a second."""
        first = self.stop_signal is None
        self.stop_signal = self.stop_signal or signum
        sig = signal.SIGTERM if first else signal.SIGKILL
        self.killed = self.killed or not first
        for job in self.jobs:
            if job.proc is not None and job.proc.poll() is None:
                try:
                    os.killpg(job.proc.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass


def launch_batch(batch: LocalLaunch) -> None:
    """Run a batch with the sweep's stop signals (SIGINT, SIGTERM) forwarded to its jobs; then, if one came,
    raise :class:`~bam_pipeline.training.preemption.Stopped`."""
    from bam_pipeline.training.preemption import Stopped

    signals = (signal.SIGINT, signal.SIGTERM)
    before = {s: signal.getsignal(s) for s in signals}
    for s in signals:
        signal.signal(s, lambda signum, frame: batch.stop(signum))
    try:
        batch.run()
    except BaseException:
        batch.stop(signal.SIGTERM)
        batch.stop(signal.SIGTERM)  # a launcher failing on its own leaves no job behind: SIGKILL
        raise
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    if batch.stop_signal is not None:
        name = signal.Signals(batch.stop_signal).name
        stopped = sum(1 for j in batch.jobs if j.returncode not in (None, 0))
        raise Stopped(batch.stop_signal, f"stopped by {name}: {stopped} job(s) stopped "
                      f"({'killed' if batch.killed else 'each saved a checkpoint'}); re-run the same command to "
                      "finish what is unfinished")


def outcome_of(job: Job) -> tuple[bool, Optional[JobFailed]]:
    """(whether the job completed, its failure as the sweep's sweeper reads it)."""
    if job.returncode == 0:
        return True, None
    if job.problem is not None:
        return False, JobFailed(f"{job.problem} (log: {job.log})", USER_ERROR)
    message, code = error_of(job.log, job.returncode if job.returncode is not None else 1)
    return False, JobFailed(f"{message} (log: {job.log})", code)


def machine_gpus(env: dict[str, str]) -> tuple[str, ...]:
    """The GPU ids this process sees: CUDA_VISIBLE_DEVICES's entries where it is set, else torch's count."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return tuple(v.strip() for v in visible.split(",") if v.strip() and v.strip() != "-1")
    try:
        import torch

        return tuple(str(i) for i in range(torch.cuda.device_count()))
    except Exception:  # no usable CUDA: a CPU machine
        return ()


def machine_cores() -> tuple[int, ...]:
    if hasattr(os, "sched_getaffinity"):
        return tuple(sorted(os.sched_getaffinity(0)))
    return tuple(range(os.cpu_count() or 1))


def plan_jobs(spec: LocalLauncherSpec, batch: Sequence[Sequence[str]], first: int,
              compose: Callable[[Sequence[str]], Any], extra: Sequence[str], typed: Callable[[str], str],
              gpus: Sequence[str], cores: Sequence[int]) -> list[Job]:
    """The batch's jobs: each one's command, log and need (``compose``: a job's overrides to its config;
    ``extra``: Hydra overrides every job's command gets; ``typed``: an override as the user typed it)."""
    varying = varying_keys(batch)
    composed = [compose(list(o)) for o in batch]
    trainers = [dict(_plain(c.trainer)) for c in composed]
    cpu_processes = 0
    for t in trainers:
        try:
            n = job_need(t, gpus=len(gpus), cores=len(cores), threads=1)
        except BamError:
            continue
        cpu_processes += n.processes if n.gpus == 0 else 0
    threads = spec.threads or default_threads(cpu_processes, len(cores))
    jobs = []
    for number, (overrides, cfg, trainer) in enumerate(zip(batch, composed, trainers), first):
        layout = RunLayout(Path(str(cfg.paths.run_dir)).resolve())
        sweep_dir = Path(str(cfg.hydra.sweep.dir)).resolve()
        command = [sys.executable, "-m", "bam_pipeline", *(typed(o) for o in overrides), *extra,
                   f"hydra.run.dir={hydra_quoted(sweep_dir / str(number))}"]
        label = command_line(distinguishing(overrides, varying) or overrides)
        job = Job(number, list(overrides), command, layout.sweep_log(log_name(number, overrides, varying)), label)
        try:
            job.need = job_need(trainer, gpus=len(gpus), cores=len(cores), threads=threads)
        except BamError as e:
            job.problem = str(e)
        jobs.append(job)
    return jobs


def _plain(node: Any) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]


def job_returns(jobs: Sequence[Job], config: Any) -> list[Any]:
    """Hydra's JobReturn of each job, as bam-pipeline's sweeper reads them (:func:`bam_pipeline.sweeps.outcome`)."""
    from hydra.core.utils import JobReturn, JobStatus

    out = []
    for job in jobs:
        ok, failure = outcome_of(job)
        out.append(JobReturn(overrides=list(job.overrides), working_dir=os.getcwd(),
                             task_name=str(config.hydra.job.name), status=JobStatus.COMPLETED if ok else JobStatus.FAILED,
                             _return_value=None if ok else failure))
    return out


def sweep_extra_overrides(config: Any) -> list[str]:
    """The sweep's Hydra overrides that each job's command keeps (``hydra.verbose=...``), not the launcher's,
    the sweeper's or the sweep's folder."""
    return [str(o) for o in config.hydra.overrides.hydra if not NOT_A_JOBS.match(str(o))]


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int,
           typed: Callable[[str], str] = lambda o: o) -> list[Any]:
    """``Launcher.launch`` of ``hydra/launcher=local`` (``launcher``: its plugin, holding Hydra's context and its
    settings; ``typed``: an override as the user typed it, where the entry point respelt it for Hydra)."""
    spec = LocalLauncherSpec.read(launcher.devices, launcher.cores, launcher.threads, launcher.max_parallel)
    env = dict(os.environ)
    gpus = spec.devices if spec.devices is not None else machine_gpus(env)
    cores = spec.cores if spec.cores is not None else machine_cores()
    config, loader = launcher.config, launcher.hydra_context.config_loader
    jobs = plan_jobs(spec, job_overrides, initial_job_idx,
                     lambda o: loader.load_sweep_config(master_config=config, sweep_overrides=list(o)),
                     sweep_extra_overrides(config), typed, gpus, cores)
    Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    print(f"sweep: {describe_batch(jobs, gpus, cores, spec.max_parallel)} (hydra/launcher=local)", flush=True)
    batch = LocalLaunch(jobs, Slots(gpus, cores), spec.max_parallel, Console(sys.stdout), bool(gpus), env)
    launch_batch(batch)
    return job_returns(jobs, config)


def describe_batch(jobs: Sequence[Job], gpus: Sequence[str], cores: Sequence[int], max_parallel: Optional[int]
                   ) -> str:
    """The batch in words: its jobs, the machine they share, CPU threads per process."""
    where = (f"GPUs {','.join(gpus)} and " if gpus else "") + f"cores {_ranges(cores)}"
    threads = sorted({j.need.threads for j in jobs if j.need is not None and j.need.gpus == 0})
    per = f", {threads[0]} CPU thread(s) per process" if len(threads) == 1 else ""
    most = f", at most {max_parallel} at once" if max_parallel else ""
    return f"{len(jobs)} job(s) on {where}{per}{most}"
