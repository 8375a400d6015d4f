"""The smoke run's total training compute from its manifests, and stage=results: its summary into
docs/results/<experiment>.json, and docs/results.md with its plots from the summaries."""

from __future__ import annotations

import json

import pytest
from cli_runner import cli_here

from bam_pipeline.eval.report import training_costs
from bam_pipeline.eval.results import read_summaries, results_markdown
from bam_pipeline.store.artifacts import read_artifact
from bam_pipeline.store.layout import RunLayout
from bam_pipeline.store.lineage import total_compute


def test_total_compute_follows_what_each_manifest_read(smoke_run):
    layout = RunLayout(smoke_run[0] / "smoke")
    lineage, budgets = training_costs(layout)
    own = {lab: read_artifact(layout.run_dir / (lab if lab != "seed" else "seed/main")).manifest["flops"]
           for lab in lineage}
    seed, experts = own["seed"], [own[f"branch/{d}"] for d in ("code", "math", "law")]
    assert seed > 0 and all(e > 0 for e in experts)
    # BAM's mixture copies the experts: the seed once, every expert once, then its own training
    assert total_compute(lineage, ["moe/bam"]) == pytest.approx(own["moe/bam"] + seed + sum(experts))
    # the dense mixture read the seed alone: no expert counts towards it
    assert total_compute(lineage, ["moe/dense"]) == pytest.approx(own["moe/dense"] + seed)
    assert budgets["moe/bam_cm"] == budgets["moe/dense"] == "compute-matched (total FLOPs)"
    assert budgets["moe/bam"] == "data-matched" and budgets["seed"] == "tokens" and budgets["mix/bam"] is None


@pytest.mark.slow  # about 10 s: the bootstrap over the smoke run's documents and the plots
def test_stage_results_exports_the_run_and_writes_the_page(smoke_copy, tmp_path):
    docs = tmp_path / "docs"
    r = cli_here(smoke_copy, "stage=results", f"paths.results={docs}", check=True)
    summary = json.loads((docs / "results" / "smoke.json").read_text())
    assert summary["experiment"] == "smoke" and summary["seeds"] == [0]
    p = summary["provenance"]
    assert p["command"].startswith("python -m bam_pipeline stage=all") and "experiment=smoke" in p["command"]
    assert p["machine"]["cores"] > 0 and p["machine"]["cpu"] and p["date"] and p["commit"]
    assert {c["key"] for c in summary["claims"]} >= {"experts_beat_seed", "bam_beats_btx"}
    assert summary["cost"][0][-2:] == ["total training FLOPs", "budget"]
    page = (docs / "results.md").read_text()
    assert page == results_markdown(read_summaries(docs)) and "## `experiment=smoke`" in page
    for png in ("smoke_perplexity.png", "smoke_routing_attn.png"):
        assert (docs / "results" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "smoke.json" in r.out

    # a run that is not evaluated keeps the committed summary and still writes the page
    r = cli_here(smoke_copy, "stage=results", f"paths.results={docs}", "run=elsewhere", check=True)
    assert "no summary of smoke exported" in r.out and "keeping the committed" in r.out
    assert json.loads((docs / "results" / "smoke.json").read_text()) == summary
