"""Test helper: a tiny GGUF file written with the ``gguf`` package's writer from a tiny random transformers
Llama, the way llama.cpp's converter writes one: ``llama.*`` metadata, q/k rows permuted into llama.cpp's
interleaved RoPE layout, norms in F32, the embedding in Q8_0 and every other matrix in Q4_1 (quantised with
``gguf.quants.quantize``), and a byte-level BPE tokenizer as ``tokenizer.ggml.*`` metadata with SmolLM2's
special tokens: ``<|endoftext|>`` (0, unknown), ``<|im_start|>`` (1, BOS), ``<|im_end|>`` (2, EOS and padding).
The reference for what the file means is transformers reading it (``gguf_file=``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from hf_checkpoints import hf_model  # noqa: E402

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
TEXT = ("def add(a, b):\n    return a + b\n\nThe quick brown fox jumps over the lazy dog. "
        "Let x be a real number; then x squared is never negative. The licensee shall keep this notice.\n") * 4
# Q4_1 and Q8_0 pack 32 values a block: every matrix's rows (its input width) are a multiple of 32
GGUF_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
                 initializer_range=0.1, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID,
                 tie_word_embeddings=True)
Q = gguf.GGMLQuantizationType


def tiny_bpe() -> Tokenizer:
    """A byte-level BPE of about 300 ids trained on :data:`TEXT`, the special tokens first."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(
        vocab_size=300, special_tokens=list(SPECIALS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return tok


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py, LlamaModel.permute): each head's half-split RoPE
    dims interleaved into pairs; transformers' GGUF loader undoes it."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_llama(seed: int = 0, **fields):
    tok = tiny_bpe()
    config = transformers.LlamaConfig(**{**GGUF_TINY, "vocab_size": tok.get_vocab_size(), **fields})
    return hf_model(config, seed=seed), tok


def _tensors(model, quant: Q) -> dict[str, tuple[np.ndarray, Q]]:
    """GGUF name -> (values in torch's (out, in) order, the ggml type to store them in)."""
    cfg = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": (sd["model.embed_tokens.weight"], Q.Q8_0),
           "output_norm.weight": (sd["model.norm.weight"], Q.F32)}
    if not cfg.tie_word_embeddings:
        out["output.weight"] = (sd["lm_head.weight"], quant)
    for i in range(cfg.num_hidden_layers):
        hf, blk = f"model.layers.{i}.", f"blk.{i}."
        out[blk + "attn_norm.weight"] = (sd[hf + "input_layernorm.weight"], Q.F32)
        out[blk + "ffn_norm.weight"] = (sd[hf + "post_attention_layernorm.weight"], Q.F32)
        out[blk + "attn_q.weight"] = (llama_cpp_permute(sd[hf + "self_attn.q_proj.weight"], cfg.num_attention_heads),
                                      quant)
        out[blk + "attn_k.weight"] = (llama_cpp_permute(sd[hf + "self_attn.k_proj.weight"], cfg.num_key_value_heads),
                                      quant)
        for gguf_name, hf_name in (("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
                                   ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
                                   ("ffn_down", "mlp.down_proj")):
            out[f"{blk}{gguf_name}.weight"] = (sd[f"{hf}{hf_name}.weight"], quant)
    return out


def zero_blocks(name: str, qtype: Q) -> Callable[[dict], None]:
    """A :func:`write_gguf` edit: tensor ``name`` stored as zero blocks of ``qtype`` (packed, not quantised)."""
    def edit(tensors: dict) -> None:
        values, _ = tensors[name]
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        tensors[name] = (np.zeros((values.shape[0], values.shape[1] // block * size), np.uint8), qtype)
    return edit


def write_gguf(path: Path, model, tok: Tokenizer, *, arch: str = "llama", quant: Q = Q.Q4_1,
               edit: Callable[[dict], None] | None = None) -> Path:
    """``model`` and ``tok`` as a GGUF file at ``path``; ``edit`` may change the tensor dict (name ->
    (values, type)) before it is written: float values are quantised to the type, uint8 ones are taken as
    its blocks already packed."""
    cfg = model.config
    tensors = _tensors(model, quant)
    if edit is not None:
        edit(tensors)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("Tiny Llama For Tests")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t, _ in vocab])
    merges = json.loads(tok.to_str())["model"]["merges"]  # ["a b", ...] or [["a", "b"], ...] by tokenizers version
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_unk_token_id(UNK_ID)
    w.add_pad_token_id(EOS_ID)
    w.add_add_bos_token(False)
    for name, (values, qtype) in tensors.items():
        if qtype == Q.F32:
            w.add_tensor(name, values.astype(np.float32))
        elif values.dtype == np.uint8:
            w.add_tensor(name, values, raw_dtype=qtype)
        else:
            w.add_tensor(name, gguf.quants.quantize(values.astype(np.float32), qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
