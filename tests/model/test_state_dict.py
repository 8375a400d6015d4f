"""The state-dict layout (:mod:`bam_pipeline.model.state_dict`) is the model's own: for every routing
and backbone layout, the keys, shapes and order of ``BAMTransformer(cfg).state_dict()``; and the expert
tensors it names are the model's stacked tensors, each with the leading dim its group says."""

from __future__ import annotations

import pytest

from bam_pipeline.model import BAMTransformer, RouterConfig, preset
from bam_pipeline.model.state_dict import (
    ATTN_EXPERT_TENSORS, EXPERT_TENSORS, FFN_EXPERT_TENSORS, KV_TENSORS, expected_shapes,
)

SMOKE = preset("smoke")
LAYOUTS = {
    "dense": SMOKE,
    "dense_sequential_biases_untied": SMOKE.replace(parallel_residual=False, qkv_bias=True, tie_embeddings=False),
    "bam_expert_kv": SMOKE.replace(attn_experts=3, ffn_experts=4),
    "bam_shared_kv_biases": SMOKE.replace(attn_experts=3, attn_kv="shared", ffn_experts=3, qkv_bias=True),
    "btx_top2": SMOKE.replace(ffn_experts=4, ffn_router=RouterConfig("topk", 2, renormalize=True)),
    "hash": SMOKE.replace(attn_experts=2, ffn_experts=4, ffn_router=RouterConfig("hash")),
    "expert_choice_one_routing": SMOKE.replace(ffn_experts=4, ffn_router=RouterConfig("expert_choice"),
                                               router_scope="model"),
    "joint": SMOKE.replace(attn_experts=3, ffn_experts=3, joint_router=True),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_the_layout_is_the_models_state_dict_in_its_order(name):
    cfg = LAYOUTS[name]
    state = BAMTransformer(cfg).state_dict()
    assert [(k, tuple(t.shape)) for k, t in state.items()] == list(expected_shapes(cfg).items())


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_the_expert_tensors_are_the_stacked_ones_with_their_groups_leading_dim(name):
    cfg = LAYOUTS[name]
    shapes = expected_shapes(cfg)
    groups = {ATTN_EXPERT_TENSORS: cfg.attn_experts, KV_TENSORS: cfg.kv_experts, FFN_EXPERT_TENSORS: cfg.ffn_experts}
    for key, shape in shapes.items():
        leading = [n for names, n in groups.items() if key.endswith(names)]
        assert len(leading) == key.endswith(EXPERT_TENSORS), key  # in exactly one group, or none
        if leading:
            assert shape[0] == leading[0], key
    assert {k for k, s in shapes.items() if len(s) == 3} <= {k for k in shapes if k.endswith(EXPERT_TENSORS)}
    assert len(EXPERT_TENSORS) == len(set(EXPERT_TENSORS)) == 10
