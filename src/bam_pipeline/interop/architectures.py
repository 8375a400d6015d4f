"""The supported Hugging Face architectures: one :class:`Architecture` per causal-LM class, saying
how its block maps onto ours and what each ``config.json`` field is to the import.

Every field a config of the class can hold is in exactly one of three sets:
- **honoured**: read and mapped onto :class:`~bam_pipeline.model.ModelConfig` (or onto how the
  weights are read);
- **refused**: accepted only at the values listed, the ones our model computes; any other value
  stops the import with a line naming the field;
- **irrelevant**: does not change the function transformers computes from the weights (token
  ids, generation settings, initialisation, caching, bookkeeping).
A field in none of them is refused by name, so a field a newer transformers adds fails loudly
instead of being ignored. Two kinds of field are bookkeeping (:func:`is_bookkeeping`), irrelevant under
any name and recorded in an import's manifest: transformers' private fields (a leading ``_``, such as
the ``_model_name_or_path`` a GGUF's ``general.name`` becomes) and special-token ids. The sets cover the spellings of transformers 4.40 through 5.x (v5 moved
``rope_theta``/``rope_scaling`` into ``rope_parameters`` and ``torch_dtype`` to ``dtype``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# Special-token ids: which id the tokenizer gives a role (the tokenizer helpers read eos_token_id); none
# changes what the model computes from ids (pad_token_id only freezes one embedding row's gradient in
# transformers' training).
SPECIAL_TOKEN_IDS = frozenset({
    "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "sep_token_id", "cls_token_id",
    "mask_token_id", "decoder_start_token_id",
})


def is_bookkeeping(field: str) -> bool:
    """A field transformers keeps for its own bookkeeping (a leading ``_``) or a special-token id."""
    return field.startswith("_") or field in SPECIAL_TOKEN_IDS


# Written by every PretrainedConfig of 4.40-5.x; none of them changes a causal LM's forward pass.
_COMMON_IRRELEVANT = frozenset({
    # bookkeeping, output switches, dtype of the stored copy (the tensors carry their own)
    "transformers_version", "name_or_path", "output_hidden_states",
    "output_attentions", "return_dict", "torchscript", "dtype", "torch_dtype", "use_bfloat16",
    "tf_legacy_loss", "pruned_heads", "chunk_size_feed_forward",
    "is_encoder_decoder", "is_decoder", "cross_attention_hidden_size", "add_cross_attention",
    "tie_encoder_decoder", "finetuning_task", "id2label", "label2id", "num_labels", "problem_type",
    "tokenizer_class", "prefix", "task_specific_params",
    # generation settings (generation_config.json in 5.x)
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "encoder_repetition_penalty", "epsilon_cutoff", "eta_cutoff",
    "assistant_confidence_threshold", "assistant_lookbehind", "num_assistant_tokens",
    "num_assistant_tokens_schedule", "target_lookbehind",
    # training and inference machinery
    "initializer_range", "use_cache",
})

# Read by every supported class. Shapes, RoPE (both spellings), the head width transformers reads
# with getattr even where the class does not declare it.
_COMMON_HONOURED = frozenset({
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
    "rope_theta", "rope_scaling", "rope_parameters",
})

# Refused unless at these values: our SwiGLU is SiLU-gated and training has no dropout.
_COMMON_REFUSED: Mapping[str, tuple[Any, ...]] = {
    "hidden_act": ("silu", "swish"),
    "attention_dropout": (0, 0.0, None),
    # RoPE over part of the head: not in our attention
    "partial_rotary_factor": (1, 1.0, None),
    # top-level copy of the pretraining length: 5.x lets it override rope_parameters, 4.x ignores it
    "original_max_position_embeddings": (None,),
    "quantization_config": (None,),
    # 5.x: the weights file to load instead of model.safetensors / its index (save_pretrained never writes it)
    "transformers_weights": (None,),
}

# Why a refused field's other values are refused (the second half of the one-line error).
REFUSAL_REASONS: Mapping[str, str] = {
    "hidden_act": "our FFN is SwiGLU with SiLU",
    "attention_dropout": "our model has no dropout",
    "partial_rotary_factor": "our attention rotates the whole head",
    "original_max_position_embeddings": (
        "transformers versions disagree on whether it overrides rope_scaling's own; "
        "move it into rope_scaling/rope_parameters"
    ),
    "attention_bias": "our attention has biases on q/k/v only (Qwen2), not on the output projection",
    "mlp_bias": "our FFN has no biases",
    "use_qk_norm": "per-head q/k norms (Command R+) are not in our attention",
    "rope_interleaved": (
        "transformers ignores it and rotates half-split; a checkpoint that needs it is not one transformers runs"
    ),
    "quantization_config": (
        "quantised weights cannot be trained as they are; import a float16/bfloat16/float32 checkpoint"
    ),
    "transformers_weights": (
        "transformers loads the weights file it names, bam-pipeline model.safetensors or "
        "model.safetensors.index.json; rename the file it names to one of those and remove the field"
    ),
}

# Keys of rope_scaling / rope_parameters each RoPE type reads (v5 names the type rope_type; 4.x
# also wrote type). Types not listed are refused: dynamic and longrope change with the sequence
# length, yarn and the rest are not implemented.
ROPE_TYPE_KEYS: Mapping[str, frozenset[str]] = {
    "default": frozenset({"rope_type", "type", "rope_theta"}),
    "linear": frozenset({"rope_type", "type", "rope_theta", "factor"}),
    "llama3": frozenset({"rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
                         "original_max_position_embeddings"}),
}


@dataclass(frozen=True)
class Architecture:
    """How one transformers causal-LM class maps onto :class:`~bam_pipeline.model.BAMTransformer`.

    ``defaults`` are the class's values for optional fields a saved config may leave out (the
    same in 4.40-5.x). ``interleaved_rope``: q/k head dims are rotated in pairs ``(2j, 2j+1)``
    and are permuted to our half-split layout on import.
    """

    name: str
    model_type: str
    parallel_residual: bool
    norm_kind: str
    norm_eps_field: str
    qkv_bias: bool
    interleaved_rope: bool
    honoured: frozenset[str]
    refused: Mapping[str, tuple[Any, ...]]
    irrelevant: frozenset[str]
    defaults: Mapping[str, Any]

    def classify(self, field: str) -> str | None:
        """``honoured``, ``refused``, ``irrelevant``, or None for a field this class does not know."""
        if is_bookkeeping(field):
            return "irrelevant"
        for kind in ("honoured", "refused", "irrelevant"):
            if field in getattr(self, kind):
                return kind
        return None


def _architecture(name: str, model_type: str, *, parallel: bool, norm_kind: str, norm_eps_field: str,
                  qkv_bias: bool = False, interleaved_rope: bool = False, honoured: Iterable[str] = (),
                  refused: Mapping[str, tuple[Any, ...]] | None = None, irrelevant: Iterable[str] = (),
                  defaults: Mapping[str, Any]) -> Architecture:
    return Architecture(
        name=name, model_type=model_type, parallel_residual=parallel, norm_kind=norm_kind,
        norm_eps_field=norm_eps_field, qkv_bias=qkv_bias, interleaved_rope=interleaved_rope,
        honoured=_COMMON_HONOURED | {norm_eps_field} | frozenset(honoured),
        refused={**_COMMON_REFUSED, **(refused or {})},
        irrelevant=_COMMON_IRRELEVANT | frozenset(irrelevant),
        defaults={"tie_word_embeddings": False, "hidden_act": "silu", "attention_dropout": 0.0, **defaults},
    )


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a for a in (
        _architecture(
            "LlamaForCausalLM", "llama", parallel=False, norm_kind="rmsnorm", norm_eps_field="rms_norm_eps",
            refused={"attention_bias": (False,), "mlp_bias": (False,), "rope_interleaved": (False, None)},
            # pretraining_tp > 1 splits the same matmuls into slices (4.x); SmolLM's nanotron export
            # writes is_llama_config
            irrelevant={"pretraining_tp", "is_llama_config"},
            defaults={"rms_norm_eps": 1e-6, "attention_bias": False, "mlp_bias": False},
        ),
        _architecture(
            "MistralForCausalLM", "mistral", parallel=False, norm_kind="rmsnorm", norm_eps_field="rms_norm_eps",
            honoured={"sliding_window"},
            # MistralConfig ignores layer_types (5.x warns and points to Ministral)
            irrelevant={"layer_types"},
            defaults={"rms_norm_eps": 1e-6, "sliding_window": 4096},
        ),
        _architecture(
            "Qwen2ForCausalLM", "qwen2", parallel=False, norm_kind="rmsnorm", norm_eps_field="rms_norm_eps",
            qkv_bias=True,
            honoured={"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"},
            # use_mrope belongs to Qwen2-VL; Qwen2ForCausalLM never reads it
            irrelevant={"use_mrope"},
            defaults={"rms_norm_eps": 1e-6, "use_sliding_window": False, "sliding_window": 4096,
                      "max_window_layers": 28},
        ),
        _architecture(
            "CohereForCausalLM", "cohere", parallel=True, norm_kind="layernorm", norm_eps_field="layer_norm_eps",
            interleaved_rope=True,
            honoured={"logit_scale"},
            refused={"attention_bias": (False,), "use_qk_norm": (False, None)},
            # the tokenizer's length limit, copied into Command R's config
            irrelevant={"model_max_length"},
            defaults={"layer_norm_eps": 1e-5, "logit_scale": 0.0625, "tie_word_embeddings": True,
                      "attention_bias": False, "use_qk_norm": False},
        ),
    )
}
