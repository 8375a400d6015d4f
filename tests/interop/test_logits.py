"""Converted checkpoints compute transformers' logits: tiny random Llama, Mistral, Qwen2 and Cohere
models varied as real checkpoints vary (GQA ratio, tied head, biases, head width, RoPE settings
and spellings, float32/bfloat16/float16 saves, shards), compared on the same ids in float32."""

from __future__ import annotations

import json

import pytest
import torch

from hf_checkpoints import (
    SEQ, hf_config, hf_model, load_hf, max_logit_difference, ours, rewrite_config, save_checkpoint,
)
from bam_pipeline.interop import import_hf_model

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def to_4x_spelling(cfg: dict) -> dict:
    """config.json as transformers 4.40-4.57 wrote it: rope_theta + rope_scaling ("type"), torch_dtype."""
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    rope_type = rope.pop("rope_type")
    cfg["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rope}
    cfg["torch_dtype"] = cfg.pop("dtype")
    return cfg


# name -> (architecture, config fields, save dtype, save kwargs, config.json rewrite)
CASES = {
    "llama_gqa4_tied": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True), torch.float32, {}, None),
    "llama_mha_llama3_rope_bf16": ("llama", dict(num_key_value_heads=4, rope_parameters=LLAMA3_ROPE),
                                   torch.bfloat16, {}, None),
    "llama_head_dim_16_linear_rope_sharded": (
        "llama", dict(head_dim=16, rope_parameters={"rope_type": "linear", "rope_theta": 1000.0, "factor": 2.0}),
        torch.float32, {"max_shard_size": "20KB"}, None),
    "llama_4x_spelling_f16": ("llama", dict(rope_parameters={"rope_type": "linear", "rope_theta": 300.0,
                                                             "factor": 3.0}), torch.float16, {}, to_4x_spelling),
    "mistral_window_covers_context": ("mistral", dict(sliding_window=64), torch.float32, {}, None),
    "mistral_no_window_bf16_sharded": ("mistral", dict(sliding_window=None, num_key_value_heads=1),
                                       torch.bfloat16, {"max_shard_size": "30KB"}, None),
    "qwen2_biases_tied": ("qwen2", dict(num_key_value_heads=1, tie_word_embeddings=True), torch.float32, {}, None),
    "qwen2_unused_window_bf16_sharded": (
        "qwen2", dict(use_sliding_window=True, sliding_window=16, max_window_layers=2, tie_word_embeddings=False),
        torch.bfloat16, {"max_shard_size": "20KB"}, None),
    "qwen2_4x_spelling": ("qwen2", dict(rope_parameters={"rope_type": "default", "rope_theta": 2000.0}),
                          torch.float32, {}, to_4x_spelling),
    "cohere_gqa_tied": ("cohere", dict(logit_scale=0.25, rope_parameters={"rope_type": "default", "rope_theta": 200.0}),
                        torch.float32, {}, None),
    "cohere_untied_mha_bf16": ("cohere", dict(num_key_value_heads=4, tie_word_embeddings=False, logit_scale=0.5),
                               torch.bfloat16, {}, None),
}
TOLERANCE = 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_converted_logits_match_transformers(case, tmp_path):
    arch, fields, dtype, save_kwargs, rewrite = CASES[case]
    path = save_checkpoint(hf_model(hf_config(arch, **fields)), tmp_path / case, dtype=dtype, **save_kwargs)
    if rewrite is not None:
        rewrite_config(path, rewrite)
    if save_kwargs:
        assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("model-*"))) > 1
    diff = max_logit_difference(load_hf(path), ours(path, dtype=torch.float32))
    print(f"{case}: max |logit difference| = {diff:.2e}")
    assert diff <= TOLERANCE


def test_default_dtype_is_the_checkpoints_and_a_requested_one_is_honoured(tmp_path):
    path = save_checkpoint(hf_model(hf_config("llama")), tmp_path / "bf16", dtype=torch.bfloat16)
    ck = import_hf_model(path)
    assert {t.dtype for t in ck.state_dict.values()} == {torch.bfloat16}
    assert {t.dtype for t in import_hf_model(path, dtype=torch.float16).state_dict.values()} == {torch.float16}
    assert all(t.is_contiguous() for t in ck.state_dict.values())
    assert ck.files == (path / "config.json", path / "model.safetensors")


def test_4x_and_5x_spellings_map_to_the_same_config(tmp_path):
    model = hf_model(hf_config("llama", rope_parameters=LLAMA3_ROPE))
    v5 = save_checkpoint(model, tmp_path / "v5")
    v4 = save_checkpoint(model, tmp_path / "v4")
    rewrite_config(v4, to_4x_spelling)
    cfg4 = json.loads((v4 / "config.json").read_text())
    assert "rope_parameters" not in cfg4 and cfg4["rope_scaling"]["type"] == "llama3"
    assert import_hf_model(v4).config == import_hf_model(v5).config


def test_context_defaults_to_max_position_embeddings_and_can_be_shorter(tmp_path):
    path = save_checkpoint(hf_model(hf_config("llama")), tmp_path / "m", tokenizer=False)
    assert import_hf_model(path).config.max_seq_len == 64
    short = ours(path, max_seq_len=SEQ)
    assert short.cfg.max_seq_len == SEQ
    assert max_logit_difference(load_hf(path), short) <= TOLERANCE


def test_the_whole_path_a_stage_will_take(tmp_path):
    """Directory -> resolve -> import -> tokenizer and documents -> our logits == transformers'."""
    from bam_pipeline.interop import encode_documents, load_hf_model_tokenizer, resolve_hf_model_dir
    from bam_pipeline.model import BAMTransformer

    reference = hf_model(hf_config("qwen2", tie_word_embeddings=True))
    path = save_checkpoint(reference, tmp_path / "qwen2", dtype=torch.bfloat16)
    source = resolve_hf_model_dir(str(path))
    ck = import_hf_model(source.path, dtype=torch.float32, max_seq_len=SEQ)
    tok = load_hf_model_tokenizer(source.path, ck.config.vocab_size)
    docs = encode_documents(tok.tokenizer, ["the fox sleeps.", "a lazy dog"], tok.eos_id)
    ids = torch.tensor([[i for doc in docs for i in doc]])  # documents packed into one row
    assert ids[0, 0].item() == 1 and (ids == tok.eos_id).sum() == 2
    model = BAMTransformer(ck.config).eval()
    model.load_state_dict(ck.state_dict, strict=True)
    assert max_logit_difference(load_hf(path), model, ids) <= TOLERANCE
