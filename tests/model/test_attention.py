"""Fused Mixture of Attention against the per-expert loop reference; RoPE and RMSNorm math."""

import math

import pytest
import torch

from bam_pipeline.errors import BamError
from bam_pipeline.model import RouterConfig, preset
from bam_pipeline.model.attention import MixtureOfAttention, mixture_of_attention_loop
from bam_pipeline.model.routing import route
from bam_pipeline.model.layers import (
    RMSNorm,
    RotaryEmbedding,
    apply_rotary,
    apply_rotary_interleaved,
    rotary_tables,
)

# GQA: 4 query heads share 2 K/V heads per expert set; 3 experts.
CFG = preset("smoke", d_model=32, n_heads=4, n_kv_heads=2, max_seq_len=32)
ROUTERS = {"soft": RouterConfig("soft"), "top1": RouterConfig("topk", 1), "top2": RouterConfig("topk", 2)}


def _attention(kv: str, routing: str, experts: int = 3, cfg=CFG) -> MixtureOfAttention:
    torch.manual_seed(0)
    attn = MixtureOfAttention(cfg.replace(attn_experts=experts, attn_kv=kv, attn_router=ROUTERS[routing]))
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0.0, 0.3)  # far from uniform routing, so top-k picks differ between tokens
    return attn


def _run(attn, fn, h):
    h = h.clone().requires_grad_(True)
    out = fn(attn, h)
    upstream = torch.randn_like(out.out)
    params = list(attn.parameters())
    grads = torch.autograd.grad((out.out * upstream).sum(), [h, *params])
    return out, grads


def _assert_close(a, b):
    scale = b.abs().max().clamp_min(1e-6)
    assert (a - b).abs().max() / scale < 1e-5


# q/k/v biases; a head width that is not D / H (3 query heads of 12 over D = 32)
BACKBONES = {
    "plain": CFG,
    "qkv_bias": CFG.replace(qkv_bias=True),
    "head_dim_12_bias": CFG.replace(n_heads=3, n_kv_heads=1, head_dim_override=12, qkv_bias=True),
}


@pytest.mark.parametrize("backbone", list(BACKBONES))
@pytest.mark.parametrize("kv", ["expert", "shared"])
@pytest.mark.parametrize("routing", ["soft", "top1", "top2"])
def test_fused_matches_loop_outputs_and_gradients(kv, routing, backbone):
    attn = _attention(kv, routing, cfg=BACKBONES[backbone])
    h = torch.randn(2, 16, CFG.d_model, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    fused, g_fused = _run(attn, lambda m, x: m(x), h)
    torch.manual_seed(2)
    loop, g_loop = _run(attn, mixture_of_attention_loop, h)
    _assert_close(fused.out, loop.out)
    assert torch.equal(fused.routing.probs, loop.routing.probs)
    names = ["input"] + [n for n, _ in attn.named_parameters()]
    assert "router.weight" in names
    for name, a, b in zip(names, g_fused, g_loop):
        assert b.abs().max() > 0, name
        _assert_close(a, b)


def test_single_expert_is_plain_attention_without_router():
    attn = _attention("expert", "soft", experts=1)
    assert attn.router is None and not any("router" in k for k in attn.state_dict())
    h = torch.randn(2, 8, CFG.d_model)
    out = attn(h)
    assert out.routing is None
    _assert_close(out.out, mixture_of_attention_loop(attn, h).out)


def test_top_k_gates_are_unrenormalised_softmax_probs():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])
    logits = probs.log()

    def gates(router):
        return route(router, logits).dense_gates()

    torch.testing.assert_close(gates(ROUTERS["soft"]), probs)
    torch.testing.assert_close(gates(ROUTERS["top1"]), torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.0, 0.7]]))
    torch.testing.assert_close(gates(ROUTERS["top2"]), torch.tensor([[0.5, 0.3, 0.0], [0.0, 0.2, 0.7]]))
    torch.testing.assert_close(gates(RouterConfig("topk", 2, renormalize=True)),
                               torch.tensor([[0.625, 0.375, 0.0], [0.0, 2 / 9, 7 / 9]]))


def test_attention_is_causal():
    attn = _attention("shared", "soft")
    h = torch.randn(1, 12, CFG.d_model)
    h2 = h.clone()
    h2[:, 7] += 1.0
    a, b = attn(h).out, attn(h2).out
    assert torch.equal(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_rotary_scores_depend_only_on_relative_position():
    hd, theta = 8, 10000.0
    cos, sin = rotary_tables(hd, 16, theta)
    q, k = torch.randn(hd), torch.randn(hd)

    def score(m, n):
        qm = apply_rotary(q.expand(1, 16, 1, hd), cos, sin)[0, m, 0]
        kn = apply_rotary(k.expand(1, 16, 1, hd), cos, sin)[0, n, 0]
        return (qm @ kn).item()

    assert score(5, 2) == pytest.approx(score(13, 10), rel=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-3)
    # position 1, frequency 0 rotates the pair (x[0], x[hd/2]) by exactly 1 radian
    x = torch.zeros(1, 2, 1, hd)
    x[0, 1, 0, 0] = 1.0
    y = apply_rotary(x, cos[:2], sin[:2])[0, 1, 0]
    assert y[0].item() == pytest.approx(math.cos(1.0)) and y[hd // 2].item() == pytest.approx(math.sin(1.0))


def test_interleaved_rotary_is_the_half_split_rotation_permuted():
    """The fused attention's complex-multiply RoPE on interleaved head dims == the reference
    half-split RoPE followed by the same permutation, values and gradients."""
    hd = 8
    cos, sin = rotary_tables(hd, 16, 10000.0)
    x = torch.randn(2, 16, 3, hd, dtype=torch.float64, requires_grad=True)
    to_interleaved = torch.arange(hd).view(2, hd // 2).T.reshape(-1)  # [0, 4, 1, 5, 2, 6, 3, 7]
    assert to_interleaved.tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    ref = apply_rotary(x, cos, sin)[..., to_interleaved]
    got = apply_rotary_interleaved(x[..., to_interleaved], cos, sin)
    assert got.dtype == torch.float64
    assert torch.allclose(got, ref, atol=1e-6)  # the float32 tables bound the agreement
    up = torch.randn_like(ref)
    (g_ref,) = torch.autograd.grad((ref * up).sum(), x)
    (g_got,) = torch.autograd.grad((got * up).sum(), x)
    assert torch.allclose(g_got, g_ref, atol=1e-6)
    # position 0 is the identity, position 1 rotates pair 0 by exactly 1 radian
    assert torch.allclose(got[:, 0], x[:, 0, :, to_interleaved])
    pair = torch.zeros(1, 2, 1, hd)
    pair[0, 1, 0, 0] = 1.0
    y = apply_rotary_interleaved(pair, cos[:2], sin[:2])[0, 1, 0]
    assert y[:2].tolist() == pytest.approx([math.cos(1.0), math.sin(1.0)])


def test_rotary_tables_are_not_in_state_dict_and_length_is_checked():
    rope = RotaryEmbedding(8, 16, 10000.0)
    assert dict(rope.state_dict()) == {} and rope.cos.shape == (16, 8)
    for rotate in (rope, rope.interleaved):
        with pytest.raises(BamError, match="max_seq_len=16"):
            rotate(torch.zeros(1, 17, 1, 8))


def test_rmsnorm_matches_hand_value():
    norm = RMSNorm(2, eps=0.0)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0]))
    out = norm(torch.tensor([[3.0, 4.0]]))  # rms = sqrt(12.5)
    r = math.sqrt(12.5)
    assert out[0].tolist() == pytest.approx([3.0 / r, 8.0 / r])
    assert [n for n, _ in norm.named_parameters()] == ["weight"]
