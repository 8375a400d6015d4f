"""GGUF checkpoints (llama.cpp's one-file format) as transformers reads them: the file a checkpoint path
names, the transformers config the file implies, its tensors dequantised by transformers under
transformers' names, the quantisation types it holds, and the tokenizer transformers builds from it.

There is no GGUF reader here. The metadata, the dequantisation (transformers' GGUF loader, which
dequantises with the ``gguf`` package and undoes llama.cpp's q/k row permutation) and the tokenizer are
transformers'; :mod:`~bam_pipeline.interop.hf_import` maps the result through the same tables as a
safetensors checkpoint. transformers and gguf (``pip install 'bam-pipeline[hf]'``) are imported when a
GGUF file is read; what is read is cached per file (path, size and modification time) for the command.
"""

from __future__ import annotations

import functools
import importlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bam_pipeline.errors import BamError
from bam_pipeline.interop.architectures import ARCHITECTURES
from bam_pipeline.interop.hf_config import CONFIG_FILE

GGUF_SUFFIX = ".gguf"
INSTALL = "pip install 'bam-pipeline[hf]'"


def find_gguf(path: Path) -> Path | None:
    """The GGUF file ``path`` names: itself when it is a ``.gguf`` file, or the one ``.gguf`` file of a
    directory that has no config.json; None for anything else (a Hugging Face model directory, or
    nothing). A directory of several ``.gguf`` files is refused: which one is meant is not said."""
    if path.is_file():
        return path if path.suffix == GGUF_SUFFIX else None
    if not path.is_dir() or (path / CONFIG_FILE).is_file():
        return None
    files = sorted(p for p in path.iterdir() if p.suffix == GGUF_SUFFIX and p.is_file())
    if len(files) > 1:
        names = ", ".join(p.name for p in files[:4]) + (", ..." if len(files) > 4 else "")
        raise BamError(f"{path} holds {len(files)} .gguf files ({names}); pass the one to import as the path "
                       f"itself, e.g. {files[0]}")
    return files[0] if files else None


def _require_gguf() -> None:
    """transformers and gguf importable, in versions that read GGUF files, or one line saying what to install."""
    try:
        importlib.import_module("gguf")  # transformers dequantises with it
        from transformers.utils.import_utils import GGUF_MIN_VERSION, is_gguf_available
    except ImportError as e:
        raise BamError(f"reading a GGUF checkpoint needs transformers and gguf, and {e.name or 'one'} is not "
                       f"installed: {INSTALL}") from None
    if not is_gguf_available():
        raise BamError(f"transformers reads GGUF files with gguf>={GGUF_MIN_VERSION}, and an older gguf is "
                       f"installed: {INSTALL}")


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


def _key(path: Path) -> tuple[str, int, int]:
    """What identifies a file's content within a command, for the caches below."""
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


@dataclass(frozen=True)
class GGUFContents:
    """What a GGUF file holds, read from its header: ``general.architecture`` and each tensor's ggml type."""

    architecture: str
    tensor_types: dict[str, str]  # tensor name -> ggml type name, in the file's order

    @property
    def quantization(self) -> dict[str, int]:
        """How many tensors are stored in each ggml type (``{"F32": 61, "Q4_1": 210, "Q8_0": 1}``)."""
        return dict(sorted(Counter(self.tensor_types.values()).items()))


@functools.lru_cache(maxsize=8)
def _contents(key: tuple[str, int, int]) -> GGUFContents:
    path = Path(key[0])
    _require_gguf()
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import read_field

    try:
        reader = GGUFReader(str(path))
        architecture = read_field(reader, "general.architecture")
    except Exception as e:  # gguf raises ValueError, struct errors and others on a truncated or foreign file
        raise BamError(f"cannot read {path} as a GGUF file ({_one_line(e)}); re-download it") from None
    if not architecture:
        raise BamError(f"{path} names no general.architecture in its GGUF metadata; re-download it")
    return GGUFContents(str(architecture[0]), {t.name: t.tensor_type.name for t in reader.tensors})


def gguf_contents(path: Path) -> GGUFContents:
    """The file's architecture and tensor types; refuses a type transformers cannot dequantise, before
    any weight is read."""
    contents = _contents(_key(path))
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize

    first = {}
    for name, qtype in contents.tensor_types.items():
        first.setdefault(qtype, name)
    for qtype, name in first.items():
        try:  # one block of zeros through the dequantiser transformers calls on every tensor
            dequantize(torch.zeros(GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][1], dtype=torch.uint8).numpy(),
                       GGMLQuantizationType[qtype])
        except NotImplementedError:
            raise BamError(f"tensor {name} of {path} is stored as {qtype}, a quantisation type transformers "
                           "cannot dequantise (gguf has no dequantiser for it); convert the model to another type "
                           "(e.g. Q8_0, Q4_K or F16) with llama.cpp") from None
    return contents


def _supported() -> str:
    return ", ".join(ARCHITECTURES)


@functools.lru_cache(maxsize=8)
def _transformers_config(key: tuple[str, int, int]) -> Any:
    path = Path(key[0])
    arch = _contents(key).architecture
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # transformers raises ValueError / KeyError / NotImplementedError for an unknown one
        raise BamError(f"unsupported architecture {arch!r} in the GGUF metadata of {path} (transformers: "
                       f"{_one_line(e)}); bam-pipeline imports {_supported()}") from None
    if config.model_type not in {a.model_type for a in ARCHITECTURES.values()}:
        raise BamError(f"unsupported architecture {arch!r} in the GGUF metadata of {path} (transformers reads it "
                       f"as {type(config).__name__}); bam-pipeline imports {_supported()}")
    return config


def gguf_config(path: Path) -> dict[str, Any]:
    """The config transformers builds from the file's metadata, as the ``config.json`` it would save
    (every field, so no class default is assumed); refuses an architecture we do not import."""
    return _transformers_config(_key(path)).to_dict()


def read_gguf_tensors(path: Path) -> dict[str, Tensor]:
    """The file's tensors dequantised to float32 by transformers, under the names of the transformers
    model its config builds (``model.layers.0.self_attn.q_proj.weight``, q/k rows in transformers'
    layout). The names come from a model built on the meta device: no second model is allocated."""
    config = _transformers_config(_key(path))
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    try:
        return load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    except NotImplementedError as e:  # gguf_contents checks every type first; this is the backstop
        raise BamError(f"transformers cannot dequantise {path} ({_one_line(e)}); convert the model to another "
                       "type with llama.cpp") from None


@functools.lru_cache(maxsize=8)
def _tokenizer(key: tuple[str, int, int]) -> Any:
    path = Path(key[0])
    _require_gguf()
    from transformers import AutoTokenizer

    try:
        fast = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # transformers raises ValueError for a tokenizer type it cannot build, and others
        raise BamError(f"transformers could not build a tokenizer from {path} ({_one_line(e)}); the file's "
                       "tokenizer.ggml metadata is missing or of a kind transformers does not read") from None
    return fast.backend_tokenizer


def gguf_tokenizer(path: Path) -> Any:
    """The ``tokenizers.Tokenizer`` transformers builds from the file's ``tokenizer.ggml.*`` metadata (its
    fast tokenizer's backend, post-processor included)."""
    return _tokenizer(_key(path))
