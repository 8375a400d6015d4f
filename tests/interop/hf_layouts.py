"""Checkpoint directories for the bad-input catalogue's import-layout cases: a tiny Llama checkpoint (untied,
bfloat16, sharded, with a tokenizer) built with ``save_pretrained`` once per session, copied into a case's
scratch directory as ``ckpt`` and changed as the case says; and tiny GGUF files (tests/interop/gguf_files.py)
written into ``{scratch}/gguf``. transformers and gguf are imported only when a case runs (the case is skipped
without them), so the catalogue imports this module in every environment."""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

INDEX = "model.safetensors.index.json"
_BASE: list[Path] = []  # the session's base checkpoint, built by the first case that needs it


def _base() -> Path:
    if not _BASE:
        pytest.importorskip("transformers")
        from hf_checkpoints import hf_config, hf_model, save_checkpoint

        root = Path(tempfile.mkdtemp(prefix="hf-layouts-"))
        atexit.register(shutil.rmtree, root, True)
        model = hf_model(hf_config("llama", tie_word_embeddings=False))
        _BASE.append(save_checkpoint(model, root / "ckpt", dtype=torch.bfloat16, max_shard_size="30KB"))
    return _BASE[0]


def hf_checkpoint(change: Callable[[Path], None] | None = None) -> Callable[[Path, Path], list[str]]:
    """A catalogue setup: the base checkpoint at ``{scratch}/ckpt``, then ``change(ckpt)``."""
    def setup(run: Path, scratch: Path) -> list[str]:
        ckpt = shutil.copytree(_base(), scratch / "ckpt")
        if change is not None:
            change(ckpt)
        return []
    return setup


def shard_of(ckpt: Path, name: str) -> str:
    return json.loads((ckpt / INDEX).read_text())["weight_map"][name]


def edit_tensors(name: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    """Change the shard holding ``name`` (the index updated to what the shards then hold)."""
    def edit(ckpt: Path) -> None:
        shard = shard_of(ckpt, name)
        sd = load_file(ckpt / shard)
        change(sd)
        save_file(sd, ckpt / shard, metadata={"format": "pt"})
        index = json.loads((ckpt / INDEX).read_text())
        index["weight_map"] = {n: s for n, s in index["weight_map"].items() if s != shard} | {n: shard for n in sd}
        (ckpt / INDEX).write_text(json.dumps(index))
    return edit


def also_single_file(ckpt: Path) -> None:
    """A model.safetensors beside the index: the same weights, perturbed (another model's)."""
    sd = {n: t + 0.01 for shard in sorted(ckpt.glob("model-*.safetensors")) for n, t in load_file(shard).items()}
    save_file(sd, ckpt / "model.safetensors", metadata={"format": "pt"})


def stored_twice(name: str) -> Callable[[Path], None]:
    """A copy of tensor ``name`` in the first shard too (zeros), the index still placing it where it was."""
    def edit(ckpt: Path) -> None:
        first = sorted(ckpt.glob("model-*.safetensors"))[0]
        assert shard_of(ckpt, name) != first.name
        sd = load_file(first)
        sd[name] = torch.zeros(load_file(ckpt / shard_of(ckpt, name))[name].shape, dtype=torch.bfloat16)
        save_file(sd, first, metadata={"format": "pt"})
    return edit


def config_field(**fields) -> Callable[[Path], None]:
    def edit(ckpt: Path) -> None:
        cfg = json.loads((ckpt / "config.json").read_text())
        (ckpt / "config.json").write_text(json.dumps({**cfg, **fields}))
    return edit


def gguf_checkpoint(*names: str, arch: str = "llama", zero_blocks: tuple[str, str] | None = None
                    ) -> Callable[[Path, Path], list[str]]:
    """A catalogue setup: the tiny GGUF Llama written as each of ``names`` (default ``tiny.gguf``) into
    ``{scratch}/gguf``, naming ``arch`` in its metadata; ``zero_blocks``: (tensor, ggml type name) stored as zero
    blocks of that type."""
    def setup(run: Path, scratch: Path) -> list[str]:
        pytest.importorskip("gguf")
        import gguf_files

        (scratch / "gguf").mkdir()
        model, tok = gguf_files.tiny_llama()
        edit = gguf_files.zero_blocks(zero_blocks[0], gguf_files.Q[zero_blocks[1]]) if zero_blocks else None
        for name in names or ("tiny.gguf",):
            gguf_files.write_gguf(scratch / "gguf" / name, model, tok, arch=arch, edit=edit)
        return []
    return setup
