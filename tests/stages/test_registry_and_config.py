"""The stage registry and the config boundary through the real CLI: a config-only variant runs end to
end, stage=status names what is fresh, stale or missing, a user's config directory adds options, and
every bad value is one error line."""

from __future__ import annotations

import json
import re
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
    accepts = _accepts(r.out)
    assert accepts["artifact"][:2] == ["seed", "branch/code"] and accepts["domain"] == ["code", "math", "law"], accepts
    shutil.rmtree(smoke_copy / "smoke" / "branch" / "law")
    r = cli_here(smoke_copy, "stage=status", "budget.moe.tokens=1024", check=True)
    lines = {line.split()[0]: line for line in r.out.splitlines() if line.startswith("  ")}
    assert lines["branch/law"].split()[1] == "missing"
    assert lines["mix/bam"].split()[1] == "stale"  # its input branch/law is missing: the command that builds it
    assert "branch/law" in lines["mix/bam"] and "stage=branch domain=law" in lines["mix/bam"], lines["mix/bam"]
    assert lines["mix/dense"].split()[1] == "fresh"  # the dense baseline never reads a branch
    assert "budget" in lines["moe/dense"].split(None, 2)[2] and lines["seed"].split()[1] == "fresh"  # what changed


def test_a_user_config_directory_adds_a_variant(smoke_copy, tmp_path):
    mine = tmp_path / "my_conf" / "mix"
    mine.mkdir(parents=True)
    (mine / "bam_top2_renorm.yaml").write_text(
        "defaults: [/mix_base@_here_, _self_]\nffn_router: {kind: topk, k: 2, renormalize: true}\n")
    search = f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]"
    r = cli_here(smoke_copy, "stage=info", "mix=bam_top2_renorm", search, check=True)
    line = next(line for line in r.out.splitlines() if "mix=bam_top2_renorm" in line)
    assert "BAM (expert KV, top-2 renormalised FFN)" in line, line  # its display name, from its settings
    assert "FFN 4 experts (top-2 renormalised)" in r.out
    r = cli_here(smoke_copy, "stage=status", search, "pipeline.mix_variants=[bam,bam_top2_renorm]", check=True)
    assert "bam_top2_renorm" in r.out.split("mix= accepts:")[1]
    states = {line.split()[0]: line.split()[1] for line in r.out.splitlines() if line.startswith("  ")}
    assert states["mix/bam_top2_renorm"] == "missing", states


def _accepts(out: str) -> dict[str, list[str]]:
    """What stage=status says ``artifact=``, ``domain=`` and ``mix=`` accept, in its order."""
    found = {}
    for line in out.splitlines():
        key = re.match(r"(artifact|domain|mix)=", line)
        if key:
            found[key.group(1)] = [w for w in line[key.end():].replace(",", " ").split() if not w.endswith(":")]
    return found


@pytest.mark.parametrize("override,facts", [  # the key=value as the error spells it, and the options it lists
    ("train.batch_size=0", ("train.batch_size=0",)),
    ("train.lr=-1", ("train.lr=-1.0",)),
    ("train.betas=[0.9]", ("train.betas=[0.9]",)),
    ("+model.overrides.n_heads=7", ("model.overrides.d_model=32", "n_heads=7")),
    ("model.preset=huge", ("model.preset='huge'", "smoke", "tiny")),
    ("data.split.val=0.95", ("data.split.test=0.1", "val=0.95")),
    ("eval.device=tpu", ("eval.device='tpu'", "auto", "cpu", "cuda")),
    ("eval.batch_size=abc", ("eval.batch_size='abc'",)),
    ("mix.kv=both", ("mix.kv='both'", "expert", "shared")),
    ("budget.moe.match=flops", ("budget.moe.match='flops'", "data", "compute")),
    ("pipeline.on_stale=foo", ("pipeline.on_stale='foo'", "rebuild", "refuse")),
    ("+train.batchsize=4", ("+train.batchsize=4", "train.batch_size=4")),  # and the key it is close to
])
def test_a_bad_value_is_one_error_line_naming_its_key(tmp_path, override, facts):
    r = cli_here(tmp_path, "stage=info", override)
    assert r.returncode == 2, r.out
    lines = r.out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.out
    missing = [f for f in facts if not re.search(rf"(?<![\w.]){re.escape(f)}(?![\w])", lines[0])]
    assert not missing, f"the error line does not name {missing}: {lines[0]}"
    assert not (tmp_path / "smoke").exists() or {p.name for p in (tmp_path / "smoke").iterdir()} <= {"logs"}
