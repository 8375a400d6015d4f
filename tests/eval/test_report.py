"""build_report on the fake run after eval: files written, tables and claims, skips, summary."""

import base64
import json
import os
import re
import shutil

import pytest
from eval_runs import score_row

from bam_pipeline.errors import BamError
from bam_pipeline.store.layout import RunLayout
from bam_pipeline.eval.report import SCALE_NOTE, build_report, print_summary, report_files
from bam_pipeline.eval.runner import run_eval
from bam_pipeline.eval.serving import torch_threads


@pytest.fixture(scope="module")
def reported(fake_run, eval_cfg, tmp_path_factory):
    run_copy = tmp_path_factory.mktemp("report") / "stages" / fake_run.name
    shutil.copytree(fake_run, run_copy, ignore=shutil.ignore_patterns("eval", "report"))
    weights = run_copy / "branch" / "law" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")  # checksum mismatch: skipped, reported
    with torch_threads(1):  # the latency at one thread alone (thread_counts): more than the free cores is slow
        run_eval(eval_cfg(latency_rounds=1), RunLayout(run_copy), general="general")
    md = build_report(RunLayout(run_copy), command="python -m bam_pipeline stage=eval run=t", config_hash="abc123")
    return run_copy, md


def test_report_files_written(reported):
    run, md = reported
    out = run / "report"
    assert md == out / "report.md"
    names = {p.name for p in report_files(RunLayout(run))}
    assert {"report.md", "report.html", "perplexity.png", "training_loss.png", "routing_mix_bam_attn.png",
            "routing_mix_bam_ffn.png"} <= names
    for p in report_files(RunLayout(run)):
        assert p.stat().st_size > 0
    assert not list(run.glob("report.tmp-*"))


def test_report_heatmaps_are_evals_own_unless_older_than_its_routing(reported, tmp_path):
    """The report copies the heatmaps eval drew from the same routing.json; one older than routing.json (an
    eval cut short after writing it) is drawn anew from routing.json."""
    run = tmp_path / reported[0].name
    shutil.copytree(reported[0], run)
    layout = RunLayout(run)
    for kind in ("attn", "ffn"):
        assert (run / "report" / f"routing_mix_bam_{kind}.png").read_bytes() == \
            layout.heatmap("mix/bam", kind).read_bytes()
    evals = layout.heatmap("mix/bam", "ffn")
    evals.write_bytes(b"an older eval's picture")
    older = layout.routing.stat().st_mtime_ns - 10**9
    os.utime(evals, ns=(older, older))
    build_report(layout, command="python -m bam_pipeline stage=eval run=t", config_hash="abc123")
    drawn = (run / "report" / "routing_mix_bam_ffn.png").read_bytes()
    assert drawn.startswith(b"\x89PNG") and drawn != evals.read_bytes()


def test_report_content(reported):
    run, md = reported
    text = md.read_text()
    assert "python -m bam_pipeline stage=eval run=t" in text and "abc123" in text
    assert "| model | General | Code | Law | Average |" in text  # general first, then domains
    for name in ("branch/code", "Untrained BAM (renormalised)"):
        assert f"| {name} |" in text
    assert "| branch/law |" not in text.split("## The paper's Table 1")[0]  # skipped model has no row
    assert "| BAM DM expert KV |" not in text and "| BAM (expert KV) | 24.02 |" in text  # paper table, our names
    assert "2408.08274" in text
    assert "branch/law: checksum mismatch" in text
    assert SCALE_NOTE in text  # this run is far smaller than the paper's
    # with no trained mixture, BAM-vs-BTX is not measurable here but holds in the paper
    assert re.search(r"\| BAM beats BTX on every column \| holds \| \*\*not measurable\*\* \|", text)
    # branch/law was skipped (bad checksum): the claim over every expert is incomplete, not decided by code's
    experts = _claim_cells(text, _claim(run, "experts_beat_seed")["claim"])  # claim | in the paper | here
    assert experts[1] == "holds" and "incomplete" in experts[2] and "branch/law" in experts[2], experts
    # untrained mixture of identical seed copies: same perplexity as the seed on every domain
    table1 = text.split("## Perplexity per domain")[1].split("Bits per byte")[0]
    rows = {line.split(" | ")[0].strip("| "): line for line in table1.splitlines() if line.startswith("| ")}
    untrained = rows["Untrained BAM (renormalised)"]
    assert rows["seed"].replace("**", "").split("|")[2:5] == untrained.replace("**", "").split("|")[2:5]
    # routing table: 1 mixture x 2 router kinds x 3 domains
    routing = re.findall(r"^\| Untrained BAM \(renormalised\) \| (attn|ffn) \| (\w+) \|", text, re.M)
    assert routing == [(k, d) for k in ("attn", "ffn") for d in ("General", "Code", "Law")]


def _claim(run, key: str) -> dict:
    """The claim ``key`` of the run's claims.json (its text names it in the report and the summary)."""
    return next(c for c in json.loads((run / "report" / "claims.json").read_text())["claims"] if c["key"] == key)


def _claim_cells(text: str, claim: str) -> list[str]:
    """The cells of the claims table's row of ``claim``."""
    row = next(line for line in text.splitlines() if line.startswith(f"| {claim} |"))
    return [cell.strip() for cell in row.strip("|").split("|")]


def test_html_is_self_contained(reported):
    run, _ = reported
    html = (run / "report" / "report.html").read_text()
    imgs = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(imgs) == 5  # perplexity, training loss, the claims' intervals, two routing heatmaps
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in imgs)
    assert "<strong>" in html and "src=\"report" not in html


def test_print_summary(reported, capsys):
    run, _ = reported
    print_summary(RunLayout(run))
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["model", "General", "Code", "Law", "Average"]
    lines = out.splitlines()
    bam_btx = next(line for line in lines if _claim(run, "bam_beats_btx")["claim"] in line)
    experts = next(line for line in lines if _claim(run, "experts_beat_seed")["claim"] in line)
    assert "not measurable" in bam_btx, bam_btx
    assert "incomplete" in experts and "branch/law" in experts, experts
    assert f"report: {run / 'report' / 'report.md'}" in out


def test_report_without_eval_is_a_bam_error(run_copy):
    with pytest.raises(BamError, match="stage=eval"):
        build_report(RunLayout(run_copy), command="x", config_hash="y")
    assert report_files(RunLayout(run_copy)) == []


def test_metrics_rows_feed_the_table(reported):
    run, _ = reported
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    seed_code = next(r for r in metrics["rows"] if r["model"] == "seed" and r["domain"] == "code")
    assert f"{seed_code['perplexity']:.2f}" in (run / "report" / "report.md").read_text()


def test_the_serving_cost_table_has_every_scored_model_with_its_measured_latency(reported):
    run, md = reported
    serving = json.loads((run / "eval" / "metrics.json").read_text())["serving"]
    assert serving["threads"] == [1] and serving["rounds"] == 1 and serving["machine"]
    assert [m["model"] for m in serving["models"]] == ["seed", "branch/code", "mix/bam"]  # branch/law: skipped
    section = md.read_text().split("## Serving cost")[1].split("\n## ")[0]
    header = "| model | total params | active params | FLOPs/token at 256 | without LM head | KV cache bytes/token " \
             "| ms/token, 1 thread |"
    assert header in section
    rows = {line.split(" | ")[0].strip("| "): line.strip("|").split(" | ") for line in section.splitlines()
            if line.startswith("| ") and "---" not in line and line != header}
    assert set(rows) == {"seed", "branch/code", "Untrained BAM (renormalised)"}
    for model in serving["models"]:
        cells = rows[model["display"]]
        assert cells[3] == f"{model['flops_per_token']:,.0f}" and cells[4] == f"{model['flops_per_token_without_head']:,.0f}"
        assert cells[5] == f"{model['kv_cache_bytes_per_token']:,.0f}" and float(cells[6]) > 0
    assert "Ratios to BTX" not in section  # no BAM or BTX trained in this run
    assert "48,257,024" in section and "4.81 s" in section  # the paper's Table 7 and section 7.3


def test_the_serving_ratios_stand_beside_the_papers_where_the_run_has_the_models():
    from bam_pipeline.eval.report import serving_ratio_rows
    from bam_pipeline.eval.serving import DecodeCost, ServingCosts, ServingRow

    def row(label, flops, kv, seconds):
        return ServingRow(label, label, 10, 5, 2 * flops, flops, 48, DecodeCost(kv, {1: [seconds], 4: [seconds / 2]}))

    costs = ServingCosts([row("moe/bam", 450, 400, 0.3), row("moe/btx", 200, 100, 0.2),
                          row("moe/bam_kv_shared", 300, 100, 0.25)], "cpu", "cpu", (1, 4), 1)
    cells = serving_ratio_rows(costs)
    assert cells[0] == ["ratio", "FLOPs/token without head", "KV cache bytes/token", "latency, 1 thread",
                        "latency, 4 threads", "paper: FLOPs (Table 7)", "paper: latency (section 7.3, TPUs)"]
    assert cells[1] == ["BAM (expert KV) / BTX", "2.25x", "4.00x", "1.50x", "1.50x", "2.24x", "1.28x"]
    assert cells[2] == ["BAM (shared KV) / BTX", "1.50x", "1.00x", "1.25x", "1.25x", "-", "1.24x"]
    no_btx = ServingCosts([row("moe/bam", 450, 400, 0.3)], "cpu", "cpu", (1, 4), 1)
    assert len(serving_ratio_rows(no_btx)) == 1  # the header alone


def test_a_serving_cost_without_timing_says_so_and_shows_no_latency():
    from bam_pipeline.eval.report import serving_blocks
    from bam_pipeline.eval.serving import DecodeCost, ServingCosts, ServingRow

    row = ServingRow("moe/bam", "BAM", 10, 5, 20.0, 10.0, 48, DecodeCost(1024.0, {1: []}))
    blocks = serving_blocks({"serving": ServingCosts([row], "cpu model", "cpu", (1,), 0).to_dict()})
    assert any(b[0] == "p" and "`eval.latency_rounds=0`" in b[1] for b in blocks)
    table = next(b[1] for b in blocks if b[0] == "table")
    assert table[1] == ["BAM", "10", "5", "20", "10", "1,024", "-"]
    assert serving_blocks({}) == []  # metrics.json without a serving section: no section


def test_cost_table_shows_training_speed_over_training_steps_and_the_wall_time_split():
    from bam_pipeline.eval.report import cost_rows
    from bam_pipeline.eval.scores import Timing

    row = score_row("moe/bam", "code", display="BAM", params_total=2e6, params_active=1e6, flops_per_token=4e6,
                    tokens_trained=200_000,
                    timing=Timing(1000.0, {"train_s": 40.0, "validation_s": 5.0, "checkpoint_s": 2.0, "publish_s": 1.0,
                                           "other_s": 3.0, "total_s": 51.0}))
    untrained = score_row("mix/bam", "code", display="Untrained BAM", params_total=2e6, params_active=1e6,
                          flops_per_token=4e6, tokens_trained=None, timing=Timing(1100.0, None))
    header, trained, mix = cost_rows([row, untrained])
    assert header[-2:] == ["train tokens/s", "wall s: train / val / ckpt / publish"]
    assert trained[-2:] == ["5,000", "40 / 5 / 2 / 1"]  # 200k tokens over 40 s of training steps, not 51 s
    assert mix[-2:] == ["-", "-"]


def test_cost_table_gives_total_training_compute_and_the_budget_convention():
    from bam_pipeline.eval.report import cost_rows, matched_convention
    from bam_pipeline.store.lineage import Built

    lineage = {"seed": Built(100.0), "branch/code": Built(10.0, ("seed",)), "branch/law": Built(30.0, ("seed",)),
               "mix/bam": Built(0.0, ("seed", "branch/code", "branch/law")), "moe/bam_cm": Built(7.0, ("mix/bam",)),
               "mix/dense": Built(0.0, ("seed",)), "moe/dense": Built(9.0, ("mix/dense",))}
    budgets = {"seed": "tokens", "moe/bam_cm": "compute-matched (non-embedding FLOPs)",
               "moe/dense": "compute-matched (total FLOPs)", "mix/bam": None}
    rows = [score_row(m, "code", display=m, flops_per_token=1.0) for m in
            ("seed", "moe/bam_cm", "moe/bam_cm+uniform_attn", "moe/dense", "mix/bam")]
    rows.append(score_row("btm", "code", display="btm", flops_per_token=3.0,
                          btm_models=["seed", "branch/code", "branch/law"], btm_prior=[0.4, 0.3, 0.3]))
    header, *table = cost_rows(rows, lineage, budgets)
    assert header[-2:] == ["total training FLOPs", "budget"]
    got = {r[0]: r[-2:] for r in table}
    assert got["moe/bam_cm"] == ["147", "compute-matched (non-embedding FLOPs)"]  # the seed once, both experts
    assert got["moe/bam_cm+uniform_attn"] == got["moe/bam_cm"]  # a probe is its model
    assert got["moe/dense"] == ["109", "compute-matched (total FLOPs)"]  # read the seed only: no expert counted
    assert got["btm"] == ["140", "-"] and got["mix/bam"] == ["140", "-"] and got["seed"] == ["100", "tokens"]

    moe = {"stage": "moe", "tokens": 5, "about": {"match": "compute"}, "budget": {"match": "compute"}}
    assert matched_convention(moe) == "compute-matched (total FLOPs)"  # recorded before budget.moe.flops existed
    assert matched_convention({**moe, "budget": {"match": "compute", "flops": "non_embedding"}}) == \
        "compute-matched (non-embedding FLOPs)"
    assert matched_convention({**moe, "about": {"match": "data"}, "budget": {"match": "data", "flops": None}}) == \
        "data-matched"
    assert matched_convention({"stage": "branch", "tokens": 5}) == "tokens"
    assert matched_convention({"stage": "mix", "tokens": 0}) is None
