"""Ordering claims and the Table 1 analogue on hand-made tables and on the paper's own numbers."""

import math

from bam_pipeline.eval.claims import FAILS, HOLDS, UNMEASURABLE, check_claims
from bam_pipeline.eval.names import display_name, is_single_model, is_trained_mixture
from bam_pipeline.eval.paper import PAPER_COLUMNS, PAPER_TABLE1
from bam_pipeline.eval.table import AVERAGE, PplTable, order_columns, table_cells, table_from_rows


def paper():
    return PplTable(tuple(PAPER_TABLE1), PAPER_COLUMNS, PAPER_TABLE1)


def status(t):
    return {c.key: c.status for c in check_claims(t)}


def test_paper_table_satisfies_every_claim_of_section_8():
    assert status(paper()) == {k: HOLDS for k in
                               ("experts_beat_seed", "mixtures_beat_singles", "bam_beats_btx",
                                "expert_kv_beats_shared", "dm_beats_cm")}


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


def test_mixture_worse_than_a_single_model_fails_and_dense_counts_as_single():
    values = {"seed": {"g": 5.0}, "moe/dense": {"g": 3.0}, "moe/bam": {"g": 4.0}}
    st = status(PplTable(tuple(values), ("g",), values))
    assert st["mixtures_beat_singles"] == FAILS


def test_roles_and_display_names():
    assert display_name("seed") == "Seed"
    assert display_name("branch/code") == "Code expert"
    assert display_name("moe/btx") == "BTX"
    assert display_name("moe/bam") == "BAM (expert KV)"
    assert display_name("moe/bam_kv_shared") == "BAM (shared KV)"
    assert display_name("moe/bam_cm") == "BAM CM (expert KV)"
    assert display_name("moe/btx_cm") == "BTX CM"
    assert display_name("mix/bam") == "bam (untrained)"
    assert display_name("moe/newthing") == "newthing"
    assert is_single_model("moe/dense") and not is_trained_mixture("moe/dense")
    assert is_trained_mixture("moe/bam_cm") and not is_trained_mixture("mix/bam")


def test_table_from_rows_orders_general_first_and_marks_best():
    rows = [{"model": m, "domain": d, "perplexity": p} for m, d, p in
            [("seed", "code", 4.0), ("seed", "general", 2.0), ("moe/bam", "code", 3.0), ("moe/bam", "general", 2.5)]]
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
