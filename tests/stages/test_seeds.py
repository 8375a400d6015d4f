"""pipeline.seeds: the experiment once per training seed, each in its own run directory, the prepared data
shared, the run of train.seed reused, and the report over the seeds."""

from __future__ import annotations

import json

import pytest
from cli_runner import cli, cli_here

from bam_pipeline.eval.claims import FAILS, HOLDS, INCOMPLETE, NOT_RESOLVED, UNMEASURABLE
from bam_pipeline.eval.stats import SEEDS_AND_DOCUMENTS

SEEDS = ("stage=all", "pipeline.seeds=[0,1]", "pipeline.mix_variants=[bam]", "pipeline.moe_runs=[bam]")


def _weights(run):
    return {p.relative_to(run): p.stat().st_mtime_ns for p in run.glob("*/*/model.safetensors")}


@pytest.mark.slow  # trains a second seed's whole pipeline (about 2.5 minutes here)
def test_two_seeds_share_the_data_reuse_seed_0_and_report_over_both(smoke_copy, tmp_path):
    base, other = smoke_copy / "smoke", smoke_copy / "smoke-seed1"
    before = _weights(base)
    r = cli(smoke_copy, *SEEDS, timeout=600, check=True)
    assert _weights(base) == before  # seed 0 is the ordinary run, already up to date: nothing retrained
    assert not (other / "data").exists()  # one prepared data directory, named by data.json
    ref = json.loads((other / "data.json").read_text())
    assert (other / ref["data_dir"]).resolve() == (base / "data").resolve()
    seed_manifest = json.loads((other / "seed" / "main" / "manifest.json").read_text())
    assert seed_manifest["config"]["train"]["seed"] == 1
    assert (base / "seed/main/model.safetensors").read_bytes() != (other / "seed/main/model.safetensors").read_bytes()

    report = base / "seeds"
    table = json.loads((report / "table.json").read_text())
    assert table["seeds"] == [0, 1] and table["covers"] == SEEDS_AND_DOCUMENTS
    assert {row["model"] for row in table["rows"]} >= {"seed", "branch/code", "moe/bam", "btm"}
    claims = json.loads((report / "claims.json").read_text())["claims"]
    assert {c["status"] for c in claims} <= {HOLDS, FAILS, NOT_RESOLVED, UNMEASURABLE, INCOMPLETE}
    # seed 1 trains only BAM's mixture: the claim over every mixture lacks the others in one seed, and says so
    mixtures = next(c for c in claims if c["key"] == "mixtures_beat_singles")
    assert mixtures["status"] == INCOMPLETE, mixtures
    assert mixtures["reason"].startswith("missing moe/bam_cm, moe/bam_kv_shared, moe/btx"), mixtures["reason"]
    measured = [c for c in claims if c["status"] != UNMEASURABLE]
    assert measured and all(c["n_seeds"] == 2 and c["interval"]["low"] <= c["interval"]["high"] for c in measured)
    assert "over train seeds [0, 1]" in r.out and "report over" not in r.out.split("==== train seed 1")[0]

    # the seed's run alone, by name: it finds the shared data through data.json
    r1 = cli_here(smoke_copy, "stage=status", "run=smoke-seed1", "train.seed=1", "pipeline.mix_variants=[bam]",
                  "pipeline.moe_runs=[bam]", check=True)
    assert "stale" not in r1.out and "missing" not in r1.out
    from bam_pipeline import load

    model = load(other / "moe" / "bam")
    assert model(model.encode("def f(x):\n    return x")).shape[-1] == model.config.vocab_size

    # stage=results exports the run over both seeds: the same claims as the report over the seeds
    docs = tmp_path / "docs"
    cli_here(smoke_copy, "stage=results", *SEEDS[1:], f"paths.results={docs}", check=True)
    summary = json.loads((docs / "results" / "smoke.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["provenance"]["runs"] == ["smoke", "smoke-seed1"]
    assert "pipeline.seeds=[0,1]" in summary["provenance"]["command"]
    assert [(c["key"], c["status"]) for c in summary["claims"]] == [(c["key"], c["status"]) for c in claims]
