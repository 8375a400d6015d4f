"""Weights: the key table covers our layout, the named transforms, and one-line refusals of bad
checkpoints (pickled, missing or corrupt shard, missing/extra tensor, wrong shape or dtype)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_checkpoints import compare_ids, hf_config, hf_model, load_hf, max_logit_difference, ours, save_checkpoint
from bam_pipeline.errors import BamError
from bam_pipeline.interop import ARCHITECTURES, import_hf_model
from bam_pipeline.interop import hf_weights
from bam_pipeline.interop.hf_weights import interleaved_to_half_split, linear_bias, linear_weight, tensor_table
from bam_pipeline.model.state_dict import expected_shapes
from bam_pipeline.model import preset
from bam_pipeline.model.layers import apply_rotary, rotary_tables

SMOKE = preset("smoke")


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("tied", [True, False])
def test_the_table_fills_exactly_our_layout(arch, tied):
    a = ARCHITECTURES[arch]
    cfg = SMOKE.replace(parallel_residual=a.parallel_residual, qkv_bias=a.qkv_bias, tie_embeddings=tied)
    table = tensor_table(cfg, a)
    want = expected_shapes(cfg)
    assert sorted(m.ours for m in table.values()) == sorted(want)
    for name, m in table.items():
        assert m.convert(torch.randn(m.shape), torch.float32).shape == want[m.ours], name


def test_linear_transforms_give_our_in_out_layout():
    w = torch.randn(6, 4)  # transformers: (out, in)
    x = torch.randn(3, 4)
    assert torch.equal(x @ linear_weight(w)[0], torch.nn.functional.linear(x, w))
    b = torch.randn(6)
    assert linear_bias(b).shape == (1, 6) and torch.equal(linear_bias(b)[0], b)


def _rotate_interleaved(x, cos, sin):
    """Cohere's RoPE (transformers' modeling_cohere): pairs (2j, 2j+1), frequencies repeat-interleaved."""
    rotated = torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)
    return x * cos + rotated * sin


def test_interleaved_to_half_split_turns_cohere_rope_into_ours():
    heads, hd, T = 3, 8, 6
    cos, sin = rotary_tables(hd, T, 100.0)  # half-split: (T, hd), halves equal
    cos_i, sin_i = cos[:, : hd // 2].repeat_interleave(2, -1), sin[:, : hd // 2].repeat_interleave(2, -1)
    x = torch.randn(1, T, heads, hd)  # interleaved head dims
    half = interleaved_to_half_split(x.reshape(T, heads * hd).T, hd).T.reshape(1, T, heads, hd)
    ref = _rotate_interleaved(x, cos_i[:, None], sin_i[:, None])
    got = apply_rotary(half, cos, sin)
    # the rotated vectors are the same up to the same permutation, so q . k is unchanged
    assert torch.allclose(interleaved_to_half_split(ref.reshape(T, -1).T, hd).T.reshape(got.shape), got, atol=1e-6)
    assert interleaved_to_half_split(torch.arange(16.0), 8).tolist() == [0, 2, 4, 6, 1, 3, 5, 7,
                                                                          8, 10, 12, 14, 9, 11, 13, 15]


def test_cohere_needs_the_permutation(tmp_path, monkeypatch):
    path = save_checkpoint(hf_model(hf_config("cohere", logit_scale=0.5)), tmp_path / "cohere", tokenizer=False)
    hf = load_hf(path)
    assert max_logit_difference(hf, ours(path)) <= 1e-5
    half_split = dataclasses.replace(ARCHITECTURES["CohereForCausalLM"], interleaved_rope=False)
    monkeypatch.setitem(ARCHITECTURES, "CohereForCausalLM", half_split)
    with torch.no_grad():
        assert (hf(compare_ids()).logits - ours(path)(compare_ids()).logits).abs().max() > 1e-3


@pytest.fixture
def llama(tmp_path):
    return save_checkpoint(hf_model(hf_config("llama")), tmp_path / "llama", tokenizer=False)


def _edit_weights(path, change):
    sd = load_file(path / "model.safetensors")
    change(sd)
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})


def test_pickled_only_checkpoint_is_refused_unread(llama):
    (llama / "model.safetensors").rename(llama / "pytorch_model.bin")
    with pytest.raises(BamError, match="only pickled weights .pytorch_model.bin.: bam-pipeline never unpickles"):
        import_hf_model(llama)
    (llama / "pytorch_model.bin").unlink()
    with pytest.raises(BamError, match="has no model.safetensors or model.safetensors.index.json"):
        import_hf_model(llama)


def test_missing_and_corrupt_shards(tmp_path):
    path = save_checkpoint(hf_model(hf_config("llama")), tmp_path / "sharded", tokenizer=False, max_shard_size="20KB")
    shards = sorted(path.glob("model-*.safetensors"))
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    with pytest.raises(BamError, match=f"cannot read {shards[1].name} .*re-download"):
        import_hf_model(path)
    shards[1].write_bytes(b"\xff" * 64)
    with pytest.raises(BamError, match=f"cannot read {shards[1].name}"):
        import_hf_model(path)
    shards[1].unlink()
    with pytest.raises(BamError, match=f"shard {shards[1].name} named by model.safetensors.index.json is missing"):
        import_hf_model(path)
    (path / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(BamError, match="is not a safetensors index"):
        import_hf_model(path)


def test_index_that_misplaces_a_tensor_is_refused(tmp_path):
    path = save_checkpoint(hf_model(hf_config("llama")), tmp_path / "sharded", tokenizer=False, max_shard_size="20KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    wm = index["weight_map"]
    wm["model.norm.weight"] = next(s for s in sorted(set(wm.values())) if s != wm["model.norm.weight"])
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(BamError, match="places model.norm.weight in .*which does not hold it"):
        import_hf_model(path)


def test_missing_extra_and_misshapen_tensors(llama):
    _edit_weights(llama, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(BamError, match="lacks tensor model.layers.1.mlp.up_proj.weight"):
        import_hf_model(llama)
    _edit_weights(llama, lambda sd: sd.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(48, 32),
                                               "model.layers.0.self_attn.q_proj.bias": torch.zeros(32)}))
    with pytest.raises(BamError, match="has tensor model.layers.0.self_attn.q_proj.bias that config.json does not"):
        import_hf_model(llama)
    _edit_weights(llama, lambda sd: sd.pop("model.layers.0.self_attn.q_proj.bias"))
    cfg = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 40}))
    with pytest.raises(BamError, match=r"mlp\.\w+_proj\.weight in model.safetensors has shape \((32, 48|48, 32)\), "
                                       r"but config.json implies \((32, 40|40, 32)\); the weights do not belong"):
        import_hf_model(llama)


def test_tolerated_extras_stored_head_of_a_tied_model_and_old_rotary_buffers(tmp_path):
    path = save_checkpoint(hf_model(hf_config("llama", tie_word_embeddings=True)), tmp_path / "tied", tokenizer=False)
    _edit_weights(path, lambda sd: sd.update({"lm_head.weight": sd["model.embed_tokens.weight"].clone(),
                                              "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}))
    assert max_logit_difference(load_hf(path), ours(path)) <= 1e-5


def test_dtypes(llama):
    _edit_weights(llama, lambda sd: sd.update({"model.norm.weight": sd["model.norm.weight"].bfloat16()}))
    with pytest.raises(BamError, match="mixes bfloat16 and float32 tensors"):
        import_hf_model(llama)
    assert import_hf_model(llama, dtype=torch.float32).state_dict["norm.weight"].dtype == torch.float32
    _edit_weights(llama, lambda sd: sd.update({"model.norm.weight": torch.ones(32, dtype=torch.int8)}))
    with pytest.raises(BamError, match="is I8; bam-pipeline imports float32, bfloat16 and float16"):
        import_hf_model(llama, dtype=torch.float32)


def test_nothing_is_read_before_every_header_is_checked(llama, monkeypatch):
    _edit_weights(llama, lambda sd: sd.pop("model.norm.weight"))
    calls = []
    original = hf_weights.TensorMapping.convert
    monkeypatch.setattr(hf_weights.TensorMapping, "convert", lambda self, *a: calls.append(1) or original(self, *a))
    with pytest.raises(BamError, match="lacks tensor model.norm.weight"):
        import_hf_model(llama)
    assert calls == []
