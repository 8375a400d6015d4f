"""A Hugging Face ``config.json`` read into our :class:`~bam_pipeline.model.ModelConfig`.

One pass over the file's fields against the architecture's honoured / refused / irrelevant sets
(:mod:`~bam_pipeline.interop.architectures`), then one mapping onto our fields. RoPE settings
are read from ``rope_scaling`` + ``rope_theta`` (transformers 4.x) or ``rope_parameters`` (5.x),
with 5.x's precedence: ``rope_scaling`` first, a ``rope_theta`` inside the dict over the top-level
one. A sliding window is kept only when it is at least the context, where it changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bam_pipeline.errors import BamError, ConfigError
from bam_pipeline.interop.architectures import (
    ARCHITECTURES, REFUSAL_REASONS, ROPE_TYPE_KEYS, Architecture, is_bookkeeping,
)
from bam_pipeline.model.config import ModelConfig, RopeScaling

CONFIG_FILE = "config.json"
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "max_position_embeddings")
_LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class HFModelConfig:
    """A Hugging Face model's architecture, the :class:`ModelConfig` it maps onto, and its bookkeeping
    fields (transformers' private ``_`` fields and special-token ids, accepted and recorded)."""

    architecture: Architecture
    model: ModelConfig
    bookkeeping: dict[str, Any]


def read_config_file(model_dir: Path) -> dict[str, Any]:
    """The JSON object in ``model_dir/config.json``; one-line errors for a missing or broken file."""
    if not model_dir.is_dir():
        raise BamError(f"checkpoint directory {model_dir} does not exist; "
                       "pass a local directory or a hub id (org/name)")
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        raise BamError(
            f"{model_dir} has no {CONFIG_FILE} (nor one .gguf file); pass the directory of a Hugging Face checkpoint "
            "(config.json beside model.safetensors) or a GGUF file"
        )
    try:
        hf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BamError(f"{path} is not valid JSON ({e}); re-download the checkpoint") from None
    if not isinstance(hf, dict):
        raise BamError(f"{path} holds a {type(hf).__name__}, not a JSON object; re-download the checkpoint")
    return hf


def architecture_of(hf: Mapping[str, Any]) -> Architecture:
    """The supported architecture ``config.json`` names; refuses quantised and unsupported models."""
    quantization = hf.get("quantization_config")
    if quantization is not None:
        method = quantization.get("quant_method", "?") if isinstance(quantization, Mapping) else "?"
        raise BamError(f"quantised checkpoint (quantization_config, {method}): "
                       f"{REFUSAL_REASONS['quantization_config']}")
    names = hf.get("architectures")
    model_type = hf.get("model_type")
    if names:
        if not isinstance(names, list) or len(names) != 1:
            raise BamError(f"config.json names architectures={names!r}; a checkpoint to import names exactly one")
        name = names[0]
    else:
        by_type = (a.name for a in ARCHITECTURES.values() if a.model_type == model_type)
        name = next(by_type, f"model_type={model_type!r}")
    supported = ", ".join(ARCHITECTURES)
    if name not in ARCHITECTURES:
        raise BamError(f"unsupported architecture {name}: bam-pipeline imports {supported}")
    arch = ARCHITECTURES[name]
    if model_type is not None and model_type != arch.model_type:
        raise BamError(f"config.json names {name} but model_type={model_type!r} (expected {arch.model_type!r}); "
                       "fix the checkpoint's config.json")
    return arch


def check_fields(hf: Mapping[str, Any], arch: Architecture) -> None:
    """Refuse a field ``arch`` does not know, and a refused field at a value our model cannot compute."""
    for key, value in hf.items():
        kind = arch.classify(key)
        if kind is None:
            raise BamError(
                f"unknown {arch.name} config field {key}={value!r}: the import knows transformers 4.40-5.x "
                "fields and refuses others rather than ignore one that may change the model; remove it from "
                "config.json if transformers ignores it"
            )
        if kind == "refused" and value not in arch.refused[key]:
            raise BamError(f"unsupported {arch.name} setting {key}={value!r}: {REFUSAL_REASONS[key]}")


def _get(hf: Mapping[str, Any], arch: Architecture, key: str) -> Any:
    """``hf[key]``, the class default when the file leaves it out, or a one-line error."""
    if key in hf and hf[key] is not None:
        return hf[key]
    if key in arch.defaults:
        return arch.defaults[key]
    raise BamError(f"config.json of this {arch.name} checkpoint has no {key}; re-download the checkpoint")


def rope_settings(hf: Mapping[str, Any], arch: Architecture) -> tuple[float, RopeScaling]:
    """RoPE base and scaling from either spelling; refuses RoPE types we do not compute exactly."""
    field = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    params = hf.get(field) or {}
    if not isinstance(params, Mapping):
        raise BamError(f"config.json {field}={params!r} is not an object; re-download the checkpoint")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPE_KEYS:
        raise BamError(
            f"unsupported RoPE type {field}.rope_type={rope_type!r}: bam-pipeline computes "
            f"{', '.join(ROPE_TYPE_KEYS)} exactly (dynamic and longrope change with the sequence length)"
        )
    for key, value in params.items():
        if key == "partial_rotary_factor":
            if value not in (1, 1.0, None):
                raise BamError(f"unsupported {field}.partial_rotary_factor={value!r}: {REFUSAL_REASONS[key]}")
        elif key not in ROPE_TYPE_KEYS[rope_type]:
            raise BamError(f"unknown {field}.{key}={value!r} for RoPE type {rope_type!r}; remove it from config.json "
                           "if transformers ignores it")
    theta = params.get("rope_theta", hf.get("rope_theta"))
    if theta is None:
        raise BamError(f"config.json of this {arch.name} checkpoint names no rope_theta; re-download the checkpoint")

    def need(key: str) -> Any:
        if params.get(key) is None:
            raise BamError(f"config.json {field} of type {rope_type!r} has no {key}; re-download the checkpoint")
        return params[key]

    if rope_type == "linear":
        return float(theta), RopeScaling("linear", factor=float(need("factor")))
    if rope_type == "llama3":
        original = params.get("original_max_position_embeddings") or _get(hf, arch, "max_position_embeddings")
        return float(theta), RopeScaling(
            "llama3", factor=float(need("factor")), low_freq_factor=float(need("low_freq_factor")),
            high_freq_factor=float(need("high_freq_factor")), original_max_seq_len=int(original),
        )
    return float(theta), RopeScaling()


def attention_window(hf: Mapping[str, Any], arch: Architecture, n_layers: int) -> int | None:
    """The sliding window some layer of the model applies, or None when every layer is full.

    Mistral: ``sliding_window`` for every layer. Qwen2: with ``use_sliding_window``, the layers
    ``layer_types`` marks ``sliding_attention`` (5.x), or without it those from
    ``max_window_layers`` on (the rule 4.x and 5.x share).
    """
    if arch.model_type == "mistral":
        return hf.get("sliding_window", arch.defaults["sliding_window"])
    if arch.model_type != "qwen2":
        return None
    layer_types = hf.get("layer_types")
    if layer_types is not None and (not isinstance(layer_types, list) or len(layer_types) != n_layers
                                    or set(layer_types) - set(_LAYER_TYPES)):
        raise BamError(f"config.json layer_types={layer_types!r} is not {n_layers} entries of "
                       f"{' / '.join(_LAYER_TYPES)}; re-download the checkpoint")
    if not _get(hf, arch, "use_sliding_window"):
        return None
    if layer_types is not None:
        sliding = "sliding_attention" in layer_types
    else:
        sliding = _get(hf, arch, "max_window_layers") < n_layers
    return hf.get("sliding_window", arch.defaults["sliding_window"]) if sliding else None


def to_model_config(hf: Mapping[str, Any], *, max_seq_len: int | None = None, name: str = "hf") -> HFModelConfig:
    """Map a ``config.json`` object onto a dense :class:`ModelConfig`.

    ``max_seq_len`` is the context the model will run at (default: ``max_position_embeddings``);
    a sliding window shorter than it is refused, since our attention is full.
    """
    arch = architecture_of(hf)
    check_fields(hf, arch)
    for key in _REQUIRED:
        if hf.get(key) is None:
            raise BamError(f"config.json of this {arch.name} checkpoint has no {key}; re-download the checkpoint")
    n_layers, d_model, n_heads = hf["num_hidden_layers"], hf["hidden_size"], hf["num_attention_heads"]
    context = max_seq_len if max_seq_len is not None else hf["max_position_embeddings"]
    window = attention_window(hf, arch, n_layers)
    if window is not None and context > window:
        raise BamError(
            f"{arch.name} attends over a sliding window of {window} positions, shorter than the context "
            f"max_seq_len={context}; our attention is full, so import with max_seq_len <= {window}"
        )
    theta, scaling = rope_settings(hf, arch)
    head_dim = hf.get("head_dim")
    try:
        model = ModelConfig(
            name=name,
            vocab_size=hf["vocab_size"],
            d_model=d_model,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            d_ff=hf["intermediate_size"],
            max_seq_len=context,
            rope_theta=theta,
            rope_scaling=scaling,
            rope_precision="float32",
            norm_eps=float(_get(hf, arch, arch.norm_eps_field)),
            norm_kind=arch.norm_kind,
            tie_embeddings=bool(_get(hf, arch, "tie_word_embeddings")),
            parallel_residual=arch.parallel_residual,
            head_dim_override=head_dim if head_dim is not None and head_dim * n_heads != d_model else None,
            qkv_bias=arch.qkv_bias,
            logit_scale=float(_get(hf, arch, "logit_scale")) if "logit_scale" in arch.honoured else 1.0,
            sliding_window=window,
        )
    except ConfigError as e:
        raise BamError(f"{arch.name} config.json maps to an invalid model: {e}") from None
    return HFModelConfig(arch, model, {k: v for k, v in hf.items() if is_bookkeeping(k)})
