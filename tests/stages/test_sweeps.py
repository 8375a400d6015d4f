"""Sweeps run every valid job (issue 20, item 5): a failed job is recorded and the sweep goes on; at the end one
`error:` line per failed job names its number, its overrides and its error, and the exit code is 2 (1 if a job
failed on a bug). A stop signal still stops the whole sweep. The same under Hydra's basic launcher (in this
process) and submitit_local (each job in its own process; slow)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from cli_runner import cli_here

from bam_pipeline.store.artifacts import read_artifact

K9 = "invalid mix.ffn_router.k=9: must be at most the number of experts (4)"


def _errors(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("error:")]


def _job_dirs(root: Path) -> set[str]:
    """The job numbers whose log folders the sweep made (Hydra makes one as it starts a job)."""
    return {p.name for p in (root / "smoke" / "logs" / "multirun").glob("*/*") if p.name.isdigit()}


def test_a_failed_job_does_not_stop_the_sweep_and_the_end_names_it(smoke_copy):
    """The issue's sweep: k=9 is invalid for both variants (4 experts), the k=1 jobs after them still run."""
    r = cli_here(smoke_copy, "-m", "stage=mix", "mix=bam_attn_top1,bam_attn_top2", "mix.ffn_router.k=1,9")
    assert r.returncode == 2, r.out[-3000:]
    for variant in ("bam_attn_top1", "bam_attn_top2"):  # jobs 0 and 2 published theirs
        read_artifact(smoke_copy / "smoke" / "mix" / variant).verify()
    assert _errors(r.out) == [
        f"error: job 1 (stage=mix mix=bam_attn_top1 mix.ffn_router.k=9 experiment=smoke logger=none) failed: {K9}",
        f"error: job 3 (stage=mix mix=bam_attn_top2 mix.ffn_router.k=9 experiment=smoke logger=none) failed: {K9}",
    ], r.out[-3000:]
    assert f"[job 1] failed: {K9}" in r.out and "2 of 4 jobs failed" in r.out  # said as it happened, and counted
    assert "Traceback" not in r.out and "Error executing job" not in r.out  # not Hydra's own report


def test_a_job_hydra_cannot_compose_is_a_failed_job_and_the_others_keep_their_numbers(tmp_path):
    r = cli_here(tmp_path, "-m", "stage=info", "mix=bam,bamm,btx")
    assert r.returncode == 2, r.out[-3000:]
    [line] = _errors(r.out)
    assert line.startswith("error: job 1 (stage=info mix=bamm experiment=smoke logger=none) failed: unknown mix "
                           "'bamm' in mix=bamm: did you mean mix=bam?"), line
    assert "smoke + mix=bam " in r.out and "smoke + mix=btx " in r.out  # jobs 0 and 2 ran
    assert _job_dirs(tmp_path) == {"0", "2"}  # under their own numbers


def test_a_failed_batch_does_not_stop_the_next_batch(tmp_path):
    r = cli_here(tmp_path, "-m", "stage=info", "train.batch_size=0,4", "hydra.sweeper.max_batch_size=1")
    assert r.returncode == 2, r.out[-3000:]
    [line] = _errors(r.out)
    assert line.startswith("error: job 0 (stage=info train.batch_size=0 "), line
    assert "micro-batch 4 x 64 tokens" in r.out and _job_dirs(tmp_path) == {"0", "1"}  # the second batch ran


def _failing(monkeypatch, make_error, job: int = 0) -> None:
    """stage=info raises ``make_error()`` in job ``job`` of a sweep, and runs as it does in the others."""
    from hydra.core.hydra_config import HydraConfig

    from bam_pipeline.stages import info

    run_info = info.run_info

    def run(ctx):
        if HydraConfig.get().job.num == job:
            raise make_error()
        return run_info(ctx)

    monkeypatch.setattr(info, "run_info", run)  # what stage=info's registry entry imports when it runs


def test_a_bug_in_one_job_fails_that_job_with_exit_code_1(tmp_path, monkeypatch):
    _failing(monkeypatch, lambda: RuntimeError("boom"))
    r = cli_here(tmp_path, "-m", "stage=info", "train.batch_size=4,0,8")
    assert r.returncode == 1, r.out[-3000:]  # not every failure is the user's
    first, second = _errors(r.out)
    assert first.startswith("error: job 0 (stage=info train.batch_size=4 experiment=smoke logger=none) failed: "
                            "unexpected RuntimeError: boom (a bug in bam-pipeline"), first
    log = Path(first.split("the traceback is in ")[1].split(";")[0])
    assert log.parent.name == "0" and "RuntimeError: boom" in log.read_text()  # in the job's log folder
    assert second.startswith("error: job 1 (stage=info train.batch_size=0 "), second
    assert "micro-batch 8 x 64 tokens" in r.out  # job 2 ran
    assert "Traceback" not in r.out


def test_a_stop_signal_still_stops_the_whole_sweep(tmp_path, monkeypatch):
    from bam_pipeline.training.preemption import Stopped

    _failing(monkeypatch, lambda: Stopped(15, "stopped by SIGTERM; re-run the same command to continue"))
    r = cli_here(tmp_path, "-m", "stage=info", "train.batch_size=4,8")
    assert r.returncode == 143, r.out[-3000:]
    assert _errors(r.out) == ["error: stopped by SIGTERM; re-run the same command to continue"]
    assert "micro-batch" not in r.out and _job_dirs(tmp_path) == {"0"}  # job 1 never started


def test_a_failed_jobs_overrides_are_quoted_as_a_shell_needs_them():
    from bam_pipeline.sweeps import FailedJob

    job = FailedJob(2, ("stage=generate", 'generate.prompt="def add("', "data.sources.code={max_docs:3}"), "why", 2)
    assert job.line() == """job 2 (stage=generate 'generate.prompt="def add("' 'data.sources.code={max_docs:3}') """ \
                         "failed: why"


@pytest.mark.slow  # about 40 s on 2 busy cores: submitit starts a Python process per job
def test_under_submitit_local_each_job_in_its_own_process(smoke_run, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    root = tmp_path / "stages"
    shutil.copytree(smoke_run[0], root)
    r = cli_here(root, "-m", "hydra/launcher=submitit_local", "stage=mix", "mix=bam_attn_top1",
                 "mix.ffn_router.k=9,1")
    assert r.returncode == 2, r.out[-3000:]
    assert _errors(r.out) == [
        f"error: job 0 (stage=mix mix=bam_attn_top1 mix.ffn_router.k=9 experiment=smoke logger=none) failed: {K9}"]
    read_artifact(root / "smoke" / "mix" / "bam_attn_top1").verify()  # job 1 ran, in another process
    logs = "".join(p.read_text() for p in (root / "smoke" / "logs" / "multirun").glob("*/.submitit/*/*_log.err"))
    assert f"[job 0] failed: {K9}" in logs  # said in the failed job's own log
