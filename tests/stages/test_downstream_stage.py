"""stage=downstream on the smoke run: stage=all ran the offline suite after eval for every model
(BTM skipped with its reason), wrote downstream/results.json and put the Table 3 analogue in the
report; a second run reuses every cached (model, task) result; one model again keeps the others'
rows; a subset of models and tasks; the
numbers are lm-eval's over our LM; without lm-eval, stage=downstream is one line and stage=all goes on."""

from __future__ import annotations

import json
import sys

import pytest

pytest.importorskip("lm_eval")

from cli_runner import cli_here  # noqa: E402

from bam_pipeline.data.prepare import open_prepared  # noqa: E402
from bam_pipeline.eval import harness  # noqa: E402
from bam_pipeline.eval.downstream import run_tasks  # noqa: E402
from bam_pipeline.eval.downstream_table import pooled  # noqa: E402
from bam_pipeline.eval.harness import harness_lm  # noqa: E402
from bam_pipeline.store.artifacts import find_model_artifacts, load_model, read_artifact  # noqa: E402
from bam_pipeline.store.layout import RunLayout  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def results(smoke_run):
    run = smoke_run[0] / "smoke"
    return run, json.loads((run / "downstream" / "results.json").read_text())


def test_stage_all_ran_the_offline_suite_for_every_model(smoke_run, results):
    run, res = results
    out = smoke_run[1].out
    assert "[downstream] evaluated: seed, branch/code" in out
    prepared = open_prepared(run / "data")
    tasks = [f"bam_next_passage_{s}" for s in prepared.sources]
    models = [a.label for a in find_model_artifacts(RunLayout(run))]
    assert res["suite"] == "offline" and list(res["tasks"]) == tasks
    assert [(r["model"], r["task"]) for r in res["rows"]] == [(m, t) for m in models for t in tasks]
    hashes = {a.label: a.hash for a in find_model_artifacts(RunLayout(run))}
    for row in res["rows"]:
        items = res["tasks"][row["task"]]["items"]
        assert row["items"] == items and 1 <= items <= 16  # downstream.max_items of the smoke experiment
        assert 0.0 <= row["acc"] <= 1.0 and 0.0 <= row["acc_norm"] <= 1.0 and row["acc_stderr"] >= 0.0
        assert row["artifact_hash"] == hashes[row["model"]]
    assert sum(res["tasks"][t]["items"] for t in tasks) >= 20
    assert [x["name"] for x in res["skipped"]] == ["btm"] and "no downstream row" in res["skipped"][0]["reason"]


def test_the_report_shows_the_downstream_table(results):
    run, res = results
    report = (run / "report" / "report.md").read_text()
    section = report.split("## Downstream tasks (this run's Table 3 analogue)")[1].split("\n## ")[0]
    assert "chance is 0.250" in section and "no paper number stands beside them" in section
    assert "Seed 31.60%" in section and "BAM DM (expert KV) 34.02%" in section  # the paper's averages, as context
    seed = next(r for r in res["rows"] if r["model"] == "seed" and r["task"] == "bam_next_passage_code")
    line = next(x for x in section.splitlines() if x.startswith("| Seed |"))
    assert f"{seed['acc']:.3f} ± {seed['acc_stderr']:.3f} ({seed['acc_norm']:.3f})" in line
    rows = [r for r in res["rows"] if r["model"] == "seed"]
    acc, se = pooled(rows, "acc")
    assert line.rstrip(" |").endswith(f"{acc:.3f} ± {se:.3f} ({pooled(rows, 'acc_norm')[0]:.3f})")
    assert "btm: BTM is an eval-time ensemble" in section
    assert "Downstream tasks" in (run / "report" / "report.html").read_text()


def test_the_numbers_are_lm_evals_over_our_model(results):
    run, res = results
    prepared = open_prepared(run / "data")
    model, _ = load_model(read_artifact(run / "moe" / "bam"))
    lm = harness_lm(model, prepared.tokenizer(), prepared.eos_id, batch_size=64)
    task = "bam_next_passage_math"
    direct = run_tasks(lm, [task], include_path=run / "downstream" / "suite")["results"][task]
    row = next(r for r in res["rows"] if r["model"] == "moe/bam" and r["task"] == task)
    assert (row["acc"], row["acc_norm"], row["acc_stderr"]) == \
        (direct["acc,none"], direct["acc_norm,none"], direct["acc_stderr,none"])


def test_a_second_run_reuses_the_cache_and_a_subset_runs_only_what_it_names(smoke_copy, results):
    _, res = results
    run = smoke_copy / "smoke"
    r = cli_here(smoke_copy, "stage=downstream", check=True)  # nothing it is made from changed: skipped
    assert "downstream: up to date" in r.out and "[downstream]" not in r.out
    r = cli_here(smoke_copy, "stage=downstream", "downstream.rebuild=true", check=True)
    assert "[downstream] reused cached results for: seed, branch/code" in r.out and "evaluated:" not in r.out
    again = json.loads((run / "downstream" / "results.json").read_text())
    assert again["rows"] == res["rows"]
    # one model again: the others' rows stay in results.json (same tasks and settings, same artifacts)
    r = cli_here(smoke_copy, "stage=downstream", "downstream.models=[moe/bam]", check=True)
    assert "kept the earlier results (same tasks and settings, same artifact) of: seed, branch/code" in r.out
    one = json.loads((run / "downstream" / "results.json").read_text())
    assert one["rows"] == res["rows"] and "moe/bam" not in one["kept"]
    for row in one["rows"]:  # as if the seed had been retrained since its rows were scored
        if row["model"] == "seed":
            row["artifact_hash"] = "0" * 64
    (run / "downstream" / "results.json").write_text(json.dumps(one))
    # the identity (models, settings) is unchanged: only a forced run reads the hand-edited file
    cli_here(smoke_copy, "stage=downstream", "downstream.models=[moe/bam]", "downstream.rebuild=true", check=True)
    stale = json.loads((run / "downstream" / "results.json").read_text())
    assert "seed" not in stale["kept"] and [x for x in stale["rows"] if x["model"] != "seed"] == \
        [x for x in res["rows"] if x["model"] != "seed"]
    r = cli_here(smoke_copy, "stage=downstream", "downstream.models=[seed,moe/bam,btm]",
                 "downstream.tasks=[bam_next_passage_law]", check=True)
    subset = json.loads((run / "downstream" / "results.json").read_text())
    assert [(x["model"], x["task"]) for x in subset["rows"]] == [("seed", "bam_next_passage_law"),
                                                                  ("moe/bam", "bam_next_passage_law")]
    assert "reused cached results for: seed, moe/bam" in r.out and [x["name"] for x in subset["skipped"]] == ["btm"]
    # a changed suite setting is another task config: evaluated again, the entries it replaced removed,
    # every other model's kept
    r = cli_here(smoke_copy, "stage=downstream", "downstream.models=[seed]", "downstream.max_items=4", check=True)
    assert "[downstream] evaluated: seed" in r.out
    small = json.loads((run / "downstream" / "results.json").read_text())
    assert all(x["items"] <= 4 for x in small["rows"])
    assert len(list((run / "downstream" / "cache").glob("*.json"))) == len(res["rows"])
    r = cli_here(smoke_copy, "stage=downstream", "downstream.models=[moe/bam]", check=True)
    assert "reused cached results for: moe/bam" in r.out and "evaluated:" not in r.out


def test_without_lm_eval_downstream_is_one_line_and_stage_all_goes_on(smoke_copy, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    harness._lm_class.cache_clear()
    run = smoke_copy / "smoke"
    before = (run / "downstream" / "results.json").read_bytes()
    try:
        r = cli_here(smoke_copy, "stage=downstream")
        errors = [line for line in r.out.splitlines() if line.startswith("error:")]
        assert r.returncode == 2 and len(errors) == 1, r.out[-2000:]
        assert "needs lm-evaluation-harness, which is not installed; install" in errors[0]
        r = cli_here(smoke_copy, "stage=all", check=True)  # every stage up to date; downstream skipped in one line
        assert "[downstream] skipped: downstream evaluation needs lm-evaluation-harness" in r.out
    finally:
        harness._lm_class.cache_clear()
    assert (run / "downstream" / "results.json").read_bytes() == before
