"""Test helpers: tiny random transformers checkpoints, built from configs (no download) and saved with
``save_pretrained`` plus a small tokenizer, and the comparison of our converted model with
transformers on the same ids.

The q/k projections are scaled up after transformers' 0.02 init: with it, attention is nearly
uniform and a RoPE or head-mapping bug would hide in the noise. Norm scales and biases are drawn
away from their 1 / 0 init for the same reason.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

transformers = pytest.importorskip("transformers")

from bam_pipeline.interop import import_hf_model  # noqa: E402
from bam_pipeline.model import BAMTransformer  # noqa: E402

# The start of a script run in a fresh interpreter where bam_pipeline cannot be imported: what an
# export's user has (transformers and torch, one thread); the script checks it, then goes on.
WITHOUT_BAM_PIPELINE = textwrap.dedent("""
    import sys
    sys.modules["bam_pipeline"] = None  # any import of bam_pipeline now raises ImportError
    import json, torch, transformers
    torch.set_num_threads(1)
    try:
        import bam_pipeline
        sys.exit("bam_pipeline is importable")
    except ImportError:
        pass
""")

VOCAB_ROWS = 96  # embedding rows; the tokenizer below uses the first 32 (rows may exceed ids)
CHARS = " abcdefghijklmnopqrstuvwxyz.,"
SPECIALS = ("<unk>", "<s>", "</s>")
BOS_ID, EOS_ID = 1, 2
SEQ = 40  # compared positions; every context and window in the tests is at least this long
CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "cohere": ("CohereConfig", "CohereForCausalLM"),
}
TINY = dict(vocab_size=VOCAB_ROWS, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1, bos_token_id=BOS_ID,
            eos_token_id=EOS_ID, pad_token_id=None)


def tiny_tokenizer() -> Tokenizer:
    """Character-level, lower-cased, BOS added per document by its post-processor (Llama 3 style)."""
    vocab = {tok: i for i, tok in enumerate((*SPECIALS, *CHARS))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    tok.add_special_tokens(list(SPECIALS))
    return tok


def hf_config(arch: str, **fields: Any):
    return getattr(transformers, CLASSES[arch][0])(**{**TINY, **fields})


def hf_model(config, seed: int = 0):
    """A random transformers model with peaked attention, non-trivial norms and biases."""
    torch.manual_seed(seed)
    model = getattr(transformers, config.architectures[0] if config.architectures else
                    CLASSES[config.model_type][1])(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(3.0)
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
            if "norm" in name:
                p.normal_(1.0, 0.2)
    return model


def save_checkpoint(model, path: Path, *, dtype: torch.dtype = torch.float32, tokenizer: bool = True,
                    **save_kwargs: Any) -> Path:
    """``save_pretrained`` in ``dtype`` (the model is left in float32) plus ``tokenizer.json``."""
    model.to(dtype).save_pretrained(path, **save_kwargs)
    model.to(torch.float32)
    if tokenizer:
        tiny_tokenizer().save(str(path / "tokenizer.json"))
    return path


def load_hf(path: Path):
    """transformers' model from the directory, in float32 (a bf16/f16 save upcast as we do)."""
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def ours(path: Path, **kwargs: Any) -> BAMTransformer:
    ck = import_hf_model(path, **kwargs)
    model = BAMTransformer(ck.config).eval()
    model.load_state_dict(ck.state_dict, strict=True)
    return model


def compare_ids() -> torch.Tensor:
    """(2, SEQ) ids: a tokenized sentence and random ids over every embedding row."""
    text = tiny_tokenizer().encode("the quick brown fox jumps over the lazy dog, then sleeps.").ids
    text = (text * 2)[:SEQ]
    rand = torch.randint(0, VOCAB_ROWS, (SEQ,), generator=torch.Generator().manual_seed(5))
    return torch.stack([torch.tensor(text), rand])


def max_logit_difference(hf_model, our_model, ids: torch.Tensor | None = None) -> float:
    ids = compare_ids() if ids is None else ids
    with torch.no_grad():
        want = hf_model(ids).logits
        got = our_model(ids).logits
    assert want.shape == got.shape and want.std() > 0.05  # real logits, not near-zero noise
    return (want - got).abs().max().item()


def rewrite_config(path: Path, change) -> None:
    """Edit ``config.json`` in place with ``change(dict) -> dict``."""
    cfg = path / "config.json"
    cfg.write_text(json.dumps(change(json.loads(cfg.read_text())), indent=2))
