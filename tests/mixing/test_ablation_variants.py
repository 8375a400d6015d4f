"""The mixture variants of the routing ablations: their declarations (layout, names, identity,
refusals), the hash tables, hidden-state routers and the BTX expert-count series of paper Table 4."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from bam_pipeline.config.files import load_option
from bam_pipeline.config.reading import plain, read_section
from bam_pipeline.errors import BamError, ConfigError
from bam_pipeline.mixing.hidden import hidden_means
from bam_pipeline.mixing.upcycle import hash_table, hidden_router_weights, upcycle
from bam_pipeline.mixing.variant import MixVariant
from bam_pipeline.model.config import RouterConfig, preset
from bam_pipeline.model.transformer import BAMTransformer

DOMAINS = ("code", "math", "law")
SMOKE = preset("smoke")  # V=256, D=32, L=2


def variant(name: str, **changes) -> MixVariant:
    return read_section(MixVariant, {**plain(load_option("mix", name)), **changes}, "mix", name=name)


def dense_states(cfg=SMOKE, seed=0):
    torch.manual_seed(seed)
    return {n: BAMTransformer(cfg).state_dict() for n in ("seed", *DOMAINS)}


# ---- declarations -----------------------------------------------------------------------------
def test_new_variants_lay_out_what_they_name():
    dense = SMOKE
    assert variant("bam_router_shared_layers").layout(dense, 3).router_scope == "model"
    assert variant("bam_router_joint").layout(dense, 3).joint_router
    assert variant("bam_hash").layout(dense, 3).ffn_router == RouterConfig("hash")
    ec = variant("bam_expert_choice").layout(dense, 3).ffn_router
    assert (ec.kind, ec.capacity) == ("expert_choice", 1.0)
    assert variant("btx_top2").layout(dense, 3).ffn_router == RouterConfig("topk", 2, renormalize=True)
    assert variant("bam_frozen").freeze_experts and variant("bam_frozen").layout(dense, 3) == \
        variant("bam").layout(dense, 3).replace(name="smoke-bam_frozen")
    for n in range(5, 9):  # paper Table 4: 4 mixed FFNs (seed + 3 domains) plus seed copies, top-1
        v = variant(f"btx_e{n}")
        cfg = v.layout(dense, 3)
        assert (cfg.ffn_experts, cfg.ffn_router, cfg.attn_experts) == (n, RouterConfig("topk", 1), 1)
        assert v.expert_origins(DOMAINS)["ffn"] == ["seed", *DOMAINS] + ["seed"] * (n - 4)


def test_display_names_say_what_differs():
    assert variant("bam_frozen").display_name() == "BAM (expert KV, frozen experts)"
    assert variant("bam_router_shared_layers").display_name() == "BAM (expert KV, one routing for all layers)"
    assert variant("bam_router_joint").display_name() == "BAM (expert KV, joint attention/FFN router)"
    assert variant("bam_hash").display_name() == "BAM (expert KV, hash FFN)"
    assert variant("bam_hash", hash_table="random").display_name() == "BAM (expert KV, hash FFN, random hash table)"
    assert variant("bam_expert_choice").display_name() == "BAM (expert KV, expert-choice FFN, capacity 1)"
    assert variant("btx_top2").display_name(compute_matched=True) == "BTX CM (top-2 renormalised FFN)"
    assert variant("btx_e5").display_name() == "BTX (+1 seed FFN copy)"
    assert variant("btx_e8").display_name() == "BTX (+4 seed FFN copies)"
    assert variant("bam_router_hidden").display_name() == "BAM (expert KV, hidden-state routers)"
    assert variant("btx", router_init="hidden").display_name() == "BTX (hidden-state routers)"


OLD_KEYS = {"name", "method", "display", "kv", "attn_router", "ffn_router", "include_seed", "extra_seed_ffn_experts",
            "router_init", "router_std"}


@pytest.mark.parametrize("name", ["bam", "bam_kv_shared", "btx", "btx_matched", "dense", "sparse_upcycle"])
def test_variants_that_use_no_new_option_keep_their_identity(name):
    d = variant(name).to_dict()
    assert set(d) == OLD_KEYS
    assert set(d["attn_router"]) == set(d["ffn_router"]) == {"kind", "k", "renormalize"}


def test_topk_attention_variants_now_name_their_load_balancing():
    """Their training changed (a load-balancing loss), so their identity changes with it."""
    d = variant("bam_attn_top1").to_dict()
    assert set(d) == OLD_KEYS | {"attn_lb_coef"} and d["attn_lb_coef"] == 0.01
    assert variant("bam_attn_top1").layout(SMOKE, 3).attn_lb_coef == 0.01
    assert variant("bam").layout(SMOKE, 3).attn_lb_coef == 0.0  # soft: none, and not serialised
    assert "attn_lb_coef" not in variant("bam").layout(SMOKE, 3).to_dict()


def test_which_variants_read_data():
    assert variant("bam_hash").reads_data and variant("bam_router_hidden").reads_data
    assert not variant("bam_hash", hash_table="random").reads_data
    assert not any(variant(n).reads_data for n in ("bam", "btx", "bam_expert_choice", "bam_frozen", "btx_e6"))
    assert variant("bam").hidden_sources(DOMAINS, "general") == {"seed": "general", **{d: d for d in DOMAINS}}
    assert variant("sparse_upcycle").hidden_sources(DOMAINS, "general") == {"seed": "general"}


@pytest.mark.parametrize("name,changes,key,match", [
    ("bam_router_joint", {"method": "btx"}, "mix.joint_router", "method=btx has no attention experts"),
    ("bam_router_joint", {"ffn_router": {"kind": "hash"}}, "mix.joint_router", "none to share"),
    ("bam", {"attn_router": {"kind": "hash"}}, "mix.attn_router.kind", "routes the FFN only"),
    ("bam", {"attn_router": {"kind": "expert_choice"}}, "mix.attn_router.kind", "routes the FFN only"),
    ("bam", {"hash_table": "random"}, "mix.hash_table", "applies to ffn_router.kind=hash only"),
    ("bam", {"hash_table": "sha1"}, "mix.hash_table", "use one of balanced, random"),
    ("bam", {"router_scope": "global"}, "mix.router_scope", "use one of layer, model"),
    ("dense", {"freeze_experts": True}, "mix.freeze_experts", "no experts to freeze"),
    ("bam", {"router_init_tokens": 0}, "mix.router_init_tokens", "positive"),
    ("bam", {"ffn_router": {"kind": "hash", "k": 2}}, "mix.ffn_router.k", "leave k at 1"),
    ("bam", {"ffn_router": {"kind": "topk", "capacity": 2.0}}, "mix.ffn_router.capacity", "expert_choice only"),
])
def test_bad_ablation_settings_are_one_line_errors_naming_their_key(name, changes, key, match):
    with pytest.raises(ConfigError, match=match) as err:
        variant(name, **changes).layout(SMOKE, 3)
    assert str(err.value).startswith(f"invalid {key}") or key.split(".")[-1] in str(err.value)
    assert "\n" not in str(err.value)


def test_joint_router_with_unequal_expert_counts_is_refused_in_one_line():
    v = variant("bam_router_joint", extra_seed_ffn_experts=1)
    with pytest.raises(ConfigError, match="4 attention and 5 FFN experts") as err:
        v.layout(SMOKE, 3)
    assert "\n" not in str(err.value)


# ---- hash tables ------------------------------------------------------------------------------
def test_balanced_table_assigns_ids_by_frequency_rank_round_robin():
    freq = torch.tensor([5.0, 9.0, 1.0, 9.0, 0.0, 7.0, 3.0, 2.0])
    table = hash_table(8, 3, kind="balanced", frequencies=freq)
    # ranks: id1 (9), id3 (9, tie: lower id first), id5 (7), id0 (5), id6 (3), id7 (2), id2 (1), id4 (0)
    want = {1: 0, 3: 1, 5: 2, 0: 0, 6: 1, 7: 2, 2: 0, 4: 1}
    assert table.tolist() == [want[i] for i in range(8)]
    with pytest.raises(BamError, match="frequency"):
        hash_table(8, 3, kind="balanced")


def test_balanced_table_gives_balanced_counts_on_a_uniform_id_stream():
    V, E = 256, 4
    zipf = 1.0 / torch.arange(1, V + 1).double()
    freq = zipf[torch.randperm(V, generator=torch.Generator().manual_seed(0))]
    cfg, state = upcycle(variant("bam_hash"), dense_states(), SMOKE, DOMAINS, token_frequencies=freq)
    model = BAMTransformer(cfg)
    model.load_state_dict(state, strict=True)
    stream = torch.randperm(V * 8, generator=torch.Generator().manual_seed(1)).remainder(V).view(32, 64)  # each id 8x
    with torch.no_grad():
        out = model(stream)
    for r in out.routing:
        assert r.ffn_counts.tolist() == [V * 8 // E] * E  # exactly balanced
    # and on the training distribution the token loads differ by at most the most frequent token's share
    table = state["layers.0.ffn.router.table"]
    loads = torch.zeros(E, dtype=torch.float64).index_add(0, table, freq / freq.sum())
    assert loads.max() - loads.min() <= (freq / freq.sum()).max() + 1e-12


def test_random_table_is_seeded_and_roughly_uniform():
    a = hash_table(4096, 4, kind="random", generator=torch.Generator().manual_seed(3))
    b = hash_table(4096, 4, kind="random", generator=torch.Generator().manual_seed(3))
    c = hash_table(4096, 4, kind="random", generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    counts = torch.bincount(a, minlength=4)
    assert ((counts - 1024).abs() < 120).all()


def test_hash_table_is_an_int64_buffer_in_every_layer_and_survives_safetensors(tmp_path):
    freq = torch.rand(256, generator=torch.Generator().manual_seed(2))
    cfg, state = upcycle(variant("bam_hash"), dense_states(), SMOKE, DOMAINS, token_frequencies=freq)
    t0, t1 = state["layers.0.ffn.router.table"], state["layers.1.ffn.router.table"]
    assert t0.dtype == torch.int64 and torch.equal(t0, t1) and torch.equal(t0, hash_table(256, 4, kind="balanced",
                                                                                          frequencies=freq))
    assert not any(k.endswith("ffn.router.weight") for k in state)
    save_file(state, str(tmp_path / "m.safetensors"))
    back = load_file(str(tmp_path / "m.safetensors"))
    assert torch.equal(back["layers.0.ffn.router.table"], t0)
    BAMTransformer(cfg).load_state_dict(back, strict=True)


# ---- expert choice ----------------------------------------------------------------------------
def test_expert_choice_mixture_starts_with_unestimated_thresholds():
    cfg, state = upcycle(variant("bam_expert_choice"), dense_states(), SMOKE, DOMAINS)
    assert torch.isnan(state["layers.0.ffn.router.threshold"]).all()
    assert state["layers.0.ffn.router.threshold"].shape == (4,)
    BAMTransformer(cfg).load_state_dict(state, strict=True)


# ---- hidden-state routers -----------------------------------------------------------------------
VOCAB = {"general": (0, 16), "code": (16, 32), "math": (32, 48), "law": (48, 64)}  # disjoint per source


def tokens(source: str, seed: int, n: int = 4) -> torch.Tensor:
    lo, hi = VOCAB[source]
    return torch.randint(lo, hi, (n, 32), generator=torch.Generator().manual_seed(seed))


def manual_means(cfg, state, batch):
    """Mean router input per layer, by running the blocks one at a time (not the hooks under test)."""
    m = BAMTransformer(cfg).eval()
    m.load_state_dict(state)
    attn, ffn = [], []
    with torch.no_grad():
        x = m.tok_emb(batch)
        for block in m.layers:
            h = block.norm(x)
            attn.append(h.reshape(-1, cfg.d_model).mean(0))
            if block.ffn_norm is None:
                ffn.append(attn[-1])
            else:
                ffn.append(block.ffn_norm(x + block.attn(h).out).reshape(-1, cfg.d_model).mean(0))
            x, _ = block(x, batch)
    return torch.stack(attn), torch.stack(ffn)


@pytest.mark.parametrize("parallel", [True, False])
def test_hidden_router_rows_are_the_scaled_mean_hidden_states(parallel):
    cfg = SMOKE.replace(parallel_residual=parallel)
    states = dense_states(cfg)
    v = variant("bam_router_hidden", router_std=0.05)
    sources = v.hidden_sources(DOMAINS, "general")
    hidden = {o: hidden_means(cfg, states["seed"], [tokens(src, 1)]) for o, src in sources.items()}
    mix_cfg, state = upcycle(v, states, cfg, DOMAINS, hidden=hidden)
    order = ["seed", *DOMAINS]
    for layer in range(cfg.n_layers):
        means = {o: manual_means(cfg, states["seed"], tokens(sources[o], 1)) for o in order}
        for kind, which in (("attn", 0), ("ffn", 1)):
            rows = torch.stack([means[o][which][layer] for o in order])
            want = rows * 0.05 / rows.pow(2).mean().sqrt()
            got = state[f"layers.{layer}.{kind}.router.weight"]
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
            assert got.pow(2).mean().sqrt().item() == pytest.approx(0.05, rel=1e-5)  # the init std as RMS
    if not parallel:  # the FFN router reads the FFN norm's output, not the attention's input
        assert not torch.allclose(state["layers.1.attn.router.weight"], state["layers.1.ffn.router.weight"])


@pytest.mark.parametrize("name,parallel", [("bam_router_hidden", True), ("bam_router_hidden", False),
                                           ("btx", True), ("bam_router_joint", True)])
def test_hidden_routers_send_each_domain_to_its_own_expert_at_init(name, parallel):
    """Behaviour: before any training, each source's tokens go (top-1, and by mean probability) to the
    expert copied from that source's model more than to any other expert, at every layer."""
    cfg = SMOKE.replace(parallel_residual=parallel)
    torch.manual_seed(0)
    seed = BAMTransformer(cfg).state_dict()
    # the domain experts are branched from the seed: near it, as continued pretraining leaves them
    states = {"seed": seed, **{d: {k: t + 0.2 * t.std() * torch.randn_like(t) for k, t in seed.items()}
                               for d in DOMAINS}}
    v = variant(name, router_init="hidden")
    sources = v.hidden_sources(DOMAINS, "general")
    hidden = {o: hidden_means(cfg, states["seed"], [tokens(src, 1)]) for o, src in sources.items()}
    mix_cfg, state = upcycle(v, states, cfg, DOMAINS, hidden=hidden)
    model = BAMTransformer(mix_cfg).eval()
    model.load_state_dict(state, strict=True)
    for e, source in enumerate(["general", *DOMAINS]):  # expert e was copied from this source's model
        with torch.no_grad():
            out = model(tokens(source, 2))  # held-out tokens of the source
        for r in out.routing:
            for routing in (r.attn, r.ffn):
                if routing is None:
                    continue
                top1 = torch.bincount(routing.probs.argmax(-1), minlength=4)
                assert top1.argmax() == e and routing.probs.mean(0).argmax() == e, (source, top1)


def test_hidden_router_weights_need_every_origin():
    cfg = variant("bam").layout(SMOKE, 3)
    hidden = {"seed": {"attn": torch.zeros(2, 32), "ffn": torch.zeros(2, 32)}}
    with pytest.raises(BamError, match=r"\['code', 'math', 'law'\]"):
        hidden_router_weights(cfg, variant("bam").expert_origins(DOMAINS), hidden, std=0.02, dtype=torch.float32)
    with pytest.raises(BamError, match="mean hidden states"):
        upcycle(variant("bam_router_hidden"), dense_states(), SMOKE, DOMAINS)


def test_hidden_means_refuse_a_mixture_and_no_tokens():
    with pytest.raises(BamError, match="dense seed"):
        hidden_means(SMOKE.replace(ffn_experts=2), {}, [])
    with pytest.raises(BamError, match="no tokens"):
        hidden_means(SMOKE, dense_states()["seed"], [])
