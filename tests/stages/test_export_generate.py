"""stage=export and stage=generate on the smoke run, through the CLI: every model of the run (seed,
experts, every mix variant's upcycled mixture, every trained mixture) exported and loaded by
``transformers`` in a process where bam_pipeline cannot be imported computes the logits of
``bam_pipeline.load`` of the same artifact, and its greedy ``generate()`` continues the prompts with
exactly the tokens ``stage=generate`` printed (and a cache-free argmax loop computes); a stock-format
export of an imported Llama seed loads without trust_remote_code; overwrite, the hub upload offline,
and the decoding next to ``bam_pipeline.load``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_checkpoints import WITHOUT_BAM_PIPELINE  # noqa: E402
from cli_runner import cli_here  # noqa: E402

import bam_pipeline  # noqa: E402
from bam_pipeline.config.files import group_options  # noqa: E402
from bam_pipeline.model.generation import greedy_without_cache  # noqa: E402
from bam_pipeline.store.artifacts import find_model_artifacts  # noqa: E402
from bam_pipeline.store.layout import RunLayout, parse_label  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
NEW_TOKENS = 32
TOLERANCE = 1e-5
PROMPTS = [{"prompt": "def add(a, b):\n    return"}, "The court shall", {"prompt": "Let x be"}]


def compare_ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(3))  # (2, 32)


LOAD_ELSEWHERE = WITHOUT_BAM_PIPELINE + textwrap.dedent("""
    jobs, ids, new = json.loads(sys.argv[1]), torch.tensor(json.loads(sys.argv[2])), int(sys.argv[3])
    out = {}
    for label, job in jobs.items():
        model = transformers.AutoModelForCausalLM.from_pretrained(job["dir"], trust_remote_code=True).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(job["dir"])
        with torch.no_grad():
            logits = model(ids).logits
        encoded = [tokenizer(p).input_ids for p in job["prompts"]]
        greedy = [model.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0, len(p):].tolist() for p in encoded]
        out[label] = {"logits": logits, "encoded": encoded, "greedy": greedy, "class": type(model).__name__}
    torch.save(out, sys.argv[4])
""")


@pytest.fixture(scope="module")
def exported(smoke_run, tmp_path_factory):
    """A copy of the smoke run with every mix variant upcycled, every model exported and continued by
    stage=generate, and what transformers computed from each export where bam_pipeline is not importable."""
    work = tmp_path_factory.mktemp("export")
    root = work / "stages"
    shutil.copytree(smoke_run[0], root)
    run = root / "smoke"
    for variant in group_options("mix"):  # the ones stage=all did not build: btx_matched, sparse_upcycle, top-k ...
        if not (run / "mix" / variant).is_dir():
            cli_here(root, "stage=mix", f"mix={variant}", check=True)
    before = [a.label for a in find_model_artifacts(RunLayout(run))]
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    jobs, printed, generated = {}, {}, {}
    for label in before:
        r = cli_here(root, "stage=export", f"artifact={label}", check=True)
        out = work / f"{label.replace('/', '_')}.jsonl"
        g = cli_here(root, "stage=generate", f"artifact={label}", f"generate.prompts_file={prompts}",
                     f"generate.max_new_tokens={NEW_TOKENS}", "generate.stop_at_eos=false",
                     f"generate.output={out}", check=True)
        printed[label] = r.out + g.out
        generated[label] = [json.loads(line) for line in out.read_text().splitlines()]
        jobs[label] = {"dir": str(run / "export" / Path(*parse_label(label))),
                       "prompts": [row["prompt"] for row in generated[label]]}
    vocab = bam_pipeline.load(run / "seed" / "main").config.vocab_size
    theirs_file = work / "theirs.pt"
    env = {**os.environ, "HF_MODULES_CACHE": str(work / "modules"), "PYTHONPATH": ""}
    p = subprocess.run([sys.executable, "-c", LOAD_ELSEWHERE, json.dumps(jobs), json.dumps(compare_ids(vocab).tolist()),
                        str(NEW_TOKENS), str(theirs_file)], env=env, cwd=work, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return run, before, jobs, printed, generated, torch.load(theirs_file)


@pytest.mark.slow  # the exported fixture: ~3 min of CLI exports of every smoke model (tests/interop/test_export.py checks every variant in-process)
def test_every_model_of_the_run_is_exported_outside_the_model_scan(exported):
    run, labels, jobs, printed, _, _ = exported
    evaluated = {r["model"] for r in json.loads((run / "eval" / "metrics.json").read_text())["rows"]}
    mix = {lab.split("/")[1] for lab in labels if lab.startswith("mix/")}
    assert mix == set(group_options("mix"))  # btx_matched, sparse_upcycle, bam_attn_top1/top2 ... included
    assert {"seed", "branch/code", "moe/bam", "moe/bam_kv_shared", "moe/btx", "moe/bam_cm"} <= set(labels)
    assert [a.label for a in find_model_artifacts(RunLayout(run))] == labels  # exports are not models of the run
    for label, job in jobs.items():
        path = Path(job["dir"])
        assert path.parent.parent == run / "export" and (path / "config.json").is_file()
        assert f"-> {path}" in printed[label]
        card = (path / "README.md").read_text()
        assert f"artifact `{label}`" in card and "config hash of that command" in card
        if label in evaluated:  # its rows of the eval table
            assert "| test source | perplexity |" in card and "| code |" in card
            downstream = next(line for line in card.splitlines() if "bam_next_passage_code" in line)
            assert "offline" in downstream and "acc" in downstream, downstream  # the suite, the task, its accuracy
        else:  # a mix variant built after stage=all's eval: no eval rows, and the command that scores it
            assert "| test source |" not in card and "stage=eval" in card
        assert not list(path.parent.glob("*.tmp-*"))
    status = cli_here(run.parent, "stage=status", check=True).out
    assert "export" not in status.split("artifact= accepts:")[1]


def test_generate_prints_the_decode_latency_the_report_measures(smoke_copy):
    r = cli_here(smoke_copy, "stage=generate", "artifact=moe/bam", "generate.prompt=the", "generate.max_new_tokens=4",
                 "eval.latency_rounds=1", check=True)  # the smoke experiment times none; one thread (one_thread)
    line = next(line for line in r.out.splitlines() if line.startswith("decode latency per generated token:"))
    assert float(re.search(r"([\d.]+) ms at 1 thread\b", line).group(1)) > 0, line
    assert "48-token prompt and 16 new tokens" in line, line  # max_seq_len 64 - 16


@pytest.mark.parametrize("label", ["seed", "branch/code", "moe/bam", "moe/bam_kv_shared", "moe/btx", "moe/dense",
                                   "moe/bam_cm", "mix/btx_matched", "mix/sparse_upcycle", "mix/bam_attn_top1",
                                   "mix/bam_attn_top2", "mix/bam_kv_shared_top1"])
@pytest.mark.slow  # the exported fixture: ~3 min of CLI exports of every smoke model (tests/interop/test_export.py checks every variant in-process)
def test_the_export_computes_what_bam_pipeline_load_computes(exported, label):
    run, _, _, _, generated, theirs = exported
    got = theirs[label]
    assert got["class"] == "BamForCausalLM"
    ours = bam_pipeline.load(run / Path(*parse_label(label)))
    ids = compare_ids(ours.config.vocab_size)
    with torch.no_grad():
        want = ours(ids)
    diff = (got["logits"] - want).abs().max().item()
    print(f"{label}: max |logit difference| = {diff:.2e}")
    assert want.std() > 0.05 and diff <= TOLERANCE
    rows = generated[label]
    assert [r["prompt_ids"] for r in rows] == got["encoded"]  # the export's tokenizer encodes as the run's
    assert [r["tokens"] for r in rows] == got["greedy"]  # generate() of the export == stage=generate
    assert all(len(r["tokens"]) == NEW_TOKENS for r in rows)
    for r in rows:  # the cached decoder == a cache-free argmax loop
        assert greedy_without_cache(ours.model, r["prompt_ids"], NEW_TOKENS) == r["tokens"]
        assert r["text"] == ours.tokenizer.decode(r["tokens"])


@pytest.mark.slow  # the exported fixture: ~3 min of CLI exports of every smoke model (tests/interop/test_export.py checks every variant in-process)
def test_generate_prints_the_continuations_and_the_measured_cache_per_token(exported):
    _, _, _, printed, generated, _ = exported
    per_token = {label: float(re.search(r"KV cache: ([\d,]+) bytes per token", out).group(1).replace(",", ""))
                 for label, out in printed.items()}
    layers, kv_heads, head_dim = 2, 2, 8  # the smoke model
    one_set = layers * 2 * kv_heads * head_dim * 4  # K and V, float32
    assert per_token["seed"] == per_token["moe/bam_kv_shared"] == per_token["moe/btx"] == one_set
    assert per_token["moe/bam"] == per_token["mix/bam_attn_top1"] == 4 * one_set  # one K/V set per expert
    out = printed["moe/bam"]
    settings = next(line for line in out.splitlines() if "greedy" in line)  # greedy, 32 tokens, not stopped at eos
    assert re.search(rf"\b{NEW_TOKENS}\b", settings) and "end of document" in settings, settings
    for row in generated["moe/bam"]:
        assert f"{row['prompt']}{row['text']}" in out


@pytest.mark.slow  # the exported fixture: ~3 min of CLI exports of every smoke model (tests/interop/test_export.py checks every variant in-process)
def test_bam_pipeline_load_generates_what_the_stage_prints(exported):
    run, _, _, _, generated, _ = exported
    model = bam_pipeline.load(run / "moe" / "bam_kv_shared")
    prompts = [r["prompt"] for r in generated["moe/bam_kv_shared"]]
    full = model.generate_full(prompts, max_new_tokens=NEW_TOKENS, stop_at_eos=False)
    assert [r.tokens for r in full] == [r["tokens"] for r in generated["moe/bam_kv_shared"]]
    assert model.generate(prompts[1], max_new_tokens=NEW_TOKENS, stop_at_eos=False) == full[1].text
    sampled = model.generate(prompts, max_new_tokens=16, temperature=1.0, top_p=0.9, seed=3)
    assert model.generate(prompts, max_new_tokens=16, temperature=1.0, top_p=0.9, seed=3) == sampled  # seeded
    assert model.generate(prompts, max_new_tokens=16, temperature=1.0, top_p=0.9, seed=4) != sampled
    stopped = model.generate_full(prompts, max_new_tokens=NEW_TOKENS)
    for r in stopped:  # stopping at the end of the document keeps the eos id, not its text
        assert r.tokens[-1] == model.eos_id if r.stopped_at_eos else len(r.tokens) == NEW_TOKENS


@pytest.mark.slow  # the exported fixture: ~3 min of CLI exports of every smoke model (tests/interop/test_export.py checks every variant in-process)
def test_overwrite_replaces_an_export_atomically_and_the_hub_upload_offline_is_one_line(exported):
    run, _, _, _, _, _ = exported
    target = run / "export" / "moe" / "btx"
    (target / "stray.txt").write_text("left from before")
    r = cli_here(run.parent, "stage=export", "artifact=moe/btx", "export.overwrite=true", check=True)
    assert "BamForCausalLM" in r.out and not (target / "stray.txt").exists()
    assert not [p for p in target.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    shutil.rmtree(run / "export" / "branch")
    r = cli_here(run.parent, "stage=export", "artifact=branch/law", "export.push_to_hub=someone/bam-law")
    errors = [line for line in r.out.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1, r.out[-2000:]
    assert "HF_HUB_OFFLINE=1" in errors[0] and "hf upload someone/bam-law" in errors[0], errors[0]  # why, and the fix
    assert (run / "export" / "branch" / "law" / "model.safetensors").is_file()  # the export itself is complete


# ---- a stock-format export: an imported Llama seed -----------------------------------------------------
@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    from hf_checkpoints import hf_config, hf_model, save_checkpoint

    work = tmp_path_factory.mktemp("llama")
    ckpt = save_checkpoint(hf_model(hf_config("llama", tie_word_embeddings=False)), work / "ckpt")
    root = work / "stages"
    args = ("seed=hf", f"seed.path={ckpt}")
    cli_here(root, "stage=data", *args, check=True)
    cli_here(root, "stage=seed", *args, check=True)
    r = cli_here(root, "stage=export", "artifact=seed", *args, check=True)
    return root / "smoke", r.out


def test_a_sequential_seed_exports_to_llama_and_loads_without_remote_code(llama_run, tmp_path):
    run, out = llama_run
    path = run / "export" / "seed" / "main"
    line = next(line for line in out.splitlines() if "LlamaForCausalLM" in line)
    assert "stock" in line and "custom" not in line and "trust_remote_code" not in out, out
    assert not list(path.glob("*.py")) and "auto_map" not in json.loads((path / "config.json").read_text())
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path).eval()  # no trust_remote_code
    assert type(theirs).__module__.startswith("transformers.models.llama")
    ours = bam_pipeline.load(run / "seed" / "main")
    ids = compare_ids(ours.config.vocab_size)
    with torch.no_grad():
        diff = (theirs(ids).logits - ours(ids)).abs().max().item()
    print(f"stock Llama export of an imported seed: max |logit difference| = {diff:.2e}")
    assert diff <= TOLERANCE
    reference = tmp_path / "reference"  # the keys save_pretrained() writes for this class and config
    transformers.LlamaForCausalLM(theirs.config).save_pretrained(reference)
    from safetensors import safe_open

    def keys(d: Path) -> set[str]:
        with safe_open(str(d / "model.safetensors"), "pt") as f:
            return set(f.keys())
    assert keys(path) == keys(reference)
    # the tokenizer exported is the run's: what the data stage tokenised with
    assert (path / "tokenizer.json").read_bytes() == (run / "data" / "tokenizer.json").read_bytes()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert tok("the fox").input_ids == ours.tokenizer.encode("the fox").ids


def test_a_sentencepiece_only_seed_exports_the_converted_tokenizer_json(tmp_path):
    pytest.importorskip("sentencepiece")  # the [hf] extra: transformers converts tokenizer.model with it
    from hf_checkpoints import hf_config, hf_model, save_checkpoint
    from test_hf_tokenizer import _write_sentencepiece_model

    ckpt = save_checkpoint(hf_model(hf_config("llama")), tmp_path / "ckpt", tokenizer=False)
    _write_sentencepiece_model(ckpt / "tokenizer.model")
    root = tmp_path / "stages"
    args = ("seed=hf", f"seed.path={ckpt}")
    for stage in ("data", "seed"):
        cli_here(root, f"stage={stage}", *args, check=True)
    cli_here(root, "stage=export", "artifact=seed", *args, check=True)
    run = root / "smoke"
    exported_tok = run / "export" / "seed" / "main" / "tokenizer.json"
    assert not (run / "export" / "seed" / "main" / "tokenizer.model").exists()
    assert exported_tok.read_bytes() == (run / "data" / "tokenizer.json").read_bytes()
    want = transformers.AutoTokenizer.from_pretrained(str(ckpt))("the fox jumps").input_ids  # converted by transformers
    assert transformers.AutoTokenizer.from_pretrained(exported_tok.parent)("the fox jumps").input_ids == want


def test_generate_prints_control_characters_as_escapes():
    from bam_pipeline.stages.generate import printable

    assert printable("a\x1b[31mb\bc\nd\te é") == "a\\x1b[31mb\\x08c\nd\te é"
