"""The logit comparison can see every honoured field: perturbing one moves transformers' logits by
more than 1e-3, and the converted model follows the perturbed checkpoint (or refuses it where our
model cannot follow, e.g. a sliding window shorter than the context)."""

from __future__ import annotations

import shutil
from collections.abc import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_checkpoints import SEQ, compare_ids, hf_config, hf_model, load_hf, ours, rewrite_config, save_checkpoint
from bam_pipeline.errors import BamError

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
BASES = {
    "llama": ("llama", dict(rope_parameters={"rope_type": "linear", "rope_theta": 2000.0, "factor": 2.0})),
    "llama3": ("llama", dict(rope_parameters=LLAMA3_ROPE)),
    "mistral": ("mistral", dict(sliding_window=64)),
    # the window covers the context / no layer slides / sliding switched off
    "qwen2": ("qwen2", dict(use_sliding_window=True, sliding_window=64, max_window_layers=1)),
    "qwen2_full_layers": ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=2)),
    "qwen2_off": ("qwen2", dict(use_sliding_window=False, sliding_window=8, max_window_layers=0)),
    "cohere": ("cohere", dict(logit_scale=0.25)),
}


def rope(**changes) -> Callable[[dict], dict]:
    def change(cfg: dict) -> dict:
        cfg["rope_parameters"] = {**cfg["rope_parameters"], **changes}
        return cfg
    return change


def field(**changes) -> Callable[[dict], dict]:
    return lambda cfg: {**cfg, **changes}


def swap_kv_heads(sd: dict, hd: int = 8) -> None:
    """Pair query heads with the other K/V head: what a repeat-vs-repeat_interleave bug does."""
    for name in list(sd):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            sd[name] = sd[name].unflatten(0, (-1, hd)).flip(0).flatten(0, 1).contiguous()


def shift(suffix: str, amount: float = 0.3) -> Callable[[dict], None]:
    def change(sd: dict) -> None:
        for name in list(sd):
            if name.endswith(suffix):
                sd[name] = sd[name] + amount
    return change


# name -> (base, config.json change or None, weight change or None, our import follows it)
MUTATIONS = {
    "llama rope_theta": ("llama", rope(rope_theta=3000.0), None, True),
    "llama linear factor": ("llama", rope(factor=2.5), None, True),
    "llama rms_norm_eps": ("llama", field(rms_norm_eps=1e-4), None, True),
    "llama GQA mapping": ("llama", None, swap_kv_heads, True),
    "llama3 factor": ("llama3", rope(factor=6.0), None, True),
    "llama3 low_freq_factor": ("llama3", rope(low_freq_factor=1.5), None, True),
    "llama3 high_freq_factor": ("llama3", rope(high_freq_factor=3.0), None, True),
    "llama3 original_max_position_embeddings": ("llama3", rope(original_max_position_embeddings=24), None, True),
    "mistral sliding_window": ("mistral", field(sliding_window=8), None, False),
    "qwen2 q bias": ("qwen2", None, shift("q_proj.bias"), True),
    "qwen2 k bias": ("qwen2", None, shift("k_proj.bias"), True),
    "qwen2 v bias": ("qwen2", None, shift("v_proj.bias"), True),
    "qwen2 sliding_window": ("qwen2", field(sliding_window=8), None, False),
    # 5.x saves layer_types, which then decides over max_window_layers; 5.x saves sliding_window=None when off
    "qwen2 max_window_layers": ("qwen2_full_layers", field(max_window_layers=1, layer_types=None), None, False),
    "qwen2 layer_types": ("qwen2_full_layers", field(layer_types=["full_attention", "sliding_attention"]),
                          None, False),
    "qwen2 use_sliding_window": ("qwen2_off", field(use_sliding_window=True, sliding_window=8, layer_types=None),
                                 None, False),
    "cohere logit_scale": ("cohere", field(logit_scale=0.3), None, True),
    "cohere layer_norm_eps": ("cohere", field(layer_norm_eps=1e-3), None, True),
    "cohere rope_theta": ("cohere", rope(rope_theta=10000.0), None, True),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Each base checkpoint's directory and transformers' logits on the comparison ids."""
    root = tmp_path_factory.mktemp("bases")
    out = {}
    for name, (arch, fields) in BASES.items():
        model = hf_model(hf_config(arch, **fields))
        with torch.no_grad():
            out[name] = (save_checkpoint(model, root / name, tokenizer=False), model(compare_ids()).logits)
    return out


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_perturbing_a_field_moves_transformers_logits_and_ours_follow(mutation, bases, tmp_path):
    base, change_config, change_weights, follows = MUTATIONS[mutation]
    base_path, before = bases[base]
    path = tmp_path / "mutated"
    shutil.copytree(base_path, path)
    if change_config is not None:
        rewrite_config(path, change_config)
    if change_weights is not None:
        sd = load_file(path / "model.safetensors")
        change_weights(sd)
        save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    ids = compare_ids()
    with torch.no_grad():
        after = load_hf(path)(ids).logits
    assert (after - before).abs().max() > 1e-3, "the comparison cannot see this field"
    if follows:
        with torch.no_grad():
            assert (ours(path, max_seq_len=SEQ)(ids).logits - after).abs().max() <= 1e-5
    else:
        with pytest.raises(BamError, match="sliding window of 8 positions"):
            ours(path, max_seq_len=SEQ)
