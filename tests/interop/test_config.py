"""config.json to ModelConfig: every field of every supported transformers config class is honoured,
refused or irrelevant; unknown fields, refused values, unsupported architectures, quantised and
broken configs each end in one line naming what is wrong."""

from __future__ import annotations

import json

import pytest
import transformers

from hf_checkpoints import TINY
from bam_pipeline.errors import BamError
from bam_pipeline.interop import ARCHITECTURES, import_hf_model, read_config_file, to_model_config
from bam_pipeline.interop.architectures import REFUSAL_REASONS
from bam_pipeline.model.config import RopeScaling

CONFIG_CLASSES = {"LlamaForCausalLM": transformers.LlamaConfig, "MistralForCausalLM": transformers.MistralConfig,
                  "Qwen2ForCausalLM": transformers.Qwen2Config, "CohereForCausalLM": transformers.CohereConfig}


def config_dict(arch: str, **fields) -> dict:
    """The config.json transformers writes for a tiny model of ``arch``."""
    cfg = CONFIG_CLASSES[arch](**{**TINY, **fields})
    cfg.architectures = [arch]
    return json.loads(cfg.to_json_string(use_diff=False))


@pytest.mark.parametrize("arch", list(CONFIG_CLASSES))
def test_every_field_of_the_installed_config_class_is_classified(arch):
    """A field a new transformers adds fails here instead of being ignored."""
    a = ARCHITECTURES[arch]
    fields = set(CONFIG_CLASSES[arch]().to_dict())
    unclassified = sorted(f for f in fields if a.classify(f) is None)
    assert not unclassified, f"classify {unclassified} in interop/architectures.py"
    # the three sets do not overlap, and every refused field says why
    assert not (a.honoured & a.irrelevant) and not (set(a.refused) & (a.honoured | a.irrelevant))
    assert set(a.refused) <= set(REFUSAL_REASONS)


@pytest.mark.parametrize("arch", list(CONFIG_CLASSES))
def test_a_default_config_of_each_class_maps(arch):
    mapped = to_model_config(config_dict(arch), max_seq_len=32)
    a = ARCHITECTURES[arch]
    cfg = mapped.model
    assert mapped.architecture is a
    assert (cfg.parallel_residual, cfg.norm_kind, cfg.qkv_bias) == (a.parallel_residual, a.norm_kind, a.qkv_bias)
    assert (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.vocab_size) == (32, 4, 2, 48, 96)
    assert cfg.rope_precision == "float32" and cfg.is_dense


def test_fields_map_onto_model_config():
    cfg = to_model_config(config_dict(
        "LlamaForCausalLM", head_dim=16, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
    )).model
    assert cfg.head_dim == 16 and cfg.head_dim_override == 16 and cfg.norm_eps == 1e-5 and cfg.tie_embeddings
    assert cfg.max_seq_len == 64 and cfg.rope_theta == 5e5
    assert cfg.rope_scaling == RopeScaling("llama3", 32.0, 1.0, 4.0, 8)
    cohere = to_model_config(config_dict("CohereForCausalLM", logit_scale=0.125, layer_norm_eps=1e-3)).model
    assert (cohere.logit_scale, cohere.norm_eps, cohere.tie_embeddings) == (0.125, 1e-3, True)
    assert to_model_config(config_dict("LlamaForCausalLM")).model.head_dim_override is None


def test_class_defaults_fill_fields_a_4x_save_leaves_out():
    """4.x wrote tie_word_embeddings only when it differed from PretrainedConfig's default."""
    hf = config_dict("CohereForCausalLM")
    del hf["tie_word_embeddings"], hf["logit_scale"], hf["num_key_value_heads"]
    cfg = to_model_config(hf).model
    assert cfg.tie_embeddings and cfg.logit_scale == 0.0625 and cfg.n_kv_heads == cfg.n_heads


@pytest.mark.parametrize("change,message", [
    ({"hidden_act": "gelu"}, "hidden_act='gelu': our FFN is SwiGLU with SiLU"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"mlp_bias": True}, "mlp_bias=True: our FFN has no biases"),
    ({"attention_dropout": 0.1}, "attention_dropout=0.1"),
    ({"rope_interleaved": True}, "rope_interleaved=True"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ({"original_max_position_embeddings": 8}, "original_max_position_embeddings=8"),
    ({"some_new_field": 3}, "unknown LlamaForCausalLM config field some_new_field=3"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}}, "rope_type='dynamic'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "rope_type='yarn'"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope_type='longrope'"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, "has no factor"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "factor": 2.0}}, "rope_parameters.factor=2.0"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor=0.5"),
    ({"rope_parameters": {"rope_type": "default"}}, "names no rope_theta"),
    ({"hidden_size": None}, "has no hidden_size"),
    ({"num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": None},
     "maps to an invalid model: invalid d_model=32"),
    ({"model_type": "mistral"}, "model_type='mistral'"),
    ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quantised checkpoint .*bitsandbytes"),
])
def test_refusals_name_the_field(change, message):
    with pytest.raises(BamError, match=message) as err:
        to_model_config({**config_dict("LlamaForCausalLM"), **change})
    assert "\n" not in str(err.value)


def test_bookkeeping_fields_are_accepted_and_recorded():
    """transformers' private fields and special-token ids do not change the model; other unknown fields are
    refused (test_refusals_name_the_field)."""
    fields = {"_model_name_or_path": "Smollm2 135M", "_some_future_private": [1], "unk_token_id": 0,
              "cls_token_id": 3, "mask_token_id": 4, "sep_token_id": 5}
    mapped = to_model_config({**config_dict("LlamaForCausalLM"), **fields})
    assert mapped.model == to_model_config(config_dict("LlamaForCausalLM")).model
    assert mapped.bookkeeping == {**fields, "_name_or_path": "", "bos_token_id": 1, "eos_token_id": 2,
                                  "pad_token_id": None}


@pytest.mark.parametrize("arch,change,message", [
    ("CohereForCausalLM", {"use_qk_norm": True}, "use_qk_norm=True: per-head q/k norms"),
    ("CohereForCausalLM", {"attention_bias": True}, "attention_bias=True"),
    ("MistralForCausalLM", {"sliding_window": 16}, "sliding window of 16 positions.*max_seq_len=64.*<= 16"),
    ("Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1,
                          "layer_types": None}, "sliding window of 16"),
    ("Qwen2ForCausalLM", {"layer_types": ["full_attention"]}, "layer_types"),
])
def test_architecture_specific_refusals(arch, change, message):
    with pytest.raises(BamError, match=message):
        to_model_config({**config_dict(arch), **change})


def test_a_window_at_least_the_context_is_kept_as_the_models_bound():
    hf = {**config_dict("MistralForCausalLM"), "sliding_window": 16}
    assert to_model_config(hf, max_seq_len=16).model.sliding_window == 16
    assert to_model_config({**hf, "sliding_window": None}).model.sliding_window is None


@pytest.mark.parametrize("config_class,arch", [
    ("GPTNeoXConfig", "GPTNeoXForCausalLM"), ("GemmaConfig", "GemmaForCausalLM"), ("PhiConfig", "PhiForCausalLM"),
    ("Cohere2Config", "Cohere2ForCausalLM"), ("Qwen3Config", "Qwen3ForCausalLM"),
])
def test_unsupported_architectures_are_refused_by_name(config_class, arch, tmp_path):
    cfg = getattr(transformers, config_class)()
    cfg.architectures = [arch]
    cfg.save_pretrained(tmp_path)
    with pytest.raises(BamError, match=f"unsupported architecture {arch}: bam-pipeline imports LlamaForCausalLM, "
                                       "MistralForCausalLM, Qwen2ForCausalLM, CohereForCausalLM"):
        import_hf_model(tmp_path)


def test_architecture_is_found_from_model_type_when_architectures_is_absent():
    hf = config_dict("Qwen2ForCausalLM")
    del hf["architectures"]
    assert to_model_config(hf).architecture.name == "Qwen2ForCausalLM"
    with pytest.raises(BamError, match="unsupported architecture model_type='gpt2'"):
        to_model_config({**hf, "model_type": "gpt2"})
    with pytest.raises(BamError, match="names exactly one"):
        to_model_config({**hf, "architectures": ["LlamaForCausalLM", "Qwen2ForCausalLM"]})


def test_missing_or_broken_config_files(tmp_path):
    with pytest.raises(BamError, match="does not exist"):
        read_config_file(tmp_path / "nowhere")
    with pytest.raises(BamError, match="has no config.json"):
        read_config_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(BamError, match="is not valid JSON"):
        read_config_file(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(BamError, match="not a JSON object"):
        read_config_file(tmp_path)
