"""The routing ablations at the model level: hash routing, expert choice (capacity, causal eval,
thresholds), one routing for the whole model, a joint attention/FFN router, top-2 renormalised gates,
and the load-balancing loss of top-k attention routers."""

from __future__ import annotations

import pytest
import torch

from bam_pipeline.errors import BamError, ConfigError
from bam_pipeline.model.config import RouterConfig, preset
from bam_pipeline.model.moe import MoEFeedForward, grouped_mm_supported
from bam_pipeline.model.routing import Router, capacity_tokens, route
from bam_pipeline.model.transformer import BAMTransformer

SMOKE = preset("smoke")  # V=256, D=32, L=2, H=4, KV=2, F=64
E = 4
HASH = RouterConfig("hash")
EC = RouterConfig("expert_choice", capacity=1.0)


def model(cfg, seed=0):
    torch.manual_seed(seed)
    return BAMTransformer(cfg.replace(init_std=0.1))


def ids(shape, seed=0, high=256):
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


# ---- hash routing ---------------------------------------------------------------------------
def test_hash_assignment_is_a_function_of_the_token_id_alone():
    cfg = SMOKE.replace(attn_experts=E, ffn_experts=E, ffn_router=HASH)
    m = model(cfg).eval()
    table = torch.randint(0, E, (256,), generator=torch.Generator().manual_seed(5))
    for block in m.layers:
        block.ffn.router.table.copy_(table)
    a, b = ids((3, 24), 1), ids((3, 24), 2)
    b[:, 5], b[0, 11] = a[:, 5], a[0, 11]  # the same ids in different contexts and positions
    b[1, 20] = a[2, 3]
    with torch.no_grad():
        ra, rb = m(a).routing, m(b).routing
    for layer_a, layer_b in zip(ra, rb):
        ea, eb = layer_a.ffn.experts.view(3, 24), layer_b.ffn.experts.view(3, 24)
        assert torch.equal(ea, table[a]) and torch.equal(eb, table[b])  # the table, nothing else
        assert torch.equal(ea[:, 5], eb[:, 5]) and ea[0, 11] == eb[0, 11] and ea[2, 3] == eb[1, 20]
        assert torch.equal(layer_a.ffn.gates, torch.ones_like(layer_a.ffn.gates))  # weight 1, no router


def test_hash_router_has_no_weight_no_aux_loss_and_needs_the_ids():
    cfg = SMOKE.replace(attn_experts=E, ffn_experts=E, ffn_router=HASH)
    m = model(cfg)
    keys = set(m.state_dict())
    assert "layers.0.ffn.router.table" in keys and "layers.0.ffn.router.weight" not in keys
    assert m.state_dict()["layers.0.ffn.router.table"].dtype == torch.int64
    assert "layers.0.ffn.router.table" not in dict(m.named_parameters())  # a buffer: never trained
    out = m(ids((2, 16)))
    assert all(r.lb_loss == 0 and r.z_loss == 0 for r in out.routing)
    with pytest.raises(BamError, match="token ids"):
        m.layers[0].ffn(torch.randn(2, 16, 32))


def test_hash_is_ffn_only():
    with pytest.raises(ConfigError, match="attn_router.kind"):
        SMOKE.replace(attn_experts=E, attn_router=HASH)
    with pytest.raises(ConfigError, match="k=2"):
        RouterConfig("hash", k=2)


# ---- expert choice --------------------------------------------------------------------------
@pytest.mark.parametrize("capacity,n_tokens", [(1.0, 64), (2.0, 64), (0.5, 50), (1.25, 37)])
def test_expert_choice_takes_exactly_capacity_tokens_per_expert_in_training(capacity, n_tokens):
    cfg = SMOKE.replace(ffn_experts=E, ffn_router=RouterConfig("expert_choice", capacity=capacity))
    moe = MoEFeedForward(cfg).train()
    h = torch.randn(1, n_tokens, 32)
    out = moe(h)
    c = capacity_tokens(n_tokens, E, capacity)
    assert c == min(n_tokens, max(1, int(capacity * n_tokens // E)))
    assert out.counts.tolist() == [c] * E
    # each expert holds its c most probable tokens, gated by that probability
    probs, chosen = out.routing.probs, out.routing.chosen
    for e in range(E):
        assert torch.equal(chosen[:, e], torch.zeros_like(chosen[:, e]).index_fill(0, probs[:, e].topk(c).indices, True))
    torch.testing.assert_close(out.routing.gates, probs * chosen)
    assert out.lb_loss == 0 and out.z_loss > 0  # balanced by construction; the z-loss stays


def test_expert_choice_output_is_the_gated_sum_of_its_chosen_experts():
    cfg = SMOKE.replace(ffn_experts=E, ffn_router=EC)
    moe = MoEFeedForward(cfg).train()
    h = torch.randn(2, 8, 32)
    out = moe(h)
    x = h.reshape(-1, 32)
    want = torch.zeros_like(x)
    for e in range(E):
        y = (torch.nn.functional.silu(x @ moe.w1[e]) * (x @ moe.w3[e])) @ moe.w2[e]
        want += out.routing.gates[:, e : e + 1] * y
    torch.testing.assert_close(out.out.reshape(-1, 32), want, atol=1e-6, rtol=1e-5)


def test_expert_choice_eval_is_causal_and_training_is_not():
    cfg = SMOKE.replace(attn_experts=E, ffn_experts=E, ffn_router=EC)
    m = model(cfg)
    m.train()
    with torch.no_grad():
        for s in range(4):  # estimate the thresholds
            m(ids((4, 32), 10 + s))
    a = ids((2, 32), 3)
    b = a.clone()
    b[:, 20:] = ids((2, 12), 4)  # change every token from position 20 on
    m.eval()
    with torch.no_grad():
        oa, ob = m(a), m(b)
    for ra, rb in zip(oa.routing, ob.routing):  # every earlier routing decision is the same
        assert torch.equal(ra.ffn.chosen.view(2, 32, E)[:, :20], rb.ffn.chosen.view(2, 32, E)[:, :20])
    # earlier outputs equal (up to float summation order: experts run on different row counts)
    torch.testing.assert_close(oa.logits[:, :20], ob.logits[:, :20], atol=1e-5, rtol=0)
    assert not torch.allclose(oa.logits[:, 20:], ob.logits[:, 20:], atol=1e-2)
    m.train()  # batch-wide top-c: later tokens change which earlier tokens an expert takes
    with torch.no_grad():
        ca, cb = m(a).routing[0].ffn.chosen.view(2, 32, E), m(b).routing[0].ffn.chosen.view(2, 32, E)
    assert not torch.equal(ca[:, :20], cb[:, :20])


@pytest.mark.parametrize("capacity", [0.5, 1.0, 2.0])
def test_expert_choice_eval_loads_track_capacity(capacity):
    """Thresholds estimated in training give each expert about its capacity at eval, on new tokens
    from the same distribution; the untrained fallback (1/E) does not."""
    torch.manual_seed(0)
    cfg = SMOKE.replace(ffn_experts=E, ffn_router=RouterConfig("expert_choice", capacity=capacity))
    moe = MoEFeedForward(cfg)
    torch.nn.init.normal_(moe.router.weight, std=0.5)  # a router with preferences
    n = 512
    c = capacity_tokens(n, E, capacity)
    moe.eval()
    with torch.no_grad():
        untrained = moe(torch.randn(1, n, 32)).counts.float()
    moe.train()
    with torch.no_grad():
        for _ in range(60):
            moe(torch.randn(1, n, 32))
    assert torch.isfinite(moe.router.threshold).all()
    moe.eval()
    with torch.no_grad():
        loads = torch.stack([moe(torch.randn(1, n, 32)).counts.float() for _ in range(10)]).mean(0)
    assert ((loads - c).abs() <= 0.1 * c).all(), (loads, c)
    assert ((untrained - c).abs() > 0.1 * c).any(), (untrained, c)  # the estimate is what makes it track


def test_expert_choice_thresholds_are_an_ema_of_the_capacity_th_score():
    cfg = SMOKE.replace(ffn_experts=E, ffn_router=RouterConfig("expert_choice", capacity=1.0, threshold_momentum=0.5))
    router = Router(32, E, cfg.ffn_router).train()
    torch.nn.init.normal_(router.weight)
    assert torch.isnan(router.threshold).all()  # not estimated yet
    h1, h2 = torch.randn(40, 32), torch.randn(40, 32)
    r1 = router(h1)
    kth1 = torch.softmax(h1 @ router.weight.t(), -1).topk(10, dim=0).values[-1]  # c = 40 / 4
    torch.testing.assert_close(router.threshold, kth1)
    router(h2)
    kth2 = torch.softmax(h2 @ router.weight.t(), -1).topk(10, dim=0).values[-1]
    torch.testing.assert_close(router.threshold, 0.5 * kth1 + 0.5 * kth2)
    assert r1.chosen.sum(0).tolist() == [10] * E
    router.eval()
    before = router.threshold.clone()
    out = router(h1)
    assert torch.equal(router.threshold, before)  # eval never moves them
    assert torch.equal(out.chosen, torch.softmax(h1 @ router.weight.t(), -1) >= before)


def test_expert_choice_thresholds_move_once_per_step_under_activation_checkpointing():
    """Checkpointing recomputes a block's forward in backward; the thresholds must not move again."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    from bam_pipeline.model.transformer import Block

    cfg = SMOKE.replace(ffn_experts=E, ffn_router=RouterConfig("expert_choice", capacity=1.0, threshold_momentum=0.5))
    batches = torch.randint(0, cfg.vocab_size, (3, 2, 16), generator=torch.Generator().manual_seed(0))
    thresholds = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = BAMTransformer(cfg).train()
        if checkpointed:
            apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Block))
        for idx in batches:  # different batches: a second update per step would move the average
            loss, out = model.loss(idx, idx)
            (loss + out.aux_loss).backward()
        thresholds.append(torch.cat([b.ffn.router.threshold for b in model.layers if b.ffn.router is not None]))
    torch.testing.assert_close(thresholds[1], thresholds[0], rtol=0, atol=0)


def test_expert_choice_eval_with_no_token_routed_gives_zero():
    cfg = SMOKE.replace(ffn_experts=E, ffn_router=EC)
    moe = MoEFeedForward(cfg).eval()
    moe.router.threshold.fill_(2.0)  # no probability reaches it
    out = moe(torch.randn(2, 5, 32))
    assert out.counts.sum() == 0 and torch.equal(out.out, torch.zeros_like(out.out))


def test_expert_choice_settings_are_checked():
    with pytest.raises(ConfigError, match="capacity"):
        RouterConfig("expert_choice", capacity=0)
    with pytest.raises(ConfigError, match="threshold_momentum"):
        RouterConfig("expert_choice", threshold_momentum=1.0)
    with pytest.raises(ConfigError, match="applies to kind=expert_choice only"):
        RouterConfig("topk", capacity=2.0)
    with pytest.raises(ConfigError, match="attn_router.kind"):
        SMOKE.replace(attn_experts=E, attn_router=EC)
    assert RouterConfig("topk").to_dict() == {"kind": "topk", "k": 1, "renormalize": False}  # serialised as before
    assert RouterConfig("expert_choice", capacity=2.0).to_dict()["capacity"] == 2.0


# ---- one routing for the whole model ----------------------------------------------------------
def test_shared_layers_route_once_for_the_whole_model():
    cfg = SMOKE.replace(n_layers=3, attn_experts=E, ffn_experts=E, router_scope="model")
    m = model(cfg)
    routers = sorted(k for k in m.state_dict() if "router" in k)
    assert routers == ["layers.0.attn.router.weight", "layers.0.ffn.router.weight"]  # one tensor per kind
    out = m(ids((2, 16)))
    first = out.routing[0]
    for r in out.routing[1:]:  # the same decision, not a tied weight deciding again on other inputs
        assert r.attn is first.attn and r.ffn is first.ffn
        assert r.lb_loss == 0 and r.z_loss == 0
    want = cfg.lb_coef * first.lb_loss + cfg.z_coef * first.z_loss
    torch.testing.assert_close(out.aux_loss, want)
    # every layer's output uses layer 0's gates: zeroing them zeroes every attention output
    captured = []
    hooks = [blk.attn.register_forward_hook(lambda mod, inp, o: captured.append(o.out)) for blk in m.layers]
    with torch.no_grad():
        m.layers[0].attn.router.weight.fill_(0.0)  # uniform soft gates: 1/E for every expert
        m(ids((2, 16)))
        captured_uniform = list(captured)
        captured.clear()
        m.layers[0].attn.router.weight.copy_(torch.randn(E, 32) * 50)  # peaked gates
        m(ids((2, 16)))
    for h in hooks:
        h.remove()
    assert all(not torch.allclose(u, p) for u, p in zip(captured_uniform[1:], captured[1:]))


def test_tied_router_weights_would_decide_differently_per_layer():
    """The ablation is one decision: per-layer routers with equal weights still decide per layer."""
    cfg = SMOKE.replace(n_layers=2, attn_experts=E, ffn_experts=E)
    m = model(cfg)
    with torch.no_grad():
        m.layers[1].ffn.router.weight.copy_(m.layers[0].ffn.router.weight)
        m.layers[1].attn.router.weight.copy_(m.layers[0].attn.router.weight)
    out = m(ids((2, 32)))
    assert not torch.equal(out.routing[0].ffn.probs, out.routing[1].ffn.probs)


# ---- joint router -----------------------------------------------------------------------------
def test_joint_router_is_one_weight_whose_logits_both_kinds_gate():
    cfg = SMOKE.replace(attn_experts=E, ffn_experts=E, joint_router=True)
    m = model(cfg)
    routers = sorted(k for k in m.state_dict() if "router" in k)
    assert routers == ["layers.0.router.weight", "layers.1.router.weight"]
    out = m(ids((2, 16)))
    for block, r in zip(m.layers, out.routing):
        assert torch.equal(r.attn.logits, r.ffn.logits)
        torch.testing.assert_close(r.attn.gates, torch.softmax(r.attn.logits, -1))  # soft attention
        assert r.ffn.experts.shape[-1] == 1  # top-1 FFN over the same logits
        assert torch.equal(r.ffn.experts[:, 0], r.attn.probs.argmax(-1))
    loss, o = m.loss(ids((2, 16))[:, :-1], ids((2, 16))[:, 1:])
    (loss + o.aux_loss).backward()
    assert m.layers[0].router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("changes,match", [
    ({"attn_experts": 4, "ffn_experts": 6, "joint_router": True}, "as many attention as FFN experts"),
    ({"attn_experts": 4, "ffn_experts": 4, "joint_router": True, "ffn_router": HASH}, "none to share"),
    ({"attn_experts": 4, "ffn_experts": 4, "joint_router": True, "parallel_residual": False}, "parallel blocks"),
    ({"router_scope": "global"}, "router_scope"),
])
def test_bad_routing_layouts_are_one_line_config_errors(changes, match):
    with pytest.raises(ConfigError, match=match) as err:
        SMOKE.replace(**changes)
    assert "\n" not in str(err.value)


# ---- BTX top-2 renormalised ---------------------------------------------------------------------
def test_top2_renormalised_gates_sum_to_one():
    logits = torch.randn(100, 4) * 3
    r = route(RouterConfig("topk", k=2, renormalize=True), logits)
    torch.testing.assert_close(r.gates.sum(-1), torch.ones(100))
    assert torch.equal(r.experts, logits.topk(2).indices)
    unnorm = route(RouterConfig("topk", k=2), logits / 3)
    assert (unnorm.gates.sum(-1) < 1 - 1e-3).all()  # the paper's unrenormalised gate does not


# ---- load balancing of top-k attention routers --------------------------------------------------
@pytest.mark.parametrize("k", [1, 2])
def test_topk_attention_routers_get_a_load_balancing_loss(k):
    cfg = SMOKE.replace(attn_experts=E, attn_router=RouterConfig("topk", k), ffn_experts=E, attn_lb_coef=0.01)
    m = model(cfg)
    out = m(ids((2, 16)))
    for r in out.routing:
        counts = torch.bincount(r.attn.experts.reshape(-1), minlength=E)
        want = E * (counts.float() / counts.sum() * r.attn.probs.mean(0)).sum()
        torch.testing.assert_close(r.attn_lb_loss, want)
        assert r.attn_lb_loss > 0
    ffn_only = sum(cfg.lb_coef * r.lb_loss + cfg.z_coef * r.z_loss for r in out.routing)
    torch.testing.assert_close(out.aux_loss - ffn_only, sum(0.01 * r.attn_lb_loss for r in out.routing))
    grad, = torch.autograd.grad(sum(r.attn_lb_loss for r in out.routing), m.layers[0].attn.router.weight)
    assert grad.abs().sum() > 0


def test_soft_attention_has_no_load_balancing_loss():
    cfg = SMOKE.replace(attn_experts=E, ffn_experts=E, attn_lb_coef=0.01)
    out = model(cfg)(ids((2, 16)))
    assert all(r.attn_lb_loss is None for r in out.routing)
    ffn_only = sum(cfg.lb_coef * r.lb_loss + cfg.z_coef * r.z_loss for r in out.routing)
    torch.testing.assert_close(out.aux_loss, ffn_only)


def test_routing_options_serialise_only_when_used():
    plain = SMOKE.replace(attn_experts=E, ffn_experts=E)
    assert not {"router_scope", "joint_router", "attn_lb_coef"} & set(plain.to_dict())
    used = plain.replace(router_scope="model", joint_router=True, attn_lb_coef=0.5,
                         ffn_router=RouterConfig("topk", 2, renormalize=True))
    d = used.to_dict()
    assert (d["router_scope"], d["joint_router"], d["attn_lb_coef"]) == ("model", True, 0.5)
    assert type(used).from_dict(d) == used
    ec = plain.replace(ffn_router=RouterConfig("expert_choice", capacity=2.0))
    assert type(ec).from_dict(ec.to_dict()) == ec


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_expert_choice_dispatch_is_the_same_grouped_or_looped(mode):
    """The masked dispatch through grouped_mm (the CUDA path; float32 on CPU here) equals the loop,
    forward and backward, including experts that get no token at eval."""
    cfg = SMOKE.replace(ffn_experts=E, ffn_router=RouterConfig("expert_choice", capacity=0.5))
    x = torch.randn(2, 12, 32)
    if not grouped_mm_supported(x, torch.zeros(E, 32, 64)):
        pytest.skip("grouped_mm does not support float32 on this torch/CPU")
    outs, grads = [], []
    for dispatch in ("loop", "grouped"):
        torch.manual_seed(0)
        moe = MoEFeedForward(cfg, dispatch=dispatch)
        moe.router.threshold.copy_(torch.tensor([0.2, 0.3, 2.0, 0.25]))  # expert 2 gets nothing at eval
        moe.train(mode == "train")
        h = x.clone().requires_grad_(True)
        out = moe(h)
        out.out.square().sum().backward()
        outs.append(out.out.detach())
        grads.append((h.grad, moe.w1.grad, moe.router.weight.grad))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
