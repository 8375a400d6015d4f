"""stage=eval and stage=downstream under a two-device trainer (trainer=ddp_cpu: two gloo processes started by
Lightning Fabric's launcher): every score, document loss, routing statistic and verdict equals the one-process
run's, each rank scored its share, rank 0 alone wrote the results; a rank that fails mid-eval stops every rank
with one line and nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cli_runner import cli

TIMING = ("tokens_per_s",)  # measured speeds: exempt from the comparison


def _rows(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in json.loads(path.read_text())["rows"]]


def _fresh_scoring(root: Path) -> Path:
    """A copy of the smoke run whose eval and downstream must score every model again."""
    run = root / "smoke"
    for d in ("eval/cache", "downstream/cache"):
        shutil.rmtree(run / d, ignore_errors=True)
    return run


def test_two_ranks_score_their_eval_shares_and_rank_zero_writes_what_one_process_wrote(smoke_run, smoke_copy):
    one = smoke_run[0] / "smoke"
    run = _fresh_scoring(smoke_copy)
    ev = cli(smoke_copy, "stage=eval", "trainer=ddp_cpu", "eval.rebuild=true", timeout=600).ok()
    metrics = json.loads((run / "eval/metrics.json").read_text())
    assert _rows(run / "eval/metrics.json") == _rows(one / "eval/metrics.json")
    for name in ("documents.json", "routing.json"):
        assert json.loads((run / "eval" / name).read_text()) == json.loads((one / "eval" / name).read_text())
    assert json.loads((run / "report/claims.json").read_text()) == json.loads((one / "report/claims.json").read_text())
    shares = metrics["ranks"]
    scored = [label for labels in shares["scored"].values() for label in labels]
    assert shares["world"] == 2 and sorted(scored) == sorted(metrics["evaluated"]) == sorted(
        {r["model"] for r in metrics["rows"]})  # every entry scored once, by one rank
    assert all(len(labels) >= 4 for labels in shares["scored"].values()), shares  # 14 entries split over 2 ranks
    assert ev.out.count("[eval] scored on 2 ranks") == 1  # one writer: rank 0 prints and writes


@pytest.mark.slow  # ~30 s
def test_two_ranks_run_their_share_of_the_downstream_tasks_and_rank_zero_writes_what_one_process_wrote(
        smoke_run, smoke_copy):
    one = smoke_run[0] / "smoke"
    run = _fresh_scoring(smoke_copy)
    down = cli(smoke_copy, "stage=downstream", "trainer=ddp_cpu", "downstream.rebuild=true", timeout=600).ok()
    results = json.loads((run / "downstream/results.json").read_text())
    assert results["rows"] == json.loads((one / "downstream/results.json").read_text())["rows"]
    ran = results["ranks"]["ran"]
    assert sorted(m for labels in ran.values() for m in labels) == sorted(results["evaluated"])
    assert all(ran.values()) and len(results["evaluated"]) == 13
    assert down.out.count("[downstream] ran on 2 ranks") == 1


POISON = """import os
if os.environ.get("LOCAL_RANK") == "1":  # the second rank's scoring fails mid-eval
    import bam_pipeline.eval.runner as runner
    def _poisoned(*args, **kwargs):
        raise RuntimeError("rank 1 was poisoned")
    runner.score_entry = _poisoned
"""


@pytest.mark.slow  # ~25 s
def test_a_rank_that_fails_mid_eval_stops_every_rank_with_one_line_and_nothing_written(smoke_copy, tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(POISON)
    run = _fresh_scoring(smoke_copy)
    (run / "eval/metrics.json").unlink()
    r = cli(smoke_copy, "stage=eval", "trainer=ddp_cpu", "eval.rebuild=true", timeout=600,
            env={"PYTHONPATH": f"{tmp_path / 'site'}:{Path(__file__).parent}"})
    assert r.returncode != 0
    errors = [line for line in r.out.splitlines() if line.startswith("error:")]
    assert errors == ["error: rank 1: unexpected RuntimeError: rank 1 was poisoned (a bug in bam-pipeline; run the "
                      "command on one device for its traceback, and please report it)"], r.out[-3000:]
    assert "Traceback" not in r.out
    assert not (run / "eval/metrics.json").exists()
    assert not (run / "eval/identity.json").exists()  # eval is not recorded as done
