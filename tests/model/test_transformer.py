"""BAMTransformer: state-dict layout (the upcycling contract), blocks, aux losses, causality, loss."""

import pytest
import torch
import torch.nn.functional as F

from bam_pipeline.errors import BamError
from bam_pipeline.model import BAMTransformer, ModelOutput, RouterConfig, preset

BASE = preset("smoke", n_layers=2, tie_embeddings=False)  # V=256, D=32, H=4, KV=2, hd=8, F=64
LAYOUTS = {
    "dense": BASE,
    "bam_expert_kv": BASE.replace(attn_experts=4, attn_kv="expert", ffn_experts=4),
    "bam_shared_kv": BASE.replace(attn_experts=4, attn_kv="shared", ffn_experts=4),
    "btx": BASE.replace(ffn_experts=4, ffn_router=RouterConfig("topk", 2, renormalize=True)),
}


def expected_layout(cfg) -> dict[str, tuple[int, ...]]:
    """The docs/architecture.md state-dict table, written out for one config."""
    V, D, F_, H, KV, hd = cfg.vocab_size, cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    Ea, Ef = cfg.attn_experts, cfg.ffn_experts
    Ekv = Ea if cfg.attn_kv == "expert" else 1
    keys = {"tok_emb.weight": (V, D), "norm.weight": (D,)}
    if not cfg.tie_embeddings:
        keys["lm_head.weight"] = (V, D)
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        keys[p + "norm.weight"] = (D,)
        if not cfg.parallel_residual:
            keys[p + "ffn_norm.weight"] = (D,)
        if Ea > 1:
            keys[p + "attn.router.weight"] = (Ea, D)
        keys |= {p + "attn.wq": (Ea, D, H * hd), p + "attn.wk": (Ekv, D, KV * hd), p + "attn.wv": (Ekv, D, KV * hd)}
        keys[p + "attn.wo"] = (Ea, H * hd, D)
        if Ef > 1:
            keys[p + "ffn.router.weight"] = (Ef, D)
        keys |= {p + "ffn.w1": (Ef, D, F_), p + "ffn.w3": (Ef, D, F_), p + "ffn.w2": (Ef, F_, D)}
    return keys


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_state_dict_matches_architecture_doc(layout, tied, parallel):
    cfg = LAYOUTS[layout].replace(tie_embeddings=tied, parallel_residual=parallel)
    got = {k: tuple(v.shape) for k, v in BAMTransformer(cfg).state_dict().items()}
    assert got == expected_layout(cfg)
    if layout == "dense":
        assert not any("router" in k for k in got)


def test_tied_embeddings_share_storage():
    tied = BAMTransformer(BASE.replace(tie_embeddings=True))
    assert tied.lm_head is None
    assert tied.output_weight.data_ptr() == tied.tok_emb.weight.data_ptr()
    untied = BAMTransformer(BASE)
    assert untied.output_weight.data_ptr() != untied.tok_emb.weight.data_ptr()


def test_parallel_and_sequential_blocks_follow_their_formulas():
    torch.manual_seed(0)
    seq_cfg = LAYOUTS["bam_expert_kv"].replace(parallel_residual=False)
    par = BAMTransformer(LAYOUTS["bam_expert_kv"]).layers[0]
    seq = BAMTransformer(seq_cfg).layers[0]
    missing, unexpected = seq.load_state_dict(par.state_dict(), strict=False)
    assert missing == ["ffn_norm.weight"] and unexpected == []
    with torch.no_grad():
        seq.ffn_norm.weight.mul_(1.5)  # distinguish the two norms
    x = torch.randn(2, 8, BASE.d_model)
    h = par.norm(x)
    y_par, _ = par(x)
    assert torch.allclose(y_par, x + par.attn(h).out + par.ffn(h).out, atol=1e-6)
    y_seq, _ = seq(x)
    x1 = x + seq.attn(seq.norm(x)).out
    assert torch.allclose(y_seq, x1 + seq.ffn(seq.ffn_norm(x1)).out, atol=1e-6)
    assert not torch.allclose(y_par, y_seq, atol=1e-3)


def test_forward_contract_and_aux_loss_sum():
    torch.manual_seed(0)
    cfg = LAYOUTS["bam_expert_kv"]
    model = BAMTransformer(cfg)
    out = model(torch.randint(0, cfg.vocab_size, (2, 10)))
    assert isinstance(out, ModelOutput) and out.logits.shape == (2, 10, cfg.vocab_size)
    assert len(out.routing) == cfg.n_layers
    for r in out.routing:
        assert r.attn_probs.shape == (20, 4) and r.ffn_probs.shape == (20, 4)
        assert r.attn_probs.dtype == r.ffn_probs.dtype == torch.float32
        assert r.ffn_counts.shape == (4,) and r.ffn_counts.sum().item() == 20
    expected = sum(cfg.lb_coef * r.lb_loss + cfg.z_coef * r.z_loss for r in out.routing)
    assert out.aux_loss.item() == pytest.approx(expected.item()) and out.aux_loss.item() > 0
    dense = BAMTransformer(BASE)(torch.randint(0, 256, (1, 4)))
    assert dense.aux_loss.item() == 0 and all(r.ffn_probs is None and r.attn_probs is None for r in dense.routing)


def test_aux_loss_alone_trains_every_ffn_router_and_adds_no_attention_router_loss():
    torch.manual_seed(0)
    model = BAMTransformer(LAYOUTS["bam_expert_kv"])
    model(torch.randint(0, 256, (2, 16))).aux_loss.backward()
    for i, block in enumerate(model.layers):
        assert block.ffn.router.weight.grad.abs().max() > 0, f"layer {i} ffn router"
    # earlier attention routers feed later FFN routers through the residual; the last one feeds none
    assert model.layers[-1].attn.router.weight.grad is None


@pytest.mark.parametrize("coefs", [(1.0, 0.0), (0.0, 1.0)])
def test_each_aux_term_alone_reaches_every_ffn_router(coefs):
    torch.manual_seed(0)
    model = BAMTransformer(LAYOUTS["btx"].replace(lb_coef=coefs[0], z_coef=coefs[1]))
    model(torch.randint(0, 256, (2, 16))).aux_loss.backward()
    assert all(b.ffn.router.weight.grad.abs().max() > 0 for b in model.layers)


def test_lm_loss_trains_soft_attention_router():
    torch.manual_seed(0)
    model = BAMTransformer(LAYOUTS["bam_shared_kv"])
    idx = torch.randint(0, 256, (2, 16))
    lm_loss, _ = model.loss(idx, idx)
    lm_loss.backward()
    assert all(b.attn.router.weight.grad.abs().max() > 0 for b in model.layers)


def test_loss_is_mean_cross_entropy_ignoring_minus_100():
    torch.manual_seed(0)
    model = BAMTransformer(BASE)
    idx = torch.randint(0, 256, (2, 6))
    targets = torch.randint(0, 256, (2, 6))
    targets[0, :3] = -100
    lm_loss, out = model.loss(idx, targets)
    keep = targets != -100
    manual = -F.log_softmax(out.logits, -1).gather(-1, targets.clamp_min(0)[..., None])[..., 0][keep].mean()
    assert lm_loss.item() == pytest.approx(manual.item(), rel=1e-6)


@pytest.mark.parametrize("layout", ["bam_expert_kv", "bam_shared_kv", "btx"])
def test_changing_a_future_token_leaves_earlier_logits_unchanged(layout):
    torch.manual_seed(0)
    model = BAMTransformer(LAYOUTS[layout])
    idx = torch.randint(0, 256, (2, 12))
    idx2 = idx.clone()
    idx2[:, 8] = (idx[:, 8] + 1) % 256
    a, b = model(idx).logits, model(idx2).logits
    # Not bitwise: the changed token can change an FFN expert's batch size, and a matmul's rounding
    # may depend on its row count (seen: 3e-8 on an AMD EPYC). A leak from the future moves logits
    # by orders of magnitude more.
    assert (a[:, :8] - b[:, :8]).abs().max() < 1e-6
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-3


def test_too_long_input_is_a_user_error():
    model = BAMTransformer(BASE)
    with pytest.raises(BamError, match="max_seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_init_std_is_honoured():
    model = BAMTransformer(preset("tiny").replace(init_std=0.05, vocab_size=512))
    assert model.tok_emb.weight.std().item() == pytest.approx(0.05, rel=0.05)
    assert model.layers[0].ffn.w1.std().item() == pytest.approx(0.05, rel=0.05)
    assert torch.equal(model.layers[0].norm.weight, torch.ones(128))


def test_routers_stay_float32_under_autocast():
    torch.manual_seed(0)
    model = BAMTransformer(LAYOUTS["bam_shared_kv"].replace(ffn_router=RouterConfig("topk", 2)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randint(0, 256, (2, 8)))
    assert out.logits.dtype == torch.bfloat16
    for r in out.routing:
        assert r.attn_probs.dtype == r.ffn_probs.dtype == r.lb_loss.dtype == r.z_loss.dtype == torch.float32
