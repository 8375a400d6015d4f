"""A bam-pipeline model for transformers (``trust_remote_code=True``): the code bam-pipeline trains
(``transformer.py`` and the modules it imports, beside this file) as a ``PreTrainedModel`` that
``generate()`` decodes with the model's own KV cache. Torch and transformers only."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import ModelConfig
from .configuration_bam import BamConfig
from .kv_cache import KVCache
from .layers import LayerNorm, RMSNorm, RotaryEmbedding
from .loss import next_token_nll
from .transformer import BAMTransformer

# transformers 5.x renamed the cache argument and output field from past_key_values to cache
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class BamForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = BamConfig
    _no_split_modules = ["Block"]
    _input_embed_layer = "tok_emb"  # model.tok_emb

    def __init__(self, config: BamConfig) -> None:
        super().__init__(config)
        self.model = BAMTransformer(ModelConfig.from_dict(config.model))
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() passes back the cache forward() returns: the model's KVCache

    def _reorder_cache(self, cache: KVCache, beam_idx: torch.Tensor) -> KVCache:
        """Beam search: the cached sequences in the order ``beam_idx`` (B,) picks."""
        cache.keys, cache.values = [k[beam_idx] for k in cache.keys], [v[beam_idx] for v in cache.values]
        cache.valid = cache.valid[beam_idx]
        return cache

    def _init_weights(self, module: nn.Module) -> None:
        """What the checkpoint did not provide, as a new model has it (loaded tensors, which transformers
        marks ``_is_hf_initialized``, are kept): RoPE tables, never saved; weights N(0, init_std), norms 1,
        q/k/v biases 0, a hash router's table ``id % E``, expert-choice thresholds NaN."""
        if isinstance(module, RotaryEmbedding):
            return module.reset_tables()
        for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if getattr(t, "_is_hf_initialized", False):
                continue
            with torch.no_grad():
                if name == "table":
                    t.copy_(torch.arange(t.numel(), device=t.device) % module.n_experts)
                elif name == "threshold":
                    t.fill_(math.nan)
                elif name in ("bq", "bk", "bv"):
                    t.zero_()
                elif isinstance(module, (RMSNorm, LayerNorm)):
                    t.fill_(1.0)
                else:
                    t.normal_(0.0, self.model.cfg.init_std)

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, past_key_values: KVCache | None = None, use_cache: bool | None = None,
                labels: torch.LongTensor | None = None, logits_to_keep: int = 0, **kwargs: Any
                ) -> CausalLMOutputWithPast:
        """Logits (B, T, V) of ``input_ids`` (B, T) after the tokens in ``cache`` (the last ``logits_to_keep``
        when positive); ``attention_mask`` (B, S) is 0 at left padding. ``use_cache``: return the cache (a new
        one for the whole context unless passed). ``labels`` (B, T): the next-token loss (-100 ignored)."""
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"this model decodes with its own KVCache, not a {type(cache).__name__}; pass the "
                            "cache its forward returned, or none")
        B, T = input_ids.shape
        valid = None if attention_mask is None else attention_mask[:, -T:].bool()  # (B, T) real tokens
        if cache is None and (use_cache or (valid is not None and not valid.all())):  # padding: a cache's mask
            cache = KVCache.for_model(self.model, B, self.model.cfg.max_seq_len if use_cache else T)
        out = self.model(input_ids, cache=cache, valid=valid if cache is not None else None,
                         last_only=logits_to_keep == 1)
        logits = out.logits[:, -logits_to_keep:] if logits_to_keep else out.logits
        loss = None if labels is None else next_token_nll(out.logits[:, :-1], labels[:, 1:])
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})
