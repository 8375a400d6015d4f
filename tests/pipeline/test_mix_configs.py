"""conf/mix/*.yaml agree with the upcycling table, and the weight-free layout matches real upcycling."""

import pytest
import torch

from bam_pipeline.conf_files import group_options, load_group
from bam_pipeline.model.config import preset
from bam_pipeline.model.transformer import BAMTransformer
from bam_pipeline.pipeline.mixing import build_mixture, mixture_config, upcycle_kwargs
from bam_pipeline.upcycle import MIX_VARIANTS


def test_every_variant_has_a_config_file_that_agrees_with_the_table():
    assert set(group_options("mix")) == set(MIX_VARIANTS)
    for variant, table in MIX_VARIANTS.items():
        settings = load_group("mix", variant)
        assert settings.variant == variant
        assert settings.method == table["method"]
        for key, value in table.items():
            if key != "method" and table["method"] != "dense":
                assert settings[key] == value, (variant, key)


@pytest.mark.parametrize("variant", sorted(MIX_VARIANTS))
def test_mixture_config_without_weights_equals_the_built_mixture(variant):
    torch.manual_seed(0)
    dense = preset("smoke")
    states = [BAMTransformer(dense).state_dict() for _ in range(4)]
    settings = dict(load_group("mix", variant))
    built_cfg, state = build_mixture(settings, states[0], states[1:], dense, generator_seed=0)
    assert mixture_config(settings, dense, n_domains=3) == built_cfg
    BAMTransformer(built_cfg).load_state_dict(state, strict=True)
    assert set(upcycle_kwargs(settings)) <= set(settings)
