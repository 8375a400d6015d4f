"""A mixture variant is one declaration: every conf/mix/<name>.yaml reads into a MixVariant named by
its file, and everything else about it (inputs, expert names, layout, display name) is derived."""

import pytest
import torch

from bam_pipeline.config.files import conf_dir, group_options, load_option
from bam_pipeline.config.reading import plain, read_section
from bam_pipeline.errors import ConfigError
from bam_pipeline.mixing.hidden import hidden_means
from bam_pipeline.mixing.upcycle import upcycle
from bam_pipeline.mixing.variant import MixVariant
from bam_pipeline.model.config import RouterConfig, preset
from bam_pipeline.model.transformer import BAMTransformer

DOMAINS = ("code", "math", "law")


def variant(name: str) -> MixVariant:
    return read_section(MixVariant, load_option("mix", name), "mix", name=name)


@pytest.mark.parametrize("name", group_options("mix"))
def test_every_variant_file_is_a_difference_from_the_base(name):
    text = (conf_dir() / "mix" / f"{name}.yaml").read_text()
    assert "defaults: [/mix_base@_here_, _self_]" in text and "variant:" not in text
    settings = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith(("#", "defaults"))]
    assert len(settings) <= 4, settings  # only what differs from conf/mix_base.yaml
    assert variant(name).name == name


@pytest.mark.parametrize("name", group_options("mix"))
def test_layout_without_weights_equals_the_built_mixture(name):
    torch.manual_seed(0)
    dense = preset("smoke")
    states = {n: BAMTransformer(dense).state_dict() for n in ("seed", *DOMAINS)}
    v = variant(name)
    data = {}
    if v.reads_data:  # token frequencies and the seed's mean hidden states (on random tokens here)
        tokens = torch.randint(0, dense.vocab_size, (2, 16))
        data = {"token_frequencies": torch.rand(dense.vocab_size),
                "hidden": {o: hidden_means(dense, states["seed"], [tokens]) for o in v.hidden_sources(DOMAINS, "g")}}
    built_cfg, state = upcycle(v, {n: states[n] for n in v.models(DOMAINS)}, dense, DOMAINS, generator_seed=0,
                               **data)
    assert v.layout(dense, len(DOMAINS)) == built_cfg
    BAMTransformer(built_cfg).load_state_dict(state, strict=True)
    names = v.expert_names(DOMAINS)
    assert len(names.get("attn", [])) == (built_cfg.attn_experts if built_cfg.attn_experts > 1 else 0)
    assert len(names.get("ffn", [])) == (built_cfg.ffn_experts if built_cfg.ffn_experts > 1 else 0)


def test_expert_names_and_inputs_follow_the_method():
    assert variant("bam").expert_names(DOMAINS) == {"attn": ["seed", *DOMAINS], "ffn": ["seed", *DOMAINS]}
    assert variant("btx_matched").expert_names(DOMAINS) == {"ffn": ["seed", *DOMAINS, "seed+1", "seed+2"]}
    assert variant("sparse_upcycle").expert_names(DOMAINS) == {"ffn": ["seed", "seed+1", "seed+2", "seed+3"]}
    assert variant("dense").expert_names(DOMAINS) == {}
    assert variant("bam").models(DOMAINS) == ["seed", *DOMAINS] and variant("bam").uses_branches
    no_seed = read_section(MixVariant, {**plain(load_option("mix", "btx")), "include_seed": False,
                                        "extra_seed_ffn_experts": 1}, "mix", name="x")
    assert no_seed.models(DOMAINS) == [*DOMAINS, "seed"]  # the seed is read for its FFN copy only
    assert no_seed.expert_names(DOMAINS) == {"ffn": [*DOMAINS, "seed"]}


def test_display_names_are_derived_from_the_options():
    assert variant("bam").display_name() == "BAM (expert KV)"
    assert variant("bam").display_name(compute_matched=True) == "BAM CM (expert KV)"
    assert variant("bam_kv_shared_top1").display_name() == "BAM (shared KV, top-1 attention)"
    assert variant("btx").display_name() == "BTX"
    assert variant("btx_matched").display_name(compute_matched=True) == "BTX CM (parameter-matched)"
    assert variant("dense").display_name() == "Dense"


def test_the_shipped_two_line_variant_is_shared_kv_with_top1_attention():
    v = variant("bam_kv_shared_top1")
    cfg = v.layout(preset("smoke"), 3)
    assert (cfg.attn_kv, cfg.attn_router, cfg.attn_active_experts, cfg.kv_experts) == \
        ("shared", RouterConfig("topk", 1), 1, 1)


@pytest.mark.parametrize("bad,key", [
    ({"method": "moe"}, "mix.method"), ({"kv": "both"}, "mix.kv"), ({"router_init": "xavier"}, "mix.router_init"),
    ({"attn_router": {"kind": "hard"}}, "mix.attn_router.kind"), ({"ffn_router": {"k": 0}}, "mix.ffn_router.k"),
    ({"extra_seed_ffn_experts": -1}, "mix.extra_seed_ffn_experts"), ({"ffn_gate": "renorm"}, "mix.ffn_gate"),
])
def test_bad_variant_settings_name_their_key(bad, key):
    with pytest.raises(ConfigError) as err:
        read_section(MixVariant, {**plain(load_option("mix", "bam")), **bad}, "mix", name="x")
    assert str(err.value).startswith(f"invalid {key}=")
