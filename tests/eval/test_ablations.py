"""The open questions answered by paired comparisons against a reference, on synthetic runs with known effects."""

import re

import pytest
from eval_runs import ROLES, fake_eval_run

from bam_pipeline.eval import ablations
from bam_pipeline.eval.aggregate import aggregate
from bam_pipeline.eval.names import column_name
from bam_pipeline.eval.report import _question_blocks
from bam_pipeline.eval.render import to_markdown

SHIFT = {
    "seed": {"code": 0.3, "law": 0.3},
    "moe/bam": {"general": -0.2, "code": -0.2, "law": -0.2},
    "moe/bam_frozen": {"general": -0.1, "code": -0.05, "law": -0.2},  # worse on general and code, equal on law
    "moe/bam_router_joint": {"general": -0.2, "code": -0.2, "law": -0.2},  # equal everywhere
    "moe/bam_hash": {"general": -0.3, "code": -0.3, "law": -0.3},  # better everywhere
    "moe/btx_e6": {"general": 0.0, "code": 0.0, "law": 0.0},
}
MODELS = ("seed", "branch/code", "branch/law", *[m for m in SHIFT if m.startswith("moe/")])


def _agg(tmp_path, seeds=2):
    runs = [fake_eval_run(tmp_path, f"r{s}", s, shift=SHIFT, models=MODELS, roles={**ROLES}) for s in range(seeds)]
    return aggregate(runs, resamples=2000), runs


def test_each_model_is_judged_against_the_reference_on_every_column(tmp_path):
    agg, _ = _agg(tmp_path)
    q = {x.key: x for x in ablations.QUESTIONS}
    assert ablations.answer_row(agg, q["frozen"], "moe/bam_frozen").verdict == ablations.WORSE
    assert ablations.answer_row(agg, q["shared_routing"], "moe/bam_router_joint").verdict == ablations.UNRESOLVED
    assert ablations.answer_row(agg, q["routing_rule"], "moe/bam_hash").verdict == ablations.BETTER
    frozen = ablations.answer_row(agg, q["frozen"], "moe/bam_frozen")
    # true Average difference: mean of (+0.1, +0.15, 0) = +0.0833 per token
    assert frozen.average.low < 0.0833 < frozen.average.high
    assert ablations.present(q["parameters"], agg) == ["moe/btx_e6"]  # only the rows this run trained
    assert ablations.present(q["attention_routing"], agg) == []  # no reference: no section


def test_report_sections_only_for_questions_with_their_models(tmp_path):
    agg, runs = _agg(tmp_path)
    text = to_markdown(_question_blocks(agg, runs[0].rows, {}))
    assert "Would frozen experts keep their specialisation?" in text
    assert "Is BAM's edge over BTX just more parameters? (paper Table 4)" in text
    assert "The paper's Table 4" in text and "3.44" in text
    assert "Soft or top-k attention routing" not in text and "expert-choice or hash" in text
    # each compared model's clause names its verdict against the reference moe/bam (and where it is worse)
    frozen, hashed, joint = (_clause(text, lab) for lab in ("moe/bam_frozen", "moe/bam_hash", "moe/bam_router_joint"))
    assert all("moe/bam" in c.split() for c in (frozen, hashed, joint)), (frozen, hashed, joint)
    assert ablations.WORSE in frozen and "General" in frozen and "Code" in frozen and ablations.BETTER not in frozen
    assert ablations.BETTER in hashed and ablations.WORSE not in hashed
    assert "distinguishable" in joint and ablations.BETTER not in joint and ablations.WORSE not in joint


def _clause(text: str, label: str) -> str:
    """The clause of a question's sentence (not a table row) about ``label``: from its name to the next ``;``."""
    for line in text.splitlines():
        found = None if line.startswith("|") else re.search(rf"(?<![\w/]){re.escape(label)} [^;]*", line)
        if found:
            return found.group(0)
    raise AssertionError(f"no sentence names {label}:\n{text}")


# BTX better than BAM on Code alone (the smoke report's case, with enough documents to decide it)
TABLE4 = {"seed": {"code": 0.3, "law": 0.3}, "moe/bam": {"general": -0.2, "code": -0.1, "law": -0.2},
          "moe/btx": {"general": -0.2, "code": -0.2, "law": -0.2}}


def test_table_4_and_the_claim_bam_beats_btx_decide_from_the_same_intervals(tmp_path):
    agg = aggregate([fake_eval_run(tmp_path, "r0", 0, shift=TABLE4, models=tuple(ROLES))], resamples=2000)
    claim = next(c for c in agg.claims() if c.key == "bam_beats_btx")
    q = next(x for x in ablations.QUESTIONS if x.key == "parameters")
    row = ablations.answer_row(agg, q, "moe/btx")
    assert claim.status == "fails" and claim.deciding == "moe/bam vs moe/btx, Code"
    # the row is the same comparison the other way round: every column's interval mirrored exactly
    for c, iv in row.intervals.items():
        mirrored = claim.intervals[f"moe/bam vs moe/btx, {column_name(c)}"]
        assert (iv.estimate, iv.low, iv.high) == pytest.approx((-mirrored.estimate, -mirrored.high, -mirrored.low))
    # and it names the columns where BTX is better: exactly those on which the claim fails
    failing = {name.split(", ")[1] for name, iv in claim.intervals.items() if iv.low > 0}
    assert "Code" in failing and {column_name(c) for c in row.better_on} == failing and not row.worse_on
    assert row.verdict == ablations.UNRESOLVED and "better on Code" in row.cell()
    btx = _clause(ablations.sentence(q, agg), "moe/btx")  # not resolved, against moe/bam, better on Code
    assert "distinguishable" in btx and "moe/bam" in btx.split() and ablations.WORSE not in btx, btx
    assert "better on Code" in btx


def test_table_4_and_the_claims_give_no_verdict_on_one_document_alike(tmp_path):
    run = fake_eval_run(tmp_path, "r0", 0, shift=TABLE4, models=tuple(ROLES), scored={"code": 1})
    agg = aggregate([run], resamples=2000)
    claim = next(c for c in agg.claims() if c.key == "bam_beats_btx")
    row = ablations.answer_row(agg, next(x for x in ablations.QUESTIONS if x.key == "parameters"), "moe/btx")
    assert claim.status == row.verdict == ablations.UNRESOLVED
    # the reason names the source, its scored and split documents and the setting: 1 of 60, eval.min_documents=5
    assert claim.reason == row.reason and "Code" in row.reason
    assert re.search(r"\b1\b", row.reason) and re.search(r"\b60\b", row.reason), row.reason
    assert "eval.min_documents=5" in row.reason, row.reason
    assert not row.better_on and row.cell().startswith(f"**{ablations.UNRESOLVED}**") and row.reason in row.cell()
