"""The bad-input catalogue: every mistake a user can make ends in exit code 2 and exactly one `error:`
line that names the offending key or file and what to do: no traceback, no catch-all "unexpected
error" line, and nothing half-written. Runs the real CLI entry point in this process (the same
code path as `python -m bam_pipeline`, without the interpreter start-up per case)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_runner import cli, cli_here

Setup = Callable[[Path, Path], list[str]]  # (stages root's run dir, scratch dir) -> extra arguments


@dataclass(frozen=True)
class Case:
    category: str
    args: tuple[str, ...]
    says: str  # a piece of the one error line: the key or file, and what to do
    setup: Setup | None = None
    needs_run: bool = False  # start from a copy of the finished smoke run
    env: dict[str, str] = field(default_factory=dict)
    code: int = 2


def _files_source(run: Path, scratch: Path, name: str, content: bytes | None = None, **extra) -> list[str]:
    """Make `code` a files source reading ``scratch/<name>`` (written with ``content`` when given), as a
    user adds one on the command line."""
    path = scratch / name
    if content is not None:
        path.write_bytes(content)
    opts = ",".join(f"{k}:{v}" for k, v in {"type": "files", "path": f"'{path}'", **extra}.items())
    return [f"+data.sources.code={{source:{{{opts}}}}}"]


def jsonl(*rows) -> bytes:
    return b"".join((json.dumps(r) if not isinstance(r, bytes) else r.decode()).encode() + b"\n" for r in rows)


def _binary_only_folder(run: Path, scratch: Path) -> list[str]:
    (scratch / "only_bin").mkdir()
    (scratch / "only_bin" / "x.bin").write_bytes(b"\0")
    return _files_source(run, scratch, "only_bin")


def _parquet(run: Path, scratch: Path) -> list[str]:
    pq.write_table(pa.table({"body": ["a", "b"]}), scratch / "docs.parquet")
    return _files_source(run, scratch, "docs.parquet")


def _remove(*parts: str) -> Setup:
    def setup(run: Path, scratch: Path) -> list[str]:
        for p in parts:
            shutil.rmtree(run / p)
        return []
    return setup


def _corrupt_manifest(artifact: str, text: str, remove: tuple[str, ...] = ()) -> Setup:
    def setup(run: Path, scratch: Path) -> list[str]:
        (run / artifact / "manifest.json").write_text(text)
        for p in remove:
            shutil.rmtree(run / p)
        return []
    return setup


def _without_hash(run: Path, scratch: Path) -> list[str]:
    m = json.loads((run / "seed" / "main" / "manifest.json").read_text())
    del m["hash"]
    (run / "seed" / "main" / "manifest.json").write_text(json.dumps(m))
    shutil.rmtree(run / "branch" / "code")
    return []


def _flip_byte(path: str, remove: tuple[str, ...] = ()) -> Setup:
    def setup(run: Path, scratch: Path) -> list[str]:
        files = sorted(run.glob(path))
        for f in files:
            data = bytearray(f.read_bytes())
            data[len(data) // 2] ^= 0xFF
            f.write_bytes(bytes(data))
        for p in remove:
            shutil.rmtree(run / p)
        return []
    return setup


def _other_tokenizer(run: Path, scratch: Path) -> list[str]:
    """Prepare the run's data again with another vocabulary: every model now has another tokenizer."""
    r = cli_here(run.parent, "stage=data", "data.tokenizer.vocab_size=400")
    assert r.returncode == 0, r.out[-2000:]
    return ["data.tokenizer.vocab_size=400"]


def _existing_export(run: Path, scratch: Path) -> list[str]:
    """An export of moe/bam from before (a file in its directory)."""
    (run / "export" / "moe" / "bam").mkdir(parents=True)
    (run / "export" / "moe" / "bam" / "README.md").write_text("an earlier export")
    return []


def _prompts_file(scratch: Path, name: str, text: str) -> list[str]:
    (scratch / name).write_text(text)
    return [f"generate.prompts_file={scratch / name}"]


def _sleeper() -> int:
    p = subprocess.Popen(["sleep", "300"])
    SLEEPERS.append(p)
    return p.pid


SLEEPERS: list[subprocess.Popen] = []


def _lock(rel: str, host: str | None = None, remove: tuple[str, ...] = ()) -> Setup:
    """A lock on ``rel`` held by a live process (a sleeper here, or a fresh lease on another host)."""
    def setup(run: Path, scratch: Path) -> list[str]:
        path = run / ".locks" / f"{rel}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        now = time.time()
        holder = {"host": host or socket.gethostname(), "pid": 4242 if host else _sleeper(), "slurm_job": None,
                  "started": now, "renewed": now}
        path.write_text(json.dumps(holder))
        for p in remove:
            shutil.rmtree(run / p)
        return []
    return setup


H, C, M, P, S, D, A, K = ("the command line", "config values", "model overrides", "paths", "source file contents",
                          "devices", "missing and corrupt artifacts", "concurrency")
CASES: dict[str, Case] = {
    # ---- the command line: overrides Hydra cannot compose or parse, keys the config does not have ----
    "group_option": Case(H, ("domain=physics",), "unknown domain 'physics' in domain=physics: use one of: bible, code, "
                         "general, law, math (or add domain/physics.yaml to a config directory)"),
    "group_option_typo": Case(H, ("experiment=smok",), "unknown experiment 'smok' in experiment=smok: did you mean "
                              "experiment=smoke? (options: ablations, paper_590m"),
    "group_option_nested": Case(H, ("mix=bamm",), "unknown mix 'bamm' in mix=bamm: did you mean mix=bam?"),
    "key_typo": Case(H, ("domian=code",), "unknown key 'domian' in domian=code: did you mean domain=code?"),
    "section_key_typo": Case(H, ("train.batchsize=4",),
                             "unknown key 'train.batchsize' in train.batchsize=4: did you mean train.batch_size=4?"),
    "appended_key": Case(H, ("+domian=code",), "unknown key 'domian' in +domian=code: did you mean domain=code? "
                         "(+ adds a key the config does not have, and no stage reads it)"),
    "train_unknown_key": Case(H, ("+train.batchsize=4",),
                              "unknown key 'train.batchsize' in +train.batchsize=4: did you mean train.batch_size=4?"),
    "appended_unknown": Case(H, ("++traning.lr=1",),
                             "unknown key 'traning' in ++traning.lr=1: did you mean train.lr=1?"),
    "unparsable": Case(H, ("generate.prompt=def add(",), "cannot parse the override 'generate.prompt=def add(' "
                       "(extraneous input '(' expecting <EOF>): quote the whole override for the shell and the value "
                       """for Hydra, e.g. 'generate.prompt="def add("'"""),
    "split_value": Case(H, ("generate.prompt=def", "add(n):"),
                        "cannot parse the override 'add(n):' (at '(', character 4): an override is key=value; quote"),
    # ---- config values (stage=info: read and checked before anything runs) ----
    "batch_size_0": Case(C, ("train.batch_size=0",), "invalid train.batch_size=0: must be a positive integer"),
    "batch_size_text": Case(C, ("train.batch_size=abc",), "invalid train.batch_size='abc': must be an integer"),
    "accumulate_0": Case(C, ("train.accumulate=0",), "invalid train.accumulate=0: must be a positive integer"),
    "lr_negative": Case(C, ("train.lr=-1",), "invalid train.lr=-1.0: must be a positive number"),
    "val_every_0": Case(C, ("train.val_every=0",), "invalid train.val_every=0"),
    "log_every_0": Case(C, ("train.log_every=0",), "invalid train.log_every=0"),
    "warmup_frac": Case(C, ("train.warmup_frac=1.5",), "invalid train.warmup_frac=1.5: must be a fraction in [0, 1]"),
    "betas_one": Case(C, ("train.betas=[0.9]",), "invalid train.betas=[0.9]: must be two numbers in [0, 1)"),
    "val_tokens_short": Case(C, ("train.val_tokens=10",), "invalid train.val_tokens=10: must be 0 (no validation)"),
    "train_seq_len": Case(C, ("train.seq_len=128",), "invalid train.seq_len=128: exceeds the model's context"),
    "seed_tokens_0": Case(C, ("budget.seed.tokens=0",), "invalid budget.seed.tokens=0: must be a positive number"),
    "match_flops": Case(C, ("budget.moe.match=flops",), "invalid budget.moe.match='flops': use one of data, compute"),
    "reference": Case(C, ("budget.moe.reference=nope",), "invalid budget.moe.reference='nope': no mix variant"),
    "split_sum": Case(C, ("data.split.val=0.95",), "invalid data.split.test=0.1: val + test must stay below 1"),
    "vocab_small": Case(C, ("data.tokenizer.vocab_size=100",), "invalid data.tokenizer.vocab_size=100: byte-level"),
    "max_bytes": Case(C, ("data.max_bytes_per_source=-1",), "invalid data.max_bytes_per_source=-1"),
    "seed_general": Case(C, ("data.mixtures.seed_general=2",), "invalid data.mixtures.seed_general=2.0"),
    "no_domains": Case(C, ("data.domains=[]",), "invalid data.domains=[]: list the branch domains"),
    "domain_twice": Case(C, ("data.domains=[code,code]",), "invalid data.domains=['code', 'code']: names a domain twice"),
    "source_typo": Case(C, ("+data.sources.cdoe.max_bytes=5",), "invalid data.sources.cdoe={'max_bytes': 5}: names no"),
    "eval_batch_0": Case(C, ("eval.batch_size=0",), "invalid eval.batch_size=0"),
    "eval_seq_len_0": Case(C, ("eval.seq_len=0",), "invalid eval.seq_len=0"),
    "on_stale": Case(C, ("pipeline.on_stale=foo",), "invalid pipeline.on_stale='foo': use one of rebuild, refuse"),
    "moe_runs": Case(C, ("pipeline.moe_runs=[bam,xx_cm]",), "invalid pipeline.moe_runs='xx': no mix variant"),
    "wait_0": Case(C, ("pipeline.wait_s=0",), "invalid pipeline.wait_s=0.0: must be a positive number of seconds"),
    "seeds_repeated": Case(C, ("pipeline.seeds=[0,0]",), "invalid pipeline.seeds=[0, 0]: use distinct non-negative"),
    "seeds_negative": Case(C, ("pipeline.seeds=[-1]",), "invalid pipeline.seeds=[-1]: use distinct non-negative"),
    "resamples": Case(C, ("eval.resamples=100",), "invalid eval.resamples=100: use at least 2000"),
    "min_documents": Case(C, ("eval.min_documents=1",), "invalid eval.min_documents=1: use at least 2"),
    "stage": Case(C, ("stage=bogus",), "unknown stage 'bogus'; choose one of: data, seed"),
    "mix_kv": Case(C, ("mix.kv=both",), "invalid mix.kv='both': use one of expert, shared"),
    "mix_k": Case(C, ("mix.ffn_router.k=9",), "invalid mix.ffn_router.k=9: must be at most the number of experts (4)"),
    "mix_router_kind": Case(C, ("mix.attn_router.kind=hard",), "invalid mix.attn_router.kind='hard': use one of soft"),
    "mix_joint_counts": Case(C, ("mix=bam_router_joint", "mix.extra_seed_ffn_experts=1"),
                             "invalid mix.joint_router=True: needs as many attention as FFN experts"),
    "mix_attn_expert_choice": Case(C, ("mix.attn_router.kind=expert_choice",),
                                   "invalid mix.attn_router.kind='expert_choice': routes the FFN only"),
    "mix_attn_hash": Case(C, ("mix=bam_hash", "mix.attn_router.kind=hash"),
                          "invalid mix.attn_router.kind='hash': routes the FFN only"),
    "mix_hash_k": Case(C, ("mix=bam_hash", "mix.ffn_router.k=2"), "invalid mix.ffn_router.k=2: hash routing"),
    "export_format": Case(C, ("export.format=onnx",), "invalid export.format='onnx': use one of auto, stock, custom"),
    "export_repo_id": Case(C, ("export.push_to_hub=no-owner",), "invalid export.push_to_hub='no-owner': use a hub"),
    "generate_temperature": Case(C, ("generate.temperature=-1",), "invalid generate.temperature=-1.0: must be a number"),
    "generate_top_p": Case(C, ("generate.top_p=0",), "invalid generate.top_p=0.0: must be in (0, 1]"),
    "generate_new_0": Case(C, ("generate.max_new_tokens=0",), "invalid generate.max_new_tokens=0: must be a positive"),
    "downstream_suite": Case(C, ("downstream.suite=web",), "invalid downstream.suite='web': use downstream=offline or"),
    "downstream_models_empty": Case(C, ("downstream.models=[]",), "invalid downstream.models=[]: list distinct names"),
    # ---- model overrides ----
    "n_heads": Case(M, ("+model.overrides.n_heads=7",), "invalid model.overrides.d_model=32: must be divisible by n_heads=7"),
    "d_model_0": Case(M, ("+model.overrides.d_model=0",), "invalid model.overrides.d_model=0: must be positive"),
    "unknown_field": Case(M, ("+model.overrides.foo=1",), "invalid model.overrides.foo=1: unknown setting"),
    "preset": Case(M, ("model.preset=huge",), "invalid model.preset='huge': is not a model preset; known presets"),
    "kv_heads": Case(M, ("+model.overrides.n_kv_heads=3",), "invalid model.overrides.n_kv_heads=3: must divide n_heads=4"),
    "max_seq_len": Case(M, ("+model.overrides.max_seq_len=32",), "invalid model.overrides.max_seq_len=32: set model.seq_len"),
    "mixture_field": Case(M, ("+model.overrides.ffn_experts=4",), "the seed is dense; mixtures come from mix=<variant>"),
    "vocab_field": Case(M, ("+model.overrides.vocab_size=100",), "the vocabulary size comes from the run's tokenizer"),
    "seq_len_0": Case(M, ("model.seq_len=0",), "invalid model.seq_len=0: must be a positive number of tokens"),
    "rope_text": Case(M, ("+model.overrides.rope_theta=abc",), "invalid model.overrides.rope_theta='abc': must be a number"),
    "tie_maybe": Case(M, ("+model.overrides.tie_embeddings=maybe",), "invalid model.overrides.tie_embeddings='maybe'"),
    # ---- paths ----
    "root_is_file": Case(P, ("stage=info",), "is a file, not a directory; point BAM_STAGES_DIR",
                         env={"BAM_STAGES_DIR": "{scratch}/afile"}),
    "root_under_file": Case(P, ("stage=info",), "afile is a file, not a directory",
                            env={"BAM_STAGES_DIR": "{scratch}/afile/stages"}),
    "root_unwritable": Case(P, ("stage=info",), "cannot write stage outputs under /proc/bam-stages",
                            env={"BAM_STAGES_DIR": "/proc/bam-stages"}),
    "paths_root_file": Case(P, ("stage=info", "paths.root={scratch}/afile"), "is a file, not a directory"),
    "tokenizer_path": Case(P, ("data.tokenizer.path=/nonexistent/tokenizer.json",),
                           "invalid data.tokenizer.path='/nonexistent/tokenizer.json': no such file"),
    "source_path": Case(P, ("stage=data",), "does not exist; point data.sources.code.source.path",
                        setup=lambda run, scratch: _files_source(run, scratch, "missing")),
    "source_suffix": Case(P, ("stage=data",), "is not a text, JSONL, JSON or Parquet file",
                          setup=lambda run, scratch: _files_source(run, scratch, "docs.csv", b"a,b\n")),
    "source_empty_folder": Case(P, ("stage=data",), "source 'code' (files) yielded no documents",
                                setup=_binary_only_folder),
    # ---- source file contents (the general source read from a file) ----
    "jsonl_malformed": Case(S, ("stage=data",), "docs.jsonl line 2 is not valid JSON",
                            setup=lambda r, s: _files_source(r, s, "docs.jsonl", jsonl({"text": "a"}, b"{oops"))),
    "jsonl_not_utf8": Case(S, ("stage=data",), "docs.jsonl line 1 is not UTF-8 text (byte 0xff",
                           setup=lambda r, s: _files_source(r, s, "docs.jsonl", b'{"text": "\xff"}\n')),
    "json_malformed": Case(S, ("stage=data",), "docs.json is not valid JSON",
                           setup=lambda r, s: _files_source(r, s, "docs.json", b'[{"text": "a"},')),
    "parquet_corrupt": Case(S, ("stage=data",), "docs.parquet is not a readable Parquet file",
                            setup=lambda r, s: _files_source(r, s, "docs.parquet", b"PAR1 not really")),
    "row_not_object": Case(S, ("stage=data",), "docs.jsonl line 1 is a JSON list, not an object",
                           setup=lambda r, s: _files_source(r, s, "docs.jsonl", jsonl(["a", "b"]))),
    "text_not_string": Case(S, ("stage=data",), "field 'text' is int, not text; set source.text_field",
                            setup=lambda r, s: _files_source(r, s, "docs.jsonl", jsonl({"text": 7}))),
    "text_missing": Case(S, ("stage=data",), "docs.jsonl line 1 has no field 'text'",
                         setup=lambda r, s: _files_source(r, s, "docs.jsonl", jsonl({"body": "a"}))),
    "txt_not_utf8": Case(S, ("stage=data",), "doc.txt is not UTF-8 text",
                         setup=lambda r, s: _files_source(r, s, "doc.txt", b"caf\xe9 latin-1\n")),
    "id_missing": Case(S, ("stage=data",), "has no field 'key' (fields: ['text']); set source.id_field or drop it",
                       setup=lambda r, s: _files_source(r, s, "docs.jsonl", jsonl({"text": "a"}), id_field="key")),
    "parquet_column": Case(S, ("stage=data",), "docs.parquet has no column 'text'", setup=_parquet),
    "blank_documents": Case(S, ("stage=data",), "source 'code' (files) yielded no documents",
                            setup=lambda r, s: _files_source(r, s, "docs.jsonl", jsonl({"text": "  "}, {"text": ""}))),
    "too_few_documents": Case(S, ("stage=data",), "split is empty (2 documents",
                              setup=lambda r, s: _files_source(r, s, "docs.jsonl", jsonl({"text": "a"}, {"text": "b"}))),
    # ---- devices ----
    "gpu_trainer": Case(D, ("stage=seed", "trainer=gpu"), "invalid trainer.accelerator='gpu': no CUDA GPU is visible"),
    "ddp_trainer": Case(D, ("stage=branch", "domain=code", "trainer=ddp"), "use trainer=cpu"),
    "fsdp_trainer": Case(D, ("stage=moe", "trainer=fsdp"), "invalid trainer.accelerator='gpu'"),
    "eval_cuda": Case(D, ("stage=eval", "eval.device=cuda"), "invalid eval.device='cuda': no CUDA GPU is visible"),
    "devices_0": Case(D, ("trainer.devices=0",), "invalid trainer.devices=0: use a positive number of devices"),
    "devices_text": Case(D, ("trainer.devices=abc",), "invalid trainer.devices='abc'"),
    "accelerator_tpu": Case(D, ("trainer.accelerator=tpu",), "invalid trainer.accelerator='tpu': use one of cpu"),
    "precision": Case(D, ("trainer.precision=bf17",), "invalid trainer.precision='bf17': use one of"),
    "nodes_0": Case(D, ("trainer.num_nodes=0",), "invalid trainer.num_nodes=0: must be a positive integer"),
    "eval_device_name": Case(D, ("eval.device=tpu",), "invalid eval.device='tpu': use auto, cpu, cuda"),
    # ---- missing and corrupt artifacts (a copy of the finished smoke run) ----
    "no_data": Case(A, ("stage=seed",), "no prepared data in", setup=lambda r, s: shutil.rmtree(r) or []),
    "no_seed": Case(A, ("stage=branch", "domain=code"), "seed/main: run `python -m bam_pipeline stage=seed",
                    setup=_remove("seed", "branch/code"), needs_run=True),
    "no_branch": Case(A, ("stage=mix", "mix=bam"), "branch/law: run `python -m bam_pipeline stage=branch domain=law",
                      setup=_remove("branch/law", "mix/bam"), needs_run=True),
    "no_mix": Case(A, ("stage=moe", "mix=bam_attn_top2"), "run `python -m bam_pipeline stage=mix mix=bam_attn_top2",
                   needs_run=True),
    "manifest_truncated": Case(A, ("stage=branch", "domain=code"), "seed/main/manifest.json (",
                               setup=_corrupt_manifest("seed/main", '{"stage": "se', ("branch/code",)), needs_run=True),
    "manifest_field": Case(A, ("stage=branch", "domain=code"), "no 'hash' field; delete", setup=_without_hash,
                           needs_run=True),
    "weights_checksum": Case(A, ("stage=branch", "domain=code"), "checksum mismatch for",
                             setup=_flip_byte("seed/main/model.safetensors", ("branch/code",)), needs_run=True),
    "data_manifest": Case(A, ("stage=seed",), "prepared data in", needs_run=True,
                          setup=_corrupt_manifest("data", "{", ("seed",))),
    "data_checksum": Case(A, ("stage=seed",), "data.rebuild=true", needs_run=True,
                          setup=_flip_byte("data/tokens/code/train/*.arrow", ("seed",))),
    "eval_no_model": Case(A, ("stage=eval",), "no trained model in", needs_run=True,
                          setup=_remove("seed", "branch", "mix", "moe")),
    "eval_all_corrupt": Case(A, ("stage=eval",), "could be evaluated", needs_run=True,
                             setup=_flip_byte("*/*/model.safetensors")),
    "eval_other_tokenizer": Case(A, ("stage=eval",), "made with another tokenizer", needs_run=True,
                                 setup=_other_tokenizer),
    "branch_other_tokenizer": Case(A, ("stage=branch", "domain=code"), "seed was made with another tokenizer",
                                   needs_run=True, setup=_other_tokenizer),
    "eval_seq_len": Case(A, ("stage=eval", "eval.seq_len=128"), "eval.seq_len=128 exceeds", needs_run=True),
    # ---- stage=export / generate / downstream on the finished run ----
    "export_no_artifact": Case(A, ("stage=export",), "stage=export needs artifact=<label>", needs_run=True),
    "export_unknown": Case(A, ("stage=export", "artifact=moe/nope"), "unknown artifact 'moe/nope': run smoke has no such "
                           "model (seed, branch/code", needs_run=True),
    "export_btm": Case(A, ("stage=export", "artifact=btm"), "BTM is an eval-time ensemble", needs_run=True),
    "export_other_tokenizer": Case(A, ("stage=export", "artifact=moe/bam"), "moe/bam was made with another tokenizer",
                                   needs_run=True, setup=_other_tokenizer),
    "export_exists": Case(A, ("stage=export", "artifact=moe/bam"), "exists; add export.overwrite=true to replace it",
                          needs_run=True, setup=_existing_export),
    "export_stock_moa": Case(A, ("stage=export", "artifact=moe/bam", "export.format=stock"),
                             "no stock transformers class holds a Mixture of Attention", needs_run=True),
    "generate_no_prompt": Case(A, ("stage=generate", "artifact=seed"), "stage=generate needs a prompt", needs_run=True),
    "generate_empty_prompt": Case(A, ("stage=generate", "artifact=seed", "generate.prompt=''"), "the prompt is empty",
                                  needs_run=True),
    "generate_empty_line": Case(A, ("stage=generate", "artifact=seed"), "prompt 1 of", needs_run=True,
                                setup=lambda r, s: _prompts_file(s, "p.jsonl", '"  "\n')),
    "generate_bad_jsonl": Case(A, ("stage=generate", "artifact=seed"), "p.jsonl line 2 is not valid JSON",
                               needs_run=True, setup=lambda r, s: _prompts_file(s, "p.jsonl", '"a"\n{oops\n')),
    "generate_no_file": Case(A, ("stage=generate", "artifact=seed", "generate.prompts_file=/nonexistent/p.txt"),
                             "invalid generate.prompts_file='/nonexistent/p.txt': no such file", needs_run=True),
    "generate_too_long": Case(A, ("stage=generate", "artifact=seed", "generate.prompt=the", "generate.max_new_tokens=999"),
                              "exceeds the model's context max_seq_len=64; shorten the prompt or lower "
                              "max_new_tokens to at most 62", needs_run=True),
    "generate_unknown": Case(A, ("stage=generate", "artifact=branch/bible", "generate.prompt=the"),
                             "unknown artifact 'branch/bible'", needs_run=True),
    "downstream_unknown_task": Case(A, ("stage=downstream", "downstream.tasks=[arc_easy]"),
                                    "unknown task 'arc_easy' for downstream=offline; its tasks: bam_next_passage_general",
                                    needs_run=True),
    "downstream_quac": Case(A, ("stage=downstream", "downstream=paper", "downstream.tasks=[QuAC]"),
                            "unknown task 'QuAC' for downstream=paper (QuAC: lm-evaluation-harness has no QuAC task)",
                            needs_run=True),
    "downstream_code_task": Case(A, ("stage=downstream", "downstream=paper", "downstream.tasks=[humaneval]"),
                                 "executes generated code; add downstream.allow_code_execution=true", needs_run=True),
    "downstream_unknown_model": Case(A, ("stage=downstream", "downstream.models=[seed,moe/nope]"),
                                     "unknown downstream.models 'moe/nope'", needs_run=True),
    "downstream_other_tokenizer": Case(A, ("stage=downstream",), "was made with another tokenizer", needs_run=True,
                                       setup=_other_tokenizer),
    # ---- concurrency: an output another live run is building ----
    "seed_locked": Case(K, ("stage=seed",), "seed is being built by another run (pid", needs_run=True,
                        setup=_lock("seed/main", remove=("seed",))),
    "other_host": Case(K, ("stage=branch", "domain=code"), "pid 4242 on gpu-node-7", needs_run=True,
                       setup=_lock("branch/code", host="gpu-node-7", remove=("branch/code",))),
    "data_wait": Case(K, ("stage=branch", "domain=code", "pipeline.wait_s=1"), "waited 1 s for the prepared data",
                      needs_run=True, setup=_lock("data")),
    "input_building": Case(K, ("stage=mix", "mix=bam"), "input branch/law is being built by another run",
                           needs_run=True, setup=_lock("branch/law", remove=("branch/law", "mix/bam"))),
    "eval_locked": Case(K, ("stage=eval",), "the eval report is being built by another run", needs_run=True,
                        setup=_lock("eval/report")),
    "mix_locked": Case(K, ("stage=mix", "mix=bam"), "mix/bam is being built by another run", needs_run=True,
                       setup=_lock("mix/bam", remove=("mix/bam",))),
}


def test_the_catalogue_covers_every_category():
    counts = {}
    for case in CASES.values():
        counts[case.category] = counts.get(case.category, 0) + 1
    assert len(CASES) >= 60 and all(n >= 5 for n in counts.values()), counts
    assert set(counts) == {H, C, M, P, S, D, A, K}  # signals: tests/stages/test_faults.py


def _files(root: Path) -> set[str]:
    """Every file under the stages root but Hydra's logs: what a failed command must leave as it was."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "logs" not in p.parts}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_changes_nothing(name, request, tmp_path):
    case = CASES[name]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "afile").write_text("not a directory")
    root = tmp_path / "stages"
    if case.needs_run or case.category == A:  # only these wait for the smoke run (minutes, once per session)
        shutil.copytree(request.getfixturevalue("smoke_run")[0], root)
    else:
        root.mkdir()
    run = root / "smoke"
    try:
        extra = case.setup(run, scratch) if case.setup else []
        before = _files(root)
        env = {k: v.format(scratch=scratch) for k, v in case.env.items()}
        args = tuple(a.format(scratch=scratch) for a in case.args)
        r = cli_here(Path(env.get("BAM_STAGES_DIR", root)), *(args if "stage=" in " ".join(args) else
                                                               ("stage=info", *args)), *extra, env=env)
    finally:
        for p in SLEEPERS:
            p.kill()
        SLEEPERS.clear()
    errors = [line for line in r.out.splitlines() if line.startswith("error:")]
    assert r.returncode == case.code, r.out[-3000:]
    assert len(errors) == 1, r.out[-3000:]
    assert case.says in errors[0], errors[0]
    assert "Traceback" not in r.out and "unexpected" not in errors[0]
    after = _files(root)
    assert after <= before, f"left behind: {sorted(after - before)}"  # no output, no temporary, no lock
    if case.category == H:  # refused while Hydra composes: before it makes even its log directory
        assert not any(root.iterdir()), sorted(root.rglob("*"))


def test_hydra_full_error_keeps_hydras_own_report(tmp_path):
    """HYDRA_FULL_ERROR=1, set by the user to debug, still gives Hydra's full trace of a command-line error."""
    r = cli(tmp_path, "stage=info", "domain=physics", env={"HYDRA_FULL_ERROR": "1"})
    assert r.returncode == 1, r.out[-3000:]
    assert "Traceback" in r.out and "MissingConfigException" in r.out and "Could not find 'domain/physics'" in r.out
    assert not any(line.startswith("error:") for line in r.out.splitlines())
    assert not (tmp_path / "smoke").exists()
