"""Claims with intervals over seeds and documents: the joint resampling, verdicts on synthetic runs whose
true differences are known, and the aggregate read from several runs' eval files."""

import json
import math

import numpy as np
import pytest

from bootstrap_oracles import paired_difference
from eval_runs import ROLES, SOURCES, fake_eval_run

from bam_pipeline.errors import BamError
from bam_pipeline.eval.aggregate import aggregate
from bam_pipeline.eval.claims import FAILS, HOLDS, INCOMPLETE, NOT_RESOLVED, UNMEASURABLE
from bam_pipeline.eval.report import build_report, interval_cells
from bam_pipeline.eval.stats import DOCUMENTS_ONLY, SEEDS_AND_DOCUMENTS, DocLosses, joint_mean_losses
from bam_pipeline.eval.table import AVERAGE


def test_joint_resampling_reproduces_the_paired_difference_for_one_source():
    rng = np.random.default_rng(0)
    tokens = rng.integers(10, 200, size=(3, 40))
    a = DocLosses(tokens * rng.normal(3.0, 0.3, size=(3, 40)), tokens)
    b = DocLosses(tokens * rng.normal(3.1, 0.3, size=(3, 40)), tokens)
    reps = joint_mean_losses({"a": {"s": a}, "b": {"s": b}}, resamples=2000, rng=np.random.default_rng(7))
    iv = paired_difference(a, b, resamples=2000, rng=np.random.default_rng(7))
    q = np.quantile(reps["a"]["s"] - reps["b"]["s"], [0.025, 0.975])
    assert np.allclose(q, [iv.low, iv.high], rtol=0, atol=1e-12)


def test_joint_resampling_draws_the_seeds_once_for_every_source():
    """With identical seed effects in two sources and no document variation, the resampled mean losses of the
    two sources move together exactly: one seed draw is shared."""
    tokens = np.full((4, 5), 10)
    seed_effect = np.array([[0.0], [1.0], [2.0], [3.0]])
    x = DocLosses(tokens * (2.0 + seed_effect), tokens)
    reps = joint_mean_losses({"m": {"s1": x, "s2": x}}, resamples=2000, rng=np.random.default_rng(1))
    assert np.array_equal(reps["m"]["s1"], reps["m"]["s2"]) and reps["m"]["s1"].std() > 0.1


# offsets in nats per token: experts better in their domain, mixtures better everywhere, BAM vs BTX tiny
SHIFT = {
    "seed": {"code": 0.3, "law": 0.3},
    "branch/code": {"general": 0.5, "law": 0.5},
    "branch/law": {"general": 0.5, "code": 0.5},
    "moe/bam": {"general": -0.2, "code": -0.2, "law": -0.2},
    "moe/btx": {"general": -0.2, "code": -0.2, "law": -0.2},  # equal to BAM: not resolved
    "moe/dense": {"general": -0.3, "code": -0.3, "law": -0.3},  # better than every mixture: fails
}


def test_verdicts_on_synthetic_seeds_match_the_true_differences(tmp_path):
    runs = [fake_eval_run(tmp_path, f"r{s}", s, shift=SHIFT) for s in range(3)]
    agg = aggregate(runs, resamples=2000)
    claims = {c.key: c for c in agg.claims()}
    assert claims["experts_beat_seed"].status == HOLDS
    assert claims["mixtures_beat_singles"].status == HOLDS
    assert claims["bam_beats_btx"].status == NOT_RESOLVED  # no true difference
    assert claims["mixtures_beat_dense"].status == FAILS
    assert claims["expert_kv_beats_shared"].status == UNMEASURABLE and claims["bam_beats_btm"].status == UNMEASURABLE
    assert claims["mixtures_beat_dense"].seeds_holding == 0 and claims["experts_beat_seed"].seeds_holding == 3
    iv = claims["experts_beat_seed"].interval
    assert iv.covers == SEEDS_AND_DOCUMENTS and iv.n_seeds == 3 and iv.high < 0
    # the deciding interval of claim (b) brackets its true difference on the average: BAM/BTX vs the seed is
    # -0.2 - 0.2 = -0.4 per source on average, vs each expert -0.2 - 1/3 = -0.533; the weakest is vs the seed
    assert claims["mixtures_beat_singles"].deciding.endswith("Average")
    assert iv.low < iv.estimate < iv.high
    assert claims["mixtures_beat_singles"].interval.low < -0.4 < claims["mixtures_beat_singles"].interval.high


def test_one_seed_covers_documents_only_and_cells_bracket_their_estimate(tmp_path):
    agg = aggregate([fake_eval_run(tmp_path, "r0", 0, shift=SHIFT)], resamples=2000)
    assert agg.covers == DOCUMENTS_ONLY
    for lab, row in agg.cells.items():
        assert set(row) == {*SOURCES, AVERAGE}
        for iv in row.values():
            assert iv.low <= iv.estimate <= iv.high
        assert math.isclose(row[AVERAGE].estimate, sum(row[s].estimate for s in SOURCES) / 3)
    cells = interval_cells(agg)
    assert cells[0] == ["model", "General", "Code", "Law", "Average"]
    assert all(" [" in c for c in cells[1][1:])


def test_models_missing_from_a_seed_are_left_out_with_why(tmp_path):
    runs = [fake_eval_run(tmp_path, "r0", 0, shift=SHIFT),
            fake_eval_run(tmp_path, "r1", 1, shift=SHIFT, models=tuple(m for m in ROLES if m != "moe/btx"))]
    agg = aggregate(runs, resamples=2000)
    assert "moe/btx" not in agg.table.labels and "r1" in agg.left_out["moe/btx"]


def test_a_source_with_one_scored_document_gives_no_claim_a_verdict(tmp_path):
    # the smoke experiment: eval.max_tokens_per_source covers one Code document of the split's 60
    run = fake_eval_run(tmp_path, "r0", 0, shift=SHIFT, scored={"code": 1})
    agg = aggregate([run], resamples=2000)
    assert agg.thin_sources() == [("code", 1, 60)]
    claims = {c.key: c for c in agg.claims()}
    for key in ("experts_beat_seed", "mixtures_beat_singles", "bam_beats_btx", "mixtures_beat_dense"):
        assert claims[key].status == NOT_RESOLVED, key  # each rests on Code (its column, or the Average)
        assert claims[key].reason.startswith("Code has 1 test document (of 60 in its split): fewer than "
                                             "eval.min_documents=5; raise eval.max_tokens_per_source"), key
        assert claims[key].verdict.startswith("not resolved at this scale: Code has 1 test document")
    # the claims that rest on Code only through the intervals that decided them before: with one
    # document its interval has zero width, a "confident" verdict the old code gave
    code = next(iv for name, iv in claims["bam_beats_btx"].intervals.items() if name.endswith("Code"))
    assert code.zero_width and code.documents[0].scored == 1
    # the threshold is eval.min_documents: with 1 allowed, the zero-width interval still decides nothing
    lenient = {c.key: c for c in aggregate([run], resamples=2000, min_documents=1).claims()}
    assert lenient["bam_beats_btx"].status == NOT_RESOLVED and "zero width" in lenient["bam_beats_btx"].reason
    # enough documents everywhere: verdicts as in the synthetic truth
    full = {c.key: c for c in aggregate([fake_eval_run(tmp_path, "r1", 0, shift=SHIFT, scored={"code": 5})],
                                         resamples=2000).claims()}
    assert full["experts_beat_seed"].status == HOLDS and full["mixtures_beat_dense"].status == FAILS
    assert full["experts_beat_seed"].reason == ""


def test_a_claim_with_an_expert_missing_or_skipped_is_incomplete(tmp_path):
    models = tuple(m for m in ROLES if m != "branch/law")  # branch/law never built: only its domain says it should be
    claims = {c.key: c for c in aggregate([fake_eval_run(tmp_path, "r0", 0, shift=SHIFT, models=models)],
                                          resamples=2000).claims()}
    assert claims["experts_beat_seed"].status == INCOMPLETE  # the code expert's comparison alone holds
    assert claims["experts_beat_seed"].verdict == "incomplete: missing branch/law"
    assert claims["mixtures_beat_singles"].status == INCOMPLETE
    assert claims["bam_beats_btx"].status == NOT_RESOLVED and claims["mixtures_beat_dense"].status == FAILS
    # a model eval skipped (a bad checksum), and one a seed lacks, are missing too
    every = (*ROLES, "moe/bam_kv_shared")
    runs = [fake_eval_run(tmp_path, "s0", 0, shift=SHIFT, models=tuple(m for m in every if m != "moe/bam"),
                          skipped=("moe/bam",)),
            fake_eval_run(tmp_path, "s1", 1, shift=SHIFT, models=tuple(m for m in every if m != "moe/btx"))]
    agg = aggregate(runs, resamples=2000)
    assert agg.table.missing == ("moe/bam", "moe/btx")
    claims = {c.key: c for c in agg.claims()}
    assert claims["mixtures_beat_singles"].verdict == "incomplete: missing moe/bam, moe/btx"  # shared KV's alone
    assert claims["experts_beat_seed"].status == HOLDS
    assert claims["bam_beats_btx"].status == UNMEASURABLE  # neither is there: not measurable, as before


def test_seeds_on_different_data_are_refused(tmp_path):
    runs = [fake_eval_run(tmp_path, "r0", 0, shift=SHIFT), fake_eval_run(tmp_path, "r1", 1, shift=SHIFT, data_hash="other")]
    with pytest.raises(BamError, match="different prepared data"):
        aggregate(runs, resamples=2000)


def test_too_few_resamples_are_refused(tmp_path):
    with pytest.raises(BamError, match="at least 2000"):
        aggregate([fake_eval_run(tmp_path, "r0", 0, shift=SHIFT)], resamples=100)


def test_seeds_report_files(tmp_path):
    runs = [fake_eval_run(tmp_path, f"r{s}", s, shift=SHIFT) for s in range(2)]
    md = build_report(runs[0].layout, runs, command="python -m bam_pipeline stage=all pipeline.seeds=[0,1]")
    out = md.parent
    assert {p.name for p in out.iterdir()} >= {"report.md", "report.html", "claims.json", "table.json", "claims.png",
                                                "perplexity_intervals.png"}
    text = md.read_text()
    assert "over 2 training seeds" in text and "| seeds where it held |" in text.replace(" | perplexities", " |")
    verdicts = json.loads((out / "claims.json").read_text())
    assert {c["key"]: c["status"] for c in verdicts["claims"]}["mixtures_beat_dense"] == FAILS
    table = json.loads((out / "table.json").read_text())
    assert len(table["rows"]) == len(ROLES) * 4 and table["covers"] == SEEDS_AND_DOCUMENTS


def test_losses_that_are_not_finite_name_the_run_and_how_to_score_it_again(tmp_path):
    """documents.json from an eval that wrote NaN (an older version): the message names the model, the source,
    the file and the command that scores the run afresh (eval.rebuild=true: an unchanged eval is skipped)."""
    runs = [fake_eval_run(tmp_path, f"r{s}", s, shift=SHIFT) for s in range(2)]
    runs[1].documents["models"]["moe/bam"]["law"]["nll"][3] = math.nan
    with pytest.raises(BamError) as err:
        aggregate(runs, resamples=2000)
    msg = str(err.value)
    assert f"moe/bam's test losses on law in {runs[1].layout.documents}" in msg
    assert "stage=eval eval.rebuild=true run=r1 train.seed=1" in msg
