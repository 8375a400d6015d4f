"""The model (torch only): configuration and presets, routers, the (mixture) transformer built from
them, its loss, its parameter and FLOP counts, and decoding with a KV cache."""

from .config import PRESETS, ModelConfig, RouterConfig, preset
from .generation import GREEDY, Generation, Sampling, generate
from .kv_cache import KVCache
from .transformer import BAMTransformer, LayerRouting, ModelOutput

__all__ = ["GREEDY", "PRESETS", "BAMTransformer", "Generation", "KVCache", "LayerRouting", "ModelConfig", "ModelOutput",
           "RouterConfig", "Sampling", "generate", "preset"]
