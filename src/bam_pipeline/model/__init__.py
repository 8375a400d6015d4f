"""The model: configuration and presets, and the (mixture) transformer built from them."""

from bam_pipeline.model.config import PRESETS, ModelConfig, preset
from bam_pipeline.model.transformer import BAMTransformer, LayerRouting, ModelOutput

__all__ = ["PRESETS", "BAMTransformer", "LayerRouting", "ModelConfig", "ModelOutput", "preset"]
