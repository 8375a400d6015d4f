"""Upcycling: function preservation, copied/averaged tensors, routers, refusals, loadable variants."""

from __future__ import annotations

import pytest
import torch

from bam_pipeline.config.files import group_options, load_option
from bam_pipeline.config.reading import plain, read_section
from bam_pipeline.errors import BamError, ConfigError
from bam_pipeline.mixing.hidden import hidden_means
from bam_pipeline.mixing.upcycle import upcycle
from bam_pipeline.mixing.variant import MixVariant
from bam_pipeline.model.config import preset
from bam_pipeline.model.state_dict import expected_shapes
from bam_pipeline.model.transformer import BAMTransformer

CFG = preset("smoke")  # V=256, D=32, L=2, H=4, KV=2, F=64, untied
DOMAINS = ("code", "law", "math")
N_DOMAINS = len(DOMAINS)
RENORM_TOP1 = {"kind": "topk", "k": 1, "renormalize": True}


def variant(name: str, **changes) -> MixVariant:
    """The shipped variant ``name`` (conf/mix/<name>.yaml over the base), with ``changes``."""
    return read_section(MixVariant, {**plain(load_option("mix", name)), **changes}, "mix", name=name)


def mix(name_or_variant, seed, experts, cfg=CFG, **changes):
    """Upcycle ``seed`` and the domain ``experts`` (one per domain, in DOMAINS order) with a variant;
    a variant that reads data gets token frequencies and the seed's hidden means on random tokens."""
    v = name_or_variant if isinstance(name_or_variant, MixVariant) else variant(name_or_variant, **changes)
    domains = DOMAINS[: len(experts)]
    data = {}
    if v.reads_data:
        g = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, cfg.vocab_size, (2, 16), generator=g) for _ in v.hidden_sources(domains, "g")]
        data = {"token_frequencies": torch.rand(cfg.vocab_size, generator=g),
                "hidden": {o: hidden_means(cfg, seed, [b]) for o, b in zip(v.hidden_sources(domains, "g"), batches)}}
    return upcycle(v, {"seed": seed, **dict(zip(domains, experts))}, cfg, domains, **data)


def random_dense(cfg, seed):
    """A dense state dict with the model layout, every tensor distinct (no model needed)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) for k, shape in expected_shapes(cfg).items()}


@pytest.fixture(scope="module")
def distinct():
    """seed + 3 domain experts with different weights."""
    return random_dense(CFG, 100), [random_dense(CFG, 101 + i) for i in range(N_DOMAINS)]


@pytest.fixture(scope="module")
def dense_model():
    torch.manual_seed(0)
    return BAMTransformer(CFG.replace(init_std=0.1)).eval()


def logits(cfg, state, idx):
    model = BAMTransformer(cfg).eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        return model(idx).logits


PRESERVING = ["bam", "bam_kv_shared", "btx", "btx_matched", "sparse_upcycle", "dense"]


@pytest.mark.parametrize("variant", PRESERVING)
def test_identical_experts_preserve_the_dense_function(variant, dense_model):
    sd = {k: v.clone() for k, v in dense_model.state_dict().items()}
    idx = torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = dense_model(idx).logits
    assert want.std() > 0.1  # the logits are far from zero: 1e-5 agreement is a real check
    changes = {} if variant == "dense" else {"ffn_router": {**plain(load_option("mix", variant)).get("ffn_router"),
                                                            "renormalize": True}}
    mix_cfg, state = mix(variant, sd, [sd, sd, sd], CFG.replace(init_std=0.1), **changes)
    assert not mix_cfg.is_dense or variant == "dense"
    torch.testing.assert_close(logits(mix_cfg, state, idx), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["bam", "bam_kv_shared"])
def test_identical_experts_with_qkv_biases_preserve_the_dense_function(variant):
    cfg = CFG.replace(qkv_bias=True, init_std=0.1)
    sd = random_dense(cfg, 7)
    sd = {k: v * 0.1 if "norm" not in k else 1 + 0.1 * v for k, v in sd.items()}
    idx = torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    want = logits(cfg, sd, idx)
    ffn_router = {**plain(load_option("mix", variant))["ffn_router"], "renormalize": True}
    mix_cfg, state = mix(variant, sd, [sd, sd, sd], cfg, ffn_router=ffn_router)
    assert state["layers.0.attn.bq"].shape == (4, 32)
    assert state["layers.0.attn.bk"].shape == ((4, 16) if variant == "bam" else (1, 16))
    torch.testing.assert_close(logits(mix_cfg, state, idx), want, atol=1e-5, rtol=0)


def test_qkv_biases_are_stacked_like_their_weights_and_averaged_when_kv_is_shared():
    cfg = CFG.replace(qkv_bias=True)
    seed, experts = random_dense(cfg, 200), [random_dense(cfg, 201 + i) for i in range(N_DOMAINS)]
    models = [seed, *experts]
    _, expert_kv = mix("bam", seed, experts, cfg)
    _, shared = mix("bam_kv_shared", seed, experts, cfg)
    for i, m in enumerate(models):
        for name in ("bq", "bk", "bv"):
            assert torch.equal(expert_kv[f"layers.1.attn.{name}"][i], m[f"layers.1.attn.{name}"][0])
        assert torch.equal(shared["layers.1.attn.bq"][i], m["layers.1.attn.bq"][0])
    for name in ("bk", "bv"):
        key = f"layers.1.attn.{name}"
        torch.testing.assert_close(shared[key], sum(m[key] for m in models) / 4, atol=1e-6, rtol=0)
    _, btx = mix("btx", seed, experts, cfg)
    torch.testing.assert_close(btx["layers.0.attn.bq"], sum(m["layers.0.attn.bq"] for m in models) / 4,
                               atol=1e-6, rtol=0)


def test_full_softmax_top1_gate_does_not_preserve(dense_model):
    """BAM's gate p_i < 1 scales the FFN output: why preservation needs ffn_gate='renorm'."""
    sd = dense_model.state_dict()
    idx = torch.arange(16).unsqueeze(0)
    with torch.no_grad():
        want = dense_model(idx).logits
    mix_cfg, state = mix("bam", sd, [sd, sd, sd], dense_model.cfg)
    assert (logits(mix_cfg, state, idx) - want).abs().max() > 1e-3


def test_bam_copies_experts_and_averages_the_rest(distinct):
    seed, experts = distinct
    models = [seed, *experts]
    mix_cfg, mixed = mix("bam", seed, experts)
    assert (mix_cfg.attn_experts, mix_cfg.ffn_experts, mix_cfg.kv_experts) == (4, 4, 4)
    for layer in range(CFG.n_layers):
        for name in ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "ffn.w1", "ffn.w2", "ffn.w3"):
            key = f"layers.{layer}.{name}"
            for i, m in enumerate(models):
                assert torch.equal(mixed[key][i], m[key][0]), (key, i)
    for key in ("tok_emb.weight", "lm_head.weight", "norm.weight", "layers.1.norm.weight"):
        mean = (seed[key] + experts[0][key] + experts[1][key] + experts[2][key]) / 4
        torch.testing.assert_close(mixed[key], mean, atol=1e-6, rtol=0)
    assert set(mixed) == set(expected_shapes(mix_cfg))


def test_bam_shared_kv_averages_k_and_v(distinct):
    seed, experts = distinct
    mix_cfg, mixed = mix("bam_kv_shared", seed, experts)
    assert mix_cfg.kv_experts == 1 and mix_cfg.attn_kv == "shared"
    for key in ("layers.0.attn.wk", "layers.1.attn.wv"):
        mean = (seed[key] + sum(e[key] for e in experts)) / 4
        assert mixed[key].shape == seed[key].shape
        torch.testing.assert_close(mixed[key], mean, atol=1e-6, rtol=0)
    assert torch.equal(mixed["layers.0.attn.wq"][2], experts[1]["layers.0.attn.wq"][0])


def test_without_seed_only_domain_experts_are_mixed(distinct):
    seed, experts = distinct
    mix_cfg, mixed = mix("bam", seed, experts, include_seed=False)
    assert mix_cfg.ffn_experts == 3
    assert torch.equal(mixed["layers.0.ffn.w2"][0], experts[0]["layers.0.ffn.w2"][0])
    torch.testing.assert_close(mixed["norm.weight"], sum(e["norm.weight"] for e in experts) / 3, atol=1e-6, rtol=0)


def test_btx_averages_attention_and_copies_ffn(distinct):
    seed, experts = distinct
    mix_cfg, mixed = mix("btx", seed, experts)
    assert (mix_cfg.attn_experts, mix_cfg.ffn_experts, mix_cfg.ffn_router.k) == (1, 4, 1)
    assert "layers.0.attn.router.weight" not in mixed
    key = "layers.1.attn.wo"
    torch.testing.assert_close(mixed[key], (seed[key] + sum(e[key] for e in experts)) / 4, atol=1e-6, rtol=0)
    assert torch.equal(mixed["layers.1.ffn.w3"][3], experts[2]["layers.1.ffn.w3"][0])


def test_btx_matched_has_six_experts_top3_three_from_domains(distinct):
    seed, experts = distinct
    mix_cfg, mixed = mix("btx_matched", seed, experts)
    assert (mix_cfg.ffn_experts, mix_cfg.ffn_router.k, mix_cfg.attn_experts) == (6, 3, 1)
    w1 = mixed["layers.0.ffn.w1"]  # (6, D, F)
    from_domains = [i for i in range(6) if any(torch.equal(w1[i], e["layers.0.ffn.w1"][0]) for e in experts)]
    from_seed = [i for i in range(6) if torch.equal(w1[i], seed["layers.0.ffn.w1"][0])]
    assert from_domains == [1, 2, 3] and from_seed == [0, 4, 5]


def test_sparse_upcycle_copies_the_seed_only(distinct):
    seed, experts = distinct
    mix_cfg, mixed = mix("sparse_upcycle", seed, experts)
    assert (mix_cfg.attn_experts, mix_cfg.ffn_experts) == (1, 4)
    for i in range(4):
        assert torch.equal(mixed["layers.1.ffn.w2"][i], seed["layers.1.ffn.w2"][0])
    assert torch.equal(mixed["layers.0.attn.wq"], seed["layers.0.attn.wq"])
    assert torch.equal(mixed["tok_emb.weight"], seed["tok_emb.weight"])
    # the domain experts set only the count: sparse upcycling reads the seed alone
    assert variant("sparse_upcycle").models(DOMAINS) == ["seed"]
    assert upcycle(variant("sparse_upcycle"), {"seed": seed}, CFG, DOMAINS)[0] == mix_cfg


def test_dense_is_the_seed_alone(distinct):
    seed, experts = distinct
    cfg, state = mix("dense", seed, experts)
    assert cfg == CFG and set(state) == set(seed)
    assert all(torch.equal(state[k], seed[k]) for k in seed)
    assert variant("dense").models(DOMAINS) == ["seed"] and not variant("dense").uses_branches


def test_routers_are_deterministic_per_generator_seed(distinct):
    seed, experts = distinct
    models, bam = {"seed": seed, **dict(zip(DOMAINS, experts))}, variant("bam")
    _, a = upcycle(bam, models, CFG, DOMAINS, generator_seed=7)
    _, b = upcycle(bam, models, CFG, DOMAINS, generator_seed=7)
    _, c = upcycle(bam, models, CFG, DOMAINS, generator_seed=8)
    routers = [k for k in a if k.endswith("router.weight")]
    assert len(routers) == 2 * CFG.n_layers
    for k in routers:
        assert a[k].shape == (4, CFG.d_model) and a[k].dtype == torch.float32
        assert torch.equal(a[k], b[k]) and not torch.equal(a[k], c[k])
    assert not torch.equal(a["layers.0.attn.router.weight"], a["layers.0.ffn.router.weight"])
    all_normal = torch.cat([a[k].flatten() for k in routers])  # 512 draws of N(0, 0.02)
    assert 0.015 < all_normal.std().item() < 0.025


def test_router_init_options(distinct):
    seed, experts = distinct
    _, zeros = mix("bam", seed, experts, router_init="zeros")
    assert torch.count_nonzero(zeros["layers.0.ffn.router.weight"]) == 0
    _, uni = mix("bam", seed, experts, router_init="uniform", router_std=0.5)
    w = uni["layers.1.attn.router.weight"]
    assert w.abs().max() <= 0.5 and w.abs().max() > 0.4 and w.min() < 0 < w.max()


def test_bf16_models_give_a_bf16_mixture_averaged_in_float32(distinct):
    seed, experts = distinct
    seed16, experts16 = ({k: v.bfloat16() for k, v in m.items()} for m in (seed, experts[0]))
    _, mixed = mix("bam", seed16, [experts16])
    assert {v.dtype for v in mixed.values()} == {torch.bfloat16}
    key = "tok_emb.weight"
    assert torch.equal(mixed[key], ((seed16[key].float() + experts16[key].float()) / 2).bfloat16())


def _expect_refusal(match, seed, experts, cfg=CFG, name="bam", **changes):
    with pytest.raises(BamError, match=match) as err:
        mix(name, seed, experts, cfg, **changes)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_different_d_model_is_refused_naming_tensor_and_shapes(distinct):
    seed, experts = distinct
    wide = random_dense(CFG.replace(d_model=48), 5)
    msg = _expect_refusal("tok_emb.weight", seed, [experts[0], wide])
    assert "(256, 48)" in msg and "(256, 32)" in msg and "law" in msg and "architectures" in msg


def test_different_vocab_is_refused_naming_tensor_and_shapes(distinct):
    seed, experts = distinct
    other_vocab = random_dense(CFG.replace(vocab_size=300), 5)
    msg = _expect_refusal("tok_emb.weight", seed, [other_vocab])
    assert "(300, 32)" in msg and "(256, 32)" in msg and "vocabularies" in msg


def test_other_unmixable_inputs_are_refused(distinct):
    seed, experts = distinct
    missing = {k: v for k, v in experts[0].items() if k != "layers.1.ffn.w2"}
    _expect_refusal("layers.1.ffn.w2", seed, [missing])
    tied = random_dense(CFG.replace(tie_embeddings=True), 5)
    _expect_refusal("lm_head.weight", seed, [tied])
    _, mixture = mix("bam", seed, experts)
    _expect_refusal("not a dense model.*router", seed, [mixture])
    half = {k: v.half() for k, v in experts[0].items()}
    _expect_refusal("float16", seed, [half])
    _expect_refusal("nothing to mix", seed, [], include_seed=False)
    _expect_refusal("dense model", seed, experts, cfg=CFG.replace(ffn_experts=2))
    _expect_refusal(r"ffn_router.k=5: must be at most the number of experts \(4\)", seed, experts,
                    ffn_router={"kind": "topk", "k": 5, "renormalize": False})
    _expect_refusal("at least 2 FFN experts", seed, [])
    _expect_refusal("mix.kv='both': use one of expert, shared", seed, experts, kv="both")
    with pytest.raises(BamError, match="unknown mix 'bam_xl'; known: bam,"):
        variant("bam_xl")


def test_a_missing_dense_model_is_named(distinct):
    seed, experts = distinct
    with pytest.raises(BamError, match=r"needs the dense models \['seed', 'code', 'law'\]; missing \['law'\]"):
        upcycle(variant("bam"), {"seed": seed, "code": experts[0]}, CFG, ("code", "law"))


@pytest.mark.parametrize("name", group_options("mix"))
@pytest.mark.parametrize("tied", [False, True])
def test_every_variant_loads_strictly(name, tied):
    cfg = CFG.replace(tie_embeddings=tied, parallel_residual=not tied)
    seed = random_dense(cfg, 1)
    v = variant(name)
    if v.joint_router and not cfg.parallel_residual:  # one router for two different inputs: refused
        with pytest.raises(ConfigError, match="joint_router=True: needs parallel blocks"):
            mix(v, seed, [random_dense(cfg, 2 + i) for i in range(N_DOMAINS)], cfg)
        return
    mix_cfg, mixed = mix(v, seed, [random_dense(cfg, 2 + i) for i in range(N_DOMAINS)], cfg)
    BAMTransformer(mix_cfg).load_state_dict(mixed, strict=True)
    if mix_cfg.attn_experts > 1:
        assert mix_cfg.attn_router == v.attn_router and mix_cfg.attn_kv == v.kv
    if mix_cfg.ffn_experts > 1:
        assert mix_cfg.ffn_router == v.ffn_router
