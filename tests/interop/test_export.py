"""Hugging Face export: every mix variant (custom code, loaded in a process that cannot import
bam_pipeline) and every stock-class model kind computes our logits and greedy continuations; stock
exports load without trust_remote_code and hold exactly the tensors transformers saves; routing
layouts no stock class computes (hash, expert choice, one routing for all layers, a joint router)
go to the custom code, whose router buffers (hash table, expert-choice thresholds) are saved and
loaded as they are; refusals, shards, the model card and the hub upload.

Models are random with peaked attention and routers (q/k and router weights scaled up), so that a
layout, position or routing bug changes the argmax instead of hiding in near-uniform noise; expert
choice is exported both with unestimated (NaN) thresholds and with thresholds trained as the moe
stage trains them (an EMA over training-mode batches), under which tokens get 0..E experts.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hf_checkpoints import EOS_ID, VOCAB_ROWS, WITHOUT_BAM_PIPELINE, tiny_tokenizer
from bam_pipeline.config.files import group_options, load_option
from bam_pipeline.config.reading import read_section
from bam_pipeline.errors import BamError
from bam_pipeline.interop import ARCHITECTURES, import_hf_model
from bam_pipeline.interop.hf_export import (
    ERRORS_FILE, FORWARD_PASS, STOCK_MODEL_FIELDS, STOCK_ROUTER_FIELDS, ExportTokenizer, ModelCard, choose_format,
    forward_pass_files, push_to_hub, write_export,
)
from bam_pipeline.interop.hf_weights import tensor_table
from bam_pipeline.mixing.hidden import hidden_means
from bam_pipeline.mixing.upcycle import upcycle
from bam_pipeline.mixing.variant import MixVariant
from bam_pipeline.model import BAMTransformer, ModelConfig, RouterConfig, preset
from bam_pipeline.model.config import RopeScaling, added_later
from bam_pipeline.model.generation import generate

transformers = pytest.importorskip("transformers")

DENSE = preset("smoke", vocab_size=VOCAB_ROWS)  # parallel, RMSNorm, 4 heads / 2 KV heads, 2 layers
DOMAINS = ("code", "law", "math")
NEW_TOKENS = 32
PROMPTS = [[1, 10, 5, 20, 7, 7, 30, 4], [1, 22, 9]]
TOLERANCE = 1e-5
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
SEQUENTIAL = DENSE.replace(parallel_residual=False)
# name -> (config, the stock class auto must pick)
STOCK = {
    "llama": (SEQUENTIAL, "LlamaForCausalLM"),
    "llama_tied_gqa4_linear_rope": (SEQUENTIAL.replace(n_kv_heads=1, tie_embeddings=True, rope_precision="float32",
                                                      rope_scaling=RopeScaling("linear", factor=2.0)),
                                    "LlamaForCausalLM"),
    "qwen2_biases": (SEQUENTIAL.replace(qkv_bias=True, head_dim_override=16), "Qwen2ForCausalLM"),
    "mistral_window": (SEQUENTIAL.replace(sliding_window=64), "MistralForCausalLM"),
    "mixtral_top2_renormalised": (
        SEQUENTIAL.replace(ffn_experts=4, ffn_router=RouterConfig("topk", 2, renormalize=True)), "MixtralForCausalLM"),
    "qwen2moe_top1_unrenormalised": (SEQUENTIAL.replace(ffn_experts=4), "Qwen2MoeForCausalLM"),
    "qwen2moe_soft_biases": (SEQUENTIAL.replace(ffn_experts=3, ffn_router=RouterConfig("soft"), qkv_bias=True),
                             "Qwen2MoeForCausalLM"),
    "cohere_layernorm_logit_scale": (DENSE.replace(norm_kind="layernorm", logit_scale=0.5, rope_theta=500.0,
                                                   rope_precision="float32"), "CohereForCausalLM"),
}
# custom exports beyond the mix variants: the backbone options and a forced custom format
CUSTOM_EXTRA = {
    "parallel_biases_layernorm_llama3_rope": DENSE.replace(
        qkv_bias=True, norm_kind="layernorm", logit_scale=0.75, head_dim_override=12, rope_precision="float32",
        rope_scaling=RopeScaling("llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_seq_len=16)),
    "sequential_bam_shared_kv_biases_soft_ffn": SEQUENTIAL.replace(
        attn_experts=3, attn_kv="shared", n_kv_heads=1, qkv_bias=True, ffn_experts=3, ffn_router=RouterConfig("soft"),
        tie_embeddings=True),
    "llama_forced_custom": SEQUENTIAL,
    # FFN-only mixtures in sequential RMSNorm blocks, the shape of Mixtral and Qwen2-MoE, with a routing
    # neither computes: auto must choose the custom code
    "sequential_btx_hash": SEQUENTIAL.replace(ffn_experts=4, ffn_router=RouterConfig("hash")),
    "sequential_btx_expert_choice_capacity2": SEQUENTIAL.replace(
        ffn_experts=4, ffn_router=RouterConfig("expert_choice", capacity=2.0, threshold_momentum=0.5)),
    "sequential_btx_top2_renormalised_one_routing": SEQUENTIAL.replace(
        ffn_experts=4, ffn_router=RouterConfig("topk", 2, renormalize=True), router_scope="model"),
}
# exported by the variant (or extra) named, with expert-choice thresholds trained (trained_thresholds)
TRAINED = {"bam_expert_choice_trained": "bam_expert_choice",
           "sequential_btx_expert_choice_capacity2_trained": "sequential_btx_expert_choice_capacity2"}
# exports loaded again with one tensor taken out: it alone is initialised, the router buffers beside it are loaded
PARTIAL = {"bam_expert_choice_trained": "model.layers.0.ffn.router.weight",
           "bam_hash": "model.layers.1.ffn.router.table"}
# custom exports that also run beam search (compared with the stock class computing the same model)
BEAMS = ("llama_forced_custom",)
# at least one hash, expert-choice, shared-layer and joint-router layout among the custom exports
ROUTING_LAYOUTS = ("bam_hash", "bam_expert_choice", "bam_expert_choice_trained", "bam_router_shared_layers",
                   "bam_router_joint", *[n for n in CUSTOM_EXTRA if n.startswith("sequential_btx")])




def peaked(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """``state`` with q/k scaled up, decisive routers, norms and biases drawn away from 1 and 0."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, t in state.items():
        if key.endswith(("attn.wq", "attn.wk")):
            t = t * 2.0
        elif key.endswith("router.weight"):
            t = torch.randn(t.shape, generator=g) * 0.2
        elif key.endswith(("attn.bq", "attn.bk")):
            t = torch.randn(t.shape, generator=g) * 0.3
        elif key.endswith("attn.bv"):  # a large value bias adds one vector to every token: one argmax for all
            t = torch.randn(t.shape, generator=g) * 0.05
        elif "norm" in key:
            t = 1.0 + 0.2 * torch.randn(t.shape, generator=g)
        out[key] = t.contiguous()
    return out


def random_state(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """A random model: peaked, and a hash table shuffled away from the default ``id % E``."""
    torch.manual_seed(seed)
    state = peaked(BAMTransformer(cfg).state_dict(), seed)
    g = torch.Generator().manual_seed(seed)
    return {k: t[torch.randperm(t.numel(), generator=g)] if k.endswith("router.table") else t
            for k, t in state.items()}


def trained_thresholds(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with its expert-choice thresholds estimated as training does: the router's EMA of each
    expert's capacity-th score over training-mode batches (here 6 random ones, no weight update)."""
    model = BAMTransformer(cfg)
    model.load_state_dict(state, strict=True)
    model.train()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for _ in range(6):
            model(torch.randint(0, cfg.vocab_size, (4, 32), generator=g))
    trained = model.state_dict()
    return {k: trained[k].clone() if k.endswith("router.threshold") else t for k, t in state.items()}


@functools.cache
def dense_models() -> dict[str, dict[str, torch.Tensor]]:
    """A random seed and three random domain experts (smoke size) to mix."""
    return {n: random_state(DENSE, k) for k, n in enumerate(("seed", *DOMAINS))}


def variant_model(name: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The mixture ``conf/mix/<name>.yaml`` builds from the seed and the three domain experts; what a
    variant reads from the prepared data is made up: random token frequencies (a balanced hash table),
    the seed's mean hidden states on random tokens (hidden-state routers)."""
    variant = read_section(MixVariant, load_option("mix", name), "mix", name=name)
    dense = dense_models()
    data = {}
    if variant.reads_data:
        g = torch.Generator().manual_seed(13)
        tokens = torch.randint(0, VOCAB_ROWS, (2, 16), generator=g)
        hidden = {o: hidden_means(DENSE, dense["seed"], [tokens]) for o in variant.hidden_sources(DOMAINS, "g")}
        data = {"token_frequencies": torch.rand(VOCAB_ROWS, generator=g), "hidden": hidden}
    cfg, state = upcycle(variant, {n: dense[n] for n in variant.models(DOMAINS)}, DENSE, DOMAINS, **data)
    return cfg, peaked(state, 99)


def custom_models() -> dict[str, tuple[ModelConfig, dict[str, torch.Tensor]]]:
    """Every model the custom-code tests export: the mix variants, the extras, trained thresholds."""
    models = {name: variant_model(name) for name in group_options("mix")}
    models.update({name: (cfg, random_state(cfg, 7)) for name, cfg in CUSTOM_EXTRA.items()})
    for name, source in TRAINED.items():
        cfg, state = models[source]
        models[name] = (cfg, trained_thresholds(cfg, state))
    return models


def model_of(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> BAMTransformer:
    model = BAMTransformer(cfg).eval()
    model.load_state_dict(state, strict=True)
    return model


def compare_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB_ROWS, (2, 40), generator=torch.Generator().manual_seed(5))  # (2, 40)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> ExportTokenizer:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tiny_tokenizer().save(str(path))
    return ExportTokenizer(path, eos_token="</s>", bos_token="<s>")


def export(tmp_path: Path, name: str, cfg: ModelConfig, state, tokenizer, **kwargs):
    card = ModelCard(f"Test {name}", provenance=f"run `t`, artifact `{name}`",
                     eval_rows=[{"model": name, "general ppl": 12.5, "code ppl": 3.25}])
    return write_export(tmp_path / name, cfg, state, tokenizer=tokenizer, card=card, **kwargs)


# ---- custom code, loaded where bam_pipeline cannot be imported ---------------------------------------
LOAD_ELSEWHERE = WITHOUT_BAM_PIPELINE + textwrap.dedent("""
    import dataclasses
    dirs, ids, prompts = json.loads(sys.argv[1]), torch.tensor(json.loads(sys.argv[2])), json.loads(sys.argv[3])
    new = int(sys.argv[4])
    out = {}
    for name, path in dirs.items():
        model, info = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True,
                                                                        output_loading_info=True)
        model.eval()
        state = model.state_dict()
        buffers = {k: v.clone() for k, v in state.items() if k.endswith(("router.table", "router.threshold"))}
        with torch.no_grad():
            logits = model(ids).logits
        alone = [model.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(p):].tolist() for p in prompts]
        width = max(map(len, prompts))
        padded = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        batched = model.generate(padded, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[:, width:].tolist()
        with torch.no_grad():  # the left-padded batch in one forward, no cache
            padded_logits = model(padded, attention_mask=mask).logits
        beams = None if name not in json.loads(sys.argv[6]) else model.generate(
            padded, attention_mask=mask, num_beams=3, max_new_tokens=new, do_sample=False, eos_token_id=None,
            pad_token_id=0)[:, width:].tolist()
        out[name] = {"logits": logits, "alone": alone, "batched": batched, "class": type(model).__name__,
                     "padded_logits": padded_logits, "beams": beams,
                     "module": type(model).__module__, "buffers": buffers,
                     "config": dataclasses.asdict(model.model.cfg),
                     "loading": {k: sorted(map(str, v)) for k, v in info.items()}}
        if any(k.endswith("threshold") for k in buffers):  # expert choice in training mode: one batch
            with torch.no_grad():
                out[name]["train_logits"] = model.train()(ids).logits
            out[name]["train_thresholds"] = {k: v for k, v in model.state_dict().items() if k.endswith("threshold")}
    torch.save(out, sys.argv[5])
""")


@pytest.fixture(scope="module")
def custom_exports(tmp_path_factory, tokenizer):
    """Every custom export, our logits and cached greedy continuations, and what transformers
    computed from the export in a subprocess that cannot import bam_pipeline."""
    root = tmp_path_factory.mktemp("custom")
    dirs, ours = {}, {}
    for name, (cfg, state) in custom_models().items():
        shards = {"max_shard_bytes": 40_000} if name == "bam" else {}
        fmt = "custom" if name == "llama_forced_custom" else "auto"  # auto: no stock class computes the others
        result = export(root, name, cfg, state, tokenizer, format=fmt, **shards)
        assert result.format == "custom" and result.architecture == "BamForCausalLM"
        dirs[name] = str(result.path)
        model = model_of(cfg, state)
        with torch.no_grad():
            out = model(compare_ids())
            ours[name] = {"logits": out.logits, "ffn_experts_per_token": experts_per_token(out), "cfg": cfg,
                          "state": state, "greedy": generate(model, PROMPTS, max_new_tokens=NEW_TOKENS).tokens}
    for name, key in PARTIAL.items():
        partial = root / f"{name}_partial"
        shutil.copytree(dirs[name], partial)
        tensors = load_file(partial / "model.safetensors")
        del tensors[key]
        save_file(tensors, partial / "model.safetensors", metadata={"format": "pt"})
        dirs[partial.name] = str(partial)
    out = root / "theirs.pt"
    env = {**os.environ, "HF_MODULES_CACHE": str(root / "modules"), "PYTHONPATH": ""}
    run = subprocess.run([sys.executable, "-c", LOAD_ELSEWHERE, json.dumps(dirs), json.dumps(compare_ids().tolist()),
                          json.dumps(PROMPTS), str(NEW_TOKENS), str(out), json.dumps(BEAMS)], env=env, cwd=root,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return dirs, ours, torch.load(out)


def experts_per_token(out) -> set[int]:
    """How many FFN experts the tokens of a forward used (per layer, under expert choice; else {})."""
    return {int(n) for r in out.routing if r.ffn is not None and r.ffn.chosen is not None
            for n in r.ffn.chosen.sum(-1).unique()}


@pytest.mark.parametrize("name", [*group_options("mix"), *CUSTOM_EXTRA, *TRAINED])
def test_custom_export_computes_our_logits_and_greedy_continuations(custom_exports, name):
    dirs, ours, theirs = custom_exports
    got = theirs[name]
    assert got["class"] == "BamForCausalLM" and got["module"].startswith("transformers_modules")
    diff = (got["logits"] - ours[name]["logits"]).abs().max().item()
    print(f"custom {name}: max |logit difference| = {diff:.2e}")
    assert ours[name]["logits"].std() > 0.05 and diff <= TOLERANCE
    assert got["alone"] == ours[name]["greedy"]  # generate() with transformers' KV cache
    assert got["batched"] == ours[name]["greedy"]  # left-padded batch, attention_mask
    assert len({tuple(t) for t in got["alone"]}) == len(PROMPTS)
    assert got["loading"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}


@pytest.mark.parametrize("name", [*group_options("mix"), *CUSTOM_EXTRA, *TRAINED])
def test_custom_export_computes_each_prompts_logits_in_a_left_padded_batch_without_a_cache(custom_exports, name):
    _, ours, theirs = custom_exports
    model = model_of(ours[name]["cfg"], ours[name]["state"])
    width = max(map(len, PROMPTS))
    for row, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            want = model(torch.tensor([prompt])).logits[0]  # (T, V) the prompt alone
        got = theirs[name]["padded_logits"][row, width - len(prompt):]
        assert (got - want).abs().max().item() <= TOLERANCE


def test_beam_search_over_the_custom_code_finds_the_stock_classes_beams(custom_exports, tmp_path, tokenizer):
    """transformers' beam search reorders the custom code's own KV cache (``_reorder_cache``): the same
    model exported as custom code and as LlamaForCausalLM gives the same beams of a left-padded batch."""
    _, ours, theirs = custom_exports
    name, = BEAMS
    stock = transformers.AutoModelForCausalLM.from_pretrained(
        export(tmp_path, name, ours[name]["cfg"], ours[name]["state"], tokenizer).path).eval()
    assert type(stock).__name__ == "LlamaForCausalLM"
    width = max(map(len, PROMPTS))
    padded = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = (torch.arange(width) >= width - torch.tensor([[len(p)] for p in PROMPTS])).long()
    want = stock.generate(padded, attention_mask=mask, num_beams=3, max_new_tokens=NEW_TOKENS, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[:, width:].tolist()
    assert theirs[name]["beams"] == want
    assert want != theirs[name]["batched"]  # beam search chose other continuations than greedy decoding


def test_the_routing_layouts_are_among_the_custom_exports(custom_exports):
    _, ours, theirs = custom_exports
    assert set(ROUTING_LAYOUTS) <= set(theirs)
    for name in TRAINED:  # trained thresholds give tokens varying numbers of experts
        assert len(ours[name]["ffn_experts_per_token"]) >= 3, name
    assert {0, 1, 2} <= ours["bam_expert_choice_trained"]["ffn_experts_per_token"]  # capacity 1: none, one, several


@pytest.mark.parametrize("name", ["bam_hash", "sequential_btx_hash", "bam_expert_choice", *TRAINED])
def test_router_buffers_are_saved_and_loaded_as_they_are(custom_exports, name):
    """The hash table and thresholds are persistent buffers: in the safetensors under their own names and
    dtypes, in the loaded model's state dict, equal to ours (not re-initialised by transformers' loading)."""
    dirs, ours, theirs = custom_exports
    cfg, state = ours[name]["cfg"], ours[name]["state"]
    want = {f"model.{k}": t for k, t in state.items() if k.endswith(("router.table", "router.threshold"))}
    assert want
    with safe_open(str(Path(dirs[name]) / "model.safetensors"), framework="pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys() if k in want}
    got = theirs[name]["buffers"]
    assert saved.keys() == got.keys() == want.keys()
    for key, t in want.items():
        assert saved[key].dtype == got[key].dtype == t.dtype, key
        torch.testing.assert_close(saved[key], t, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(got[key], t, rtol=0, atol=0, equal_nan=True)
        if key.endswith("table"):  # not the table a fresh router starts with
            assert t.dtype == torch.int64 and not torch.equal(t, torch.arange(cfg.vocab_size) % cfg.ffn_experts)
        elif name in TRAINED:
            assert torch.isfinite(t).all() and len(set(t.tolist())) == t.numel()
        else:
            assert torch.isnan(t).all()  # unestimated: loaded as NaN, not drawn or zeroed


@pytest.mark.parametrize("name", ["bam_expert_choice", *TRAINED])
def test_expert_choice_export_trains_its_thresholds_as_we_do(custom_exports, name):
    """In training mode the export routes as ours (each expert's capacity-th best tokens of the batch)
    and moves its thresholds as ours (from NaN to the first batch's scores, then an EMA)."""
    _, ours, theirs = custom_exports
    model = model_of(ours[name]["cfg"], ours[name]["state"]).train()
    with torch.no_grad():
        want = model(compare_ids()).logits
    got = theirs[name]
    assert (got["train_logits"] - want).abs().max().item() <= TOLERANCE
    moved = {f"model.{k}": t for k, t in model.state_dict().items() if k.endswith("threshold")}
    assert got["train_thresholds"].keys() == moved.keys()
    for key, t in moved.items():
        torch.testing.assert_close(got["train_thresholds"][key], t)
        assert not torch.equal(t, ours[name]["state"][key.removeprefix("model.")])  # they moved


@pytest.mark.parametrize("name", list(PARTIAL))
def test_loading_initialises_a_missing_tensor_and_keeps_the_router_buffers_loaded(custom_exports, name):
    """transformers initialises what a checkpoint lacks, module by module: an expert-choice router
    whose weight is missing has it initialised and keeps its loaded thresholds; a missing hash table is
    the default ``id % E``, and the other layers' tables are loaded."""
    _, ours, theirs = custom_exports
    cfg, state, got = ours[name]["cfg"], ours[name]["state"], theirs[f"{name}_partial"]
    missing = PARTIAL[name]
    assert got["loading"]["missing_keys"] == [missing] and not got["loading"]["unexpected_keys"]
    for key, t in got["buffers"].items():
        if key == missing:
            assert torch.equal(t, torch.arange(cfg.vocab_size) % cfg.ffn_experts)
        else:
            torch.testing.assert_close(t, state[key.removeprefix("model.")], rtol=0, atol=0, equal_nan=True)
    assert len(got["buffers"]) == sum(k.endswith(("router.table", "router.threshold")) for k in state)
    assert torch.isfinite(got["logits"]).all()


def test_custom_export_directory_is_complete_and_self_contained(custom_exports):
    dirs, _, _ = custom_exports
    path = Path(dirs["bam_kv_shared"])
    assert sorted(p.name for p in path.iterdir() if p.suffix != ".py") == sorted([
        "README.md", "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
        "tokenizer.json", "tokenizer_config.json"])
    code = {p.name for p in path.glob("*.py")}
    assert code == {"configuration_bam.py", "modeling_bam.py", *forward_pass_files()}
    assert {"transformer.py", "attention.py", "moe.py", "errors.py"} <= code  # the forward pass and what it imports
    assert not {"__init__.py", "generation.py", "counting.py"} & code  # not what it does not import
    for name in ("configuration_bam.py", "modeling_bam.py"):
        assert "bam_pipeline" not in (path / name).read_text()
    for name in code:
        imported = [n for n in ast.walk(ast.parse((path / name).read_text()))
                    if isinstance(n, ast.ImportFrom | ast.Import)]
        assert not [n for n in imported if isinstance(n, ast.ImportFrom) and n.level > 1], name  # flat: siblings only
        assert not [n for n in imported if "bam_pipeline" in str(getattr(n, "module", "")) + str(
            [a.name for a in n.names])], name
    config = json.loads((path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_bam.BamForCausalLM"
    assert config["model"]["attn_kv"] == "shared" and config["model"]["attn_experts"] == 4
    assert config["eos_token_id"] == EOS_ID
    sharded = Path(dirs["bam"])
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (sharded / "model.safetensors").exists()


def test_the_custom_export_runs_the_code_training_runs(custom_exports):
    """Each model file of the export is the package's own, its one ``errors`` import made a sibling's."""
    dirs, _, _ = custom_exports
    path = Path(dirs["bam"])
    for name in forward_pass_files():
        ours = (ERRORS_FILE if name == "errors.py" else FORWARD_PASS.with_name(name)).read_text()
        assert name == "errors.py" or ours.count("from ..errors import") == 1, name
        assert (path / name).read_text() == ours.replace("from ..errors import", "from .errors import"), name


@pytest.mark.parametrize("name", [*group_options("mix"), *CUSTOM_EXTRA, *TRAINED])
def test_the_custom_export_carries_every_model_config_field(custom_exports, name):
    """config.json holds every ModelConfig field, and the model transformers builds from it, in a process
    without bam_pipeline, has our config, field for field."""
    dirs, ours, theirs = custom_exports
    cfg = ours[name]["cfg"]
    written = json.loads((Path(dirs[name]) / "config.json").read_text())["model"]
    assert list(written) == [f.name for f in dataclasses.fields(ModelConfig)]
    assert ModelConfig.from_dict(written) == cfg and theirs[name]["config"] == dataclasses.asdict(cfg)


def test_a_model_option_the_stock_classes_do_not_know_is_exported_as_custom_code():
    """An option added to ModelConfig (here a stand-in: ModelConfig grown by one field) is inert at its
    default; away from it no stock class is known to compute it: auto takes the custom code, stock refuses."""
    grown = dataclasses.make_dataclass("GrownModelConfig", [("new_option", float, added_later(0.5))],
                                       bases=(ModelConfig,), frozen=True)
    cfg = grown(**{f.name: getattr(SEQUENTIAL, f.name) for f in dataclasses.fields(ModelConfig)})
    assert choose_format(cfg, "auto").name == "LlamaForCausalLM"
    moved = cfg.replace(new_option=0.25)
    assert choose_format(moved, "auto") is None
    with pytest.raises(BamError, match="no stock transformers class is known to compute new_option=0.25") as e:
        choose_format(moved, "stock")
    assert "\n" not in str(e.value) and "export.format=custom" in str(e.value)
    known = {f.name for f in dataclasses.fields(ModelConfig)}, {f.name for f in dataclasses.fields(RouterConfig)}
    assert set(STOCK_MODEL_FIELDS) <= known[0] and set(STOCK_ROUTER_FIELDS) <= known[1]  # no stale or misspelt name


# ---- stock classes ------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # Qwen2-MoE's zero-width shared expert
@pytest.mark.parametrize("name", list(STOCK))
def test_stock_export_loads_in_its_class_and_computes_our_function(name, tmp_path, tokenizer):
    cfg, want_class = STOCK[name]
    state = random_state(cfg, 3)
    result = export(tmp_path, name, cfg, state, tokenizer, **({"max_shard_bytes": 30_000} if "mixtral" in name else {}))
    assert (result.format, result.architecture) == ("stock", want_class)
    assert not any(p.suffix == ".py" for p in result.path.iterdir())
    theirs = transformers.AutoModelForCausalLM.from_pretrained(result.path).eval()  # no trust_remote_code
    assert type(theirs).__name__ == want_class and type(theirs).__module__.startswith("transformers.models.")
    ours = model_of(cfg, state)
    with torch.no_grad():
        want, got = ours(compare_ids()).logits, theirs(compare_ids()).logits
    diff = (got - want).abs().max().item()
    print(f"stock {name} ({want_class}): max |logit difference| = {diff:.2e}")
    assert want.std() > 0.05 and diff <= TOLERANCE
    greedy = generate(ours, PROMPTS, max_new_tokens=NEW_TOKENS).tokens
    for prompt, tokens in zip(PROMPTS, greedy):
        out = theirs.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
        assert out[0, len(prompt):].tolist() == tokens

    # the tensors are exactly those save_pretrained() writes for this class and config
    reference = tmp_path / "reference"
    config = getattr(transformers, want_class.replace("ForCausalLM", "Config")).from_pretrained(result.path)
    getattr(transformers, want_class)(config).save_pretrained(reference)
    assert shapes(result.path) == shapes(reference)


def shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape over every safetensors file in ``path``."""
    out = {}
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return out


@pytest.mark.parametrize("name", ["llama_tied_gqa4_linear_rope", "qwen2_biases", "mistral_window",
                                  "cohere_layernorm_logit_scale"])
def test_the_import_reads_a_dense_stock_export_back_exactly(name, tmp_path, tokenizer):
    cfg, _ = STOCK[name]
    state = random_state(cfg, 4)
    back = import_hf_model(export(tmp_path, name, cfg, state, tokenizer).path, max_seq_len=cfg.max_seq_len)
    assert back.config.replace(rope_precision=cfg.rope_precision, name=cfg.name) == cfg
    assert back.state_dict.keys() == state.keys()
    assert all(torch.equal(back.state_dict[k], state[k]) for k in state)  # the inverse table is exact


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_import_transform_has_its_inverse(arch):
    a = ARCHITECTURES[arch]
    cfg = DENSE.replace(parallel_residual=a.parallel_residual, qkv_bias=a.qkv_bias)
    for name, m in tensor_table(cfg, a).items():
        t = torch.randn(m.shape)
        assert torch.equal(m.export(m.convert(t, torch.float32)), t), name


# ---- choices and refusals -------------------------------------------------------------------------------
@pytest.mark.parametrize(("cfg", "why"), [
    (DENSE.replace(attn_experts=4, ffn_experts=4), "Mixture of Attention \\(4 attention experts, soft, expert KV\\)"),
    (DENSE, "parallel-attention block with RMSNorm"),
    (DENSE.replace(norm_kind="layernorm", ffn_experts=2), "parallel-attention block with an FFN mixture"),
    (DENSE.replace(norm_kind="layernorm", qkv_bias=True), "parallel-attention block with q/k/v biases"),
    (SEQUENTIAL.replace(norm_kind="layernorm"), "sequential block with LayerNorm"),
    (SEQUENTIAL.replace(logit_scale=0.5), "sequential block with logit_scale=0.5"),
    # routings Mixtral and Qwen2-MoE would otherwise be chosen for, and cannot compute
    (SEQUENTIAL.replace(ffn_experts=4, ffn_router=RouterConfig("hash")), "computes hash FFN routing"),
    (SEQUENTIAL.replace(ffn_experts=4, ffn_router=RouterConfig("expert_choice")),
     "computes expert-choice FFN routing"),
    (SEQUENTIAL.replace(ffn_experts=4, router_scope="model"), "computes one routing decision for every layer"),
    (SEQUENTIAL.replace(ffn_experts=4, ffn_router=RouterConfig("topk", 2, renormalize=True), router_scope="model"),
     "computes one routing decision for every layer"),
    (DENSE.replace(attn_experts=4, ffn_experts=4, ffn_router=RouterConfig("hash")), "computes hash FFN routing"),
    (DENSE.replace(attn_experts=4, ffn_experts=4, joint_router=True), "computes a joint router"),
])
def test_stock_is_refused_in_one_line_where_no_class_computes_the_model(cfg, why, tmp_path, tokenizer):
    with pytest.raises(BamError, match=why) as e:
        write_export(tmp_path / "x", cfg, random_state(cfg, 0), tokenizer=tokenizer, card=ModelCard("x"),
                     format="stock")
    assert "\n" not in str(e.value) and "export.format=custom" in str(e.value)
    assert not (tmp_path / "x").exists()
    assert choose_format(cfg, "auto") is None


def test_bad_export_requests_are_one_line_errors(tmp_path, tokenizer):
    state = random_state(SEQUENTIAL, 0)
    with pytest.raises(BamError, match="unknown export format 'onnx'"):
        choose_format(SEQUENTIAL, "onnx")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "config.json").write_text("{}")
    with pytest.raises(BamError, match="exists and is not empty"):
        write_export(tmp_path / "full", SEQUENTIAL, state, tokenizer=tokenizer, card=ModelCard("x"))
    with pytest.raises(BamError, match="layout of its model config"):
        write_export(tmp_path / "a", SEQUENTIAL.replace(ffn_experts=2), state, tokenizer=tokenizer, card=ModelCard("x"))
    with pytest.raises(BamError, match="'<eos>' is not in"):
        write_export(tmp_path / "b", SEQUENTIAL, state, tokenizer=ExportTokenizer(tokenizer.path, "<eos>"),
                     card=ModelCard("x"))
    small = SEQUENTIAL.replace(vocab_size=16)
    with pytest.raises(BamError, match="has no row in the model's 16-row embedding"):
        write_export(tmp_path / "c", small, random_state(small, 0), tokenizer=tokenizer, card=ModelCard("x"))
    with pytest.raises(BamError, match="choose one dtype"):
        mixed = {**state, "norm.weight": state["norm.weight"].half()}
        write_export(tmp_path / "d", SEQUENTIAL, mixed, tokenizer=tokenizer, card=ModelCard("x"))


def test_bfloat16_export_is_bfloat16(tmp_path, tokenizer):
    result = export(tmp_path, "bf16", SEQUENTIAL, random_state(SEQUENTIAL, 0), tokenizer, dtype=torch.bfloat16)
    assert json.loads((result.path / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(result.path / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    hashed = SEQUENTIAL.replace(ffn_experts=4, ffn_router=RouterConfig("hash"))  # its table keeps int64
    result = export(tmp_path, "bf16_hash", hashed, random_state(hashed, 0), tokenizer, dtype=torch.bfloat16)
    with safe_open(str(result.path / "model.safetensors"), framework="pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert {k for k, d in dtypes.items() if d != "BF16"} == {f"model.layers.{i}.ffn.router.table" for i in range(2)}
    assert {dtypes[f"model.layers.{i}.ffn.router.table"] for i in range(2)} == {"I64"}


def test_model_card_renders_provenance_and_eval_rows(tmp_path, tokenizer):
    cfg = DENSE.replace(attn_experts=2, ffn_experts=2)
    card = (export(tmp_path, "card", cfg, random_state(cfg, 0), tokenizer).path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and "- mixture-of-experts" in card
    assert "# Test card" in card and "run `t`, artifact `card`" in card
    assert "| model | general ppl | code ppl |" in card and "| card | 12.5 | 3.25 |" in card
    assert "trust_remote_code=True" in card and "attention 2 experts (soft, expert KV)" in card


# ---- hub upload ---------------------------------------------------------------------------------------
def test_push_offline_ends_with_one_line(tmp_path):
    with pytest.raises(BamError, match="offline \\(HF_HUB_OFFLINE=1\\); upload it later") as e:
        push_to_hub(tmp_path, "me/bam")
    assert "\n" not in str(e.value)


class FakeApi:
    calls: list = []
    fail: BaseException | None = None

    def __init__(self, token=None):
        self.calls.append(("init", token))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        if self.fail is not None:
            raise self.fail

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"})()


def test_push_uploads_the_folder_and_turns_hub_failures_into_one_line(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    monkeypatch.setattr(huggingface_hub.constants, "is_offline_mode", lambda: False)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    FakeApi.calls = []
    assert push_to_hub(tmp_path, "me/bam", token="t") == "https://huggingface.co/me/bam/commit/abc"
    assert FakeApi.calls[0] == ("init", "t")
    assert FakeApi.calls[1] == ("create_repo", "me/bam", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert FakeApi.calls[2][1]["folder_path"] == str(tmp_path) and FakeApi.calls[2][1]["repo_id"] == "me/bam"

    def refused(status: int) -> HfHubHTTPError:
        response = type("Response", (), {"status_code": status, "headers": {}, "request": None})()
        return HfHubHTTPError(f"{status} Client Error", response=response)

    for fail, why in ((refused(401), "HTTP 401\\): log in with a token"),
                      (refused(500), "pushing to me/bam failed .*; retry, or upload it later.*hf upload me/bam"),
                      (ConnectionError("no route to host"), "cannot reach the hub.*hf upload me/bam")):
        monkeypatch.setattr(FakeApi, "fail", fail)
        with pytest.raises(BamError, match=why) as e:
            push_to_hub(tmp_path, "me/bam")
        assert "\n" not in str(e.value)
