"""MoE FFN dispatch against a naive per-token reference; aux losses by hand; dispatch selection."""

import math

import pytest
import torch
import torch.nn.functional as F

from bam_pipeline.errors import BamError
from bam_pipeline.model import RouterConfig, preset
from bam_pipeline.model.layers import swiglu
from bam_pipeline.model.moe import MoEFeedForward, grouped_mm_supported
from bam_pipeline.model.routing import Routing, load_balancing_loss

# d_model and d_ff are multiples of 4, so float32 rows are 16-byte aligned as CPU grouped_mm needs.
CFG = preset("smoke", d_model=32, d_ff=48)
E = 4


def _uneven_moe(top_k: int, gate: str, dispatch: str) -> MoEFeedForward:
    """4 experts, uneven load: top-1 counts (44, 15, 5, 0), top-2 counts (61, 38, 29, 0)."""
    torch.manual_seed(0)
    moe = MoEFeedForward(CFG.replace(ffn_experts=E, ffn_router=RouterConfig("topk", top_k, renormalize=gate == "renorm")), dispatch=dispatch)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.3)
        moe.router.weight.normal_(0.0, 0.1)
        # feature 0 of every token is 1 (see _tokens): a per-expert logit offset
        moe.router.weight[:, 0] = torch.tensor([1.0, 0.3, 0.0, -30.0])
    return moe


def _tokens(n: int = 64) -> torch.Tensor:
    x = torch.randn(2, n // 2, CFG.d_model, generator=torch.Generator().manual_seed(1))
    x[..., 0] = 1.0
    return x


def naive_moe(moe: MoEFeedForward, h: torch.Tensor) -> torch.Tensor:
    """Loop over tokens, then over each token's top-k experts."""
    x = h.reshape(-1, h.shape[-1])
    probs = F.softmax(x.float() @ moe.router.weight.float().T, dim=-1)
    rows = []
    for t in range(x.shape[0]):
        top_p, top_e = probs[t].topk(moe.cfg.ffn_router.k)
        if moe.cfg.ffn_router.renormalize:
            top_p = top_p / top_p.sum()
        row = torch.zeros_like(x[t])
        for p, e in zip(top_p, top_e.tolist()):
            row = row + p * swiglu(x[t : t + 1], moe.w1[e], moe.w3[e], moe.w2[e])[0]
        rows.append(row)
    return torch.stack(rows).view_as(h)


def _assert_close(a, b, name=""):
    assert (a - b).abs().max() <= 1e-5 * b.abs().max().clamp_min(1e-6), name


def _grads(moe, fn, h, upstream):
    h = h.clone().requires_grad_(True)
    out = fn(h)
    return out, torch.autograd.grad((out * upstream).sum(), [h, *moe.parameters()])


@pytest.mark.parametrize("dispatch", ["grouped", "loop"])
@pytest.mark.parametrize("gate", ["softmax", "renorm"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_dispatch_matches_naive_reference(dispatch, gate, top_k):
    if dispatch == "grouped" and not grouped_mm_supported(_tokens(), torch.zeros(E, CFG.d_model, CFG.d_ff)):
        pytest.skip("grouped_mm does not support float32 on this torch/CPU")
    moe = _uneven_moe(top_k, gate, dispatch)
    h = _tokens()
    res = moe(h)
    counts = res.counts.tolist()
    assert counts[3] == 0 and min(counts[:3]) > 0 and counts[0] >= 2 * counts[2] and sum(counts) == 64 * top_k
    upstream = torch.randn_like(h)
    out, g = _grads(moe, lambda x: moe(x).out, h, upstream)
    ref, g_ref = _grads(moe, lambda x: naive_moe(moe, x), h, upstream)
    _assert_close(out, ref)
    names = ["input"] + [n for n, _ in moe.named_parameters()]
    router_grad = g[names.index("router.weight")]
    if top_k == 1 and gate == "renorm":
        # the renormalised top-1 gate p / p is 1: the router's LM gradient is rounding noise only
        assert router_grad.abs().max() < 1e-4
        names, g, g_ref = names[:-1], g[:-1], g_ref[:-1]
        assert names[-1] == "w2"
    else:
        assert router_grad.abs().max() > 1e-2
    for name, a, b in zip(names, g, g_ref, strict=True):
        _assert_close(a, b, name)
    # the idle expert gets exactly zero gradient; the used ones do not
    w1_grad = g[names.index("w1")]
    assert w1_grad[3].abs().max() == 0 and w1_grad[0].abs().max() > 0


def test_grouped_support_check_and_cpu_fallbacks():
    assert grouped_mm_supported(torch.zeros(8, 32), torch.zeros(4, 32, 48)) == hasattr(F, "grouped_mm")
    assert not grouped_mm_supported(torch.zeros(8, 30), torch.zeros(4, 30, 48))  # 120-byte rows
    assert not grouped_mm_supported(torch.zeros(8, 32, dtype=torch.float64), torch.zeros(4, 32, 48))
    # misaligned widths: auto runs (the loop path, the CPU default) and matches the reference;
    # forcing grouped is a user error naming the widths
    odd = preset("smoke", d_model=30, n_heads=3, n_kv_heads=3, d_ff=50).replace(ffn_experts=3)
    torch.manual_seed(0)
    moe = MoEFeedForward(odd)
    h = torch.randn(2, 5, 30)
    _assert_close(moe(h).out, naive_moe(moe, h))
    with pytest.raises(BamError, match="d_model=30, d_ff=50"):
        MoEFeedForward(odd, dispatch="grouped")(h)


def test_support_check_uses_the_compute_dtype():
    x, w = torch.zeros(8, 36), torch.zeros(4, 36, 48)  # 144-byte float32 rows, 72-byte bfloat16 rows
    assert grouped_mm_supported(x, w) == hasattr(F, "grouped_mm")
    assert not grouped_mm_supported(x, w, dtype=torch.bfloat16)


@pytest.mark.parametrize("top_k", [1, 2])
def test_grouped_dispatch_runs_in_the_autocast_dtype(top_k):
    """bf16-mixed training feeds the MoE a float32 input while matmuls run in bfloat16: the grouped
    path must compute in bfloat16 too (the condition for grouped_mm on CUDA), like the loop path."""
    h = _tokens()
    if not grouped_mm_supported(h, torch.zeros(E, CFG.d_model, CFG.d_ff), dtype=torch.bfloat16):
        pytest.skip("grouped_mm does not support bfloat16 on this torch/CPU")
    out = {}
    for dispatch in ("grouped", "loop"):
        moe = _uneven_moe(top_k, "softmax", dispatch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out[dispatch] = moe(h).out
    assert out["grouped"].dtype == out["loop"].dtype == torch.bfloat16
    ref = naive_moe(_uneven_moe(top_k, "softmax", "loop"), h)
    for dispatch, y in out.items():
        assert (y.float() - ref).abs().max() <= 2e-2 * ref.abs().max(), dispatch  # bfloat16 rounding


def test_unknown_dispatch_is_a_user_error():
    with pytest.raises(BamError, match="'fast'"):
        MoEFeedForward(CFG, dispatch="fast")


def test_single_expert_is_plain_swiglu_without_router():
    moe = MoEFeedForward(CFG)
    assert moe.router is None and sorted(moe.state_dict()) == ["w1", "w2", "w3"]
    h = torch.randn(2, 3, CFG.d_model)
    res = moe(h)
    assert res.routing is None and res.counts is None and res.lb_loss.item() == 0 and res.z_loss.item() == 0
    assert torch.allclose(res.out, swiglu(h.reshape(6, -1), moe.w1[0], moe.w3[0], moe.w2[0]).view_as(h))


def _hand_router_moe(top_k: int) -> tuple[MoEFeedForward, torch.Tensor]:
    """2 experts; tokens e0, e1, e0, e0 get logits (ln 3, 0), (0, ln 3), (ln 3, 0), (ln 3, 0)."""
    cfg = preset("smoke", d_model=4, n_heads=2, n_kv_heads=2, d_ff=8).replace(ffn_experts=2,
                                                                        ffn_router=RouterConfig("topk", top_k))
    moe = MoEFeedForward(cfg)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = math.log(3.0)
        moe.router.weight[1, 1] = math.log(3.0)
    eye = torch.eye(4)
    return moe, torch.stack([eye[0], eye[1], eye[0], eye[0]])[None]  # (1, 4, 4)


def test_lb_and_z_loss_match_hand_values():
    # probs per token: (.75, .25) x3 and (.25, .75); top-1 counts (3, 1) -> f = (.75, .25);
    # P = (.625, .375); lb = 2 * (.75 * .625 + .25 * .375) = 1.125; every logsumexp = ln 4.
    moe, h = _hand_router_moe(top_k=1)
    res = moe(h)
    assert res.counts.tolist() == [3, 1]
    assert res.lb_loss.item() == pytest.approx(1.125)
    assert res.z_loss.item() == pytest.approx(math.log(4.0) ** 2)
    # top-2: f is the fraction of the 8 assignments, (.5, .5) -> lb = 2 * (.5 * .625 + .5 * .375) = 1
    moe2, h2 = _hand_router_moe(top_k=2)
    res2 = moe2(h2)
    assert res2.counts.tolist() == [4, 4] and res2.lb_loss.item() == pytest.approx(1.0)


def test_lb_loss_gradient_flows_through_mean_probs_only():
    probs = torch.tensor([[0.75, 0.25], [0.25, 0.75]], requires_grad=True)
    load_balancing_loss(probs, torch.tensor([3, 1])).backward()
    # d/dP_ij of E * sum_i f_i * mean_n P_ni = E * f_j / N = 2 * f_j / 2
    assert probs.grad.tolist() == [[0.75, 0.25], [0.75, 0.25]]


def test_bfloat16_forward_keeps_router_in_float32():
    moe = _uneven_moe(2, "softmax", "auto").to(torch.bfloat16)
    res = moe(_tokens().to(torch.bfloat16))
    assert res.out.dtype == torch.bfloat16 and res.routing.probs.dtype == torch.float32
    assert torch.isfinite(res.out.float()).all()


def test_counts_are_each_experts_assignments_as_int64_an_unchosen_expert_zero():
    """Counted without bincount (whose output size depends on the values: a host read on CUDA, a graph break under
    torch.compile), to the same integers."""
    experts = torch.tensor([[0, 2], [2, 0], [2, 1], [0, 2]])  # (N=4, k=2); expert 3 never chosen
    routing = Routing(torch.zeros(4, 4), torch.full((4, 4), 0.25), torch.full((4, 2), 0.25), experts)
    counts = routing.counts()
    assert counts.dtype == torch.int64 and counts.tolist() == [3, 1, 4, 0]
    assert torch.equal(counts, torch.bincount(experts.reshape(-1), minlength=4))


def test_run_eager_works_on_a_torch_whose_disable_takes_no_reason(monkeypatch):
    """The package supports torch 2.5, whose torch.compiler.disable has no ``reason``: the decorator falls back."""
    from bam_pipeline.model import layers

    seen = []

    def old_disable(fn=None, recursive=True):  # torch 2.5's signature
        seen.append(recursive)
        return lambda f: f

    monkeypatch.setattr(torch.compiler, "disable", old_disable)
    assert layers.run_eager("why")(abs) is abs and seen == [True]
