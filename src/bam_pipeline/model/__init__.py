"""The model (torch only): configuration and presets, routers, the (mixture) transformer built from
them, its loss, its parameter and FLOP counts, and decoding with a KV cache."""

from bam_pipeline.model.config import PRESETS, ModelConfig, RouterConfig, preset
from bam_pipeline.model.generation import GREEDY, Generation, Sampling, generate
from bam_pipeline.model.kv_cache import KVCache
from bam_pipeline.model.transformer import BAMTransformer, LayerRouting, ModelOutput

__all__ = ["GREEDY", "PRESETS", "BAMTransformer", "Generation", "KVCache", "LayerRouting", "ModelConfig", "ModelOutput",
           "RouterConfig", "Sampling", "generate", "preset"]
