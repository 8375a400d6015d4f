"""A Hugging Face model's weights: a table from transformers' tensor names to our state-dict layout, the named
transforms it applies, and a streaming reader over single or sharded safetensors files.

The table maps each tensor of ``tensor_table(cfg, arch)`` to our key, its shape in the
Hugging Face model and its transforms: :func:`linear_weight` (transformers' ``(out, in)`` Linear weight
to our ``(1, in, out)`` one-expert stack), :func:`linear_bias` (``(out,)`` to ``(1, out)``) and,
for models that rotate q/k in interleaved pairs (Cohere), :func:`interleaved_to_half_split`
on q/k rows first. Everything else is copied as is. Each transform has a named inverse
(:data:`INVERSES`), so the same table also writes our tensors back into the Hugging Face layout
(:meth:`TensorMapping.export`, used by :mod:`~bam_pipeline.interop.hf_export`).

Reading is tensor by tensor: every file's header is checked first (names, shapes, dtypes) so a
bad directory fails before any weight is read, then each tensor is read, transformed and copied
once into a new tensor of the requested dtype, which must be finite. Pickled ``.bin`` weights
are refused: we never unpickle weights. A GGUF file's tensors, dequantised by transformers
(:mod:`~bam_pipeline.interop.hf_gguf`), go through the same checks and table from memory
(:func:`convert_weights`).

Where a directory's files could be read two ways, the import reads them as transformers 5.x does
or refuses: the head (:func:`head_table`, :func:`read_weights`) is tied or not as transformers
ties it, and a directory holding both weight layouts (a single file and an index) is refused,
since transformers' choice there (the single file) is as likely to be the stale one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from bam_pipeline.errors import BamError, ConfigError
from bam_pipeline.interop.architectures import Architecture
from bam_pipeline.model.config import ModelConfig
from bam_pipeline.model.state_dict import StateDict, expected_shapes

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
EMBEDDING, HEAD = "model.embed_tokens.weight", "lm_head.weight"
FLOAT_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
TENSOR_DTYPES = {d: name for name, d in FLOAT_DTYPES.items()}
# Buffers old transformers versions saved and every version skips on load.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

Transform = Callable[[Tensor], Tensor]


def linear_weight(w: Tensor) -> Tensor:
    """A transformers Linear weight ``(out, in)`` as our one-expert stack ``(1, in, out)`` (a view)."""
    return w.t().unsqueeze(0)


def linear_bias(b: Tensor) -> Tensor:
    """A transformers Linear bias ``(out,)`` as our one-expert stack ``(1, out)`` (a view)."""
    return b.unsqueeze(0)


def interleaved_to_half_split(rows: Tensor, head_dim: int) -> Tensor:
    """Reorder the head dims of q/k projection rows from RoPE's interleaved layout, pair ``j`` at
    ``(2j, 2j+1)``, to the half-split layout, pair ``j`` at ``(j, j + head_dim/2)``.

    ``rows`` is ``(heads * head_dim, ...)`` (a weight or a bias); head ``h``'s new dim ``j`` is its
    old dim ``2j`` and new dim ``j + head_dim/2`` its old ``2j + 1``. q and k get the same
    permutation, so every score ``q . k`` is unchanged.
    """
    order = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])  # (hd,)
    return rows.unflatten(0, (-1, head_dim))[:, order].flatten(0, 1)


def stacked_to_linear_weight(w: Tensor) -> Tensor:
    """Our one-expert stack ``(1, in, out)`` as a transformers Linear weight ``(out, in)`` (a view)."""
    return w.squeeze(0).t()


def stacked_to_linear_bias(b: Tensor) -> Tensor:
    """Our one-expert bias stack ``(1, out)`` as a transformers Linear bias ``(out,)`` (a view)."""
    return b.squeeze(0)


def half_split_to_interleaved(rows: Tensor, head_dim: int) -> Tensor:
    """The inverse of :func:`interleaved_to_half_split`: head dim ``j`` of the half-split layout goes
    to ``2j`` and dim ``j + head_dim/2`` to ``2j + 1``, for q/k rows ``(heads * head_dim, ...)``."""
    order = torch.stack([torch.arange(head_dim // 2), torch.arange(head_dim // 2, head_dim)], dim=1).flatten()
    return rows.unflatten(0, (-1, head_dim))[:, order].flatten(0, 1)


# Each import transform and its inverse (export).
INVERSES: dict[Callable[..., Tensor], Callable[..., Tensor]] = {
    linear_weight: stacked_to_linear_weight,
    linear_bias: stacked_to_linear_bias,
    interleaved_to_half_split: half_split_to_interleaved,
}


def inverse(f: Transform) -> Transform:
    """The inverse of an import transform (a ``functools.partial`` keeps its arguments)."""
    if isinstance(f, partial):
        return partial(INVERSES[f.func], *f.args, **f.keywords)
    return INVERSES[f]


@dataclass(frozen=True)
class TensorMapping:
    """Where one Hugging Face tensor goes: our key, its shape as stored, transforms in order."""

    ours: str
    shape: tuple[int, ...]
    transforms: tuple[Transform, ...] = ()

    def convert(self, t: Tensor, dtype: torch.dtype, *, reuse: bool = False) -> Tensor:
        """``t`` transformed and copied once into a new contiguous tensor of ``dtype``; with ``reuse`` (``t`` is
        the caller's to give away), ``t`` itself where it needs no transform and is already that."""
        if reuse and not self.transforms and t.dtype == dtype and t.is_contiguous():
            return t
        for f in self.transforms:
            t = f(t)
        return torch.empty(t.shape, dtype=dtype).copy_(t)

    def export(self, t: Tensor) -> Tensor:
        """Our tensor ``t`` back in the Hugging Face layout: the inverse transforms in reverse order
        (views where they can be)."""
        for f in reversed(self.transforms):
            t = inverse(f)(t)
        return t


def tensor_table(cfg: ModelConfig, arch: Architecture) -> dict[str, TensorMapping]:
    """Hugging Face tensor name -> :class:`TensorMapping`, for every tensor the dense ``cfg`` needs."""
    D, F, hd = cfg.d_model, cfg.d_ff, cfg.head_dim
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd

    qk = (partial(interleaved_to_half_split, head_dim=hd),) if arch.interleaved_rope else ()
    table = {"model.embed_tokens.weight": TensorMapping("tok_emb.weight", (cfg.vocab_size, D))}
    for i in range(cfg.n_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        table[hf + "input_layernorm.weight"] = TensorMapping(ours + "norm.weight", (D,))
        if not cfg.parallel_residual:
            table[hf + "post_attention_layernorm.weight"] = TensorMapping(ours + "ffn_norm.weight", (D,))
        for name, key, width, rope in (("q", "q", q, qk), ("k", "k", kv, qk), ("v", "v", kv, ())):
            table[hf + f"self_attn.{name}_proj.weight"] = TensorMapping(
                ours + f"attn.w{key}", (width, D), (*rope, linear_weight))
            if cfg.qkv_bias:
                table[hf + f"self_attn.{name}_proj.bias"] = TensorMapping(
                    ours + f"attn.b{key}", (width,), (*rope, linear_bias))
        table[hf + "self_attn.o_proj.weight"] = TensorMapping(ours + "attn.wo", (D, q), (linear_weight,))
        table[hf + "mlp.gate_proj.weight"] = TensorMapping(ours + "ffn.w1", (F, D), (linear_weight,))
        table[hf + "mlp.up_proj.weight"] = TensorMapping(ours + "ffn.w3", (F, D), (linear_weight,))
        table[hf + "mlp.down_proj.weight"] = TensorMapping(ours + "ffn.w2", (D, F), (linear_weight,))
    table["model.norm.weight"] = TensorMapping("norm.weight", (D,))
    if not cfg.tie_embeddings:
        table["lm_head.weight"] = TensorMapping("lm_head.weight", (cfg.vocab_size, D))
    return table


@dataclass(frozen=True)
class WeightFiles:
    """A Hugging Face model directory's safetensors files: tensor name -> file, and the index when it is sharded."""

    locations: dict[str, Path]
    index: Path | None

    @property
    def shards(self) -> list[Path]:
        return sorted(set(self.locations.values()))

    @property
    def paths(self) -> list[Path]:
        """Every weight file an import reads: the index (if any) and the shards."""
        return ([self.index] if self.index else []) + self.shards


def weight_files(model_dir: Path) -> WeightFiles:
    """Where each tensor lies, as the directory's index (or its single file) says; refuses
    pickled and missing weights, a missing shard, and both layouts in one directory."""
    index, single = model_dir / INDEX_FILE, model_dir / WEIGHTS_FILE
    if index.is_file() and single.is_file():
        # save_pretrained keeps model.safetensors when it re-saves sharded (it deletes only stale shards), and
        # the index when it re-saves unsharded: either may be the stale copy, and transformers reads the single file
        raise BamError(f"{model_dir} holds two weight layouts, {WEIGHTS_FILE} and {INDEX_FILE}: transformers reads "
                       f"{WEIGHTS_FILE} and ignores the index, but save_pretrained leaves either behind when it "
                       "re-saves in the other layout; delete the stale one (with its shards)")
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            locations = {name: model_dir / shard for name, shard in weight_map.items()}
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise BamError(f"{index} is not a safetensors index ({e!r}); re-download the checkpoint") from None
        for shard in sorted(set(locations.values())):
            if not shard.is_file():
                raise BamError(f"shard {shard.name} named by {INDEX_FILE} is missing from {model_dir}; "
                               "re-download the checkpoint")
        return WeightFiles(locations, index)
    if single.is_file():
        with _open(single) as f:
            return WeightFiles({name: single for name in f.keys()}, None)
    pickled = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickled:
        raise BamError(
            f"{model_dir} holds only pickled weights ({pickled[0]}): bam-pipeline never unpickles weights; convert "
            "them to safetensors (transformers: model.save_pretrained(dir, safe_serialization=True))"
        )
    raise BamError(f"{model_dir} has no {WEIGHTS_FILE} or {INDEX_FILE}; pass a checkpoint with safetensors weights")


@contextmanager
def _open(path: Path) -> Iterator[safe_open]:
    """``safe_open`` with a one-line error for an unreadable file (truncated, corrupt header)."""
    try:
        f = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise BamError(f"cannot read {path.name} in {path.parent} ({e}); re-download the checkpoint") from None
    with f:
        yield f


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as a file's header describes it."""

    shard: Path
    shape: tuple[int, ...]
    dtype: str


def _read_headers(files: WeightFiles) -> dict[str, StoredTensor]:
    """Every tensor the directory stores, from its files' headers; refuses a tensor stored twice and
    an index that places a tensor in a shard that does not hold it."""
    stored: dict[str, StoredTensor] = {}
    for shard in files.shards:
        with _open(shard) as f:
            for name in f.keys():
                if name in stored:
                    raise BamError(f"tensor {name} is stored twice, in {stored[name].shard.name} and {shard.name} "
                                   f"of {shard.parent}; re-download the checkpoint")
                sl = f.get_slice(name)
                stored[name] = StoredTensor(shard, tuple(sl.get_shape()), sl.get_dtype())
    for name, shard in files.locations.items():
        if name not in stored or stored[name].shard != shard:
            raise BamError(f"{INDEX_FILE} places {name} in {shard.name}, which does not hold it; "
                           "re-download the checkpoint")
    return stored


def head_table(cfg: ModelConfig, arch: Architecture, stored: Iterable[str]) -> dict[str, TensorMapping]:
    """:func:`tensor_table` for the head as the directory stores it, read as transformers 5.x reads it.

    With ``tie_word_embeddings`` (``cfg.tie_embeddings``) transformers ties ``lm_head.weight`` to the
    embedding unless the directory stores both with different values; so both are read when both are
    stored (:func:`read_weights` compares them), and a head stored without the embedding is the
    embedding. Without it the table has the head, stored or not (:func:`_check_headers` refuses a
    missing one, which transformers would draw at random).
    """
    stored = set(stored)
    if not cfg.tie_embeddings:
        return tensor_table(cfg, arch)
    table = tensor_table(cfg.replace(tie_embeddings=False), arch)
    if HEAD not in stored:
        del table[HEAD]
    elif EMBEDDING not in stored:
        table[HEAD] = table.pop(EMBEDDING)
    return table


def _check_headers(stored: dict[str, StoredTensor], table: dict[str, TensorMapping],
                   arch: Architecture) -> set[torch.dtype]:
    """The stored tensors' names, shapes and dtypes against the table; returns the dtypes found."""
    dtypes = set()
    for name, t in stored.items():
        if name not in table:
            continue
        if t.shape != table[name].shape:
            raise BamError(f"tensor {name} in {t.shard.name} has shape {t.shape}, but config.json implies "
                           f"{table[name].shape}; the weights do not belong to this config.json")
        if t.dtype not in FLOAT_DTYPES:
            raise BamError(f"tensor {name} in {t.shard.name} is {t.dtype}; bam-pipeline imports float32, "
                           "bfloat16 and float16 weights (quantised checkpoints are not supported)")
        dtypes.add(FLOAT_DTYPES[t.dtype])
    extra = sorted(n for n in set(stored) - set(table) if not _IGNORED.fullmatch(n))
    if extra:
        raise BamError(f"{arch.name} checkpoint has tensor {extra[0]} that config.json does not explain "
                       f"(and {len(extra) - 1} more); it is another architecture or config.json is wrong")
    missing = sorted(set(table) - set(stored))
    if missing == [HEAD]:  # the head of an untied config (a tied one's is in the table only when stored)
        raise BamError(f"config.json sets tie_word_embeddings=false, but the {arch.name} checkpoint stores no "
                       f"{HEAD} (transformers would draw a random head); re-download the checkpoint, or set "
                       "tie_word_embeddings=true in config.json if its head is the embedding")
    if missing:
        raise BamError(f"{arch.name} checkpoint lacks tensor {missing[0]} (and {len(missing) - 1} more); "
                       "the weights are incomplete or belong to another architecture")
    return dtypes


def _finite(name: str, shard: Path, stored: Tensor, converted: Tensor) -> Tensor:
    """``converted`` (``stored`` in the import's dtype) if every value is finite; else a one-line refusal
    naming the tensor: non-finite as stored, or beyond the range of the dtype asked for."""
    if bool(torch.isfinite(converted).all()):
        return converted
    nan, inf = int(stored.isnan().sum()), int(stored.isinf().sum())
    if nan or inf:
        raise BamError(f"tensor {name} in {shard} is not finite ({nan} nan, {inf} inf values): the checkpoint is "
                       "broken; re-download it, or fix the model that wrote it")
    largest = stored.float().abs().max().item()
    wider = [str(d).removeprefix("torch.") for d in (torch.bfloat16, torch.float32)
             if d != converted.dtype and torch.finfo(d).max >= largest]
    dtype = str(converted.dtype).removeprefix("torch.")
    raise ConfigError("dtype", dtype, f"tensor {name} in {shard} holds {largest:g}, beyond {dtype}'s largest "
                      f"{torch.finfo(converted.dtype).max:g}, and would become inf; import in {' or '.join(wider)}")


def _plan(stored: dict[str, StoredTensor], cfg: ModelConfig, arch: Architecture,
          dtype: torch.dtype | None) -> tuple[dict[str, TensorMapping], torch.dtype]:
    """The table of the tensors to read and the dtype to read them in, the stored tensors checked against it."""
    table = head_table(cfg, arch, stored)
    dtypes = _check_headers(stored, table, arch)
    if dtype is None:
        if len(dtypes) > 1:
            mixed = " and ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
            raise ConfigError("dtype", None, f"the checkpoint mixes {mixed} tensors; choose the dtype to import "
                                             "in: float32, bfloat16 or float16")
        dtype = dtypes.pop()
    return table, dtype


def _layout(cfg: ModelConfig, state: StateDict) -> tuple[ModelConfig, StateDict]:
    """The config (untied where transformers unties it) and the state dict in the model's key order."""
    if cfg.tie_embeddings and "lm_head.weight" in state and not torch.equal(state["lm_head.weight"],
                                                                           state["tok_emb.weight"]):
        cfg = cfg.replace(tie_embeddings=False)  # transformers: both stored, with different values: not tied
    return cfg, {key: state[key] for key in expected_shapes(cfg)}


def read_weights(files: WeightFiles, cfg: ModelConfig, arch: Architecture,
                 dtype: torch.dtype | None = None) -> tuple[ModelConfig, StateDict]:
    """Our dense config and state dict (docs/architecture.md layout) from the directory's safetensors files.

    ``cfg`` is ``config.json``'s mapping; the result's is untied where transformers unties the head: a
    tied config whose directory stores a head with other values than the embedding (see
    :func:`head_table`). ``dtype`` is the dtype of the result (default: the stored one, which must
    then be one dtype); a value it cannot hold is refused. Tensors are read one at a time, each
    converted into its final tensor before the next is read.
    """
    stored = _read_headers(files)
    table, dtype = _plan(stored, cfg, arch, dtype)
    state: StateDict = {}
    for shard in files.shards:
        with _open(shard) as f:
            for name in f.keys():
                if name in table:
                    t = f.get_tensor(name)
                    state[table[name].ours] = _finite(name, shard, t, table[name].convert(t, dtype))
    return _layout(cfg, state)


def convert_weights(tensors: dict[str, Tensor], source: Path, cfg: ModelConfig, arch: Architecture,
                    dtype: torch.dtype | None = None) -> tuple[ModelConfig, StateDict]:
    """:func:`read_weights` for tensors already in memory under transformers' names (a GGUF file's, as
    transformers dequantised them; ``source`` names the file in errors). Checked and converted through
    the same table; each tensor is taken out of ``tensors`` as it is converted (and kept as it is where
    it needs no conversion, the embedding and norms in float32), so the memory of the two copies does
    not add up."""
    stored = {name: StoredTensor(source, tuple(t.shape), TENSOR_DTYPES.get(t.dtype, str(t.dtype)))
              for name, t in tensors.items()}
    table, dtype = _plan(stored, cfg, arch, dtype)
    state: StateDict = {}
    for name in list(tensors):
        t = tensors.pop(name)
        if name in table:
            state[table[name].ours] = _finite(name, source, t, table[name].convert(t, dtype, reuse=True))
    return _layout(cfg, state)
