"""Faults a cluster brings: stop signals mid-stage (the signals part of the bad-input catalogue), two runs
of one stage at once, killed publishes, and retraining that must not make the run stale."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
from cli_runner import SEED_ARGS, cli_here, paused, signal_when, start
from safetensors.torch import load_file

from bam_pipeline.store.artifacts import find_model_artifacts, read_artifact, read_train_log
from bam_pipeline.store.layout import RunLayout


def _data_only(smoke_run, root: Path) -> Path:
    shutil.copytree(smoke_run[0] / "smoke" / "data", root / "smoke" / "data")
    return root


def _one_error_line(out: str) -> str:
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out, out[-3000:]
    return errors[0]


# ---- signals ----------------------------------------------------------------------------------
# SIGTERM (SLURM's preemption) in make test; SIGUSR1 and Ctrl-C take the same path, in make test-full (~10 s each)
@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGUSR1, marks=pytest.mark.slow),
                                 pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_a_stop_signal_saves_a_checkpoint_and_the_rerun_resumes_to_the_same_weights(smoke_run, reference_seed,
                                                                                     tmp_path, sig):
    root = _data_only(smoke_run, tmp_path / "stopped")
    hold, ready = paused(tmp_path)
    r = signal_when(start(root, *SEED_ARGS, hold), ready, sig, settle_s=0)
    assert r.returncode == 128 + sig, r.out[-2000:]
    line = _one_error_line(r.out)
    assert signal.Signals(sig).name in line and "after step 5 of 32" in line, line  # held at step 4, stopped at the next step end
    assert not (root / "smoke" / "seed" / "main").exists() and not list((root / "smoke" / ".locks").rglob("*.lock"))
    resumed = cli_here(root, *SEED_ARGS, check=True)  # the resume itself needs no signal: in this process
    assert "resuming from" in resumed.out
    want = load_file(str(reference_seed))
    got = load_file(str(root / "smoke" / "seed" / "main" / "model.safetensors"))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)
    steps = [row["step"] for row in read_train_log(read_artifact(root / "smoke" / "seed" / "main")) if "loss" in row]
    assert steps == sorted(set(steps))


@pytest.mark.parametrize("stage,args,work", [
    ("branch", ("stage=branch", "domain=code", "budget.branch.tokens=8192", "train.val_every=8"),
     ".work/branch/code"),
    ("moe", ("stage=moe", "mix=bam", "budget.moe.tokens=8192", "train.val_every=8"),
     ".work/moe/bam"),
])
def test_a_stopped_training_stage_says_so_in_one_line(smoke_copy, tmp_path, stage, args, work):
    """In this process, the stage sending itself SIGTERM at its first checkpoint (the seed's tests above send
    it from outside, to a CLI process)."""
    hold, ready = paused(tmp_path, send="SIGTERM")
    r = cli_here(smoke_copy, *args, hold)
    assert ready() and r.returncode == 143, r.out[-2000:]
    line = _one_error_line(r.out)
    assert "SIGTERM" in line and "after step 9 of" in line and str(smoke_copy / "smoke" / work) in line, line
    assert read_artifact(smoke_copy / "smoke" / stage / ("code" if stage == "branch" else "bam")).hash  # old one kept


STOP_AFTER_FIRST_SHARD = """
import os, signal, sys
import bam_pipeline.data.prepare as prepare
prepare.on_shard_published = lambda record: os.kill(os.getpid(), signal.SIGTERM)
sys.argv = ["bam_pipeline", *sys.argv[1:]]
from bam_pipeline.cli import main
main()
"""


def test_a_stop_signal_while_preparing_data_leaves_no_data_and_the_rerun_resumes(tmp_path):
    """SIGTERM right after the data stage published its first shard (sent from the stage's own hook, not a
    timer): one line, exit 143, no data directory and no temporary; the finished shard stays in the build
    directory and the rerun prepares only the others."""
    import subprocess
    import sys

    from cli_runner import REPO, _env, _with_defaults

    root = tmp_path / "stages"
    run = root / "smoke"
    p = subprocess.run([sys.executable, "-c", STOP_AFTER_FIRST_SHARD, *_with_defaults(("stage=data", "data.num_proc=1"))],
                       cwd=REPO, env=_env(root, None), capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 143, out[-2000:]
    assert "stopped by SIGTERM" in _one_error_line(out)
    assert not (run / "data").exists() and not list(run.glob("data.tmp-*")), "half-written data left"
    [build] = run.glob("data.build-*")
    assert len(list((build / "shards").rglob("*.json"))) == 1 and not list(build.rglob("*.tmp-*"))
    again = cli_here(root, "stage=data", "data.num_proc=1", check=True)
    assert "1 of 4 shards already prepared" in again.out and not build.exists()


# ---- two runs of one stage --------------------------------------------------------------------
def test_a_second_run_of_a_stage_stops_at_once_and_the_first_publishes_one_log(smoke_run, tmp_path):
    root = _data_only(smoke_run, tmp_path / "stages")
    go = tmp_path / "go"
    hold, ready = paused(tmp_path, go=go)  # the first run holds its lock, mid-stage, until the second has run
    first = start(root, *SEED_ARGS, hold)
    import time

    deadline = time.time() + 300
    while not ready() and time.time() < deadline and first.poll() is None:
        time.sleep(0.02)
    assert ready(), first.communicate()[0][-2000:]
    second = cli_here(root, *SEED_ARGS)
    go.touch()
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out[-2000:]
    assert second.returncode == 2
    line = _one_error_line(second.out)
    assert "seed" in line and f"pid {first.pid}" in line, line
    steps = [row["step"] for row in read_train_log(read_artifact(root / "smoke" / "seed" / "main")) if "loss" in row]
    assert steps == sorted(set(steps)) and steps[-1] == 32  # one run's log, not two interleaved


# ---- what a re-run finds ----------------------------------------------------------------------
def test_retraining_to_identical_weights_keeps_everything_downstream_fresh(smoke_copy):
    run = smoke_copy / "smoke"
    before = read_artifact(run / "seed" / "main")
    shutil.rmtree(run / "seed" / "main")
    r = cli_here(smoke_copy, "stage=seed", check=True)
    assert "seed: training" in r.out
    after = read_artifact(run / "seed" / "main")
    assert after.manifest["files"]["model.safetensors"] == before.manifest["files"]["model.safetensors"]
    assert after.hash == before.hash  # the train log's wall-clock figures differ, the hash does not
    r = cli_here(smoke_copy, "stage=branch", "domain=code", check=True)
    assert "branch/code: up to date" in r.out


def test_temporaries_of_a_killed_publish_are_removed_at_the_next_run(smoke_copy):
    run = smoke_copy / "smoke"
    for leftover in ("seed/main.tmp-999999999", "seed/main.old-999999999", "data.tmp-999999999"):
        (run / leftover).mkdir(parents=True)
        (run / leftover / "model.safetensors").write_bytes(b"partial")
    r = cli_here(smoke_copy, "stage=seed")
    assert r.returncode == 0, r.out[-2000:]
    assert "removed" in r.out and not (run / "seed" / "main.tmp-999999999").exists()
    assert not (run / "seed" / "main.old-999999999").exists() and "seed: up to date" in r.out
    assert cli_here(smoke_copy, "stage=data").returncode == 0 and not (run / "data.tmp-999999999").exists()


def test_a_stale_stage_names_only_what_changed(smoke_copy):
    r = cli_here(smoke_copy, "stage=seed", "train.grad_clip=0.5", "pipeline.on_stale=refuse")
    assert r.returncode == 2
    line = _one_error_line(r.out)
    assert "seed is stale (config changed: train); re-run with pipeline.on_stale=rebuild" in line, line


def test_the_training_precision_is_part_of_a_stages_identity(smoke_copy):
    """bf16 trains other weights than float32; "32" is Lightning's alias of the default "32-true" (the smoke
    run's artifacts, trained in 32-true, keep their hashes)."""
    def seed_status(*args: str) -> str:
        out = cli_here(smoke_copy, "stage=status", *args, check=True).out
        return next(line for line in out.splitlines() if line.split()[:1] == ["seed"])

    assert "fresh" in seed_status() and "fresh" in seed_status("trainer.precision=32")
    assert "stale    config changed: precision" in seed_status("trainer.precision=bf16-mixed")
    r = cli_here(smoke_copy, "stage=seed", "trainer.precision=bf16-mixed", "pipeline.on_stale=refuse")
    assert "seed is stale (config changed: precision)" in _one_error_line(r.out)


def test_a_hint_keeps_the_users_own_overrides(smoke_copy):
    shutil.rmtree(smoke_copy / "smoke" / "branch" / "law")
    r = cli_here(smoke_copy, "stage=mix", "mix=bam", "train.seed=0", "experiment=smoke")
    assert "run `python -m bam_pipeline stage=branch domain=law train.seed=0 experiment=smoke logger=none` first" \
        in _one_error_line(r.out)


def test_consumers_leave_out_or_refuse_models_built_from_rebuilt_inputs(smoke_copy):
    """The seed retrained with another setting: every model built from the old one is outdated. eval and
    downstream leave them out and list them, generate and export refuse them in one line."""
    cli_here(smoke_copy, "stage=seed", "train.grad_clip=0.5", check=True)
    run = smoke_copy / "smoke"
    built_on_seed = {a.label for a in find_model_artifacts(RunLayout(run))} - {"seed"}
    r = cli_here(smoke_copy, "stage=generate", "artifact=moe/bam", "generate.prompt=The", "generate.max_new_tokens=4")
    assert r.returncode == 2
    line = _one_error_line(r.out)
    assert "artifact=moe/bam is outdated (mix/bam is outdated)" in line, line
    assert "rebuild it with `python -m bam_pipeline stage=moe mix=bam generate.prompt=The" in line, line
    exports = sorted(run.rglob("export*"))
    r = cli_here(smoke_copy, "stage=export", "artifact=branch/code")
    assert r.returncode == 2
    assert "artifact=branch/code is outdated (seed was rebuilt since)" in _one_error_line(r.out)
    assert sorted(run.rglob("export*")) == exports

    r = cli_here(smoke_copy, "stage=eval", check=True)
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    skipped = {x["name"]: x["reason"] for x in metrics["skipped"] if x["kind"] == "model"}
    assert {row["model"] for row in metrics["rows"]} == {"seed"} and set(skipped) == built_on_seed, skipped
    assert skipped["mix/bam"].startswith("outdated (") and "seed was rebuilt since)" in skipped["mix/bam"], skipped
    assert skipped["moe/bam"].startswith("outdated (mix/bam is outdated)"), skipped
    assert "[eval] skip branch/code: outdated (seed was rebuilt since)" in r.out

    cli_here(smoke_copy, "stage=downstream", check=True)
    results = json.loads((run / "downstream" / "results.json").read_text())
    assert {row["model"] for row in results["rows"]} == {"seed"}
    assert {x["name"] for x in results["skipped"] if x["reason"].startswith("outdated (")} == built_on_seed


def test_a_model_trained_with_its_own_settings_is_not_outdated(smoke_copy):
    """Only rebuilt inputs make a model outdated; a one-off setting of its own (a shorter budget) is recorded
    in its manifest, and the run's other models keep theirs."""
    from bam_pipeline.store.artifacts import outdated_models

    cli_here(smoke_copy, "stage=moe", "mix=btx", "budget.moe.tokens=1024", "pipeline.on_stale=rebuild", check=True)
    data_hash = json.loads((smoke_copy / "smoke" / "data" / "manifest.json").read_text())["hash"]
    layout = RunLayout(smoke_copy / "smoke")
    assert outdated_models(layout, data_hash) == {}
    other_data = outdated_models(layout, "another")  # every model rests on the data, directly or through the seed
    assert set(other_data) == {a.label for a in find_model_artifacts(layout)}
    assert other_data["seed"] == "built on other prepared data than the run's" and other_data["mix/dense"] == \
        "seed is outdated"