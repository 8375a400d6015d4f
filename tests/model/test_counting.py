"""Parameter and FLOP counts: hand-computed values, agreement with the built model, paper-scale sanity."""

from __future__ import annotations

import pytest

from bam_pipeline.errors import BamError
from bam_pipeline.model.config import RouterConfig, preset
from bam_pipeline.model.counting import (
    count_params,
    describe,
    flops_per_token,
    training_flops_per_token,
)
from bam_pipeline.model.transformer import BAMTransformer

# smoke: V=256, D=32, L=2, H=4, KV=2 (head_dim 8: q width 32, kv width 16), F=64, untied
SMOKE = preset("smoke")
EMB = 2 * 256 * 32  # tok_emb + lm_head = 16384
ATTN_EXPERT = 32 * 32 + 32 * 16 + 32 * 16 + 32 * 32  # wq, wk, wv, wo = 3072
QO = 32 * 32 + 32 * 32  # 2048
KV = 32 * 16 + 32 * 16  # 1024
FFN_EXPERT = 32 * 64 * 3  # w1, w3, w2 = 6144
NORM = 32


def test_dense_params_by_hand():
    c = count_params(SMOKE)
    layer = ATTN_EXPERT + FFN_EXPERT + NORM  # 9248
    assert c.per_layer.total == 9248 == layer
    assert c.embedding == EMB == 16384
    assert c.total == EMB + 2 * layer + NORM == 34912
    assert c.active == c.total


def test_bam_expert_kv_params_by_hand():
    cfg = SMOKE.replace(attn_experts=4, ffn_experts=4, ffn_router=RouterConfig("topk", 1))
    c = count_params(cfg)
    routers = 4 * 32 + 4 * 32  # attention + FFN router, (E, D) each
    layer_total = 4 * ATTN_EXPERT + 4 * FFN_EXPERT + routers + NORM  # 37152
    layer_active = 4 * ATTN_EXPERT + 1 * FFN_EXPERT + routers + NORM  # soft attention uses all 4
    assert c.total == EMB + 2 * layer_total + NORM == 90720
    assert c.active == EMB + 2 * layer_active + NORM == 53856
    assert c.active < c.total


def test_bam_shared_kv_and_top1_attention_params_by_hand():
    shared = count_params(SMOKE.replace(attn_experts=4, attn_kv="shared", ffn_experts=4))
    layer = 4 * QO + 1 * KV + 4 * FFN_EXPERT + 2 * 4 * 32 + NORM  # 34080
    assert shared.total == EMB + 2 * layer + NORM == 84576

    top1 = count_params(SMOKE.replace(attn_experts=4, attn_router=RouterConfig("topk", 1), ffn_experts=4))
    layer_active = ATTN_EXPERT + FFN_EXPERT + 2 * 4 * 32 + NORM  # one attention expert, one FFN expert
    assert top1.active == EMB + 2 * layer_active + NORM == 35424

    top2_shared = count_params(SMOKE.replace(attn_experts=4, attn_router=RouterConfig("topk", 2), attn_kv="shared", ffn_experts=4))
    layer_active = 2 * QO + KV + FFN_EXPERT + 2 * 4 * 32 + NORM  # shared K/V counted once
    assert top2_shared.active == EMB + 2 * layer_active + NORM


def test_tied_embeddings_count_once():
    assert count_params(SMOKE.replace(tie_embeddings=True)).total == 34912 - 256 * 32


def test_dense_flops_by_hand():
    f = flops_per_token(SMOKE, seq_len=64)
    ctx = (64 + 1) / 2  # average causal context
    proj = 2 * ATTN_EXPERT  # 6144
    scores = 2 * (32 * ctx) + 2 * (32 * ctx)  # q.k and p.v over H*hd = 32 dims: 4160
    ffn = 2 * FFN_EXPERT  # 12288
    head = 2 * 32 * 256  # 16384
    assert f.attention_scores == 2 * scores == 8320
    assert f.total == 2 * (proj + scores + ffn) + head == 61568
    assert training_flops_per_token(SMOKE, seq_len=64) == 3 * 61568
    assert flops_per_token(SMOKE).seq_len == SMOKE.max_seq_len == 64


def test_bam_flops_by_hand():
    cfg = SMOKE.replace(attn_experts=4, ffn_experts=4, ffn_router=RouterConfig("topk", 1))
    f = flops_per_token(cfg, seq_len=64)
    ctx = (64 + 1) / 2
    per_layer = 2 * 4 * ATTN_EXPERT + 4 * 4 * 32 * ctx + 2 * (4 * 32 + 4 * 32) + 2 * FFN_EXPERT
    assert f.routers == 2 * 2 * (4 * 32 + 4 * 32) == 1024
    assert f.total == 2 * per_layer + 2 * 32 * 256 == 124416

    top2 = SMOKE.replace(ffn_experts=4, ffn_router=RouterConfig("topk", 2))
    assert flops_per_token(top2, 64).ffn == 2 * 2 * 2 * FFN_EXPERT


def test_full_scores_count_every_position_of_a_row():
    """A kernel that does not skip the causal mask computes T scores per query, not (T + 1) / 2."""
    cfg = SMOKE.replace(attn_experts=4, ffn_experts=4, ffn_router=RouterConfig("topk", 1))
    causal, full = flops_per_token(cfg, seq_len=64), flops_per_token(cfg, seq_len=64, full_scores=True)
    assert full.attention_scores == 2 * 4 * (2 * 2 * 32 * 64) == 65536  # 2 layers, 4 experts, q.k + p.v
    assert full.total - causal.total == full.attention_scores - causal.attention_scores == 65536 - 33280
    assert training_flops_per_token(cfg, 64, full_scores=True) == 3 * full.total


def test_bad_seq_len_is_refused():
    with pytest.raises(BamError, match="seq_len"):
        flops_per_token(SMOKE, seq_len=0)


MODEL_CASES = {
    "dense": SMOKE,
    "dense_tied": SMOKE.replace(tie_embeddings=True),
    "bam_expert_kv": SMOKE.replace(attn_experts=4, ffn_experts=4),
    "bam_shared_kv": SMOKE.replace(attn_experts=4, attn_kv="shared", ffn_experts=4),
    "bam_shared_kv_tied": SMOKE.replace(tie_embeddings=True).replace(
        attn_experts=3, attn_kv="shared", ffn_experts=3
    ),
    "sequential_top2": SMOKE.replace(parallel_residual=False).replace(
        attn_experts=2, attn_router=RouterConfig("topk", 2), ffn_experts=3, ffn_router=RouterConfig("topk", 2)
    ),
    "btx": SMOKE.replace(ffn_experts=4, ffn_router=RouterConfig("topk", 1)),
    "btx_matched": SMOKE.replace(ffn_experts=6, ffn_router=RouterConfig("topk", 3)),
    "qkv_bias_shared_kv": SMOKE.replace(qkv_bias=True, attn_experts=3, attn_kv="shared", ffn_experts=2),
    "head_dim_override_bias": SMOKE.replace(n_heads=2, n_kv_heads=1, head_dim_override=24, qkv_bias=True,
                                            attn_experts=2, norm_kind="layernorm", parallel_residual=False),
}


@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_total_matches_built_model(name):
    cfg = MODEL_CASES[name]
    model = BAMTransformer(cfg)
    assert count_params(cfg).total == sum(p.numel() for p in model.parameters())


def test_bam_590m_sanity():
    cfg = preset("bam-590m")
    d, v, f = 1024, 256000, 2048
    layer = 4 * d * d + 3 * d * f + d  # 10,486,784
    assert count_params(cfg).total == 2 * v * d + 6 * layer + d == 587_209_728

    bam = count_params(cfg.replace(attn_experts=4, ffn_experts=4))
    btx = count_params(cfg.replace(ffn_experts=4))
    matched = count_params(cfg.replace(ffn_experts=6, ffn_router=RouterConfig("topk", 3)))
    # With F = 2D, 2 extra FFN experts (2 * 3 * D * 2D) = 3 extra attention experts (3 * 4 * D^2):
    # BTX parameter-matched equals BAM in total and active parameters, routers aside.
    bam_routers, matched_routers = 6 * (4 + 4) * d, 6 * 6 * d
    assert bam.total - bam_routers == matched.total - matched_routers
    assert bam.active - bam_routers == matched.active - matched_routers
    assert btx.total < bam.total

    bam_flops = flops_per_token(cfg.replace(attn_experts=4, ffn_experts=4), seq_len=2048)
    btx_flops = flops_per_token(cfg.replace(ffn_experts=4), seq_len=2048)
    # per layer, BAM adds 3 attention experts (2 * 4 * D^2 projections + 4 * D * (T+1)/2 scores each)
    # and an attention router (2 * 4 * D)
    extra = 6 * (3 * (2 * 4 * d * d + 4 * d * (2048 + 1) / 2) + 2 * 4 * d)
    assert bam_flops.total - btx_flops.total == extra


def test_bam_590m_reproduces_table_7s_flop_ratio_and_table_9s_shared_kv_total():
    """docs/paper.md section 10: BAM expert KV / BTX forward FLOPs per token at context 256 without the LM head
    is Table 7's 2.24; BAM shared KV has Table 9's 738,253,824 parameters (BAM's 776,002,560 less 3 K/V sets of
    2 * D^2 in each of the 6 blocks)."""
    cfg = preset("bam-590m")
    bam = flops_per_token(cfg.replace(attn_experts=4, ffn_experts=4), seq_len=256)
    btx = flops_per_token(cfg.replace(ffn_experts=4), seq_len=256)
    assert f"{bam.non_embedding / btx.non_embedding:.3g}" == "2.24"
    assert bam.non_embedding == bam.total - bam.lm_head  # the head term apart: FLOPs without the LM head
    assert 1.24 < bam.total / btx.total < 1.25  # with the 256k-vocabulary head
    shared = count_params(cfg.replace(attn_experts=4, ffn_experts=4, attn_kv="shared"))
    assert shared.total == 738_253_824 == 776_002_560 - 6 * 3 * 2 * 1024 * 1024


def test_describe_rows():
    cfg = SMOKE.replace(attn_experts=4, attn_kv="shared", ffn_experts=4, ffn_router=RouterConfig("topk", 2))
    rows = describe(cfg, seq_len=32)
    assert rows["params_total"] == count_params(cfg).total
    assert rows["params_active"] == count_params(cfg).active
    assert rows["seq_len"] == 32
    assert rows["flops_per_token_forward"] == flops_per_token(cfg, 32).total
    assert rows["flops_per_token_training"] == 3 * rows["flops_per_token_forward"]
    assert "4 experts (soft, shared KV)" in rows["architecture"]
    assert "top-2" in rows["architecture"]
    assert "dense" in describe(SMOKE)["architecture"]


# ---- top-k attention: what an ideal sparse kernel computes vs what our fused attention computes ----
CTX = (64 + 1) / 2
HEAD = 2 * 32 * 256  # 16384
FFN1 = 2 * FFN_EXPERT  # one top-1 FFN expert: 12288
ROUTERS = 2 * (4 * 32 + 4 * 32)  # attention + FFN router: 512


def test_topk_attention_flops_ideal_kernel_by_hand():
    """Budgets: the k chosen experts' Q, O and attention, every expert's K/V."""
    top1 = SMOKE.replace(attn_experts=4, attn_router=RouterConfig("topk", 1), ffn_experts=4)
    f = flops_per_token(top1, seq_len=64)
    proj = 2 * (1 * QO + 4 * KV)  # 12288: 1 expert's Q/O, all 4 experts' K/V
    scores = 2 * 2 * 1 * 32 * CTX  # 4160: one expert's q.k and p.v
    assert f.attention_proj == 2 * proj == 24576
    assert f.attention_scores == 2 * scores == 8320
    assert f.total == 2 * (proj + scores + ROUTERS + FFN1) + HEAD == 74880

    top2_shared = SMOKE.replace(attn_experts=4, attn_router=RouterConfig("topk", 2), attn_kv="shared", ffn_experts=4)
    f2 = flops_per_token(top2_shared, seq_len=64)
    proj2 = 2 * (2 * QO + 1 * KV)  # 10240: the one shared K/V set
    assert f2.attention_proj == 2 * proj2
    assert f2.total == 2 * (proj2 + 2 * 2 * 2 * 32 * CTX + ROUTERS + FFN1) + HEAD == 79104
    # the compute-matched budget uses it
    assert training_flops_per_token(top1, 64) == 3 * 74880


def test_topk_attention_flops_as_implemented_by_hand():
    """Throughput: our fused attention computes all 4 experts and zero-weights 3 of them."""
    top1 = SMOKE.replace(attn_experts=4, attn_router=RouterConfig("topk", 1), ffn_experts=4)
    f = flops_per_token(top1, seq_len=64, implementation=True)
    proj = 2 * (4 * QO + 4 * KV)  # 24576
    scores = 2 * 2 * 4 * 32 * CTX  # 16640
    assert f.total == 2 * (proj + scores + ROUTERS + FFN1) + HEAD == 124416
    soft = SMOKE.replace(attn_experts=4, ffn_experts=4)
    assert f.total == flops_per_token(soft, 64).total == flops_per_token(soft, 64, implementation=True).total
    rows = describe(top1, seq_len=64)
    assert (rows["flops_per_token_forward"], rows["flops_per_token_forward_implementation"]) == (74880, 124416)
    # active parameters stay each token's own expert (Q, K, V, O), as before
    assert count_params(top1).active == EMB + 2 * (ATTN_EXPERT + FFN_EXPERT + 2 * 4 * 32 + NORM) + NORM


def test_routing_ablation_router_counts_by_hand():
    bam = SMOKE.replace(attn_experts=4, ffn_experts=4)
    base = count_params(bam)
    hashed = count_params(bam.replace(ffn_router=RouterConfig("hash")))
    assert base.total - hashed.total == 2 * 4 * 32  # no FFN router weight in either layer
    assert flops_per_token(bam, 64).routers - flops_per_token(bam.replace(ffn_router=RouterConfig("hash")), 64).routers \
        == 2 * 2 * 4 * 32
    joint = count_params(bam.replace(joint_router=True))
    assert base.total - joint.total == 2 * 4 * 32  # one (E, D) router per layer instead of two
    shared = bam.replace(n_layers=3, router_scope="model")
    per_layer_routers = 2 * 4 * 32
    assert count_params(bam.replace(n_layers=3)).total - count_params(shared).total == 2 * per_layer_routers
    assert flops_per_token(shared, 64).routers == 2 * per_layer_routers  # layer 0's routers only
    ec = count_params(bam.replace(ffn_router=RouterConfig("expert_choice", capacity=1.5)))
    assert ec.active - base.active == 2 * round(0.5 * FFN_EXPERT)  # 1.5 experts per token on average
    assert flops_per_token(bam.replace(ffn_router=RouterConfig("expert_choice", capacity=2.0)), 64).ffn == \
        2 * 2 * 2 * FFN_EXPERT


@pytest.mark.parametrize("cfg", [
    SMOKE.replace(attn_experts=4, ffn_experts=4, ffn_router=RouterConfig("hash")),
    SMOKE.replace(attn_experts=4, ffn_experts=4, joint_router=True),
    SMOKE.replace(n_layers=3, attn_experts=4, ffn_experts=4, router_scope="model"),
    SMOKE.replace(attn_experts=4, ffn_experts=4, ffn_router=RouterConfig("expert_choice")),
])
def test_routing_ablation_totals_match_the_built_model(cfg):
    assert count_params(cfg).total == sum(p.numel() for p in BAMTransformer(cfg).parameters())
