"""Checkpoint layouts that could be read two ways are read as transformers 5.x reads them, or refused in
one line: the head of a tied config (stored with other values: untied; stored alone: the embedding
too; missing from an untied config: refused), two weight layouts in one directory (refused), a
tensor stored twice, a weights file named by config.json, and weights that are not finite in the
checkpoint or in the dtype asked for. Each case asserts what transformers itself does with the
layout, then that we compute its logits or refuse."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_checkpoints import compare_ids, hf_config, hf_model, load_hf, max_logit_difference, ours, save_checkpoint
from bam_pipeline.errors import BamError, ConfigError
from bam_pipeline.interop import import_hf_model

TOLERANCE = 1e-5
EMBEDDING, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def edit_weights(path, change, file="model.safetensors"):
    sd = load_file(path / file)
    change(sd)
    save_file(sd, path / file, metadata={"format": "pt"})


def other_head(sd):
    """A stored head with other values than the embedding (a fine-tune that untied it, config left tied)."""
    sd[HEAD] = torch.randn(sd[EMBEDDING].shape, generator=torch.Generator().manual_seed(7)) * 0.2


def logits(model):
    with torch.no_grad():
        return model(compare_ids()).logits


def is_tied(hf) -> bool:
    return hf.lm_head.weight is hf.model.embed_tokens.weight


@pytest.mark.parametrize("arch", ["llama", "cohere"])
def test_a_tied_config_storing_another_head_imports_untied_as_transformers_does(arch, tmp_path):
    path = save_checkpoint(hf_model(hf_config(arch, tie_word_embeddings=True)), tmp_path / arch, tokenizer=False)
    assert HEAD not in load_file(path / "model.safetensors")  # save_pretrained stores a tied head once
    edit_weights(path, other_head)
    hf = load_hf(path)
    assert not is_tied(hf) and torch.equal(hf.lm_head.weight, load_file(path / "model.safetensors")[HEAD])
    ck = import_hf_model(path)
    assert not ck.config.tie_embeddings and torch.equal(ck.state_dict["lm_head.weight"], hf.lm_head.weight)
    assert max_logit_difference(hf, ours(path)) <= TOLERANCE


def test_a_tied_config_storing_an_equal_head_stays_tied(tmp_path):
    path = save_checkpoint(hf_model(hf_config("qwen2", tie_word_embeddings=True)), tmp_path / "q", tokenizer=False)
    edit_weights(path, lambda sd: sd.update({HEAD: sd[EMBEDDING].clone()}))
    hf = load_hf(path)
    assert is_tied(hf)
    ck = import_hf_model(path)
    assert ck.config.tie_embeddings and "lm_head.weight" not in ck.state_dict
    assert max_logit_difference(hf, ours(path)) <= TOLERANCE


def test_a_tied_config_storing_only_the_head_uses_it_as_the_embedding(tmp_path):
    path = save_checkpoint(hf_model(hf_config("llama", tie_word_embeddings=True)), tmp_path / "l", tokenizer=False)
    edit_weights(path, lambda sd: sd.update({HEAD: sd.pop(EMBEDDING)}))
    hf = load_hf(path)
    assert is_tied(hf) and torch.equal(hf.model.embed_tokens.weight, load_file(path / "model.safetensors")[HEAD])
    assert import_hf_model(path).config.tie_embeddings
    assert max_logit_difference(hf, ours(path)) <= TOLERANCE


def test_an_untied_config_without_a_head_is_refused_where_transformers_draws_one(tmp_path):
    path = save_checkpoint(hf_model(hf_config("llama", tie_word_embeddings=False)), tmp_path / "l", tokenizer=False)
    edit_weights(path, lambda sd: sd.pop(HEAD))
    first, second = load_hf(path), load_hf(path)
    assert not is_tied(first) and (logits(first) - logits(second)).abs().max() > 1e-3  # a random head each time
    with pytest.raises(BamError, match="tie_word_embeddings=false, but the LlamaForCausalLM checkpoint stores no "
                                       r"lm_head\.weight .*set tie_word_embeddings=true"):
        import_hf_model(path)


@pytest.fixture
def two_models(tmp_path):
    """One model saved as a single file, another (other weights) sharded."""
    single = save_checkpoint(hf_model(hf_config("llama"), seed=0), tmp_path / "single", tokenizer=False)
    sharded = save_checkpoint(hf_model(hf_config("llama"), seed=1), tmp_path / "sharded", tokenizer=False,
                              max_shard_size="20KB")
    return single, sharded


def test_two_weight_layouts_in_one_directory_are_refused(two_models, tmp_path):
    single, sharded = two_models
    both = tmp_path / "both"
    shutil.copytree(single, both)
    for f in sharded.glob("model*"):
        shutil.copy(f, both / f.name)
    # transformers reads the single file and ignores the index and its shards
    assert torch.equal(logits(load_hf(both)), logits(load_hf(single)))
    assert (logits(load_hf(both)) - logits(load_hf(sharded))).abs().max() > 1e-3
    with pytest.raises(BamError, match=f"{both} holds two weight layouts, model.safetensors and "
                                       "model.safetensors.index.json: .*delete the stale one"):
        import_hf_model(both)


def test_save_pretrained_leaves_a_stale_single_file_behind(two_models, tmp_path):
    """Why the two layouts are refused rather than read as transformers does: re-saving sharded into a directory
    keeps the old model.safetensors, which transformers then loads instead of the new weights."""
    single, sharded = two_models
    resaved = tmp_path / "resaved"
    shutil.copytree(single, resaved)
    new = hf_model(hf_config("llama"), seed=1)
    save_checkpoint(new, resaved, tokenizer=False, max_shard_size="20KB")
    assert (resaved / "model.safetensors").is_file() and (resaved / "model.safetensors.index.json").is_file()
    assert (logits(load_hf(resaved)) - logits(new)).abs().max() > 1e-3  # transformers: the stale weights
    with pytest.raises(BamError, match="two weight layouts"):
        import_hf_model(resaved)


def test_pickled_weights_beside_safetensors_are_ignored_as_transformers_does(two_models):
    """transformers reads safetensors before pytorch_model.bin (and its index); we never read a pickle."""
    single, sharded = two_models
    for path, other in ((single, 1), (sharded, 0)):
        torch.save(hf_model(hf_config("llama"), seed=other).state_dict(), path / "pytorch_model.bin")
        (path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {}}))
        assert max_logit_difference(load_hf(path), ours(path)) <= TOLERANCE


def test_a_tensor_stored_in_two_shards_is_refused(two_models):
    _, sharded = two_models
    shards = sorted(sharded.glob("model-*.safetensors"))
    where = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    name = next(n for n, s in where.items() if s == shards[-1].name)
    edit_weights(sharded, lambda sd: sd.update({name: torch.zeros(load_file(shards[-1])[name].shape)}),
                 shards[0].name)
    with pytest.raises(BamError, match=f"tensor {name} is stored twice, in {shards[0].name} and {shards[-1].name} "
                                       f"of {sharded}"):
        import_hf_model(sharded)


def test_a_weights_file_named_by_config_json_is_refused(two_models):
    """transformers_weights (5.x) makes transformers load the file it names: refused, with what to rename."""
    single, sharded = two_models
    for f in sharded.glob("model*"):
        shutil.copy(f, single / f.name.replace("model", "other"))
    index = json.loads((single / "other.safetensors.index.json").read_text())
    index["weight_map"] = {k: v.replace("model", "other") for k, v in index["weight_map"].items()}
    (single / "other.safetensors.index.json").write_text(json.dumps(index))
    cfg = json.loads((single / "config.json").read_text())
    (single / "config.json").write_text(json.dumps({**cfg, "transformers_weights": "other.safetensors.index.json"}))
    assert torch.equal(logits(load_hf(single)), logits(load_hf(sharded)))  # not model.safetensors
    with pytest.raises(BamError, match="transformers_weights='other.safetensors.index.json'.*rename the file"):
        import_hf_model(single)


BIG = "model.layers.1.mlp.up_proj.weight"


def test_a_weight_beyond_the_range_of_the_dtype_asked_for_is_refused(tmp_path):
    path = save_checkpoint(hf_model(hf_config("llama")), tmp_path / "bf16", dtype=torch.bfloat16, tokenizer=False)
    edit_weights(path, lambda sd: sd[BIG].__setitem__((3, 5), 98304.0))  # a bfloat16 value float16 cannot hold
    f16 = transformers_model(path, torch.float16)
    assert torch.isinf(f16.model.layers[1].mlp.up_proj.weight).any()  # transformers: inf, without a word
    with pytest.raises(ConfigError, match=rf"invalid dtype='float16': tensor {BIG} in .*model.safetensors holds "
                                          r"98304, beyond float16's largest 65504.*import in bfloat16 or float32$"):
        import_hf_model(path, dtype=torch.float16)
    hf = load_hf(path).model.layers[1].mlp.up_proj.weight
    for dtype in (torch.float32, None):  # float32, and the checkpoint's own bfloat16, hold it
        assert torch.equal(import_hf_model(path, dtype=dtype).state_dict["layers.1.ffn.w3"][0].float(), hf.t())


def transformers_model(path, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_weight_not_finite_in_the_checkpoint_is_refused(value, tmp_path):
    path = save_checkpoint(hf_model(hf_config("llama")), tmp_path / "ckpt", tokenizer=False, max_shard_size="20KB")
    shard = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][BIG]
    edit_weights(path, lambda sd: sd[BIG][2].fill_(value), shard)
    assert not torch.isfinite(load_hf(path).model.layers[1].mlp.up_proj.weight).all()  # transformers loads it
    counts = "0 nan, 32 inf" if value > 0 else "32 nan, 0 inf"
    with pytest.raises(BamError, match=rf"tensor {BIG} in {path / shard} is not finite \({counts} values\)"):
        import_hf_model(path, dtype=torch.float32)


def test_a_checkpoint_of_mixed_dtypes_needs_a_dtype(tmp_path):
    path = save_checkpoint(hf_model(hf_config("llama")), tmp_path / "ckpt", tokenizer=False)
    edit_weights(path, lambda sd: sd.update({BIG: sd[BIG].bfloat16()}))
    with pytest.raises(ConfigError, match="invalid dtype=None: the checkpoint mixes bfloat16 and float32 tensors"):
        import_hf_model(path)
    assert max_logit_difference(load_hf(path), ours(path, dtype=torch.float32)) <= TOLERANCE
