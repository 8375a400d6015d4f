"""hydra/launcher=local (issue 23): a sweep's jobs side by side, each a `python -m bam_pipeline` process in its own
device slot. The slots and the scheduling on stand-in jobs (small Python processes: fast and deterministic); then
the real CLI on the smoke run: a bad job named with its log while the other publishes, a job killed mid-sweep and
the rerun that finishes only it, with weights bit-identical to the job run alone, the stage lock between two jobs
of one artifact, and a two-process DDP job."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
from omegaconf import OmegaConf
from cli_runner import cli, paused, start

from bam_pipeline.errors import BamError, ConfigError
from bam_pipeline.launcher import (Console, Job, LocalLauncherSpec, LocalLaunch, Need, Slots, default_threads,
                                   error_of, hydra_quoted, job_environment, job_need, launch_batch, log_name,
                                   outcome_of, sweep_arguments, varying_keys)
from bam_pipeline.processes import CORES_ENV, thread_env
from bam_pipeline.store.artifacts import read_artifact
from bam_pipeline.training.preemption import Stopped

LOCAL = "hydra/launcher=local"


# ---- slots and needs ----------------------------------------------------------------------------------
def test_a_gpu_job_gets_its_devices_and_their_share_of_the_cores():
    need = job_need({"accelerator": "gpu", "devices": 2, "num_nodes": 1}, gpus=4, cores=16, threads=1)
    assert need == Need(gpus=2, processes=2, threads=4, cores=8)
    slots = Slots(["0", "1", "2", "3"], range(16))
    a, b = slots.take(need), slots.take(need)
    assert (a.gpus, b.gpus) == (("0", "1"), ("2", "3")) and set(a.cores).isdisjoint(b.cores)
    assert slots.take(need) is None  # every GPU in use: the next job waits
    assert a.env(True) == {**thread_env(4), CORES_ENV: "0,1,2,3,4,5,6,7", "CUDA_VISIBLE_DEVICES": "0,1"}
    slots.give(a)
    assert slots.take(need).gpus == ("0", "1")  # freed, taken again


def test_a_cpu_job_gets_threads_cores_per_process_and_no_gpu():
    need = job_need({"accelerator": "cpu", "devices": 2, "num_nodes": 1}, gpus=2, cores=8, threads=3)
    assert need == Need(gpus=0, processes=2, threads=3, cores=6)
    slot = Slots(["0", "1"], range(8)).take(need)
    assert slot.env(True)["CUDA_VISIBLE_DEVICES"] == "" and slot.env(True)["OMP_NUM_THREADS"] == "3"
    assert "CUDA_VISIBLE_DEVICES" not in slot.env(False)  # a CPU machine: left as it is
    # auto: GPUs where the launcher has some; on a CPU machine one process
    assert job_need({"accelerator": "auto", "devices": "auto"}, gpus=0, cores=4, threads=2) == Need(0, 1, 2, 2)
    assert job_need({"accelerator": "auto", "devices": "auto"}, gpus=2, cores=4, threads=2).gpus == 2
    # more cores than the machine has: the job runs alone on all of them
    assert job_need({"accelerator": "cpu", "devices": 4}, gpus=0, cores=2, threads=1).cores == 2


def test_default_threads_share_the_cores_among_the_batchs_processes():
    assert default_threads(2, 2) == 1 and default_threads(1, 16) == 16 and default_threads(3, 16) == 5
    assert default_threads(5, 2) == 1 and default_threads(0, 8) == 8


@pytest.mark.parametrize("trainer, says", [
    ({"accelerator": "gpu", "devices": 2, "num_nodes": 2}, "trainer.num_nodes=2: hydra/launcher=local runs jobs on "
     "this machine only; use hydra/launcher=slurm"),
    ({"accelerator": "gpu", "devices": [0, 1]}, "give trainer.devices as a count"),
    ({"accelerator": "gpu", "devices": 8}, "the job needs 8 GPUs (trainer.devices=8), the launcher has 4"),
    ({"accelerator": "gpu", "devices": 1}, None),
])
def test_a_job_that_cannot_run_here_says_why(trainer, says):
    gpus = 0 if trainer == {"accelerator": "gpu", "devices": 1} else 4
    with pytest.raises(BamError) as e:
        job_need(trainer, gpus=gpus, cores=8, threads=1)
    assert (says or "the launcher has no GPU") in str(e.value)


@pytest.mark.parametrize("field, value, says", [
    ("devices", [0, 0], "invalid hydra.launcher.devices='0,0': lists a GPU twice"),
    ("cores", [-1], "invalid hydra.launcher.cores=[-1]: must be distinct core numbers"),
    ("cores", "a,b", "invalid hydra.launcher.cores='a,b': must be an integer"),
    ("threads", 0, "invalid hydra.launcher.threads=0: must be a positive integer"),
    ("max_parallel", 1.5, "invalid hydra.launcher.max_parallel=1.5: must be an integer"),
])
def test_bad_launcher_settings_are_one_line(field, value, says):
    settings = {"devices": None, "cores": None, "threads": None, "max_parallel": None, field: value}
    with pytest.raises(ConfigError) as e:
        LocalLauncherSpec.read(**settings)
    assert str(e.value).startswith(says), str(e.value)
    assert LocalLauncherSpec.read(devices="0,1", cores=[0, 1], threads=1, max_parallel=2).devices == ("0", "1")
    assert LocalLauncherSpec.read(OmegaConf.create([0, 1]), OmegaConf.create([2]), None, None).cores == (2,)


def test_logs_are_named_by_what_tells_the_jobs_apart():
    batch = [["stage=branch", "domain=code", "experiment=smoke"], ["stage=branch", "domain=math", "experiment=smoke"]]
    varying = varying_keys(batch)
    assert varying == {"domain"}
    assert [log_name(i, b, varying) for i, b in enumerate(batch)] == ["0-domain=code.log", "1-domain=math.log"]
    assert log_name(0, ["stage=mix", "mix=bam/x"], set()) == "0-stage=mix_mix=bam_x.log"


def test_a_failed_jobs_error_is_its_last_error_line_or_how_it_died(tmp_path):
    log = tmp_path / "job.log"
    log.write_text("progress\nerror: first\nmore\nerror: the data is missing; run stage=data\n")
    assert error_of(log, 2) == ("the data is missing; run stage=data", 2)
    log.write_text("no error line\n")
    assert error_of(log, -signal.SIGKILL) == ("killed by SIGKILL", 1) and error_of(log, 1) == ("exited with code 1", 1)
    log.write_text("error: the first attempt's\n# rerun\nprogress\n")  # a log appended to by a rerun
    assert error_of(log, -signal.SIGKILL, start=len("error: the first attempt's\n")) == ("killed by SIGKILL", 1)


# ---- scheduling, on stand-in jobs ----------------------------------------------------------------------
def _job(tmp_path: Path, number: int, script: str, need: Need) -> Job:
    """A stand-in job: ``script`` run by Python, with ``out`` (its own folder) as its first argument."""
    out = tmp_path / f"job{number}"
    out.mkdir()
    return Job(number, [f"x={number}"], [sys.executable, "-c", script, str(out)], tmp_path / f"{number}.log",
               f"x={number}", need=need)


RECORD = """
import json, os, sys, time
from pathlib import Path
out = Path(sys.argv[1])
(out / "env.json").write_text(json.dumps({k: os.environ.get(k) for k in
    ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "BAM_JOB_CORES")}))
(out / "started").touch()
while not (out.parent / "go").exists():
    time.sleep(0.01)
"""


def test_jobs_wait_for_a_free_slot_and_each_runs_in_its_own(tmp_path):
    import threading

    need = Need(gpus=2, processes=2, threads=1, cores=1)
    jobs = [_job(tmp_path, i, RECORD, need) for i in range(3)]
    out = io.StringIO()
    launch = LocalLaunch(jobs, Slots(["0", "1", "2", "3"], range(4)), None, Console(out), True, dict(os.environ))
    runner = threading.Thread(target=launch.run)
    runner.start()
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"job{i}" / "started").exists() for i in (0, 1)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not (tmp_path / "job2" / "started").exists()  # no slot frees before go
    (tmp_path / "go").touch()
    runner.join(60)
    envs = [json.loads((tmp_path / f"job{i}" / "env.json").read_text()) for i in range(3)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs[:2]] == ["0,1", "2,3"]
    assert envs[2]["CUDA_VISIBLE_DEVICES"] in ("0,1", "2,3") and {e["OMP_NUM_THREADS"] for e in envs} == {"1"}
    assert [j.returncode for j in jobs] == [0, 0, 0]
    assert "[job 2] waiting  x=2  for a free slot" in out.getvalue()
    assert out.getvalue().count("running") == 3 and out.getvalue().count("done") == 3


def test_max_parallel_caps_the_jobs_at_once(tmp_path):
    script = "import sys, pathlib; p = pathlib.Path(sys.argv[1]); (p / 'started').touch()"
    jobs = [_job(tmp_path, i, script, Need(0, 1, 1, 1)) for i in range(3)]
    out = io.StringIO()
    LocalLaunch(jobs, Slots([], range(8)), 1, Console(out), False, dict(os.environ)).run()
    lines = [line.split()[2] for line in out.getvalue().splitlines() if "waiting" not in line]
    assert lines == ["running", "done"] * 3  # one after the other
    assert "[job 1] waiting  x=1  for a job to end" in out.getvalue()


TRAP = """
import os, signal, sys, time
from pathlib import Path
out = Path(sys.argv[1])
signal.signal(signal.SIGTERM, lambda *a: ((out / "got-sigterm").touch(), sys.exit(143)))
(out / "started").touch()
if out.name == "job0":  # the first job stops the sweep: SIGINT to the launcher, as Ctrl-C would
    while not (out.parent / "job1" / "started").exists():
        time.sleep(0.01)
    os.kill(os.getppid(), signal.SIGINT)
time.sleep(120)
"""


def test_a_stop_signal_stops_every_job_and_starts_no_other(tmp_path):
    jobs = [_job(tmp_path, i, TRAP, Need(0, 1, 1, 1)) for i in range(3)]
    out = io.StringIO()
    launch = LocalLaunch(jobs, Slots([], range(2)), None, Console(out), False, dict(os.environ))
    before = signal.getsignal(signal.SIGINT)  # Python's default, or what an earlier test in this worker left
    with pytest.raises(Stopped) as e:
        launch_batch(launch)
    assert e.value.exit_code == 130 and "stopped by SIGINT: 2 running job(s) stopped" in str(e.value)
    assert "1 not started" in str(e.value)
    assert all((tmp_path / f"job{i}" / "got-sigterm").exists() for i in (0, 1))  # each job got SIGTERM
    assert not (tmp_path / "job2" / "started").exists() and "[job 2] not run" in out.getvalue()
    assert signal.getsignal(signal.SIGINT) is before  # the launcher's handlers are gone, the one before restored


def test_a_stop_that_comes_while_a_job_starts_reaches_it(tmp_path):
    job = _job(tmp_path, 1, TRAP, Need(0, 1, 1, 1))
    launch = LocalLaunch([job], Slots([], range(2)), None, Console(io.StringIO()), False, dict(os.environ))
    launch.stop_signal = signal.SIGINT  # as if the handler ran while Popen was starting the job
    launch._start(job, launch.slots.take(job.need))
    assert job.proc.wait(60) in (143, -signal.SIGTERM)  # its handler ran, or the signal came before it was set


LEAVES_A_CHILD = """
import subprocess, sys
from pathlib import Path
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
(Path(sys.argv[1]) / "child").write_text(str(child.pid))
"""


def test_what_a_job_left_in_its_group_goes_before_its_slot_is_given_again(tmp_path):
    """A job whose process ended while a process it started lives on (a DDP rank, a data worker): that process is
    killed, so the next job on the slot finds it free."""
    job = _job(tmp_path, 0, LEAVES_A_CHILD, Need(0, 1, 1, 1))
    LocalLaunch([job], Slots([], range(1)), None, Console(io.StringIO()), False, dict(os.environ)).run()
    child = int((tmp_path / "job0" / "child").read_text())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.01)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, awaiting its parent
    except FileNotFoundError:
        return False


def test_a_job_in_a_slurm_allocation_is_not_taken_for_slurm_ranks():
    env = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
           "SLURM_STEP_ID": "0", "SLURM_NTASKS_PER_NODE": "8", "SLURM_JOB_NAME": "train", "PATH": "/bin"}
    assert job_environment(env) == {"SLURM_JOB_ID": "77", "SLURM_JOB_NAME": "train", "PATH": "/bin"}
    from lightning.fabric.plugins.environments import SLURMEnvironment

    with mock.patch.dict(os.environ, job_environment(env), clear=True):
        assert not SLURMEnvironment.detect()  # Lightning launches the job's own ranks


def test_the_sweeps_own_hydra_arguments_reach_every_job():
    config = OmegaConf.create({"hydra": {
        "job": {"config_name": "mine"},
        "runtime": {"config_sources": [{"path": "pkg://bam_pipeline.conf", "schema": "pkg", "provider": "main"},
                                       {"path": "file:///x/my conf", "schema": "file", "provider": "command-line"}]},
        "overrides": {"hydra": ["hydra/launcher=local", "hydra.launcher.threads=1", "hydra.verbose=true",
                                "hydra.sweep.dir=/s", "hydra.mode=MULTIRUN"]}}})
    assert sweep_arguments(config) == ["--config-name", "mine", "--config-dir", "/x/my conf", "hydra.verbose=true"]


@pytest.mark.parametrize("path", ["/tmp/a b/c", "/tmp/it's", "/tmp/x\\y", "/tmp/end\\"])
def test_a_path_reaches_the_job_as_hydra_reads_it(path):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    [override] = OverridesParser.create().parse_overrides([f"hydra.run.dir={hydra_quoted(Path(path))}"])
    assert override.value() == path


def test_a_job_that_cannot_run_fails_without_starting_and_names_its_log(tmp_path):
    job = Job(0, ["trainer.num_nodes=2"], [sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "0.log", "x",
              problem="trainer.num_nodes=2: hydra/launcher=local runs jobs on this machine only")
    LocalLaunch([job], Slots([], [0]), None, Console(io.StringIO()), False, {}).run()
    ok, failure = outcome_of(job)
    assert not ok and failure.exit_code == 2 and str(failure) == (f"trainer.num_nodes=2: hydra/launcher=local runs "
                                                                  f"jobs on this machine only (log: {job.log})")
    assert "error: trainer.num_nodes=2" in job.log.read_text()


# ---- the real CLI ----------------------------------------------------------------------------------
def _errors(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("error:")]


def test_a_bad_job_is_named_with_its_log_and_the_other_publishes(smoke_copy):
    r = cli(smoke_copy, "-m", LOCAL, "stage=mix", "mix=bam_attn_top1", "mix.ffn_router.k=9,1")
    assert r.returncode == 2, r.out[-3000:]
    read_artifact(smoke_copy / "smoke" / "mix" / "bam_attn_top1").verify()  # job 1 published
    log = smoke_copy / "smoke" / "logs" / "sweep" / "0-mix.ffn_router.k=9.log"
    assert _errors(r.out) == [
        "error: job 0 (stage=mix mix=bam_attn_top1 mix.ffn_router.k=9 experiment=smoke logger=none) failed: invalid "
        f"mix.ffn_router.k=9: must be at most the number of experts (4) (log: {log})"], r.out[-3000:]
    assert "error: invalid mix.ffn_router.k=9" in log.read_text()
    assert "[job 1] done" in r.out and "[job 0] failed" in r.out and "Traceback" not in r.out


@pytest.mark.slow  # 13-22 s of job processes; the sweeper's numbering is tested under the basic launcher
def test_a_job_hydra_cannot_compose_splits_nothing(tmp_path):
    """mix=bam,bamm,btx: job 1 fails composing; jobs 0 and 2 go to the launcher together, under their numbers."""
    r = cli(tmp_path, "-m", LOCAL, "stage=info", "mix=bam,bamm,btx")
    assert r.returncode == 2, r.out[-3000:]
    assert r.out.count("sweep: 2 job(s)") == 1, r.out[-3000:]  # one launch of both
    assert "[job 0] done" in r.out and "[job 2] done" in r.out
    [line] = _errors(r.out)
    assert line.startswith("error: job 1 (stage=info mix=bamm "), line
    assert sorted(p.name for p in (tmp_path / "smoke" / "logs" / "sweep").iterdir()) == ["0-mix=bam.log",
                                                                                        "2-mix=btx.log"]


def _pids_of(parent: int, needle: str) -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process(parent).children() if needle in " ".join(p.cmdline())]  # the job processes


@pytest.mark.slow  # ~15 s of job processes; make test keeps the stopped sweep's resume (the next test)
def test_a_job_killed_mid_sweep_leaves_the_other_and_a_rerun_finishes_only_it(smoke_run, tmp_path):
    """Branches code and math side by side, math held at its first checkpoint and SIGKILLed there: code publishes,
    the sweep names math; the same command again reuses code and resumes math. Code's weights equal code's
    branch trained alone with the same one thread."""
    root = _with_data_and_seed(smoke_run, tmp_path)
    alone = _with_data_and_seed(smoke_run, tmp_path / "alone")
    go = tmp_path / "go"
    hold, ready = paused(tmp_path, go=go, only="branch/math")
    args = ("-m", LOCAL, "hydra.launcher.threads=1", "stage=branch", "domain=code,math", "budget.branch.tokens=4096",
            "train.val_every=4", hold)
    p = start(root, *args)
    deadline = time.monotonic() + 300
    while not (ready() and (root / "smoke" / "branch" / "code").exists()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready(), p.communicate()[0][-3000:]
    [math] = _pids_of(p.pid, "domain=math")
    os.killpg(math, signal.SIGKILL)  # the job's whole process group, as an OOM kill of its tree would
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 1, out[-3000:]  # killed: not the user's error
    math_log = root / "smoke" / "logs" / "sweep" / "1-domain=math.log"
    [line] = _errors(out)
    assert line.startswith("error: job 1 (stage=branch domain=math ") and line.endswith(
        f"failed: killed by SIGKILL (log: {math_log})"), line
    code = root / "smoke" / "branch" / "code" / "model.safetensors"
    read_artifact(code.parent).verify()
    before = code.stat().st_mtime_ns
    assert not (root / "smoke" / "branch" / "math").exists()

    go.touch()  # the same command again: nothing holds math now
    again = cli(root, *args, timeout=300)
    assert again.returncode == 0, again.out[-3000:]
    assert code.stat().st_mtime_ns == before  # not trained again
    assert "up to date" in (root / "smoke" / "logs" / "sweep" / "0-domain=code.log").read_text().split("\n# ")[-1]
    assert "resuming from" in math_log.read_text().split("\n# ")[-1]
    read_artifact(root / "smoke" / "branch" / "math").verify()

    cli(alone, "stage=branch", "domain=code", "budget.branch.tokens=4096", "train.val_every=4", check=True,
        env=thread_env(1))
    assert (alone / "smoke" / "branch" / "code" / "model.safetensors").read_bytes() == code.read_bytes()


def test_a_stop_to_the_sweep_checkpoints_every_job_and_the_rerun_resumes_them(smoke_run, tmp_path):
    """SIGTERM to the sweep's process alone (as `kill <pid>`, or Ctrl-C's SIGINT) while both branches are held at
    a checkpoint: each job gets SIGTERM, saves its stop checkpoint and exits; the sweep exits 143 with one line.
    The same command again resumes both from their checkpoints."""
    root = _with_data_and_seed(smoke_run, tmp_path)
    go, holds, readies = tmp_path / "go", [], []
    for domain in ("code", "math"):
        (tmp_path / domain).mkdir()
        hold, ready = paused(tmp_path / domain, go=go, only=f"branch/{domain}")
        holds.append(hold.replace("+callbacks.pause=", f"+callbacks.pause_{domain}="))
        readies.append(ready)
    args = ("-m", LOCAL, "hydra.launcher.threads=1", "stage=branch", "domain=code,math", "budget.branch.tokens=4096",
            "train.val_every=4", *holds)
    p = start(root, *args)
    deadline = time.monotonic() + 300
    while not all(r() for r in readies) and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert all(r() for r in readies), p.communicate()[0][-3000:]
    os.kill(p.pid, signal.SIGTERM)
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 143, out[-3000:]
    [line] = _errors(out)
    assert line.startswith("error: stopped by SIGTERM: 2 running job(s) stopped"), line
    logs = root / "smoke" / "logs" / "sweep"
    for domain, log in (("code", "0-domain=code.log"), ("math", "1-domain=math.log")):
        assert list((root / "smoke" / ".work" / "branch" / domain / "checkpoints").glob("stop-step=*.ckpt"))
        assert f"branch/{domain}: stopped by SIGTERM after step" in (logs / log).read_text()
        assert f"[job {'01'[domain == 'math']}] stopped" in out
    go.touch()
    again = cli(root, *args, timeout=300)
    assert again.returncode == 0, again.out[-3000:]
    for domain, log in (("code", "0-domain=code.log"), ("math", "1-domain=math.log")):
        assert "resuming from" in (logs / log).read_text().split("\n# ")[-1]  # this attempt's part of the log
        read_artifact(root / "smoke" / "branch" / domain).verify()


def _with_data_and_seed(smoke_run, tmp_path: Path) -> Path:
    """A stages root holding the smoke run's prepared data and seed only."""
    import shutil

    root = tmp_path / "stages"
    for part in ("data", "seed"):
        shutil.copytree(smoke_run[0] / "smoke" / part, root / "smoke" / part)
    return root


def test_two_jobs_of_one_artifact_the_lock_lets_one_write(smoke_run, tmp_path):
    root = _with_data_and_seed(smoke_run, tmp_path)
    go = tmp_path / "go"
    hold, ready = paused(tmp_path, go=go)
    p = start(root, "-m", LOCAL, "stage=branch", "domain=code,code", "budget.branch.tokens=8192", "train.val_every=4",
              hold)
    logs = root / "smoke" / "logs" / "sweep"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (ready() and any(
            "error:" in f.read_text() for f in logs.glob("*.log"))):
        time.sleep(0.05)
    go.touch()  # the holder goes on once the other job has failed on its lock
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 2, out[-3000:]
    [line] = _errors(out)
    assert line.startswith("error: job ") and "is being built by another run (pid " in line, line
    read_artifact(root / "smoke" / "branch" / "code").verify()


@pytest.mark.slow  # two gloo processes in one job: about 40 s on 2 cores
def test_a_ddp_job_runs_under_the_launcher(smoke_run, tmp_path):
    root = _with_data_and_seed(smoke_run, tmp_path)
    r = cli(root, "-m", LOCAL, "hydra.launcher.threads=1", "stage=branch", "domain=code", "trainer=ddp_cpu",
            "train.batch_size=2", "train.global_batch_tokens=256", "budget.branch.tokens=4096", timeout=600)
    assert r.returncode == 0, r.out[-3000:]
    assert re.search(r"\[job 0\] running .*cores \S+, 1 thread;", r.out), r.out  # two processes of one thread
    assert [p.name for p in (root / "smoke" / "branch").iterdir()] == ["code"]
    read_artifact(root / "smoke" / "branch" / "code").verify()
