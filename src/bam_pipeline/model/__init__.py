"""The model (torch only): configuration and presets, routers, the (mixture) transformer built from
them, its loss and its parameter and FLOP counts."""

from bam_pipeline.model.config import PRESETS, ModelConfig, RouterConfig, preset
from bam_pipeline.model.transformer import BAMTransformer, LayerRouting, ModelOutput

__all__ = ["PRESETS", "BAMTransformer", "LayerRouting", "ModelConfig", "ModelOutput", "RouterConfig", "preset"]
