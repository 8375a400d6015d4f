"""Ordering claims and the Table 1 analogue on hand-made tables and on the paper's own numbers."""

import math

from eval_runs import score_row

from bam_pipeline.eval.claims import FAILS, HOLDS, INCOMPLETE, UNMEASURABLE, check_claims, claim_specs
from bam_pipeline.eval.report import paper_table as paper
from bam_pipeline.eval.table import AVERAGE, PplTable, order_columns, table_cells, table_from_rows


def status(t):
    return {c.key: c.status for c in check_claims(t)}


def test_paper_table_satisfies_every_claim_of_section_8():
    assert status(paper()) == {**{k: HOLDS for k in ("experts_beat_seed", "mixtures_beat_singles", "bam_beats_btx",
                                                     "expert_kv_beats_shared", "dm_beats_cm")},
                               "mixtures_beat_dense": UNMEASURABLE, "bam_beats_btm": UNMEASURABLE}


def test_claim_b_compares_every_mixture_with_the_seed_and_every_expert():
    (spec,) = [c for c in claim_specs(paper()) if c.key == "mixtures_beat_singles"]
    assert len(spec.comparisons) == 4 * 4  # 4 mixtures x (seed + 3 experts), on the average
    assert {c.column for c in spec.comparisons} == {AVERAGE}
    assert {c.worse for c in spec.comparisons} == {"seed", "branch/code", "branch/law", "branch/math"}


def test_paper_averages_and_best():
    t = paper()
    assert math.isclose(t.get("seed", AVERAGE), (23.98 + 8.62 + 8.92 + 14.12) / 4)
    assert t.best("general") == "seed"  # 23.98 < BAM DM 24.02
    assert t.best("code") == "moe/bam"
    assert t.best(AVERAGE) == "moe/bam"


def test_claims_fail_and_unmeasurable_on_a_run():
    values = {
        "seed": {"general": 10.0, "code": 10.0},
        "branch/code": {"general": 12.0, "code": 11.0},  # worse than the seed in its own domain
        "moe/bam": {"general": 9.0, "code": 8.0},
        "moe/btx": {"general": 8.5, "code": 9.0},  # BTX wins General, loses Code
    }
    st = status(PplTable(tuple(values), ("general", "code"), values))
    assert st["experts_beat_seed"] == FAILS
    assert st["mixtures_beat_singles"] == HOLDS  # 8.5 and 8.75 < seed's 10
    assert st["bam_beats_btx"] == FAILS
    assert st["expert_kv_beats_shared"] == UNMEASURABLE
    assert st["dm_beats_cm"] == UNMEASURABLE


def test_the_dense_baseline_is_its_own_comparison_not_a_single_model_of_claim_b():
    values = {"seed": {"g": 5.0}, "moe/continued": {"g": 3.0}, "moe/bam": {"g": 4.0}}
    roles = {"moe/continued": "dense"}  # a role comes from the manifest, not from the artifact's name
    st = status(PplTable(tuple(values), ("g",), values, roles=roles))
    assert st["mixtures_beat_singles"] == HOLDS and st["mixtures_beat_dense"] == FAILS
    st = status(PplTable(tuple(values), ("g",), values))  # both mixtures now
    assert st["mixtures_beat_singles"] == HOLDS and st["mixtures_beat_dense"] == UNMEASURABLE
    values["branch/g"] = {"g": 3.5}  # an expert better than a mixture on average
    assert status(PplTable(tuple(values), ("g",), values, roles=roles))["mixtures_beat_singles"] == FAILS


def test_names_and_roles_come_with_the_table():
    t = paper()
    assert [t.name(lab) for lab in ("seed", "branch/code", "moe/bam_cm")] == ["Seed", "Code expert",
                                                                              "BAM CM (expert KV)"]
    assert t.role("moe/btx") == "mixture" and t.role("branch/law") == "expert"
    bare = PplTable(("mix/x", "moe/y"), ("g",), {})
    assert bare.name("mix/x") == "mix/x" and bare.role("mix/x") == "untrained" and bare.role("moe/y") == "mixture"


def test_table_from_rows_orders_general_first_and_marks_best():
    rows = [score_row(m, d, perplexity=p, display=name) for m, d, p, name in
            [("seed", "code", 4.0, "Seed"), ("seed", "general", 2.0, "Seed"), ("moe/bam", "code", 3.0, "BAM (expert KV)"),
             ("moe/bam", "general", 2.5, "BAM (expert KV)")]]
    cols = order_columns(["code", "general"], "general")
    assert cols == ("general", "code")
    cells = table_cells(table_from_rows(rows, ["seed", "moe/bam"], cols))
    assert cells[0] == ["model", "General", "Code", "Average"]
    assert cells[1] == ["Seed", "**2.00**", "4.00", "3.00"]
    assert cells[2] == ["BAM (expert KV)", "2.50", "**3.00**", "**2.75**"]


def test_incomplete_row_has_no_average():
    t = PplTable(("a",), ("x", "y"), {"a": {"x": 1.0}})
    assert t.get("a", AVERAGE) is None
    assert table_cells(t)[1] == ["a", "**1.00**", "-", "-"]


def test_a_claim_over_every_expert_with_experts_missing_is_incomplete_not_holds():
    # only branch/code was built: its expert beats the seed, and the math and law experts do not exist
    values = {"seed": {"general": 10.0, "code": 10.0, "math": 10.0, "law": 10.0},
              "branch/code": {"general": 12.0, "code": 8.0, "math": 11.0, "law": 11.0},
              "moe/bam": {"general": 9.0, "code": 7.0, "math": 9.0, "law": 9.0}}
    t = PplTable(tuple(values), ("general", "code", "math", "law"), values, general="general")
    claims = {c.key: c for c in check_claims(t)}
    assert claims["experts_beat_seed"].status == INCOMPLETE
    assert claims["experts_beat_seed"].detail.startswith("missing branch/math, branch/law; ")
    assert claims["mixtures_beat_singles"].status == INCOMPLETE  # against every expert: two are missing
    assert claims["bam_beats_btx"].status == UNMEASURABLE  # no BTX at all: nothing to compare
    # the same run with every expert is judged as before; a table that does not know its general source
    # (so not its domains) expects nothing more than it has
    values |= {"branch/math": {"general": 12.0, "code": 11.0, "math": 8.0, "law": 11.0},
               "branch/law": {"general": 12.0, "code": 11.0, "math": 11.0, "law": 8.0}}
    assert status(PplTable(tuple(values), ("general", "code", "math", "law"), values, general="general"))[
        "experts_beat_seed"] == HOLDS
    del values["branch/law"]
    assert status(PplTable(tuple(values), ("general", "code", "math", "law"), values))["experts_beat_seed"] == HOLDS


def test_skipped_models_and_missing_cells_make_a_claim_incomplete():
    values = {"seed": {"g": 5.0, "c": 5.0}, "branch/c": {"g": 6.0, "c": 4.0}, "moe/bam": {"g": 4.0},
              "moe/btx": {"g": 4.5, "c": 4.5}}
    t = PplTable(tuple(values), ("g", "c"), values, general="g", missing=("moe/bam_cm",))
    claims = {c.key: c for c in check_claims(t)}
    assert claims["bam_beats_btx"].status == INCOMPLETE and claims["bam_beats_btx"].detail.startswith(
        "missing moe/bam on C, moe/bam on Average; ")
    assert claims["dm_beats_cm"].status == UNMEASURABLE  # moe/bam_cm was skipped: no comparison to make
    assert claims["experts_beat_seed"].status == HOLDS
