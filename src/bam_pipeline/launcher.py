"""``hydra/launcher=local``: a sweep's jobs side by side on one machine, each in its own device slot.

Hydra's basic launcher runs a sweep's jobs one after another in the command's process. This launcher runs each
job as a fresh ``python -m bam_pipeline <its overrides>`` process (so Lightning's own launch of DDP or FSDP
ranks works inside a job as it does from a shell), as many at once as there are free slots:

- **A slot** is what one job runs on. A GPU job (``trainer.accelerator`` gpu, cuda, or auto on a machine with
  GPUs) gets ``trainer.devices`` GPUs of ``hydra.launcher.devices`` (default: every GPU this process sees) as
  its ``CUDA_VISIBLE_DEVICES``, and the free cores that go with them, up to the cores shared evenly among the
  GPUs (a GPU job never waits for cores). A CPU job gets ``threads`` cores for each of its ``trainer.devices``
  processes (``threads``: default the cores shared evenly among the sweep's CPU processes), pinned to them
  (``sched_setaffinity``, where the OS has it) and told so (``OMP_NUM_THREADS`` and the like:
  :func:`bam_pipeline.processes.thread_env`). A job waits for a free slot; jobs start in their sweep order, a
  later job passing a waiting one only where it fits and the waiting one does not. bam-pipeline's sweeper hands
  all of a batch's composable jobs over at once (``launch_numbered``), so a job Hydra cannot compose splits
  nothing.
- **Logs**: each job's output goes to ``stages/<run>/logs/sweep/<job>.log`` (appended: a rerun adds to it); the
  console has one line per job as it starts, waits, ends or fails, with its time, instead of interleaved
  progress bars.
- **Failure**: a failed job does not stop the others. Its outcome reaches bam-pipeline's sweeper
  (:mod:`bam_pipeline.sweeps`) as a failed ``JobReturn``: its error line (the ``error:`` line of its log, or how it
  died) and its log, so that the sweep's last lines name it with its overrides.
- **Stop**: SIGINT (Ctrl-C) or SIGTERM to the sweep sends SIGTERM to every running job's process group: each
  checkpoints, as it does alone. No waiting job starts, and the sweep exits with 128 + the signal. A second
  signal kills the jobs (SIGKILL). A job dies with the launcher (Linux's parent-death signal), so a killed
  launcher leaves no job running; a job's process that ends takes what it left in its process group (ranks,
  workers) with it before its slot is given again. Rerunning the same command reuses every published artifact
  and resumes the stopped jobs from their checkpoints.
- **Inside a SLURM allocation** (a sweep sbatch-ed to one node) a job does not inherit SLURM's task layout, so
  Lightning starts its ranks as from a shell (:func:`job_environment`).

The stage locks (:mod:`bam_pipeline.store.locks`) hold across these processes as across any others: two jobs
never write one artifact, and a job that needs the prepared data another job is building waits for it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, TextIO

from bam_pipeline.config.reading import plain
from bam_pipeline.errors import BamError, ConfigError, Stopped
from bam_pipeline.processes import CORES_ENV, PARENT_DEATH_ENV, PARENT_PID_ENV, available_cores, thread_env
from bam_pipeline.store.layout import RunLayout
from bam_pipeline.ranks import GPU_ACCELERATORS, check_trainer
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
        raise ConfigError(key, whole, "must be an integer" + (" (a list of them)" if value is not whole else ""))
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
    """The machine's GPUs and cores not in use by a running job. GPUs are a job's own; cores are a CPU job's own,
    and a GPU job's share of them is soft: a GPU job never waits for cores (it takes those free, up to its share)."""

    def __init__(self, gpus: Sequence[str], cores: Sequence[int]) -> None:
        self.gpus, self.cores = tuple(gpus), tuple(sorted(cores))
        self._free_gpus, self._free_cores = list(self.gpus), list(self.cores)

    def take(self, need: Need) -> Optional[Slot]:
        """The lowest free GPUs and cores for ``need``, taken; None while they are not free."""
        if len(self._free_gpus) < need.gpus or (need.gpus == 0 and len(self._free_cores) < need.cores):
            return None
        n = min(need.cores, len(self._free_cores))
        gpus, cores = self._free_gpus[:need.gpus], self._free_cores[:n]
        del self._free_gpus[:need.gpus], self._free_cores[:n]
        return Slot(tuple(gpus), tuple(cores), need.threads)

    def give(self, slot: Slot) -> None:
        self._free_gpus = [g for g in self.gpus if g in self._free_gpus or g in slot.gpus]
        self._free_cores = sorted({*self._free_cores, *slot.cores})


def gpu_job(accelerator: str, machine_gpus: int) -> bool:
    """Whether a job with ``trainer.accelerator`` runs on GPUs (auto: where the launcher has some)."""
    return accelerator in GPU_ACCELERATORS or (accelerator == "auto" and machine_gpus > 0)


def job_need(trainer: dict[str, Any], *, gpus: int, cores: int, threads: int) -> Need:
    """What a job of ``trainer`` (its accelerator, devices, num_nodes) needs of a machine with ``gpus`` GPUs and
    ``cores`` cores, its CPU processes given ``threads`` threads each; a BamError for one that cannot run here."""
    try:
        check_trainer(trainer, here=False, precision=False)  # as a single run checks them; its precision: the job
    except ConfigError as e:
        raise e.under("trainer") from None
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    if nodes != 1:
        raise BamError(f"trainer.num_nodes={nodes}: hydra/launcher=local runs jobs on this machine only; use "
                       "hydra/launcher=slurm for jobs across nodes")
    if isinstance(devices, (list, tuple)) or (isinstance(devices, str) and "," in devices):
        raise BamError(f"trainer.devices={devices!r} names devices, but under hydra/launcher=local the launcher "
                       "chooses them (hydra.launcher.devices): give trainer.devices as a count")
    on_gpu = gpu_job(str(trainer.get("accelerator", "auto")), gpus)
    count = int(devices) if str(devices).isdigit() else (gpus if on_gpu else 1)  # auto, -1: every GPU (as Lightning)
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
    log_from: int = 0  # where this attempt's output starts in its log (a rerun appends)
    signalled: bool = False  # sent the sweep's stop
    waiting_said: bool = False
    _log_file: Optional[TextIO] = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.returncode is None


def distinguishing(overrides: Sequence[str], varying: set[str]) -> list[str]:
    """The overrides of a job that tell it from the batch's other jobs (``varying``: :func:`varying_keys`)."""
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in varying]


def log_name(number: int, overrides: Sequence[str], varying: set[str]) -> str:
    """A job's log file name: its number and the overrides that tell it from the batch's other jobs."""
    slug = re.sub(r"[^-\w.=,]", "_", "_".join(distinguishing(overrides, varying) or overrides))[:100]
    return f"{number}-{slug}.log" if slug else f"{number}.log"


def varying_keys(batch: Sequence[Sequence[str]]) -> set[str]:
    """The keys whose value differs between the jobs of a batch (or that some jobs lack)."""
    values: dict[str, set[str]] = {}
    counts: dict[str, int] = {}
    for overrides in batch:
        for o in overrides:
            key, _, value = o.partition("=")
            values.setdefault(key.lstrip("+~"), set()).add(value)
            counts[key.lstrip("+~")] = counts.get(key.lstrip("+~"), 0) + 1
    return {k for k, v in values.items() if len(v) > 1 or counts[k] < len(batch)}


def hydra_quoted(path: Path) -> str:
    """A path as a Hydra override value, quoted (a path may hold characters Hydra's grammar reads). In Hydra's
    quoted strings a backslash escapes only a quote or the backslashes before one, or at the end."""
    text = str(path)
    quote = "'" if "'" not in text or '"' in text else '"'
    text = re.sub(r"(\\*)(" + quote + "|$)", lambda m: m.group(1) * 2 + ("\\" + m.group(2) if m.group(2) else ""),
                  text)
    return quote + text + quote


def error_of(log: Path, returncode: int, start: int = 0) -> tuple[str, int]:
    """(the one-line error a failed job said, its exit code as a sweep's failed job): the last ``error:`` line of
    its log from byte ``start`` on (this attempt's output), else how it ended."""
    said = None
    try:
        with open(log, "rb") as f:
            f.seek(start)
            for raw in f:
                if raw.startswith(b"error: "):
                    said = raw[len(b"error: "):].decode(errors="replace").strip()
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


# What a job's process must not inherit from a launcher that runs inside a SLURM allocation: the task layout of
# the allocation's step, by which Lightning would take the job for ranks SLURM started (and hand SIGUSR1 to its
# requeue). SLURM_JOB_ID stays: the stage locks record it.
SLURM_TASK_ENV = re.compile(r"^SLURM_(NTASKS|NTASKS_PER_NODE|TASKS_PER_NODE|PROCID|LOCALID|NODEID|STEP_\w+|SRUN_\w+)$")


def job_environment(env: dict[str, str]) -> dict[str, str]:
    """The environment every job's process starts from: the launcher's, less SLURM's task layout."""
    return {k: v for k, v in env.items() if not SLURM_TASK_ENV.match(k)}


@dataclass
class LocalLaunch:
    """A sweep's jobs run side by side (:func:`launch_batch` drives it)."""

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
        while pending or any(j.running for j in self.jobs):
            if self.stop_signal is None:
                self._start_what_fits(pending)
            for job in [j for j in self.jobs if j.running and j.proc.poll() is not None]:
                self._finished(job)
            if self.stop_signal is not None and pending:
                for job in pending:
                    self.console.say(job, "not run", "the sweep was stopped")
                pending.clear()
            if any(j.running for j in self.jobs):
                time.sleep(POLL_S)

    def _start_what_fits(self, pending: deque[Job]) -> None:
        for job in list(pending):
            if self.stop_signal is not None:
                return
            assert job.need is not None
            full = self.max_parallel is not None and sum(j.running for j in self.jobs) >= self.max_parallel
            slot = None if full else self.slots.take(job.need)
            if slot is None:
                if not job.waiting_said and any(j.running for j in self.jobs):
                    job.waiting_said = True
                    self.console.say(job, "waiting", f"for {'a job to end' if full else 'a free slot'}")
                continue
            pending.remove(job)
            self._start(job, slot)

    def _start(self, job: Job, slot: Slot) -> None:
        job.slot, job.started = slot, time.monotonic()
        log = self._write_log(job, f"# {time.strftime('%Y-%m-%d %H:%M:%S')} job {job.number} on "
                                   f"{slot.describe()}: {command_line(job.command)}\n", keep_open=True)
        job.log_from = log.tell()
        env = {**job_environment(self.env), **slot.env(self.machine_has_gpus), PARENT_DEATH_ENV: "SIGTERM",
               PARENT_PID_ENV: str(os.getpid()), "PYTHONUNBUFFERED": "1"}
        job.proc = subprocess.Popen(job.command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True)  # its own group: the launcher signals it
        self.console.say(job, "running", f"({slot.describe()}; log: {job.log})")
        if self.stop_signal is not None:  # the stop came while it was starting: it gets it too
            self._signal(job, signal.SIGTERM)

    def _finished(self, job: Job) -> None:
        assert job.proc is not None and job.slot is not None
        job.returncode, job.seconds = job.proc.returncode, time.monotonic() - job.started
        self._signal(job, signal.SIGKILL)  # what its process left in its group (a rank, a worker) goes with it
        if job._log_file is not None:
            job._log_file.close()
        self.slots.give(job.slot)
        if job.returncode == 0:
            self.console.say(job, "done", f"in {job.seconds:.1f} s")
            return
        message, _ = error_of(job.log, job.returncode, job.log_from)
        what = "stopped" if job.signalled else "failed"
        self.console.say(job, what, f"after {job.seconds:.1f} s: {message} (log: {job.log})")

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

    @staticmethod
    def _signal(job: Job, sig: int) -> None:
        """``sig`` to the job's process group (its process, and every process it started that stayed in it)."""
        try:
            os.killpg(job.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, signum: int) -> None:
        """A stop signal to the sweep: SIGTERM to every running job (a training stage checkpoints on it), SIGKILL
        on a second signal."""
        first = self.stop_signal is None
        self.stop_signal = self.stop_signal or signum
        self.killed = self.killed or not first
        for job in self.jobs:
            if job.running:
                job.signalled = True
                self._signal(job, signal.SIGTERM if first else signal.SIGKILL)

    def abandon(self) -> None:
        """The launcher itself failed: kill every running job and reap it, its log closed."""
        for job in self.jobs:
            if job.running:
                self._signal(job, signal.SIGKILL)
                job.proc.wait()
                job.returncode = job.proc.returncode
            if job._log_file is not None and not job._log_file.closed:
                job._log_file.close()


def launch_batch(batch: LocalLaunch) -> None:
    """Run the jobs with the sweep's stop signals (SIGINT, SIGTERM) forwarded to them; then, if one came, raise
    :class:`~bam_pipeline.errors.Stopped`."""

    signals = (signal.SIGINT, signal.SIGTERM)
    before = {s: signal.getsignal(s) for s in signals}
    for s in signals:
        signal.signal(s, lambda signum, frame: batch.stop(signum))
    try:
        batch.run()
    except BaseException:
        batch.abandon()
        raise
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    if batch.stop_signal is not None:
        name = signal.Signals(batch.stop_signal).name
        stopped = sum(j.signalled for j in batch.jobs)
        unstarted = sum(j.proc is None and j.problem is None for j in batch.jobs)
        how = "killed them (a second signal)" if batch.killed else "sent them SIGTERM, on which training saves a checkpoint"
        raise Stopped(batch.stop_signal, f"stopped by {name}: {stopped} running job(s) stopped ({how}), {unstarted} "
                      "not started; re-run the same command to finish what is unfinished")


def outcome_of(job: Job) -> tuple[bool, Optional[JobFailed]]:
    """(whether the job completed, its failure as the sweep's sweeper reads it)."""
    if job.returncode == 0:
        return True, None
    if job.problem is not None:
        return False, JobFailed(f"{job.problem} (log: {job.log})", USER_ERROR)
    message, code = error_of(job.log, job.returncode if job.returncode is not None else 1, job.log_from)
    return False, JobFailed(f"{message} (log: {job.log})", code)


def machine_gpus(env: dict[str, str]) -> tuple[str, ...]:
    """The GPU ids this process sees, as CUDA_VISIBLE_DEVICES spells them: its entries where it is set, else
    0 .. torch's count - 1."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return tuple(v.strip() for v in visible.split(",") if v.strip() and v.strip() != "-1")
    if sys.platform.startswith("linux") and not (Path("/proc/driver/nvidia/gpus").is_dir() or Path("/dev/kfd").exists()):
        return ()  # no NVIDIA or ROCm driver: a CPU machine, known without importing torch (seconds before any job)
    try:
        import torch

        return tuple(str(i) for i in range(torch.cuda.device_count()))
    except Exception:  # no usable CUDA: a CPU machine
        return ()


def chosen_gpus(spec: LocalLauncherSpec, visible: Sequence[str]) -> tuple[str, ...]:
    """The GPUs the jobs share: ``hydra.launcher.devices`` (each one this process sees), else every visible one."""
    if spec.devices is None:
        return tuple(visible)
    unseen = [d for d in spec.devices if d not in visible]
    if unseen:
        raise ConfigError("hydra.launcher.devices", ",".join(spec.devices), f"{', '.join(unseen)} not among the GPUs "
                          f"this process sees ({', '.join(visible) or 'none'}; ids as CUDA_VISIBLE_DEVICES spells them)")
    return spec.devices


def chosen_cores(spec: LocalLauncherSpec) -> tuple[int, ...]:
    """The cores the jobs share: ``hydra.launcher.cores`` (each one this process may run on), else all of those."""
    mine = available_cores()
    if spec.cores is None:
        return mine
    unseen = [c for c in spec.cores if c not in mine]
    if unseen:
        raise ConfigError("hydra.launcher.cores", ",".join(map(str, spec.cores)), f"{', '.join(map(str, unseen))} not "
                          f"among the cores this process may run on ({_ranges(mine)})")
    return spec.cores


def plan_jobs(spec: LocalLauncherSpec, batch: Sequence[tuple[int, Sequence[str]]],
              compose: Callable[[Sequence[str]], Any], extra: Sequence[str], typed: Callable[[str], str],
              gpus: Sequence[str], cores: Sequence[int]) -> list[Job]:
    """The jobs, (number, overrides) each: each one's command, log and need (``compose``: a job's overrides to
    its config; ``extra``: what every job's command gets before its overrides, the sweep's own Hydra arguments;
    ``typed``: an override as the user typed it)."""
    varying = varying_keys([o for _, o in batch])
    jobs, trainers = [], []
    for number, overrides in batch:
        cfg = compose(list(overrides))
        layout = RunLayout(Path(str(cfg.paths.run_dir)).resolve())
        run_dir = Path(str(cfg.hydra.sweep.dir)).resolve() / str(number)
        command = [sys.executable, "-m", "bam_pipeline", *extra, *(typed(o) for o in overrides),
                   f"hydra.run.dir={hydra_quoted(run_dir)}"]
        label = command_line(distinguishing(overrides, varying) or overrides)
        jobs.append(Job(number, list(overrides), command, layout.sweep_log(log_name(number, overrides, varying)),
                        label))
        trainers.append(plain(cfg.trainer))
    needs: list[Any] = []
    for trainer in trainers:  # first with one thread each: how many CPU processes share the cores
        try:
            needs.append(job_need(trainer, gpus=len(gpus), cores=len(cores), threads=1))
        except Exception as e:  # a value no job can run with: that job's failure, never the sweep's
            needs.append(e)
    cpu_processes = sum(n.processes for n in needs if isinstance(n, Need) and n.gpus == 0)
    threads = spec.threads or default_threads(cpu_processes, len(cores))
    for job, trainer, need in zip(jobs, trainers, needs):
        if isinstance(need, BamError):
            job.problem = str(need)
        elif isinstance(need, Exception):
            job.problem = f"trainer={trainer}: {type(need).__name__}: {need}"
        else:
            job.need = job_need(trainer, gpus=len(gpus), cores=len(cores), threads=threads)
    return jobs


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


def sweep_arguments(config: Any) -> list[str]:
    """What every job's command keeps of the sweep's own Hydra arguments: the primary config and config folder
    given on the command line (``--config-name``, ``--config-dir``), and Hydra overrides (``hydra.verbose=...``)
    that are not the launcher's, the sweeper's or the sweep's folder."""
    from bam_pipeline.config.files import PRIMARY

    args: list[str] = []
    name = config.hydra.job.get("config_name")
    if name and name != PRIMARY:
        args += ["--config-name", str(name)]
    for source in config.hydra.runtime.get("config_sources") or []:
        if source.get("provider") == "command-line" and str(source.get("schema")) == "file":
            args += ["--config-dir", str(source.path).removeprefix("file://")]
    return args + [str(o) for o in config.hydra.overrides.hydra if not NOT_A_JOBS.match(str(o))]


def launch(launcher: Any, jobs: Sequence[tuple[int, Sequence[str]]], *, typed: Callable[[str], str] = lambda o: o,
           env: Optional[dict[str, str]] = None) -> list[Any]:
    """Run the sweep's ``jobs`` ((number, overrides) each) side by side: ``hydra/launcher=local``'s launch
    (``launcher``: its plugin, holding Hydra's context and its settings; ``typed``: an override as the user typed
    it, where the entry point respelt it for Hydra; ``env``: the environment the jobs start from, the user's)."""
    spec = LocalLauncherSpec.read(launcher.devices, launcher.cores, launcher.threads, launcher.max_parallel)
    env = dict(os.environ) if env is None else env
    visible = machine_gpus(env)
    gpus, cores = chosen_gpus(spec, visible), chosen_cores(spec)
    config, loader = launcher.config, launcher.hydra_context.config_loader
    planned = plan_jobs(spec, jobs, lambda o: loader.load_sweep_config(master_config=config, sweep_overrides=list(o)),
                        sweep_arguments(config), typed, gpus, cores)
    Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    print(f"sweep: {describe_batch(planned, gpus, cores, spec.max_parallel)} (hydra/launcher=local)", flush=True)
    batch = LocalLaunch(planned, Slots(gpus, cores), spec.max_parallel, Console(sys.stdout), bool(visible), env)
    launch_batch(batch)
    return job_returns(planned, config)


def describe_batch(jobs: Sequence[Job], gpus: Sequence[str], cores: Sequence[int], max_parallel: Optional[int]
                   ) -> str:
    """The jobs in words: how many, the machine they share, CPU threads per process."""
    where = (f"GPUs {','.join(gpus)} and " if gpus else "") + f"cores {_ranges(cores)}"
    threads = sorted({j.need.threads for j in jobs if j.need is not None and j.need.gpus == 0})
    per = f", {threads[0]} CPU thread(s) per process" if len(threads) == 1 else ""
    most = f", at most {max_parallel} at once" if max_parallel else ""
    return f"{len(jobs)} job(s) on {where}{per}{most}"
