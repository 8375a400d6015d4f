"""The stage registry and the config boundary through the real CLI: a config-only variant runs end to
end, stage=status names what is fresh, stale or missing, a user's config directory adds options, and
every bad value is one error line."""

from __future__ import annotations

import json
import shutil

import pytest
from cli_runner import cli_here

from bam_pipeline.store.artifacts import read_artifact


def test_a_config_only_variant_runs_through_mix_moe_and_the_report(smoke_copy):
    """conf/mix/bam_kv_shared_top1.yaml is two settings over the base and nothing else names it."""
    run = smoke_copy / "smoke"
    cli_here(smoke_copy, "stage=mix", "mix=bam_kv_shared_top1", check=True)
    r = cli_here(smoke_copy, "stage=moe", "mix=bam_kv_shared_top1", "budget.moe.tokens=512", check=True)
    assert "moe/bam_kv_shared_top1: training" in r.out
    art = read_artifact(run / "moe" / "bam_kv_shared_top1")
    model = json.loads((art.path / "model_config.json").read_text())
    assert model["attn_kv"] == "shared" and model["attn_router"] == {"kind": "topk", "k": 1, "renormalize": False}
    assert art.manifest["about"]["display"] == "BAM (shared KV, top-1 attention)"
    cli_here(smoke_copy, "stage=eval", check=True)
    report = (run / "report" / "report.md").read_text()
    assert "| BAM (shared KV, top-1 attention) |" in report
    assert "| Untrained BAM (shared KV, top-1 attention) |" in report
    routing = json.loads((run / "eval" / "routing.json").read_text())["moe/bam_kv_shared_top1"]
    assert routing["experts"]["attn"] == ["seed", "code", "math", "law"]


def test_status_names_fresh_stale_and_missing(smoke_copy):
    r = cli_here(smoke_copy, "stage=status", check=True)
    states = {line.split()[0]: line.split()[1] for line in r.out.splitlines() if line.startswith("  ")}
    assert set(states.values()) == {"fresh"} and "moe/bam_cm" in states and "data" in states
    assert "artifact= accepts: seed, branch/code" in r.out and "domain= accepts: code, math, law" in r.out
    shutil.rmtree(smoke_copy / "smoke" / "branch" / "law")
    r = cli_here(smoke_copy, "stage=status", "budget.moe.tokens=1024", check=True)
    lines = {line.split()[0]: line for line in r.out.splitlines() if line.startswith("  ")}
    assert lines["branch/law"].split()[1] == "missing"
    assert lines["mix/bam"].split()[1] == "stale" and "missing input" in lines["mix/bam"]
    assert lines["mix/dense"].split()[1] == "fresh"  # the dense baseline never reads a branch
    assert "config changed: budget" in lines["moe/dense"] and lines["seed"].split()[1] == "fresh"


def test_a_user_config_directory_adds_a_variant(smoke_copy, tmp_path):
    mine = tmp_path / "my_conf" / "mix"
    mine.mkdir(parents=True)
    (mine / "bam_top2_renorm.yaml").write_text(
        "defaults: [/mix_base@_here_, _self_]\nffn_router: {kind: topk, k: 2, renormalize: true}\n")
    search = f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]"
    r = cli_here(smoke_copy, "stage=info", "mix=bam_top2_renorm", search, check=True)
    assert "mix=bam_top2_renorm (BAM (expert KV, top-2 renormalised FFN))" in r.out
    assert "FFN 4 experts (top-2 renormalised)" in r.out
    r = cli_here(smoke_copy, "stage=status", search, "pipeline.mix_variants=[bam,bam_top2_renorm]", check=True)
    assert "bam_top2_renorm" in r.out.split("mix= accepts:")[1]
    assert "mix/bam_top2_renorm" in r.out and "not built yet" in r.out


@pytest.mark.parametrize("override,says", [
    ("train.batch_size=0", "invalid train.batch_size=0: must be a positive integer"),
    ("train.lr=-1", "invalid train.lr=-1.0: must be a positive number"),
    ("train.betas=[0.9]", "invalid train.betas=[0.9]: must be two numbers in [0, 1)"),
    ("+model.overrides.n_heads=7", "invalid model.overrides.d_model=32: must be divisible by n_heads=7"),
    ("model.preset=huge", "invalid model.preset='huge': is not a model preset"),
    ("data.split.val=0.95", "invalid data.split.test=0.1: val + test must stay below 1"),
    ("eval.device=tpu", "invalid eval.device='tpu': use auto, cpu, cuda"),
    ("eval.batch_size=abc", "invalid eval.batch_size='abc': must be an integer"),
    ("mix.kv=both", "invalid mix.kv='both': use one of expert, shared"),
    ("budget.moe.match=flops", "invalid budget.moe.match='flops': use one of data, compute"),
    ("pipeline.on_stale=foo", "invalid pipeline.on_stale='foo': use one of rebuild, refuse"),
    ("+train.batchsize=4", "unknown key 'train.batchsize' in +train.batchsize=4: did you mean train.batch_size=4?"),
])
def test_a_bad_value_is_one_error_line_naming_its_key(tmp_path, override, says):
    r = cli_here(tmp_path, "stage=info", override)
    assert r.returncode == 2, r.out
    lines = r.out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {says}"), r.out
    assert not (tmp_path / "smoke").exists() or {p.name for p in (tmp_path / "smoke").iterdir()} <= {"logs"}
