"""Hugging Face model directories into our model: the supported architectures and what each config
field is to the import (:mod:`~bam_pipeline.interop.architectures`), ``config.json`` to
:class:`~bam_pipeline.model.ModelConfig` (:mod:`~bam_pipeline.interop.hf_config`), safetensors
weights streamed into our state-dict layout (:mod:`~bam_pipeline.interop.hf_weights`), the
directory's tokenizer and end-of-document token (:mod:`~bam_pipeline.interop.hf_tokenizer`),
hub ids resolved to local directories (:mod:`~bam_pipeline.interop.hub`), and one call that
converts a directory (:mod:`~bam_pipeline.interop.hf_import`). And back out: a model directory
transformers loads, in a stock class or as custom code (the model's own forward-pass modules with the
adapter of :mod:`~bam_pipeline.interop.remote_code`), and its upload (:mod:`~bam_pipeline.interop.hf_export`).

Needs torch, safetensors and tokenizers only; huggingface_hub for hub ids and uploads, and
transformers for SentencePiece-only tokenizers and stock-class exports, are imported when used.
"""

from bam_pipeline.interop.architectures import ARCHITECTURES, Architecture
from bam_pipeline.interop.hf_config import HFModelConfig, read_config_file, to_model_config
from bam_pipeline.interop.hf_export import (
    ExportResult, ExportTokenizer, ModelCard, StockClass, choose_format, push_to_hub, write_export,
)
from bam_pipeline.interop.hf_import import ImportedHFModel, import_hf_model
from bam_pipeline.interop.hf_tokenizer import HFModelTokenizer, encode_documents, load_hf_model_tokenizer
from bam_pipeline.interop.hf_weights import read_weights, weight_files
from bam_pipeline.interop.hub import HFModelDir, resolve_hf_model_dir

__all__ = [
    "ARCHITECTURES", "Architecture", "ExportResult", "ExportTokenizer", "HFModelConfig", "HFModelDir",
    "HFModelTokenizer", "ImportedHFModel", "ModelCard", "StockClass", "choose_format", "encode_documents",
    "import_hf_model", "load_hf_model_tokenizer", "push_to_hub", "read_config_file", "read_weights",
    "resolve_hf_model_dir", "to_model_config", "weight_files", "write_export",
]
