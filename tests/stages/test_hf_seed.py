"""A Hugging Face checkpoint as the seed, through the CLI: imported (no training), loaded with
bam_pipeline.load and compared with transformers; the whole pipeline on top of it with the
checkpoint's own tokenizer, function-preserving under zero branch training; imported experts; and
every bad checkpoint in one line with nothing half-written."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cli_runner import cli_here  # noqa: E402
from hf_checkpoints import (  # noqa: E402
    BOS_ID,
    EOS_ID,
    compare_ids,
    hf_config,
    hf_model,
    load_hf,
    save_checkpoint,
    tiny_tokenizer,
)

import bam_pipeline  # noqa: E402
from bam_pipeline.store.artifacts import read_artifact  # noqa: E402

# architecture, config fields, save arguments: what real checkpoints vary
CASES = {
    "llama_tied_gqa": ("llama", {"tie_word_embeddings": True}, {}),
    "llama_untied_bf16_sharded": ("llama", {"tie_word_embeddings": False}, {"dtype": torch.bfloat16,
                                                                           "max_shard_size": "30KB"}),
    "mistral": ("mistral", {"sliding_window": None}, {}),
    "qwen2_biases": ("qwen2", {"tie_word_embeddings": True}, {}),
    "cohere_parallel": ("cohere", {"logit_scale": 0.25, "num_key_value_heads": 4}, {"dtype": torch.bfloat16}),
}


def _checkpoint(tmp_path, arch="llama", seed=0, **fields):
    return save_checkpoint(hf_model(hf_config(arch, **fields), seed=seed), tmp_path / f"ckpt-{arch}-{seed}")


@pytest.mark.parametrize("case", list(CASES))
def test_an_imported_seed_computes_what_transformers_does(case, tmp_path):
    arch, fields, save = CASES[case]
    ckpt = save_checkpoint(hf_model(hf_config(arch, **fields)), tmp_path / "ckpt", **save)
    root = tmp_path / "stages"
    cli_here(root, "stage=seed", "seed=hf", f"seed.path={ckpt}", check=True)
    art = read_artifact(root / "smoke" / "seed" / "main")
    assert art.manifest["architecture"] == transformers.AutoConfig.from_pretrained(ckpt).architectures[0]
    assert art.manifest["source"]["path"] == str(ckpt.resolve()) and art.manifest["tokens"] == 0
    assert set(art.manifest["checkpoint_files"]) >= {"config.json"}
    ours = bam_pipeline.load(art.path)
    ids = compare_ids()
    with torch.no_grad():
        diff = (ours(ids) - load_hf(ckpt)(ids).logits).abs().max().item()
    assert diff <= 1e-5, diff
    assert ours.encode("the fox").tolist() == [tiny_tokenizer().encode("the fox").ids]
    weights = {t.dtype for t in __import__("safetensors.torch").torch.load_file(str(art.path / "model.safetensors"))
               .values()}
    assert weights == {save.get("dtype", torch.float32)}  # seed.dtype=null keeps the checkpoint's dtype


def test_a_tied_config_storing_its_own_head_is_published_untied_as_transformers_loads_it(tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = _checkpoint(tmp_path, tie_word_embeddings=True)
    sd = load_file(ckpt / "model.safetensors")
    sd["lm_head.weight"] = torch.randn(sd["model.embed_tokens.weight"].shape) * 0.2  # a head of its own
    save_file(sd, ckpt / "model.safetensors", metadata={"format": "pt"})
    root = tmp_path / "stages"
    cli_here(root, "stage=seed", "seed=hf", f"seed.path={ckpt}", check=True)
    ours = bam_pipeline.load(root / "smoke" / "seed" / "main")
    assert not ours.config.tie_embeddings
    with torch.no_grad():
        assert (ours(compare_ids()) - load_hf(ckpt)(compare_ids()).logits).abs().max() <= 1e-5


def test_the_pipeline_runs_on_an_imported_seed_and_identical_experts_preserve_it(tmp_path):
    ckpt = _checkpoint(tmp_path)
    root = tmp_path / "stages"
    # every stage on the imported seed; one trained mixture and no downstream (the smoke run has those)
    r = cli_here(root, "stage=all", "seed=hf", f"seed.path={ckpt}", "budget.branch.tokens=0",
                 "mix.ffn_router.renormalize=true", "pipeline.moe_runs=[bam]", "downstream.in_all=false", check=True)
    run = root / "smoke"
    line = next(line for line in r.out.splitlines() if "'</s>'" in line)  # tokenised with the checkpoint's tokenizer
    assert "tokenizer" in line and re.search(r"\b2\b", line), line  # its end of document '</s>', id 2
    data = json.loads((run / "data" / "manifest.json").read_text())
    seed = read_artifact(run / "seed" / "main")
    assert data["eos_id"] == EOS_ID and data["tokenizer_hash"] == seed.manifest["tokenizer_hash"]
    from bam_pipeline.data.prepare import open_prepared

    first_doc = open_prepared(run / "data").stream("code", "test").document(0).tolist()
    assert first_doc[0] == BOS_ID and first_doc[-1] == EOS_ID  # the checkpoint's post-processor, then eos
    for d in ("code", "math", "law"):
        expert = read_artifact(run / "branch" / d)
        assert expert.manifest["tokens"] == 0
        assert expert.manifest["files"]["model.safetensors"] == seed.manifest["files"]["model.safetensors"]
    rows = json.loads((run / "eval" / "metrics.json").read_text())["rows"]
    ppl = {(r["model"], r["domain"]): r["perplexity"] for r in rows}
    for domain in ("general", "code", "math", "law"):
        want = ppl[("seed", domain)]
        for preserving in ("mix/dense", "mix/bam"):  # gates that sum to one: the seed's function, exactly
            assert f"{ppl[(preserving, domain)]:.4g}" == f"{want:.4g}", (preserving, domain)
        assert not math.isclose(ppl[("mix/btx", domain)], want, rel_tol=1e-3)  # the paper's top-1 gate is not
    assert {m for m, _ in ppl} >= {"seed", "branch/code", "mix/bam", "mix/bam_kv_shared", "mix/btx", "mix/dense",
                                   "moe/bam"}  # mixed from the imported seed and trained


def test_an_imported_expert_must_match_the_seed(tmp_path):
    seed_ckpt, expert_ckpt = _checkpoint(tmp_path), _checkpoint(tmp_path, seed=1)
    root = tmp_path / "stages"
    args = ("seed=hf", f"seed.path={seed_ckpt}", "branch=hf")
    cli_here(root, "stage=data", *args, f"branch.code.path={expert_ckpt}", check=True)
    cli_here(root, "stage=seed", *args, f"branch.code.path={expert_ckpt}", check=True)
    r = cli_here(root, "stage=branch", "domain=code", *args, f"branch.code.path={expert_ckpt}", check=True)
    line = next(line for line in r.out.splitlines() if "LlamaForCausalLM" in line)
    assert "branch/code" in line and str(expert_ckpt) in line, line
    expert = bam_pipeline.load(root / "smoke" / "branch" / "code")
    with torch.no_grad():
        assert (expert(compare_ids()) - load_hf(expert_ckpt)(compare_ids()).logits).abs().max() <= 1e-5
    wide = _checkpoint(tmp_path, seed=2, hidden_size=48)
    r = cli_here(root, "stage=branch", "domain=math", *args, f"branch.math.path={wide}")
    error = _error_line(r)  # the expert, what differs (its hidden size 48) and nothing half-built
    assert str(wide) in error and "architecture" in error and re.search(r"\b48\b", error), error
    other_tok = _checkpoint(tmp_path, seed=3)
    tok = tiny_tokenizer()
    tok.add_tokens(["zz"])
    tok.save(str(other_tok / "tokenizer.json"))
    r = cli_here(root, "stage=branch", "domain=law", *args, f"branch.law.path={other_tok}")
    error = _error_line(r)
    assert str(other_tok) in error and "tokenizer" in error.replace(str(other_tok), ""), error
    assert not (root / "smoke" / "branch" / "math").exists() and not (root / "smoke" / "branch" / "law").exists()


def _error_line(r) -> str:
    """The one ``error:`` line of a command that exited with code 2."""
    errors = [line for line in r.out.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1, r.out[-2000:]
    return errors[0]


def _no_config(ck):
    (ck / "config.json").unlink()


def _bin_only(ck):
    for f in ck.glob("*.safetensors*"):
        f.unlink()
    (ck / "pytorch_model.bin").write_bytes(b"pickle")


def _arch(name):
    def change(ck):
        cfg = json.loads((ck / "config.json").read_text())
        cfg["architectures"], cfg["model_type"] = [name], name.removesuffix("ForCausalLM").lower()
        (ck / "config.json").write_text(json.dumps(cfg))
    return change


def _truncate(ck):
    shard = sorted(ck.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])


def _drop_shard(ck):
    sorted(ck.glob("model-*.safetensors"))[-1].unlink()


def _no_tokenizer(ck):
    (ck / "tokenizer.json").unlink()


def _small_vocab(ck):
    cfg = json.loads((ck / "config.json").read_text())
    cfg["vocab_size"] = 16  # the tokenizer has 32 ids
    (ck / "config.json").write_text(json.dumps(cfg))


BAD = {  # the change, and what the one error line names (case-insensitive)
    "missing_directory": (None, ("nowhere", "org/name")),  # the path given, and the hub id form it could be
    "no_config": (_no_config, ("config.json",)),
    "unsupported_architecture": (_arch("GPTNeoXForCausalLM"), ("GPTNeoXForCausalLM",)),
    "gemma": (_arch("GemmaForCausalLM"), ("GemmaForCausalLM",)),
    "bin_only": (_bin_only, ("pickle",)),
    "truncated_shard": (_truncate, ("model-",)),
    "missing_shard": (_drop_shard, ("model-",)),
    "no_tokenizer": (_no_tokenizer, ("tokenizer.json",)),
    "vocabulary": (_small_vocab, ("31", "16")),  # the tokenizer's largest id, the checkpoint's embedding rows
    "offline_hub_id": ("someorg/somemodel", ("someorg/somemodel", "offline")),
}


@pytest.mark.parametrize("name", list(BAD))
def test_a_bad_checkpoint_is_one_line_and_leaves_nothing(name, tmp_path):
    change, facts = BAD[name]
    ckpt = save_checkpoint(hf_model(hf_config("llama")), tmp_path / "ckpt", max_shard_size="30KB")
    if change is None:
        path = str(tmp_path / "nowhere")
    elif isinstance(change, str):
        path = change
    else:
        change(ckpt)
        path = str(ckpt)
    root = tmp_path / "stages"
    r = cli_here(root, "stage=seed", "seed=hf", f"seed.path={path}")
    errors = [line for line in r.out.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.out, r.out[-2000:]
    named = lambda f: re.search(rf"\b{f}\b", errors[0]) if f.isdigit() else f.lower() in errors[0].lower()  # noqa: E731
    missing = [f for f in facts if not named(f)]
    assert not missing, f"the error line does not name {missing}: {errors[0]}"
    assert not (root / "smoke" / "seed").exists() or not any((root / "smoke" / "seed").iterdir())
    shutil.rmtree(tmp_path / "ckpt", ignore_errors=True)


def test_info_describes_the_checkpoint(tmp_path):
    ckpt = _checkpoint(tmp_path, "qwen2")
    r = cli_here(tmp_path / "stages", "stage=info", "seed=hf", f"seed.path={ckpt}", check=True)
    assert "D=32, H=4/KV=2" in r.out and "sequential blocks" in r.out and "q/k/v bias" in r.out



def _gguf_checkpoints(tmp_path):
    """A tiny GGUF seed (in a directory of its own) and a GGUF expert with other weights and the same tokenizer."""
    pytest.importorskip("gguf")
    from gguf_files import tiny_llama, write_gguf

    model, tok = tiny_llama()
    (tmp_path / "seed").mkdir()
    seed_file = write_gguf(tmp_path / "seed" / "tiny.gguf", model, tok)
    return seed_file, write_gguf(tmp_path / "expert.gguf", tiny_llama(seed=1)[0], tok), tok


def _check_gguf_import(art, path, tok) -> None:
    """The artifact records the GGUF file and computes what transformers reads from it."""
    import hashlib

    assert art.manifest["checkpoint_files"] == {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    record = art.manifest["checkpoint"]
    assert record["format"] == "gguf" and record["quantization"] == {"F32": 5, "Q4_1": 14, "Q8_0": 1}
    assert record["bookkeeping"]["_model_name_or_path"] == "Tiny Llama For Tests"
    assert record["bookkeeping"]["unk_token_id"] == 0
    ours = bam_pipeline.load(art.path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    ids = torch.tensor([tok.encode("The quick brown fox: def add(a, b).").ids])
    with torch.no_grad():
        assert (ours(ids) - reference(ids).logits).abs().max().item() <= 1e-4
    assert ours.eos_id == 0  # seed.eos_token's


def test_a_gguf_seed_imports_as_transformers_reads_it(tmp_path):
    seed_file, _, tok = _gguf_checkpoints(tmp_path)
    root = tmp_path / "stages"
    r = cli_here(root, "stage=seed", "seed=hf", f"seed.path={tmp_path / 'seed'}", 'seed.eos_token="<|endoftext|>"',
                 check=True)
    assert "Q4_1" in r.out and "dequantised by transformers" in r.out
    art = read_artifact(root / "smoke" / "seed" / "main")
    _check_gguf_import(art, seed_file, tok)
    assert art.manifest["end_of_document"] == {"id": 0, "token": "<|endoftext|>"}
    assert art.manifest["config"]["import"]["eos_token"] == "<|endoftext|>"


@pytest.mark.slow
def test_a_gguf_seed_names_the_runs_end_of_document_and_a_gguf_expert_imports(tmp_path):
    """seed.eos_token ends every document the data stage writes; branch=hf takes a GGUF file too."""
    seed_file, expert_file, tok = _gguf_checkpoints(tmp_path)
    root = tmp_path / "stages"
    args = ("seed=hf", f"seed.path={seed_file}", 'seed.eos_token="<|endoftext|>"', "branch=hf",
            f"branch.code.path={expert_file}")
    r = cli_here(root, "stage=data", *args, check=True)
    assert "'<|endoftext|>' = 0" in r.out  # the data stage's line: the named token's id, not the file's 2
    run = root / "smoke"
    data = json.loads((run / "data" / "manifest.json").read_text())
    assert (data["eos_id"], data["eos_token"]) == (0, "<|endoftext|>")
    from bam_pipeline.data.prepare import open_prepared

    assert open_prepared(run / "data").stream("code", "test").document(0).tolist()[-1] == 0
    cli_here(root, "stage=seed", *args, check=True)
    cli_here(root, "stage=branch", "domain=code", *args, check=True)
    _check_gguf_import(read_artifact(run / "branch" / "code"), expert_file, tok)
