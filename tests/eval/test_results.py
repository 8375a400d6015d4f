"""docs/results.md from committed summaries: a function of the summaries byte for byte, its sections, and
"what we found" sentences made from the summaries' numbers."""

import json
import re
from pathlib import Path

import pytest
from eval_runs import fake_eval_run

from bam_pipeline.errors import BamError
from bam_pipeline.eval.aggregate import aggregate
from bam_pipeline.eval.results import (RESULTS_MD, SECTIONS, found, read_summaries, results_markdown, summarize,
                                       write_results, write_summary)

REPO = Path(__file__).resolve().parents[2]
# experts better in their domain, BAM better than BTX everywhere, dense worse than every mixture (nats per token)
SHIFT = {
    "seed": {"code": 0.3, "law": 0.3},
    "branch/code": {"general": 0.5, "law": 0.5},
    "branch/law": {"general": 0.5, "code": 0.5},
    "moe/bam": {"general": -0.3, "code": -0.3, "law": -0.3},
    "moe/btx": {"general": -0.2, "code": -0.2, "law": -0.2},
    "moe/dense": {"general": -0.1, "code": -0.1, "law": -0.1},
}
PROVENANCE = {"command": "python -m bam_pipeline stage=all experiment=tiny pipeline.seeds=[0,1,2]",
              "exported_by": "python -m bam_pipeline stage=results experiment=tiny pipeline.seeds=[0,1,2]",
              "commit": "0123abcd", "dirty": False, "machine": {"cpu": "Test CPU", "cores": 2},
              "eval_device": "cpu", "date": "2026-12-07 23:00 UTC"}


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    runs = [fake_eval_run(tmp, f"r{s}", s, shift=SHIFT) for s in range(3)]
    return summarize(runs, aggregate(runs, resamples=2000), experiment="tiny", provenance=PROVENANCE,
                     resamples=2000)


def test_the_page_is_a_function_of_the_summaries_byte_for_byte(summary, tmp_path):
    write_summary(tmp_path, summary)
    first = write_results(tmp_path, plots=False).read_bytes()
    again = json.loads(json.dumps(read_summaries(tmp_path)))  # what a reader of the committed JSON gets
    assert results_markdown(again).encode() == first
    assert write_results(tmp_path, plots=False).read_bytes() == first


def test_sections_for_the_summaries_present_and_a_line_for_each_missing_one(summary):
    page = results_markdown({"tiny": summary, "smoke": {**summary, "experiment": "smoke"}})
    titles = re.findall(r"^## (.+)$", page, re.M)
    assert titles == [s.title for s in SECTIONS] + ["`experiment=smoke`"]
    tiny, ablations, smollm2 = (page.split(f"## {s.title}")[1].split("\n## ")[0] for s in SECTIONS)
    assert PROVENANCE["command"] in tiny and "0123abcd" in tiny and "Test CPU, 2 cores" in tiny
    assert "train seeds: 0, 1, 2" in tiny
    for section, text in ((SECTIONS[1], ablations), (SECTIONS[2], smollm2)):
        assert "No summary committed yet" in text and section.produce in text and f"{section.experiment}.json" in text
    # the Table 1 analogue with intervals, the claims and the cost table are the summary's own cells
    for row in (*summary["table"][1:], *summary["cost"][1:]):
        assert "| " + " | ".join(row) + " |" in tiny
    assert summary["cost"][0][-2:] == ["total training FLOPs", "budget"]
    assert "![" in tiny and "results/tiny_perplexity.png" in tiny


def test_what_we_found_is_made_from_the_verdicts_and_numbers(summary):
    sentences = found(summary)
    claims = {c["key"]: c for c in summary["claims"]}
    assert claims["bam_beats_btx"]["status"] == "holds" and claims["mixtures_beat_dense"]["status"] == "holds"
    iv = claims["bam_beats_btx"]["interval"]
    stated = f"{iv['estimate']:+.4f} [{iv['low']:+.4f}, {iv['high']:+.4f}]"
    assert any(claims["bam_beats_btx"]["claim"] in s and "holds" in s and stated in s for s in sentences)
    held = sum(c["status"] == "holds" for c in summary["claims"])
    assert sentences[0].startswith(f"Of {len(summary['claims'])} ordering claims") and f"holds {held}" in sentences[0]
    best = min((c for c in summary["cells"] if c["column"] == "average"), key=lambda c: c["estimate"])
    assert best["model"] == "moe/bam"
    assert any("lowest Average" in s and f"{best['estimate']:.2f} [{best['low']:.2f}" in s for s in sentences)


def test_a_summary_of_another_format_is_refused_naming_the_command(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "tiny.json").write_text('{"format": 0}')
    with pytest.raises(BamError, match="make results"):
        read_summaries(tmp_path)


def test_the_committed_page_is_what_the_committed_summaries_give():
    docs = REPO / "docs"
    assert (docs / RESULTS_MD).read_text() == results_markdown(read_summaries(docs))
