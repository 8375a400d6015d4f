"""Our models out to Hugging Face: a model directory that ``transformers`` loads, in a stock class
where one computes exactly our function, else with self-contained custom code; and its upload.

**Which class** (:func:`stock_class`): a stock class is used only where it computes exactly our
function, with our weights moved by the import's own table run backwards
(:meth:`~bam_pipeline.interop.hf_weights.TensorMapping.export`):
- sequential dense, RMSNorm: ``LlamaForCausalLM``; ``Qwen2ForCausalLM`` with q/k/v biases (a
  sliding window on every layer when we record one); ``MistralForCausalLM`` with a sliding window;
- sequential FFN-only mixture, RMSNorm: ``MixtralForCausalLM`` for renormalised top-k gates (BTX),
  ``Qwen2MoeForCausalLM`` otherwise: ``norm_topk_prob=False`` is the paper's un-renormalised gate,
  top-k over every expert is soft routing, and its shared expert is made zero-width (its output
  is exactly 0). Qwen2-MoE gets q/k/v biases (zeros when we have none: exact, and read the same
  by every transformers 5.x); a recorded sliding window is left out, as Qwen2-MoE would apply it
  to alternate layers only and our window never cuts the context;
- parallel dense with LayerNorm and no biases: ``CohereForCausalLM`` (its ``logit_scale``; q/k rows
  permuted to its interleaved RoPE layout).
Everything else (every Mixture of Attention, expert or shared KV, soft or top-k; every other
parallel-attention model; and, checked first, every routing the stock mixtures cannot compute: hash
or expert-choice FFN routing, one routing for all layers (``router_scope=model``), a joint router;
and any model option the stock-class choice does not know (:data:`STOCK_MODEL_FIELDS`) away from
its default) gets the **custom** format, which runs the code training runs: ``model/transformer.py`` and
every model module it imports, found by walking their imports (:func:`forward_pass_files`), and
``errors.py``, copied flat into the directory; beside them the transformers adapter
(:mod:`~bam_pipeline.interop.remote_code`: ``configuration_bam.py``, ``modeling_bam.py``);
``auto_map`` and every ``ModelConfig`` field (under ``model``) in ``config.json``; and our state dict
under ``model.``, the routers' buffers included (a hash table in its int64, expert-choice thresholds
in the export dtype). All of it needs torch and transformers only.
``format="stock"`` for a model no stock class holds is refused with the reason; ``auto`` takes the
stock class when there is one.

A stock class computes RoPE angles in float32; our own models compute them in float64 before the
float32 tables (``rope_precision``), a difference at float32 rounding (docs/measurements.md).

**The directory**: ``config.json``; ``model.safetensors``, or shards ``model-0000i-of-0000n`` with
``model.safetensors.index.json`` above ``max_shard_bytes``; ``tokenizer.json`` with
``tokenizer_config.json`` and ``special_tokens_map.json`` (transformers' fast tokenizer over the
same file); ``generation_config.json`` (token ids); ``README.md``, the model card rendered from the
caller's provenance text and eval rows. :func:`write_export` fills an empty directory; a stage
writes it aside and renames it into place (``store.artifacts.publish``).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from tokenizers import Tokenizer
from torch import Tensor

from bam_pipeline.errors import BamError, ConfigError
from bam_pipeline.interop.architectures import ARCHITECTURES
from bam_pipeline.interop.hf_config import CONFIG_FILE
from bam_pipeline.interop.hf_tokenizer import GENERATION_CONFIG_FILE, TOKENIZER_FILE, check_vocabulary
from bam_pipeline.interop.hf_weights import INDEX_FILE, WEIGHTS_FILE, tensor_table
from bam_pipeline.model.config import ModelConfig
from bam_pipeline.model.counting import architecture_summary, count_params
from bam_pipeline.model.state_dict import StateDict, expected_shapes

FORMATS = ("auto", "stock", "custom")
PACKAGE_DIR = Path(__file__).resolve().parents[1]
FORWARD_PASS = PACKAGE_DIR / "model" / "transformer.py"  # the custom export ships it and every model module it imports
ERRORS_FILE = PACKAGE_DIR / "errors.py"
REMOTE_CODE_DIR = Path(__file__).parent / "remote_code"
REMOTE_CODE_FILES = ("configuration_bam.py", "modeling_bam.py")
CUSTOM_CLASS = "BamForCausalLM"
AUTO_MAP = {"AutoConfig": "configuration_bam.BamConfig", "AutoModelForCausalLM": "modeling_bam.BamForCausalLM"}
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
CARD_FILE = "README.md"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass(frozen=True)
class ExportSpec:
    """The ``export:`` config section (``stage=export``; defaults in ``conf/export/default.yaml``)."""

    format: str = "auto"  # auto | stock | custom (:func:`choose_format`)
    overwrite: bool = False  # replace an existing export directory (atomically)
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES  # one safetensors file up to this size, shards above
    push_to_hub: Optional[str] = None  # a hub model repo id to upload the export to (needs network)
    private: bool = True  # a repository push_to_hub creates is private

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError("format", self.format, f"use one of {', '.join(FORMATS)}")
        if self.max_shard_bytes < 1:
            raise ConfigError("max_shard_bytes", self.max_shard_bytes, "must be a positive number of bytes")
        if self.push_to_hub is not None and (self.push_to_hub.count("/") != 1 or " " in self.push_to_hub
                                             or not all(self.push_to_hub.split("/"))):
            raise ConfigError("push_to_hub", self.push_to_hub, "use a hub model repository id, <owner>/<name>")


@dataclass(frozen=True)
class StockClass:
    """A transformers class that computes a model's function exactly, and how to fill it.

    ``fields``: its config fields beyond the ones every class shares; ``table``: the imported
    architecture whose tensor table names the attention, norm and embedding tensors; ``experts``:
    how FFN experts are named (``None`` for a dense model, ``mixtral`` or ``qwen2_moe``);
    ``zero_qkv_bias``: the class has q/k/v biases our model lacks, written as zeros.
    """

    name: str
    config_class: str
    fields: Mapping[str, Any]
    table: str
    experts: str | None = None
    zero_qkv_bias: bool = False


@dataclass(frozen=True)
class ExportTokenizer:
    """The tokenizer that goes with the model: its ``tokenizer.json`` and special tokens."""

    path: Path
    eos_token: str
    pad_token: str | None = None
    bos_token: str | None = None


@dataclass(frozen=True)
class ModelCard:
    """What the caller knows about the model: a title, provenance as Markdown (the run, config hash,
    inputs), and eval rows (one mapping per row, same keys in the order to print)."""

    title: str
    provenance: str = ""
    eval_rows: Sequence[Mapping[str, Any]] = field(default_factory=tuple)


@dataclass(frozen=True)
class ExportResult:
    """A written export: where, in which format and transformers class, the files written."""

    path: Path
    format: str  # stock | custom
    architecture: str  # the transformers class config.json names
    files: tuple[str, ...]


# ---- which class ---------------------------------------------------------------------------------
def _rope_parameters(cfg: ModelConfig) -> dict[str, Any]:
    """transformers' ``rope_parameters`` for our RoPE settings."""
    s = cfg.rope_scaling
    if s.kind == "linear":
        return {"rope_type": "linear", "rope_theta": cfg.rope_theta, "factor": s.factor}
    if s.kind == "llama3":
        return {"rope_type": "llama3", "rope_theta": cfg.rope_theta, "factor": s.factor,
                "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_seq_len}
    return {"rope_type": "default", "rope_theta": cfg.rope_theta}


def _routing_no_stock_class_computes(cfg: ModelConfig) -> str:
    """The routing layout of ``cfg`` that no stock class computes, in words; empty when there is none."""
    if cfg.ffn_experts > 1 and cfg.ffn_router.kind == "hash":
        return "hash FFN routing (a fixed token id -> expert table, no learned router)"
    if cfg.ffn_experts > 1 and cfg.ffn_router.kind == "expert_choice":
        return "expert-choice FFN routing (per-expert thresholds, 0..E experts per token)"
    if cfg.joint_router:
        return "a joint router (one router per layer for attention and FFN)"
    if cfg.router_scope == "model" and not cfg.is_dense:
        return "one routing decision for every layer (router_scope=model: layer 0's routers decide)"
    return ""


# The ModelConfig fields the stock-class choice reads (each honoured, or refused where no class computes its value)
# or knows not to change the function (initialisation, training losses, the name), and those of the FFN router. Any
# other field (a model option added since) away from its default is refused: no stock class is known to compute it.
STOCK_MODEL_FIELDS = (
    "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len", "rope_theta", "norm_eps",
    "tie_embeddings", "parallel_residual", "attn_experts", "attn_kv", "attn_router", "ffn_experts", "ffn_router",
    "router_scope", "joint_router", "head_dim_override", "qkv_bias", "norm_kind", "logit_scale", "rope_scaling",
    "rope_precision", "sliding_window", "init_std", "lb_coef", "z_coef", "attn_lb_coef", "name")
STOCK_ROUTER_FIELDS = ("kind", "k", "renormalize", "capacity", "threshold_momentum")


def _option_no_stock_class_knows(cfg: ModelConfig) -> str:
    """A field of ``cfg``, or of its FFN router where it has one, that the stock-class choice does not know
    (:data:`STOCK_MODEL_FIELDS`, :data:`STOCK_ROUTER_FIELDS`) away from its default, as ``name=value``;
    empty when there is none."""
    configs = [("", cfg, STOCK_MODEL_FIELDS)]
    if cfg.ffn_experts > 1:
        configs.append(("ffn_router.", cfg.ffn_router, STOCK_ROUTER_FIELDS))
    for prefix, config, known in configs:
        for f in dataclasses.fields(config):
            if f.name not in known and getattr(config, f.name) != f.default:
                return f"{prefix}{f.name}={getattr(config, f.name)!r}"
    return ""


def stock_class(cfg: ModelConfig) -> StockClass:
    """The stock transformers class computing ``cfg``'s function (module docstring), or a BamError
    saying why there is none."""
    custom = "; use export.format=custom (or auto)"
    option = _option_no_stock_class_knows(cfg)
    if option:
        raise BamError(f"no stock transformers class is known to compute {option} (a model option the stock-class "
                       f"export does not map){custom}")
    routing = _routing_no_stock_class_computes(cfg)
    if routing:
        raise BamError(f"no stock transformers class computes {routing} (Mixtral and Qwen2-MoE route every layer's "
                       f"FFN by its own learned router, top-k per token){custom}")
    if cfg.attn_experts > 1:
        raise BamError(f"no stock transformers class holds a Mixture of Attention ({cfg.attn_experts} attention "
                       f"experts, {cfg.attn_router.describe()}, {cfg.attn_kv} KV){custom}")
    if cfg.parallel_residual:
        if cfg.ffn_experts > 1 or cfg.norm_kind != "layernorm" or cfg.qkv_bias:
            why = ("an FFN mixture" if cfg.ffn_experts > 1 else "RMSNorm" if cfg.norm_kind != "layernorm"
                   else "q/k/v biases")
            raise BamError(f"no stock transformers class holds a parallel-attention block with {why} (Cohere's "
                           f"is dense, LayerNorm, bias-free){custom}")
        return StockClass("CohereForCausalLM", "CohereConfig", {
            "layer_norm_eps": cfg.norm_eps, "logit_scale": cfg.logit_scale, "attention_bias": False,
            "use_qk_norm": False}, table="CohereForCausalLM")
    if cfg.norm_kind != "rmsnorm" or cfg.logit_scale != 1.0:
        why = "LayerNorm" if cfg.norm_kind != "rmsnorm" else f"logit_scale={cfg.logit_scale:g}"
        raise BamError(f"no stock transformers class holds a sequential block with {why} (Llama, Mistral, "
                       f"Qwen2, Mixtral and Qwen2-MoE use RMSNorm and unscaled logits){custom}")
    rms = {"rms_norm_eps": cfg.norm_eps}
    window = cfg.sliding_window
    if cfg.ffn_experts == 1:
        if cfg.qkv_bias:
            return StockClass("Qwen2ForCausalLM", "Qwen2Config", {
                **rms, "use_sliding_window": window is not None, "sliding_window": window,
                "max_window_layers": 0}, table="Qwen2ForCausalLM")
        if window is not None:
            return StockClass("MistralForCausalLM", "MistralConfig", {**rms, "sliding_window": window},
                              table="MistralForCausalLM")
        return StockClass("LlamaForCausalLM", "LlamaConfig", {**rms, "attention_bias": False, "mlp_bias": False},
                          table="LlamaForCausalLM")
    router, n = cfg.ffn_router, cfg.ffn_experts
    if router.kind == "topk" and router.renormalize and not cfg.qkv_bias:
        return StockClass("MixtralForCausalLM", "MixtralConfig", {
            **rms, "num_local_experts": n, "num_experts_per_tok": router.k, "router_jitter_noise": 0.0,
            "sliding_window": window}, table="LlamaForCausalLM", experts="mixtral")
    k = n if router.kind == "soft" else router.k  # soft = top-E with full-softmax gates
    return StockClass("Qwen2MoeForCausalLM", "Qwen2MoeConfig", {
        **rms, "num_experts": n, "num_experts_per_tok": k,
        "norm_topk_prob": router.kind == "topk" and router.renormalize, "moe_intermediate_size": cfg.d_ff,
        "shared_expert_intermediate_size": 0, "decoder_sparse_step": 1, "mlp_only_layers": [], "qkv_bias": True,
        "use_sliding_window": False},
        table="Qwen2ForCausalLM", experts="qwen2_moe", zero_qkv_bias=not cfg.qkv_bias)


def choose_format(cfg: ModelConfig, requested: str = "auto") -> StockClass | None:
    """The stock class to export ``cfg`` in, or None for the custom format; ``requested`` is
    ``auto`` (stock where one fits), ``stock`` (refused with the reason where none fits) or ``custom``."""
    if requested not in FORMATS:
        raise BamError(f"unknown export format {requested!r}; use one of {', '.join(FORMATS)}")
    if requested == "custom":
        return None
    try:
        return stock_class(cfg)
    except BamError:
        if requested == "stock":
            raise
        return None


# ---- tensors ---------------------------------------------------------------------------------------
def _linear(w: Tensor) -> Tensor:
    """One expert's ``(in, out)`` weight as a transformers Linear weight ``(out, in)``."""
    return w.t()


def stock_tensors(cfg: ModelConfig, state: StateDict, stock: StockClass) -> dict[str, Tensor]:
    """Our state dict as the tensors ``stock``'s ``save_pretrained`` writes (views where possible)."""
    state = dict(state)
    if stock.zero_qkv_bias:
        for key, shape in expected_shapes(cfg.replace(qkv_bias=True)).items():
            state.setdefault(key, torch.zeros(shape, dtype=state["tok_emb.weight"].dtype))
    table_cfg = cfg.dense().replace(qkv_bias=cfg.qkv_bias or stock.zero_qkv_bias)
    out = {name: m.export(state[m.ours]) for name, m in tensor_table(table_cfg, ARCHITECTURES[stock.table]).items()
           if not (stock.experts and ".mlp." in name)}
    if stock.experts is None:
        return out
    D = cfg.d_model
    for i in range(cfg.n_layers):
        ours = f"layers.{i}.ffn."
        w1, w3, w2 = state[ours + "w1"], state[ours + "w3"], state[ours + "w2"]  # (E, D, F), (E, D, F), (E, F, D)
        if stock.experts == "mixtral":
            moe = f"model.layers.{i}.block_sparse_moe."
            names = ("w1", "w3", "w2")
        else:
            moe = f"model.layers.{i}.mlp."
            names = ("gate_proj", "up_proj", "down_proj")
            zero = torch.zeros(0, D, dtype=w1.dtype)  # the zero-width shared expert: its output is exactly 0
            out[moe + "shared_expert.gate_proj.weight"] = zero
            out[moe + "shared_expert.up_proj.weight"] = zero.clone()
            out[moe + "shared_expert.down_proj.weight"] = torch.zeros(D, 0, dtype=w1.dtype)
            out[moe + "shared_expert_gate.weight"] = torch.zeros(1, D, dtype=w1.dtype)
        out[moe + "gate.weight"] = state[ours + "router.weight"]  # (E, D)
        for j in range(cfg.ffn_experts):
            for name, w in zip(names, (w1, w3, w2)):
                out[moe + f"experts.{j}.{name}.weight"] = _linear(w[j])
    return out


def custom_tensors(state: StateDict) -> dict[str, Tensor]:
    """Our state dict under ``model.``, the adapter's attribute holding our model (modeling_bam.py)."""
    return {f"model.{k}": v for k, v in state.items()}


def forward_pass_files() -> dict[str, str]:
    """File name -> source of the custom export's model code: ``model/transformer.py`` and every model module
    it imports, found by walking their relative imports, and ``errors.py``, as one flat directory (each
    module's ``from ..errors import`` becomes ``from .errors import``)."""
    files: dict[str, str] = {}
    todo = [FORWARD_PASS]
    while todo:
        path = todo.pop()
        if path.name in files:
            continue
        source = path.read_text()
        todo += [path.with_name(f"{n.module}.py") for n in ast.walk(ast.parse(source))
                 if isinstance(n, ast.ImportFrom) and n.level == 1]
        files[path.name] = source.replace("from ..errors import", "from .errors import")
    return {**dict(sorted(files.items())), ERRORS_FILE.name: ERRORS_FILE.read_text()}


def write_safetensors(out_dir: Path, tensors: Mapping[str, Tensor], max_shard_bytes: int) -> list[str]:
    """Write ``tensors`` as one ``model.safetensors`` or, above ``max_shard_bytes``, as shards with
    an index (in order, a new shard when the next tensor would overflow); returns the file names.
    Shards are planned first and made contiguous one at a time, so at most one shard is copied."""
    from safetensors.torch import save_file

    plan: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if plan[-1] and size + nbytes > max_shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(name)
        size += nbytes
    meta = {"format": "pt"}
    files = [WEIGHTS_FILE] if len(plan) == 1 else [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
                                                   for i in range(len(plan))]
    for names, file in zip(plan, files):
        save_file({n: tensors[n].contiguous() for n in names}, str(out_dir / file), metadata=meta)
    if len(plan) == 1:
        return files
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": {n: file for names, file in zip(plan, files) for n in names}}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [*files, INDEX_FILE]


# ---- config files ---------------------------------------------------------------------------------
def _token_ids(tokenizer: ExportTokenizer) -> dict[str, int | None]:
    tok = Tokenizer.from_file(str(tokenizer.path))
    ids = {}
    for role in ("bos", "eos", "pad"):
        token = getattr(tokenizer, f"{role}_token")
        token_id = None if token is None else tok.token_to_id(token)
        if token is not None and token_id is None:
            raise BamError(f"{role} token {token!r} is not in {tokenizer.path}; pass the tokenizer's own")
        ids[f"{role}_token_id"] = token_id
    return ids


def stock_config(cfg: ModelConfig, stock: StockClass, ids: Mapping[str, int | None], dtype: torch.dtype) -> dict:
    """``config.json`` of ``stock`` as transformers writes it (built by its config class)."""
    try:
        import transformers
    except ImportError:
        raise BamError(f"a {stock.name} export needs transformers to write its config (pip install "
                       "'bam-pipeline[hf]'); or use export.format=custom") from None

    fields = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "max_position_embeddings": cfg.max_seq_len, "rope_parameters": _rope_parameters(cfg),
        "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "attention_dropout": 0.0,
        **ids, **stock.fields,
    }
    config = getattr(transformers, stock.config_class)(**fields)
    config.architectures = [stock.name]
    config.dtype = dtype
    return json.loads(config.to_json_string(use_diff=True))


def custom_config(cfg: ModelConfig, ids: Mapping[str, int | None], dtype: torch.dtype) -> dict[str, Any]:
    """``config.json`` of the custom format: every ``ModelConfig`` field under ``model``
    (``configuration_bam.BamConfig``)."""
    return {"architectures": [CUSTOM_CLASS], "model_type": "bam", "auto_map": AUTO_MAP,
            "model": dataclasses.asdict(cfg), "dtype": DTYPE_NAMES[dtype], **ids}


def tokenizer_files(tokenizer: ExportTokenizer, max_seq_len: int) -> dict[str, dict[str, Any]]:
    """``tokenizer_config.json`` and ``special_tokens_map.json`` for the fast tokenizer over the file."""
    special = {f"{role}_token": getattr(tokenizer, f"{role}_token") for role in ("bos", "eos", "pad")
               if getattr(tokenizer, f"{role}_token") is not None}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_seq_len,
              "clean_up_tokenization_spaces": False, **special}
    return {TOKENIZER_CONFIG_FILE: config, SPECIAL_TOKENS_FILE: special}


# ---- model card ------------------------------------------------------------------------------------
def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_card(card: ModelCard, cfg: ModelConfig, architecture: str, custom: bool) -> str:
    """The model card: front matter, architecture, how to load it, provenance, eval rows."""
    params = count_params(cfg)
    tags = ["bam-pipeline", "branch-attend-mix"] + (["mixture-of-experts"] if not cfg.is_dense else [])
    remote = ", trust_remote_code=True" if custom else ""
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation", "tags:",
        *(f"- {t}" for t in tags), "---", "", f"# {card.title}", "",
        f"`{architecture}`{' (custom code in this directory)' if custom else ''}: {architecture_summary(cfg)}.",
        f"{params.total:,} parameters, {params.active:,} active per token; context {cfg.max_seq_len} tokens.", "",
        "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        f'model = AutoModelForCausalLM.from_pretrained("<this directory or repo id>"{remote})',
        f'tokenizer = AutoTokenizer.from_pretrained("<this directory or repo id>"{remote})',
        'ids = tokenizer("Once upon a time", return_tensors="pt").input_ids',
        "print(tokenizer.decode(model.generate(ids, max_new_tokens=32, do_sample=False)[0]))", "```", "",
    ]
    if custom:
        lines += ["`trust_remote_code=True` runs the Python files of this directory: bam-pipeline's model code and "
                  "`modeling_bam.py`, its transformers adapter (torch and transformers only); read them before "
                  "loading a copy from an untrusted source.", ""]
    if card.provenance:
        lines += ["## Provenance", "", card.provenance.strip(), ""]
    lines += ["## Evaluation", ""]
    if card.eval_rows:
        columns = list(card.eval_rows[0])
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in card.eval_rows]
    else:
        lines.append("No evaluation rows were given for this model.")
    return "\n".join(lines) + "\n"


# ---- the directory -------------------------------------------------------------------------------
def _state_dtype(state: StateDict, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of the exported floating tensors: ``dtype``, or the state dict's one floating dtype
    (integer buffers, a hash router's table, keep theirs)."""
    if dtype is not None:
        if dtype not in DTYPE_NAMES:
            raise BamError(f"cannot export in {dtype}; use one of {', '.join(DTYPE_NAMES.values())}")
        return dtype
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in DTYPE_NAMES:
        raise BamError(f"the state dict holds {sorted(map(str, dtypes))}; choose one dtype to export in "
                       f"({', '.join(DTYPE_NAMES.values())})")
    return dtypes.pop()


def write_export(out_dir: str | Path, cfg: ModelConfig, state: StateDict, *, tokenizer: ExportTokenizer,
                 card: ModelCard, format: str = "auto", dtype: torch.dtype | None = None,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> ExportResult:
    """Write a Hugging Face model directory for ``cfg`` and its ``state`` into ``out_dir`` (absent or
    empty). ``format``: ``auto``, ``stock`` or ``custom`` (:func:`choose_format`); ``dtype``: the
    weights' dtype (default: the state dict's one dtype)."""
    stock = choose_format(cfg, format)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise BamError(f"export directory {out_dir} exists and is not empty; export into a new directory "
                       "(a stage replaces its output with export.overwrite=true)")
    want = expected_shapes(cfg)
    if set(state) != set(want) or any(tuple(state[k].shape) != s for k, s in want.items()):
        bad = sorted(set(state) ^ set(want)) or [k for k, s in want.items() if tuple(state[k].shape) != s]
        raise BamError(f"the state dict does not have the layout of its model config (first: {bad[0]}); "
                       "export an artifact's own model.safetensors with its model_config.json")
    dtype = _state_dtype(state, dtype)
    if not tokenizer.path.is_file():
        raise BamError(f"tokenizer file {tokenizer.path} does not exist; pass the run's tokenizer.json")
    check_vocabulary(Tokenizer.from_file(str(tokenizer.path)), cfg.vocab_size)
    ids = _token_ids(tokenizer)
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype) for k, v in state.items()}

    out_dir.mkdir(parents=True, exist_ok=True)
    code: dict[str, str] = {}
    if stock is None:
        config, tensors, architecture = custom_config(cfg, ids, dtype), custom_tensors(state), CUSTOM_CLASS
        code = {**forward_pass_files(), **{name: (REMOTE_CODE_DIR / name).read_text() for name in REMOTE_CODE_FILES}}
        for name, source in code.items():
            (out_dir / name).write_text(source)
    else:
        config, tensors, architecture = stock_config(cfg, stock, ids, dtype), stock_tensors(cfg, state, stock), \
            stock.name
    files = write_safetensors(out_dir, tensors, max_shard_bytes)
    documents = {
        CONFIG_FILE: config,
        GENERATION_CONFIG_FILE: {k: v for k, v in ids.items() if v is not None},
        **tokenizer_files(tokenizer, cfg.max_seq_len),
    }
    for name, content in documents.items():
        (out_dir / name).write_text(json.dumps(content, indent=2) + "\n")
    shutil.copyfile(tokenizer.path, out_dir / TOKENIZER_FILE)
    (out_dir / CARD_FILE).write_text(render_card(card, cfg, architecture, stock is None))
    written = [*files, *documents, TOKENIZER_FILE, CARD_FILE, *code]
    return ExportResult(out_dir, "custom" if stock is None else "stock", architecture, tuple(sorted(written)))


# ---- upload -----------------------------------------------------------------------------------------
def push_to_hub(export_dir: str | Path, repo_id: str, *, private: bool = True, token: str | None = None,
                commit_message: str = "Upload bam-pipeline export") -> str:
    """Upload an export directory to the hub model repository ``repo_id`` (created if missing,
    private by default); returns the commit URL. Offline, or on any hub failure, one BamError line."""
    export_dir = Path(export_dir)
    later = f"upload it later where there is network: hf upload {repo_id} {export_dir}"
    try:
        from huggingface_hub import HfApi, constants
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError:
        raise BamError(f"pushing to the hub needs huggingface_hub (pip install 'bam-pipeline[hf]'); or {later}"
                       ) from None
    if constants.is_offline_mode():
        raise BamError(f"cannot push {export_dir} to {repo_id}: offline (HF_HUB_OFFLINE=1); {later}")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(export_dir), repo_type="model",
                                   commit_message=commit_message)
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise BamError(f"the hub refused {repo_id} (HTTP {status}): log in with a token that may write to it "
                           "(hf auth login, or HF_TOKEN=...)") from None
        raise BamError(f"pushing to {repo_id} failed ({' '.join(str(e).split())[:200]}); retry, or {later}") from None
    except Exception as e:  # network failures surface as httpx, OSError or hub-specific types
        raise BamError(f"cannot reach the hub to push {repo_id} ({type(e).__name__}: "
                       f"{' '.join(str(e).split())[:160]}); {later}") from None
    return str(getattr(commit, "commit_url", commit))
