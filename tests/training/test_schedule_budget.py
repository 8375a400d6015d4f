"""Learning-rate schedule and stage budgets: the numbers the training stages are planned with."""

import math

import pytest

from bam_pipeline.errors import BamError
from bam_pipeline.model.config import preset
from bam_pipeline.model.counting import flops_per_token
from bam_pipeline.training.budget import plan_budget
from bam_pipeline.training.schedule import lr_at, warmup_steps_for


def test_schedule_warmup_peak_and_floor():
    kw = dict(peak=1.0, total_steps=100, warmup_steps=10, min_ratio=0.1)
    lrs = [lr_at(s, **kw) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1)  # linear from 0: step 0 takes 1/10 of the peak
    assert lrs[9] == pytest.approx(1.0)  # peak at the end of warm-up
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # monotone cosine decay
    assert lrs[99] == pytest.approx(0.1)  # 10% of peak at the last step
    mid = 9 + (99 - 9) // 2
    assert lrs[mid] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(500, **kw) == pytest.approx(0.1)


def test_warmup_is_capped_and_positive():
    assert warmup_steps_for(100_000, 0.05, 1500) == 1500
    assert warmup_steps_for(100, 0.05, 1500) == 5
    assert warmup_steps_for(3, 0.05, 1500) == 1


def test_data_matched_budget_rounds_up_to_whole_steps():
    cfg = preset("smoke")
    b = plan_budget(10_000, cfg, seq_len=64, tokens_per_step=4 * 64)
    assert b.steps == math.ceil(10_000 / 256) and b.tokens == b.steps * 256
    assert b.train_flops == pytest.approx(3 * flops_per_token(cfg, 64).total * b.tokens)


def test_compute_matched_budget_spends_the_reference_flops():
    dense = preset("smoke")
    bam = dense.replace(attn_experts=4, ffn_experts=4)
    btx = dense.replace(ffn_experts=4)
    dm = plan_budget(100_000, bam, seq_len=64, tokens_per_step=64, match="data")
    cm = plan_budget(100_000, bam, seq_len=64, tokens_per_step=64, match="compute", reference=btx)
    ref = plan_budget(100_000, btx, seq_len=64, tokens_per_step=64, match="data")
    assert cm.tokens < dm.tokens  # BAM costs more per token, so it sees fewer tokens
    assert cm.train_flops == pytest.approx(ref.train_flops, rel=64 * 3 * flops_per_token(bam, 64).total / ref.train_flops)


def test_budget_rejects_bad_input():
    with pytest.raises(BamError, match="match"):
        plan_budget(100, preset("smoke"), seq_len=64, tokens_per_step=64, match="flops")
    with pytest.raises(BamError, match="reference"):
        plan_budget(100, preset("smoke"), seq_len=64, tokens_per_step=64, match="compute")
    with pytest.raises(BamError, match="positive"):
        plan_budget(0, preset("smoke"), seq_len=64, tokens_per_step=64)


def test_non_embedding_convention_matches_compute_without_the_lm_head():
    dense = preset("smoke")
    bam = dense.replace(attn_experts=4, ffn_experts=4)
    btx = dense.replace(ffn_experts=4)
    total = plan_budget(100_000, bam, seq_len=64, tokens_per_step=64, match="compute", reference=btx)
    bare = plan_budget(100_000, bam, seq_len=64, tokens_per_step=64, match="compute", reference=btx,
                       flops="non_embedding")
    f_bam, f_btx = flops_per_token(bam, 64), flops_per_token(btx, 64)
    ratio_total = f_btx.total / f_bam.total
    ratio_bare = f_btx.non_embedding / f_bam.non_embedding
    assert total.steps == math.ceil(100_000 * ratio_total / 64)
    assert bare.steps == math.ceil(100_000 * ratio_bare / 64)
    # the LM head costs both alike, so leaving it out makes BAM's extra attention weigh more: fewer tokens
    assert ratio_bare < ratio_total and bare.tokens < total.tokens
    # the manifest's training FLOPs stay the total convention's, whichever convention matched
    assert bare.train_flops == pytest.approx(3 * f_bam.total * bare.tokens)
    assert (total.flops, bare.flops) == ("total", "non_embedding")


def test_budget_identity_names_the_convention_only_away_from_total():
    """Stage identities of every budget planned before ``budget.moe.flops`` existed keep their keys (and
    hashes): data-matched budgets and total compute-matched ones record no convention."""
    before = {"match", "tokens", "steps", "tokens_per_step", "train_flops", "reference_tokens"}
    dense = preset("smoke")
    btx = dense.replace(ffn_experts=4)
    data = plan_budget(1000, btx, seq_len=64, tokens_per_step=64, flops="non_embedding")
    total = plan_budget(1000, btx, seq_len=64, tokens_per_step=64, match="compute", reference=btx)
    bare = plan_budget(1000, btx, seq_len=64, tokens_per_step=64, match="compute", reference=btx,
                       flops="non_embedding")
    assert data.flops is None and set(data.identity()) == before and set(total.identity()) == before
    assert bare.identity() == {**total.identity(), "flops": "non_embedding"}
    with pytest.raises(BamError, match="convention"):
        plan_budget(1000, btx, seq_len=64, tokens_per_step=64, match="compute", reference=btx, flops="head")
