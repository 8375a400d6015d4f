"""The bad-input catalogue: every mistake a user can make ends in exit code 2 and exactly one `error:`
line that names the offending key or file and what to do: no traceback, no catch-all "unexpected
error" line, and nothing half-written. Runs the real CLI entry point in this process (the same
code path as `python -m bam_pipeline`, without the interpreter start-up per case).

Each case lists the facts its line must name (the key and value as the message spells them, the file, the
override or command that fixes it, the options or numbers that are its point), never its wording: a
reworded message passes, a message naming the wrong key or leaving out the fix does not."""

from __future__ import annotations

import atexit
import contextlib
import fnmatch
import functools
import importlib
import os
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_runner import SEED_ARGS, cli, cli_here
from hf_layouts import also_single_file, config_field, edit_tensors, gguf_checkpoint, hf_checkpoint, stored_twice

Setup = Callable[[Path, Path], list[str]]  # (stages root's run dir, scratch dir) -> extra arguments


@dataclass(frozen=True)
class Case:
    category: str
    args: tuple[str, ...]
    # what the one error line names, each as a whole token (see _names): the key=value, file, fix ... One fact may
    # be given as a plain string. {scratch}, {run}: those directories; {pid}, {host}: the holder of a lock.
    facts: tuple[str, ...]
    setup: Setup | None = None
    needs_run: bool = False  # start from a copy of the finished smoke run
    env: dict[str, str] = field(default_factory=dict)
    code: int = 2
    # what a refused run may leave, as globs under the run's directory: a stage that trained and then refused keeps
    # its resumable checkpoints in .work (never a published output)
    may_leave: tuple[str, ...] = ()
    # "module:function": the command sends itself SIGINT (Ctrl-C) when that function returns, or once inside the
    # block when it makes a context (publish): a stop at a known point, in this process
    interrupt: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.facts, str):
            object.__setattr__(self, "facts", (self.facts,))
        assert self.facts, "a case names at least one fact of its error line"


def _names(line: str, fact: str) -> bool:
    """``fact`` is in ``line`` as a whole: not the start or end of a longer name or number (``mix=bam`` is not
    named by ``mix=bamm``, ``6`` not by ``64``)."""
    left = r"(?<!\w)" if re.match(r"\w", fact) else ""
    right = r"(?!\w)" if re.search(r"\w$", fact) else ""
    return re.search(left + re.escape(fact) + right, line) is not None


def _bad_summary(run: Path, scratch: Path) -> list[str]:
    """A docs/ whose committed summary is not JSON (stage=results reads every summary to write the page)."""
    (scratch / "docs" / "results").mkdir(parents=True)
    (scratch / "docs" / "results" / "tiny.json").write_text('{"format": 1, "experiment": "tiny",')
    return [f"paths.results={scratch}/docs"]


def _files_source(run: Path, scratch: Path, name: str, content: bytes | None = None, *, source: str = "code",
                  **extra) -> list[str]:
    """Make ``source`` (`code`) a files source reading ``scratch/<name>`` (written with ``content`` when given), as
    a user adds one on the command line."""
    path = scratch / name
    if content is not None:
        path.write_bytes(content)
    opts = ",".join(f"{k}:{v}" for k, v in {"type": "files", "path": f"'{path}'", **extra}.items())
    return [f"+data.sources.{source}={{source:{{{opts}}}}}"]


def jsonl(*rows) -> bytes:
    return b"".join((json.dumps(r) if not isinstance(r, bytes) else r.decode()).encode() + b"\n" for r in rows)


def _binary_only_folder(run: Path, scratch: Path) -> list[str]:
    (scratch / "only_bin").mkdir()
    (scratch / "only_bin" / "x.bin").write_bytes(b"\0")
    return _files_source(run, scratch, "only_bin")


def _parquet(run: Path, scratch: Path) -> list[str]:
    pq.write_table(pa.table({"body": ["a", "b"]}), scratch / "docs.parquet")
    return _files_source(run, scratch, "docs.parquet")


def _shared_texts(copies: int, own: int = 0, link: bool = False) -> Setup:
    """`code` reads a folder of 40 texts; `math` a folder holding ``copies`` of them under other file names and
    ``own`` texts of its own (``link``: `math` reads a link to `code`'s folder instead)."""
    def setup(run: Path, scratch: Path) -> list[str]:
        (scratch / "code").mkdir()
        (scratch / "math").mkdir()
        texts = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(40)]
        for i, text in enumerate(texts):
            (scratch / "code" / f"f{i}.py.txt").write_text(text)
        for i, text in enumerate(texts[:copies] + [f"lemma {i}: {i} + {i} = {2 * i}" for i in range(own)]):
            (scratch / "math" / f"m{i}.txt").write_text(text)
        if link:
            (scratch / "link").symlink_to(scratch / "code")
        return [*_files_source(run, scratch, "code"), *_files_source(run, scratch, "link" if link else "math",
                                                                      source="math")]
    return setup


def _file_name_not_utf8(run: Path, scratch: Path) -> list[str]:
    (scratch / "docs").mkdir()
    (scratch / "docs" / "ok.txt").write_text("a document")
    (scratch / "docs" / os.fsdecode(b"caf\xe9.txt")).write_text("another document")
    return _files_source(run, scratch, "docs")


def _small_corpus(scratch: Path) -> list[str]:
    """Four small `files` sources (web the general one), two shards each under these settings."""
    args = []
    for name in ("code", "math", "law", "web"):
        (scratch / name).mkdir()
        for f in range(2):
            (scratch / name / f"{f}.jsonl").write_bytes(jsonl(*({"text": f"{name} {f}.{i} " * (20 + i)}
                                                                for i in range(12))))
        args.append(f"+data.sources.{name}={{source:{{type:files,path:'{scratch / name}'}}}}")
    return [*args, "data.general=web", "data.max_bytes_per_source=null", "data.shard_bytes=2000",
            "data.tokenizer.vocab_size=300"]


def _in_parts(done: tuple[int, ...], tamper: Callable[[Path], None] | None = None, other: tuple[int, ...] = ()
              ) -> Setup:
    """:func:`_small_corpus` with the parts ``done`` of data.parts=2 prepared (``other``: under another data
    config); ``tamper(build directory)`` then changes what they left."""
    def setup(run: Path, scratch: Path) -> list[str]:
        args = _small_corpus(scratch)
        for part in done:
            cli_here(run.parent, "stage=data", *args, "data.parts=2", f"data.part={part}", check=True)
        for part in other:
            cli_here(run.parent, "stage=data", *args, "data.split.val=0.2", "data.parts=2", f"data.part={part}",
                     check=True)
        if tamper:
            [build] = run.glob("data.build-*")
            tamper(build)
        return args
    return setup


def _flip_shard_byte(build: Path) -> None:
    f = build / "tokens" / "code" / "train" / "00001.arrow"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def _other_tokenizer_record(build: Path) -> None:
    f = build / "shards" / "law" / "00000.json"
    f.write_text(f.read_text().replace('"tokenizer_hash": "', '"tokenizer_hash": "0'))


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


def _weights_set(artifact: str, value: float, remove: tuple[str, ...] = ()) -> Setup:
    """``artifact``'s final norm weights set to ``value`` (NaN, or a finite value so large that its logits
    overflow) and its manifest made to match (checksum and hash): a model an older version published, which only
    the check of the weights themselves can tell."""
    def setup(run: Path, scratch: Path) -> list[str]:
        from safetensors.torch import load_file, save_file

        from bam_pipeline.store.artifacts import RECORDS, WEIGHTS
        from bam_pipeline.store.files import canonical_hash, sha256_file

        art = run / artifact
        state = load_file(str(art / WEIGHTS))
        state["norm.weight"].fill_(value)
        save_file(state, str(art / WEIGHTS))
        m = json.loads((art / "manifest.json").read_text())
        m["files"][WEIGHTS] = sha256_file(art / WEIGHTS)
        m["hash"] = canonical_hash({"files": {f: d for f, d in m["files"].items() if f not in RECORDS},
                                    "inputs": {k: i["hash"] for k, i in m["inputs"].items()}})
        (art / "manifest.json").write_text(json.dumps(m))
        for p in remove:
            shutil.rmtree(run / p)
        return []
    return setup


NAN = float("nan")
DIVERGE = ("train.lr=1e30", "train.warmup_frac=0")  # two steps at this rate: every weight NaN
WORK = (".work/*",)  # a training stage that refuses keeps its work directory (train log, good checkpoints)
OTHER_VOCAB = "data.tokenizer.vocab_size=400"
_OTHER_DATA: list[Path] = []  # the smoke data prepared with OTHER_VOCAB once, for every case that needs it


def _other_tokenizer(run: Path, scratch: Path) -> list[str]:
    """Prepare the run's data again with another vocabulary (stage=data, the first time; a copy of that after):
    every model now has another tokenizer."""
    if not _OTHER_DATA:
        root = Path(tempfile.mkdtemp(prefix="other-tokenizer-"))
        atexit.register(shutil.rmtree, root, True)
        shutil.copytree(run / "data", root / run.name / "data")
        r = cli_here(root, "stage=data", OTHER_VOCAB)
        assert r.returncode == 0, r.out[-2000:]
        _OTHER_DATA.append(root / run.name / "data")
    shutil.rmtree(run / "data")
    shutil.copytree(_OTHER_DATA[0], run / "data")
    return [OTHER_VOCAB]


def _existing_export(run: Path, scratch: Path) -> list[str]:
    """An export of moe/bam from before (a file in its directory)."""
    (run / "export" / "moe" / "bam").mkdir(parents=True)
    (run / "export" / "moe" / "bam" / "README.md").write_text("an earlier export")
    return []


def _interrupting(fn: Callable) -> Callable:
    """``fn``, sending this process SIGINT when it returns, or inside the ``with`` block of the context it makes."""
    def ctrl_c() -> None:
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs (and raises) before the next line does

    @contextlib.contextmanager
    def inside(cm):
        with cm as value:
            ctrl_c()
            yield value

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        if hasattr(out, "__enter__"):
            return inside(out)
        ctrl_c()
        return out
    return wrapper


# a training stage held at its first checkpoint, where it presses Ctrl-C itself (tests/stages/pause_callback.py)
CTRL_C_AT_CHECKPOINT = "+callbacks.pause={{_target_:pause_callback.PauseAfterCheckpoint,ready:'{scratch}/ready',send:SIGINT}}"


def _unlisted(artifact: str, file: str, remove: tuple[str, ...] = ()) -> Setup:
    """``file`` of ``artifact`` taken off its manifest's file list, and then changed: it would load unchecked."""
    def setup(run: Path, scratch: Path) -> list[str]:
        m = json.loads((run / artifact / "manifest.json").read_text())
        del m["files"][file]
        (run / artifact / "manifest.json").write_text(json.dumps(m))
        _flip_byte(f"{artifact}/{file}")(run, scratch)
        for p in remove:
            shutil.rmtree(run / p)
        return []
    return setup


def _bad_checkpoint(write: Callable[[Path], None]) -> Setup:
    """The seed's work dir as a stopped run of the same config left it, its one checkpoint written by ``write``."""
    def setup(run: Path, scratch: Path) -> list[str]:
        from bam_pipeline.store.files import canonical_hash

        config = json.loads((run / "seed" / "main" / "manifest.json").read_text())["config"]
        shutil.rmtree(run / "seed")
        work = run / ".work" / "seed" / "main"
        (work / "checkpoints").mkdir(parents=True)
        (work / "fingerprint.json").write_text(json.dumps({"config_hash": canonical_hash(config)}))
        write(work / "checkpoints" / "step=4.ckpt")
        return []
    return setup


def _cut_checkpoint(path: Path) -> None:
    import torch

    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 4}, path)
    path.write_bytes(path.read_bytes()[:100])


def _tampered_checkpoint(path: Path) -> None:
    import argparse

    import torch

    torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": argparse.Namespace(run="x")}, path)


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
N, L, X, I, W, G = ("numerical failure", "import layouts", "cross-source data", "interrupts", "sweeps",
                    "paths and manifest integrity")
T = "data in shards and parts"
CASES: dict[str, Case] = {
    # ---- the command line: overrides Hydra cannot compose or parse, keys the config does not have ----
    "group_option": Case(H, ("domain=physics",), ("domain=physics", "bible", "code", "general", "law", "math",
                                                  "domain/physics.yaml")),
    "group_option_typo": Case(H, ("experiment=smok",), ("experiment=smok", "experiment=smoke", "ablations",
                                                        "paper_590m")),
    "group_option_nested": Case(H, ("mix=bamm",), ("mix=bamm", "mix=bam")),
    "key_typo": Case(H, ("domian=code",), ("domian=code", "domain=code")),
    "section_key_typo": Case(H, ("train.batchsize=4",), ("train.batchsize=4", "train.batch_size=4")),
    "appended_key": Case(H, ("+domian=code",), ("+domian=code", "domain=code")),
    "train_unknown_key": Case(H, ("+train.batchsize=4",), ("+train.batchsize=4", "train.batch_size=4")),
    "appended_unknown": Case(H, ("++traning.lr=1",), ("++traning.lr=1", "train.lr=1")),
    # a key of a section whose entries are yours, not there yet: + adds it (a whole mapping needs none)
    "source_key_without_plus": Case(H, ("data.sources.code.source.path=x.jsonl",),
                                    ("data.sources.code.source.path=x.jsonl", "+data.sources.code.source.path=x.jsonl")),
    "model_override_without_plus": Case(H, ("model.overrides.n_layers=3",), "+model.overrides.n_layers=3"),
    "unparsable": Case(H, ("generate.prompt=def add(",),
                       ("'generate.prompt=def add('", """'generate.prompt="def add("'""")),  # quoted for both
    "split_value": Case(H, ("generate.prompt=def", "add(n):"), ("'add(n):'", """'generate.prompt="def add(n):"'""")),
    # ---- config values (stage=info: read and checked before anything runs) ----
    "batch_size_0": Case(C, ("train.batch_size=0",), "train.batch_size=0"),
    "batch_size_text": Case(C, ("train.batch_size=abc",), "train.batch_size='abc'"),
    # train.accumulate is derived from the global batch now: the old key says what to set instead
    "accumulate_retired": Case(H, ("train.accumulate=2",), ("train.accumulate=2", "train.global_batch_tokens")),
    "global_batch_partial_sequence": Case(C, ("train.global_batch_tokens=100",),
                                          ("train.global_batch_tokens=100", "seq_len=64", "128")),
    # the global batch must split into whole micro-batches over the devices: 3 sequences over 2 processes,
    # and 6 sequences a device that micro-batches of 4 do not divide
    "global_batch_devices": Case(C, ("trainer=ddp_cpu", "train.global_batch_tokens=192"),
                                 ("train.global_batch_tokens=192", "3 sequences", "2 devices", "128")),
    "global_batch_micro_batch": Case(C, ("trainer=ddp_cpu", "train.global_batch_tokens=768"),
                                     ("train.global_batch_tokens=768", "6 sequences per device", "train.batch_size=4",
                                      "512")),
    "moe_dispatch_unknown": Case(C, ("train.moe_dispatch=fast",), ("train.moe_dispatch='fast'", "auto", "grouped",
                                                                   "loop")),
    "lr_negative": Case(C, ("train.lr=-1",), "train.lr=-1.0"),
    "val_every_0": Case(C, ("train.val_every=0",), "train.val_every=0"),
    "log_every_0": Case(C, ("train.log_every=0",), "train.log_every=0"),
    "warmup_frac": Case(C, ("train.warmup_frac=1.5",), "train.warmup_frac=1.5"),
    "betas_one": Case(C, ("train.betas=[0.9]",), "train.betas=[0.9]"),
    "val_tokens_short": Case(C, ("train.val_tokens=10",), ("train.val_tokens=10", "65")),  # one sequence: 64 + 1
    "train_seq_len": Case(C, ("train.seq_len=128",), ("train.seq_len=128", "model.seq_len=64")),
    "seed_tokens_0": Case(C, ("budget.seed.tokens=0",), "budget.seed.tokens=0"),
    "match_flops": Case(C, ("budget.moe.match=flops",), ("budget.moe.match='flops'", "data", "compute")),
    "reference": Case(C, ("budget.moe.reference=nope",), ("budget.moe.reference='nope'", "bam", "btx")),
    "moe_flops": Case(C, ("budget.moe.flops=embedding",), ("budget.moe.flops='embedding'", "total",
                                                          "non_embedding")),
    "split_sum": Case(C, ("data.split.val=0.95",), ("data.split.test=0.1", "val=0.95")),
    "vocab_small": Case(C, ("data.tokenizer.vocab_size=100",), ("data.tokenizer.vocab_size=100", "259")),
    "max_bytes": Case(C, ("data.max_bytes_per_source=-1",), "data.max_bytes_per_source=-1"),
    "seed_general": Case(C, ("data.mixtures.seed_general=2",), "data.mixtures.seed_general=2.0"),
    "seed_eos_token_pretrain": Case(C, ('seed.eos_token="<|endoftext|>"',),
                                    ("seed.eos_token='<|endoftext|>'", "seed=hf", "data.tokenizer.eos_token")),
    "no_domains": Case(C, ("data.domains=[]",), "data.domains=[]"),
    "domain_twice": Case(C, ("data.domains=[code,code]",), "data.domains=['code', 'code']"),
    "source_not_a_mapping": Case(C, ("stage=data", "+data.sources.code.source=5"),
                                 ("data.sources.code.source=5", "mapping", "type")),
    "source_settings_not_a_mapping": Case(C, ("stage=data", "+data.sources.code=5"),
                                          ("data.sources.code=5", "mapping")),
    "source_option_typo_in_mapping": Case(C, ("data.sources={{code:{{source:{{type:files,pth:x.jsonl}}}}}}",),
                                          ("data.sources.code.source.pth='x.jsonl'", "path", "text_field")),
    "source_typo": Case(C, ("+data.sources.cdoe.max_bytes=5",), ("data.sources.cdoe={'max_bytes': 5}", "code",
                                                                 "source.type")),
    "eval_batch_0": Case(C, ("eval.batch_size=0",), "eval.batch_size=0"),
    "eval_seq_len_0": Case(C, ("eval.seq_len=0",), "eval.seq_len=0"),
    "on_stale": Case(C, ("pipeline.on_stale=foo",), ("pipeline.on_stale='foo'", "rebuild", "refuse")),
    "moe_runs": Case(C, ("pipeline.moe_runs=[bam,xx_cm]",), ("pipeline.moe_runs='xx'", "bam", "btx")),
    "wait_0": Case(C, ("pipeline.wait_s=0",), "pipeline.wait_s=0.0"),
    "seeds_repeated": Case(C, ("pipeline.seeds=[0,0]",), ("pipeline.seeds=[0, 0]", "pipeline.seeds=[0,1,2]")),
    "seeds_negative": Case(C, ("pipeline.seeds=[-1]",), ("pipeline.seeds=[-1]", "pipeline.seeds=[0,1,2]")),
    "resamples": Case(C, ("eval.resamples=100",), ("eval.resamples=100", "2000")),
    "min_documents": Case(C, ("eval.min_documents=1",), ("eval.min_documents=1", "2")),
    "latency_rounds": Case(C, ("eval.latency_rounds=-1",), ("eval.latency_rounds=-1", "0")),
    "stage": Case(C, ("stage=bogus",), ("'bogus'", "data", "seed", "branch", "mix", "moe", "eval", "export",
                                        "generate")),
    "mix_kv": Case(C, ("mix.kv=both",), ("mix.kv='both'", "expert", "shared")),
    "mix_k": Case(C, ("mix.ffn_router.k=9",), ("mix.ffn_router.k=9", "4")),  # 4 experts
    "mix_router_kind": Case(C, ("mix.attn_router.kind=hard",), ("mix.attn_router.kind='hard'", "soft", "topk")),
    "mix_joint_counts": Case(C, ("mix=bam_router_joint", "mix.extra_seed_ffn_experts=1"),
                             ("mix.joint_router=True", "4", "5", "extra_seed_ffn_experts=1")),  # 4 attention, 5 FFN
    "mix_attn_expert_choice": Case(C, ("mix.attn_router.kind=expert_choice",),
                                   ("mix.attn_router.kind='expert_choice'", "FFN", "soft", "topk")),
    "mix_attn_hash": Case(C, ("mix=bam_hash", "mix.attn_router.kind=hash"),
                          ("mix.attn_router.kind='hash'", "FFN", "soft", "topk")),
    "mix_hash_k": Case(C, ("mix=bam_hash", "mix.ffn_router.k=2"), ("mix.ffn_router.k=2", "hash", "1")),
    "export_format": Case(C, ("export.format=onnx",), ("export.format='onnx'", "auto", "stock", "custom")),
    "export_repo_id": Case(C, ("export.push_to_hub=no-owner",), ("export.push_to_hub='no-owner'", "<owner>/<name>")),
    "generate_temperature": Case(C, ("generate.temperature=-1",), "generate.temperature=-1.0"),
    "generate_top_p": Case(C, ("generate.top_p=0",), "generate.top_p=0.0"),
    "generate_new_0": Case(C, ("generate.max_new_tokens=0",), "generate.max_new_tokens=0"),
    "downstream_suite": Case(C, ("downstream.suite=web",), ("downstream.suite='web'", "downstream=offline",
                                                            "downstream=paper")),
    "downstream_models_empty": Case(C, ("downstream.models=[]",), "downstream.models=[]"),
    "callback_no_target": Case(C, ("+callbacks.lr={{logging_interval:step}}",),
                               ("callbacks.lr={'logging_interval': 'step'}", "_target_", "null")),
    # ---- model overrides ----
    "n_heads": Case(M, ("+model.overrides.n_heads=7",), ("model.overrides.d_model=32", "n_heads=7")),
    "d_model_0": Case(M, ("+model.overrides.d_model=0",), "model.overrides.d_model=0"),
    "unknown_field": Case(M, ("+model.overrides.foo=1",), ("model.overrides.foo=1", "d_model", "n_heads")),
    "unknown_field_in_mapping": Case(M, ("model.overrides={{n_layer:3}}",), ("model.overrides.n_layer=3", "n_layers")),
    "preset": Case(M, ("model.preset=huge",), ("model.preset='huge'", "smoke", "tiny", "small")),
    "kv_heads": Case(M, ("+model.overrides.n_kv_heads=3",), ("model.overrides.n_kv_heads=3", "n_heads=4")),
    "max_seq_len": Case(M, ("+model.overrides.max_seq_len=32",), ("model.overrides.max_seq_len=32", "model.seq_len")),
    "mixture_field": Case(M, ("+model.overrides.ffn_experts=4",), ("model.overrides.ffn_experts=4", "mix=<variant>")),
    "vocab_field": Case(M, ("+model.overrides.vocab_size=100",), ("model.overrides.vocab_size=100", "tokenizer")),
    "seq_len_0": Case(M, ("model.seq_len=0",), "model.seq_len=0"),
    "rope_text": Case(M, ("+model.overrides.rope_theta=abc",), "model.overrides.rope_theta='abc'"),
    "tie_maybe": Case(M, ("+model.overrides.tie_embeddings=maybe",), "model.overrides.tie_embeddings='maybe'"),
    # ---- paths ----
    "root_is_file": Case(P, ("stage=info",), ("{scratch}/afile", "BAM_STAGES_DIR", "paths.root"),
                         env={"BAM_STAGES_DIR": "{scratch}/afile"}),
    "root_under_file": Case(P, ("stage=info",), ("{scratch}/afile/stages", "BAM_STAGES_DIR"),
                            env={"BAM_STAGES_DIR": "{scratch}/afile/stages"}),
    "root_unwritable": Case(P, ("stage=info",), ("/proc/bam-stages", "BAM_STAGES_DIR"),
                            env={"BAM_STAGES_DIR": "/proc/bam-stages"}),
    "paths_root_file": Case(P, ("stage=info", "paths.root={scratch}/afile"), ("{scratch}/afile", "paths.root")),
    "tokenizer_path": Case(P, ("data.tokenizer.path=/nonexistent/tokenizer.json",),
                           "data.tokenizer.path='/nonexistent/tokenizer.json'"),
    "tokenizer_path_folder": Case(P, ("data.tokenizer.path={scratch}",), ("data.tokenizer.path", "{scratch}",
                                                                          "a directory")),
    "source_path": Case(P, ("stage=data",), ("{scratch}/missing", "data.sources.code.source.path"),
                        setup=lambda run, scratch: _files_source(run, scratch, "missing")),
    "source_suffix": Case(P, ("stage=data",), ("{scratch}/docs.csv", ".txt", ".jsonl", ".json", ".parquet",
                                               "source.path"),
                          setup=lambda run, scratch: _files_source(run, scratch, "docs.csv", b"a,b\n")),
    "source_empty_folder": Case(P, ("stage=data",), ("'code'", "files", "documents"), setup=_binary_only_folder),
    "summary_not_json": Case(P, ("stage=results",), ("{scratch}/docs/results/tiny.json", "make results"),
                             setup=_bad_summary),
    # ---- source file contents (the general source read from a file) ----
    "jsonl_malformed": Case(S, ("stage=data",), ("docs.jsonl", "line 2", "JSON"),
                            setup=lambda r, s: _files_source(r, s, "docs.jsonl", jsonl({"text": "a"}, b"{oops"))),
    "jsonl_not_utf8": Case(S, ("stage=data",), ("docs.jsonl", "line 1", "UTF-8", "0xff"),
                           setup=lambda r, s: _files_source(r, s, "docs.jsonl", b'{"text": "\xff"}\n')),
    "json_malformed": Case(S, ("stage=data",), ("docs.json", "JSON"),
                           setup=lambda r, s: _files_source(r, s, "docs.json", b'[{"text": "a"},')),
    "parquet_corrupt": Case(S, ("stage=data",), ("docs.parquet", "Parquet"),
                            setup=lambda r, s: _files_source(r, s, "docs.parquet", b"PAR1 not really")),
    "row_not_object": Case(S, ("stage=data",), ("docs.jsonl", "line 1", "list"),
                           setup=lambda r, s: _files_source(r, s, "docs.jsonl", jsonl(["a", "b"]))),
    "text_not_string": Case(S, ("stage=data",), ("docs.jsonl", "line 1", "'text'", "int", "source.text_field"),
                            setup=lambda r, s: _files_source(r, s, "docs.jsonl", jsonl({"text": 7}))),
    "text_missing": Case(S, ("stage=data",), ("docs.jsonl", "line 1", "'text'", "['body']", "source.text_field"),
                         setup=lambda r, s: _files_source(r, s, "docs.jsonl", jsonl({"body": "a"}))),
    "txt_not_utf8": Case(S, ("stage=data",), ("doc.txt", "UTF-8", "0xe9"),
                         setup=lambda r, s: _files_source(r, s, "doc.txt", b"caf\xe9 latin-1\n")),
    "id_missing": Case(S, ("stage=data",), ("docs.jsonl", "line 1", "'key'", "['text']", "source.id_field"),
                       setup=lambda r, s: _files_source(r, s, "docs.jsonl", jsonl({"text": "a"}), id_field="key")),
    "parquet_column": Case(S, ("stage=data",), ("docs.parquet", "'text'", "['body']", "source.text_field"),
                           setup=_parquet),
    "blank_documents": Case(S, ("stage=data",), ("'code'", "files", "documents"),
                            setup=lambda r, s: _files_source(r, s, "docs.jsonl", jsonl({"text": "  "}, {"text": ""}))),
    "too_few_documents": Case(S, ("stage=data",), ("'code'", "split", "2", "max_bytes", "data.split"),
                              setup=lambda r, s: _files_source(r, s, "docs.jsonl", jsonl({"text": "a"}, {"text": "b"}))),
    # ---- devices ----
    "gpu_trainer": Case(D, ("stage=seed", "trainer=gpu"), ("trainer.accelerator='gpu'", "CUDA", "trainer=cpu")),
    "ddp_trainer": Case(D, ("stage=branch", "domain=code", "trainer=ddp"),
                        ("trainer.accelerator='gpu'", "trainer=cpu")),
    "fsdp_trainer": Case(D, ("stage=moe", "trainer=fsdp"), ("trainer.accelerator='gpu'", "trainer=cpu")),
    "eval_cuda": Case(D, ("stage=eval", "eval.device=cuda"), ("eval.device='cuda'", "CUDA", "eval.device=auto")),
    # eval and downstream split over a multi-device trainer's devices: checked before any rank starts
    "eval_on_missing_gpus": Case(D, ("stage=eval", "trainer=gpu", "trainer.devices=2"),
                                 ("trainer.accelerator='gpu'", "CUDA", "trainer=cpu")),
    "downstream_on_missing_gpus": Case(D, ("stage=downstream", "trainer=ddp", "trainer.devices=4"),
                                       ("trainer.accelerator='gpu'", "CUDA")),
    "collective_timeout_0": Case(C, ("stage=eval", "trainer.collective_timeout_s=0"),
                                 ("trainer.collective_timeout_s=0", "positive", "seconds")),
    "devices_0": Case(D, ("trainer.devices=0",), ("trainer.devices=0", "auto")),
    "devices_text": Case(D, ("trainer.devices=abc",), "trainer.devices='abc'"),
    "accelerator_tpu": Case(D, ("trainer.accelerator=tpu",), ("trainer.accelerator='tpu'", "cpu", "gpu")),
    "precision": Case(D, ("trainer.precision=bf17",), ("trainer.precision='bf17'", "bf16", "32")),
    "nodes_0": Case(D, ("trainer.num_nodes=0",), "trainer.num_nodes=0"),
    "eval_device_name": Case(D, ("eval.device=tpu",), ("eval.device='tpu'", "auto", "cpu", "cuda")),
    # ---- missing and corrupt artifacts (a copy of the finished smoke run; no_data: an empty stages root) ----
    "no_data": Case(A, ("stage=seed",), ("{run}/data", "stage=data")),
    "no_seed": Case(A, ("stage=branch", "domain=code"), ("{run}/seed/main", "stage=seed"),
                    setup=_remove("seed", "branch/code"), needs_run=True),
    "no_branch": Case(A, ("stage=mix", "mix=bam"), ("{run}/branch/law", "stage=branch domain=law"),
                      setup=_remove("branch/law", "mix/bam"), needs_run=True),
    "no_mix": Case(A, ("stage=moe", "mix=bam_attn_top2"), ("{run}/mix/bam_attn_top2", "stage=mix mix=bam_attn_top2"),
                   needs_run=True),
    "manifest_truncated": Case(A, ("stage=branch", "domain=code"),
                               ("{run}/seed/main/manifest.json", "{run}/seed/main", "stage=seed"),
                               setup=_corrupt_manifest("seed/main", '{"stage": "se', ("branch/code",)), needs_run=True),
    "manifest_field": Case(A, ("stage=branch", "domain=code"),
                           ("{run}/seed/main/manifest.json", "'hash'", "{run}/seed/main", "stage=seed"),
                           setup=_without_hash, needs_run=True),
    "weights_checksum": Case(A, ("stage=branch", "domain=code"),
                             ("checksum", "{run}/seed/main/model.safetensors", "{run}/seed/main"),
                             setup=_flip_byte("seed/main/model.safetensors", ("branch/code",)), needs_run=True),
    "data_manifest": Case(A, ("stage=seed",), ("{run}/data", "manifest.json", "stage=data data.rebuild=true"),
                          needs_run=True, setup=_corrupt_manifest("data", "{", ("seed",))),
    "data_checksum": Case(A, ("stage=seed",), ("checksum", "{run}/data/tokens/code/train",
                                               "stage=data data.rebuild=true"),
                          needs_run=True, setup=_flip_byte("data/tokens/code/train/*.arrow", ("seed",))),
    "eval_no_model": Case(A, ("stage=eval",), ("{run}", "model", "stage=seed"), needs_run=True,
                          setup=_remove("seed", "branch", "mix", "moe")),
    "eval_all_corrupt": Case(A, ("stage=eval",), ("{run}", "checksum", "seed", "branch/code", "moe/bam"),
                             needs_run=True, setup=_flip_byte("*/*/model.safetensors", ("eval",))),
    "eval_other_tokenizer": Case(A, ("stage=eval",), ("{run}", "tokenizer", "seed", "branch/code", "moe/bam"),
                                 needs_run=True, setup=_other_tokenizer),
    "branch_other_tokenizer": Case(A, ("stage=branch", "domain=code"),
                                   ("seed", "tokenizer", "stage=seed data.tokenizer.vocab_size=400"),
                                   needs_run=True, setup=_other_tokenizer),
    "callback_unknown_class": Case(A, ("stage=seed", "+callbacks.lr={{_target_:lightning.pytorch.callbacks.NoSuch}}"),
                                   ("callbacks.lr", "lightning.pytorch.callbacks.NoSuch", "callbacks.lr=null"),
                                   setup=_remove("seed"), needs_run=True),
    "eval_seq_len": Case(A, ("stage=eval", "eval.seq_len=128"), ("eval.seq_len=128", "seed", "max_seq_len=64"),
                         needs_run=True),
    # ---- stage=export / generate / downstream on the finished run ----
    "export_no_artifact": Case(A, ("stage=export",), ("stage=export", "artifact=<label>", "stage=status"),
                               needs_run=True),
    "export_unknown": Case(A, ("stage=export", "artifact=moe/nope"),
                           ("'moe/nope'", "smoke", "seed", "branch/code", "moe/bam", "stage=status"), needs_run=True),
    "export_btm": Case(A, ("stage=export", "artifact=btm"), ("artifact=btm", "BTM", "seed", "branch/code", "moe/bam"),
                       needs_run=True),
    "export_other_tokenizer": Case(A, ("stage=export", "artifact=moe/bam"), ("moe/bam", "tokenizer"),
                                   needs_run=True, setup=_other_tokenizer),
    "export_exists": Case(A, ("stage=export", "artifact=moe/bam"), ("{run}/export/moe/bam", "export.overwrite=true"),
                          needs_run=True, setup=_existing_export),
    "export_stock_moa": Case(A, ("stage=export", "artifact=moe/bam", "export.format=stock"),
                             ("stock", "Mixture of Attention", "export.format=custom"), needs_run=True),
    "generate_no_prompt": Case(A, ("stage=generate", "artifact=seed"),
                               ("stage=generate", "generate.prompt=", "generate.prompts_file="), needs_run=True),
    "generate_empty_prompt": Case(A, ("stage=generate", "artifact=seed", "generate.prompt=''"), "generate.prompt=''",
                                  needs_run=True),
    "generate_empty_line": Case(A, ("stage=generate", "artifact=seed"), ("prompt 1", "{scratch}/p.jsonl"),
                                needs_run=True, setup=lambda r, s: _prompts_file(s, "p.jsonl", '"  "\n')),
    "generate_bad_jsonl": Case(A, ("stage=generate", "artifact=seed"), ("{scratch}/p.jsonl", "line 2", "JSON"),
                               needs_run=True, setup=lambda r, s: _prompts_file(s, "p.jsonl", '"a"\n{oops\n')),
    "generate_no_file": Case(A, ("stage=generate", "artifact=seed", "generate.prompts_file=/nonexistent/p.txt"),
                             "generate.prompts_file='/nonexistent/p.txt'", needs_run=True),
    "generate_too_long": Case(A, ("stage=generate", "artifact=seed", "generate.prompt=the",
                                  "generate.max_new_tokens=999"),
                              ("max_new_tokens=999", "max_seq_len=64", "62"), needs_run=True),  # 64 - 2 prompt tokens
    "generate_unknown": Case(A, ("stage=generate", "artifact=branch/bible", "generate.prompt=the"),
                             ("'branch/bible'", "branch/code", "stage=status"), needs_run=True),
    "downstream_unknown_task": Case(A, ("stage=downstream", "downstream.tasks=[arc_easy]"),
                                    ("'arc_easy'", "downstream=offline", "bam_next_passage_general"), needs_run=True),
    "downstream_quac": Case(A, ("stage=downstream", "downstream=paper", "downstream.tasks=[QuAC]"),
                            ("'QuAC'", "downstream=paper", "lm-evaluation-harness"), needs_run=True),
    "downstream_code_task": Case(A, ("stage=downstream", "downstream=paper", "downstream.tasks=[humaneval]"),
                                 ("'humaneval'", "downstream.allow_code_execution=true"), needs_run=True),
    "downstream_unknown_model": Case(A, ("stage=downstream", "downstream.models=[seed,moe/nope]"),
                                     ("downstream.models", "'moe/nope'", "seed", "stage=status"), needs_run=True),
    "downstream_other_tokenizer": Case(A, ("stage=downstream",), ("seed", "tokenizer"), needs_run=True,
                                       setup=_other_tokenizer),
    # ---- concurrency: an output another live run is building ({pid} {host}: the holder of the lock) ----
    "seed_locked": Case(K, ("stage=seed",), ("seed", "{pid}", "{host}", "{run}/.locks/seed/main.lock"), needs_run=True,
                        setup=_lock("seed/main", remove=("seed",))),
    "other_host": Case(K, ("stage=branch", "domain=code"), ("branch/code", "4242", "gpu-node-7",
                                                            "{run}/.locks/branch/code.lock"), needs_run=True,
                       setup=_lock("branch/code", host="gpu-node-7", remove=("branch/code",))),
    "data_wait": Case(K, ("stage=branch", "domain=code", "pipeline.wait_s=1"),
                      ("1 s", "{pid}", "pipeline.wait_s", "{run}/.locks/data.lock"), needs_run=True,
                      setup=_lock("data")),
    "input_building": Case(K, ("stage=mix", "mix=bam"), ("branch/law", "{pid}"), needs_run=True,
                           setup=_lock("branch/law", remove=("branch/law", "mix/bam"))),
    "eval_locked": Case(K, ("stage=eval",), ("eval", "{pid}", "{run}/.locks/eval/report.lock"), needs_run=True,
                        setup=_lock("eval/report", remove=("eval",))),  # eval has work: it is not up to date
    "mix_locked": Case(K, ("stage=mix", "mix=bam"), ("mix/bam", "{pid}", "{run}/.locks/mix/bam.lock"), needs_run=True,
                       setup=_lock("mix/bam", remove=("mix/bam",))),
    # ---- numerical failure: a model that is not finite is never published, evaluated, exported or sampled ----
    "nan_seed_lr": Case(N, ("stage=seed", *DIVERGE, "budget.seed.tokens=512"),
                        ("seed", "train.lr", "train.warmup_frac=0", "{run}/.work/seed/main"), needs_run=True,
                        may_leave=WORK),
    "nan_branch_lr": Case(N, ("stage=branch", "domain=code", *DIVERGE, "budget.branch.tokens=512"),
                          ("branch/code", "train.lr", "train.branch_lr_scale", "{run}/.work/branch/code"),
                          setup=_remove("branch/code"), needs_run=True, may_leave=WORK),
    "nan_moe_lr": Case(N, ("stage=moe", "mix=bam", *DIVERGE, "budget.moe.tokens=512"),
                       ("moe/bam", "train.lr", "train.moe_lr_scale", "{run}/.work/moe/bam"), needs_run=True,
                       may_leave=WORK),
    "nan_branch_from_seed": Case(N, ("stage=branch", "domain=code"), ("seed", "{run}/seed/main", "stage=seed",
                                                                      "train.lr"),
                                 setup=_weights_set("seed/main", NAN, ("branch/code",)), needs_run=True),
    "nan_mix_from_branch": Case(N, ("stage=mix", "mix=bam"), ("branch/law", "{run}/branch/law",
                                                              "stage=branch domain=law", "train.lr"),
                                setup=_weights_set("branch/law", NAN, ("mix/bam",)), needs_run=True),
    "nan_eval": Case(N, ("stage=eval",), ("moe/bam", "{run}/moe/bam", "stage=moe mix=bam", "train.lr"),
                     setup=_weights_set("moe/bam", NAN), needs_run=True),
    "nan_eval_overflow": Case(N, ("stage=eval",), ("moe/bam", "{run}/moe/bam", "stage=moe mix=bam", "nan"),
                              setup=_weights_set("moe/bam", 3e38), needs_run=True),
    "nan_generate": Case(N, ("stage=generate", "artifact=moe/bam", "generate.prompt=the"),
                         ("moe/bam", "{run}/moe/bam", "stage=moe mix=bam", "train.lr"),
                         setup=_weights_set("moe/bam", NAN), needs_run=True),
    "nan_export": Case(N, ("stage=export", "artifact=moe/bam"),
                       ("moe/bam", "{run}/moe/bam", "stage=moe mix=bam", "train.lr"),
                       setup=_weights_set("moe/bam", NAN), needs_run=True),
    "nan_downstream": Case(N, ("stage=downstream", "downstream.models=[moe/bam]"),
                           ("moe/bam", "{run}/moe/bam", "stage=moe mix=bam", "train.lr"),
                           setup=_weights_set("moe/bam", NAN), needs_run=True),

    # ---- import layouts: a Hugging Face checkpoint we would read otherwise than transformers does ----
    # ({scratch}/ckpt: a tiny sharded bfloat16 Llama, untied, changed by the setup; see tests/interop/hf_layouts.py)
    "layout_two_layouts": Case(L, ("stage=seed", "seed=hf", "seed.path={scratch}/ckpt"),
                               ("{scratch}/ckpt", "model.safetensors", "model.safetensors.index.json"),
                               setup=hf_checkpoint(also_single_file)),
    "layout_float16_overflow": Case(L, ("stage=seed", "seed=hf", "seed.path={scratch}/ckpt", "seed.dtype=float16"),
                                    ("seed.dtype='float16'", "model.layers.1.mlp.up_proj.weight", "98304", "65504",
                                     "bfloat16", "float32"),
                                    setup=hf_checkpoint(edit_tensors("model.layers.1.mlp.up_proj.weight", lambda sd: sd[
                                        "model.layers.1.mlp.up_proj.weight"].__setitem__((0, 0), 98304.0)))),
    "layout_nan_weight": Case(L, ("stage=seed", "seed=hf", "seed.path={scratch}/ckpt"),
                              ("model.layers.0.self_attn.q_proj.weight", "{scratch}/ckpt", "nan"),
                              setup=hf_checkpoint(edit_tensors("model.layers.0.self_attn.q_proj.weight", lambda sd: sd[
                                  "model.layers.0.self_attn.q_proj.weight"].__setitem__((1, 2), float("nan"))))),
    "layout_untied_without_head": Case(L, ("stage=seed", "seed=hf", "seed.path={scratch}/ckpt"),
                                       ("tie_word_embeddings=false", "lm_head.weight", "tie_word_embeddings=true"),
                                       setup=hf_checkpoint(edit_tensors("lm_head.weight",
                                                                        lambda sd: sd.pop("lm_head.weight")))),
    "layout_head_renamed": Case(L, ("stage=seed", "seed=hf", "seed.path={scratch}/ckpt"),
                                ("output.weight", "config.json"),
                                setup=hf_checkpoint(edit_tensors("lm_head.weight", lambda sd: sd.update(
                                    {"output.weight": sd.pop("lm_head.weight")})))),
    "layout_tensor_twice": Case(L, ("stage=seed", "seed=hf", "seed.path={scratch}/ckpt"),
                                ("model.norm.weight", "model-00001-of-00002.safetensors",
                                 "model-00002-of-00002.safetensors", "{scratch}/ckpt"),
                                setup=hf_checkpoint(stored_twice("model.norm.weight"))),
    "layout_weights_file_in_config": Case(L, ("stage=seed", "seed=hf", "seed.path={scratch}/ckpt"),
                                          ("transformers_weights='consolidated.safetensors'", "model.safetensors",
                                           "model.safetensors.index.json"),
                                          setup=hf_checkpoint(config_field(
                                              transformers_weights="consolidated.safetensors"))),
    "layout_mixed_dtypes": Case(L, ("stage=seed", "seed=hf", "seed.path={scratch}/ckpt"),
                                ("seed.dtype=None", "float32", "bfloat16", "float16"),
                                setup=hf_checkpoint(edit_tensors("model.norm.weight", lambda sd: sd.update(
                                    {"model.norm.weight": sd["model.norm.weight"].float()})))),

    # ({scratch}/gguf: the tiny GGUF Llama of tests/interop/gguf_files.py, written as the case says)
    "gguf_several_files": Case(L, ("stage=seed", "seed=hf", "seed.path={scratch}/gguf"),
                               ("{scratch}/gguf", "2", "a.gguf", "b.gguf"), setup=gguf_checkpoint("a.gguf", "b.gguf")),
    "gguf_quantisation_type": Case(L, ("stage=seed", "seed=hf", "seed.path={scratch}/gguf"),
                                   ("blk.1.ffn_down.weight", "{scratch}/gguf/tiny.gguf", "Q8_1", "dequantise"),
                                   setup=gguf_checkpoint(zero_blocks=("blk.1.ffn_down.weight", "Q8_1"))),
    "gguf_architecture": Case(L, ("stage=seed", "seed=hf", "seed.path={scratch}/gguf/tiny.gguf"),
                              ("'gpt2'", "{scratch}/gguf/tiny.gguf", "GPT2Config", "LlamaForCausalLM"),
                              setup=gguf_checkpoint(arch="gpt2")),
    "gguf_eos_token": Case(L, ("stage=seed", "seed=hf", "seed.path={scratch}/gguf", 'seed.eos_token="</s>"'),
                           ("seed.eos_token='</s>'", "{scratch}/gguf/tiny.gguf", "<|endoftext|>", "<|im_end|>"),
                           setup=gguf_checkpoint()),

    # ---- cross-source data: one document in two sources or two splits ----
    "xsrc_same_path": Case(X, ("stage=data",), ("data.sources.code.source", "data.sources.math.source",
                                                "{scratch}/docs.jsonl"),
                           setup=lambda r, s: [*_files_source(r, s, "docs.jsonl", jsonl({"text": "a"})),
                                               *_files_source(r, s, "docs.jsonl", source="math")]),
    "xsrc_linked_path": Case(X, ("stage=data",), ("data.sources.code.source", "data.sources.math.source",
                                                  "{scratch}/link"), setup=_shared_texts(0, link=True)),
    "xsrc_domain_is_general": Case(X, ("stage=data", "+data.sources.law={{source:{{type:shakespeare}}}}"),
                                   ("data.sources.law.source", "data.sources.general.source", "shakespeare")),
    "xsrc_only_copies": Case(X, ("stage=data",), ("'math'", "12 in 'code'", "data.sources.math.source"),
                             setup=_shared_texts(12)),
    "xsrc_split_emptied": Case(X, ("stage=data",), ("'math'", "split", "2 documents", "40 in 'code'", "data.split"),
                               setup=_shared_texts(40, own=2)),
    "xsrc_lone_surrogate": Case(X, ("stage=data",), ("docs.jsonl", "line 2", "'text'", "\\ud800", "surrogate"),
                                setup=lambda r, s: _files_source(r, s, "docs.jsonl",
                                                                 b'{"text": "a"}\n{"text": "b \\ud800 c"}\n')),
    "xsrc_file_name_not_utf8": Case(X, ("stage=data",), ("{scratch}/docs", "UTF-8", "0xe9",
                                                         "data.sources.code.source.path"), setup=_file_name_not_utf8),
    "xsrc_eval_budget": Case(X, ("stage=eval", "eval.max_tokens_per_source=1"),
                             ("eval.max_tokens_per_source=1", "65"), needs_run=True),

    # ---- data in shards and parts (data.parts=N data.part=i, then the merge) ----
    "part_out_of_range": Case(T, ("stage=data", "data.parts=3", "data.part=3"), ("data.part=3", "data.parts=3")),
    "part_in_stage_all": Case(T, ("stage=all", "data.parts=2", "data.part=0"), ("data.part=0", "stage=all",
                                                                                 "data.parts=2")),
    "merge_part_missing": Case(T, ("stage=data", "data.parts=2"), ("part 1", "data.part=1"), setup=_in_parts((0,)),
                               may_leave=("data.build-*",)),
    "merge_shard_corrupt": Case(T, ("stage=data", "data.parts=2"), ("code/00001", "corrupt", "data.part=1"),
                                setup=_in_parts((0, 1), _flip_shard_byte), may_leave=("data.build-*",)),
    "merge_other_tokenizer": Case(T, ("stage=data", "data.parts=2"), ("law/00000", "another tokenizer", "data.part=0"),
                                  setup=_in_parts((0, 1), _other_tokenizer_record), may_leave=("data.build-*",)),
    "merge_part_other_config": Case(T, ("stage=data", "data.parts=2"), ("data.part=0", "another data config"),
                                    setup=_in_parts((1,), other=(0,)), may_leave=("data.build-*",)),
    "published_shard_missing": Case(T, ("stage=seed",), ("tokens/law/val/00000.arrow", "stage=data data.rebuild=true"),
                                    needs_run=True, setup=lambda r, s: (r / "data" / "tokens" / "law" / "val" /
                                                                        "00000.arrow").unlink() or _remove("seed")(r, s)),

    # ---- interrupts: Ctrl-C (SIGINT) in every stage: one line, exit 130, nothing half-written (a training stage
    # keeps its resumable checkpoint in .work), and the rerun resumes (tests/stages/test_faults.py) ----
    "ctrl_c_data": Case(I, ("stage=data",), ("SIGINT", "re-run the same command"), code=130,
                        interrupt="bam_pipeline.data.prepare:publish", may_leave=("data.build-*/*",)),
    "ctrl_c_seed": Case(I, (*SEED_ARGS, CTRL_C_AT_CHECKPOINT), ("SIGINT", "after step 5 of 32",
                                                               "{run}/.work/seed/main/checkpoints"),
                        code=130, needs_run=True, setup=_remove("seed"), may_leave=(".work/seed/main/*",)),
    "ctrl_c_branch": Case(I, ("stage=branch", "domain=code", "budget.branch.tokens=8192", "train.val_every=8",
                              CTRL_C_AT_CHECKPOINT), ("SIGINT", "after step 9", "{run}/.work/branch/code/checkpoints"),
                          code=130, needs_run=True, may_leave=(".work/branch/code/*",)),
    "ctrl_c_mix": Case(I, ("stage=mix", "mix=bam"), ("SIGINT", "re-run the same command"), code=130, needs_run=True,
                       setup=_remove("mix/bam"), interrupt="bam_pipeline.stages.mix:publish"),
    "ctrl_c_moe": Case(I, ("stage=moe", "mix=bam", "budget.moe.tokens=8192", "train.val_every=8",
                           CTRL_C_AT_CHECKPOINT), ("SIGINT", "after step 9", "{run}/.work/moe/bam/checkpoints"),
                       code=130, needs_run=True, may_leave=(".work/moe/bam/*",)),
    "ctrl_c_eval": Case(I, ("stage=eval",), ("SIGINT", "re-run the same command"), code=130, needs_run=True,
                        setup=_remove("eval"), interrupt="bam_pipeline.eval.runner:evaluate_model"),
    "ctrl_c_export": Case(I, ("stage=export", "artifact=moe/bam"), ("SIGINT", "re-run the same command"), code=130,
                          needs_run=True, interrupt="bam_pipeline.stages.export:publish"),
    "ctrl_c_generate": Case(I, ("stage=generate", "artifact=seed", "generate.prompt=the"),
                            ("SIGINT", "re-run the same command"), code=130, needs_run=True,
                            interrupt="bam_pipeline.stages.generate:generate_text"),
    "ctrl_c_downstream": Case(I, ("stage=downstream",), ("SIGINT", "re-run the same command"), code=130,
                              needs_run=True, setup=_remove("downstream"),  # the suite: rebuilt by every run
                              interrupt="bam_pipeline.stages.downstream:run_tasks", may_leave=("downstream/suite/*",)),

    # ---- sweeps: one bad job of a multirun ----
    # The others run (and publish what they would alone: may_leave); the sweep's one error line names the bad job
    # by number and overrides (tests/stages/test_sweeps.py checks the other jobs' outputs).
    "sweep_bad_value": Case(W, ("-m", "stage=info", "train.batch_size=4,0"), ("job 1", "train.batch_size=0")),
    "sweep_unknown_option": Case(W, ("-m", "stage=info", "domain=code,physics"),
                                 ("job 1", "domain=physics", "code", "domain/physics.yaml")),
    "sweep_unknown_key": Case(W, ("-m", "stage=info", "logger=wandb,csv", "logger.project=x"),
                              ("job 1", "logger=csv", "logger.project=x", "save_dir")),
    "sweep_missing_checkpoint": Case(W, ("-m", "stage=info", "seed=pretrain,hf"), ("job 1", "seed=hf", "seed.path")),
    "sweep_mix_k": Case(W, ("-m", "stage=mix", "mix=bam_attn_top1", "mix.ffn_router.k=1,9"),
                        ("job 1", "mix=bam_attn_top1", "mix.ffn_router.k=9", "4"), needs_run=True,
                        may_leave=("mix/bam_attn_top1/*",)),
    "sweep_branch_domain": Case(W, ("-m", "stage=branch", "domain=code,bible"),
                                ("job 1", "domain=bible", "code, math, law"), needs_run=True),
    "sweep_unknown_artifact": Case(W, ("-m", "stage=export", "artifact=seed,moe/bamm"),
                                   ("job 1", "artifact=moe/bamm", "moe/bam", "stage=status"), needs_run=True,
                                   may_leave=("export/seed/*",)),
    "sweep_generate_tokens": Case(W, ("-m", "stage=generate", "artifact=seed", "generate.prompt=def",
                                      "generate.max_new_tokens=4,0"), ("job 1", "generate.max_new_tokens=0"),
                                  needs_run=True),
    # hydra/launcher=local: a bad launcher setting ends the sweep before any job; a job that cannot run on this
    # machine fails without starting (tests/stages/test_launcher.py runs the jobs that can)
    "local_launcher_threads": Case(W, ("-m", "hydra/launcher=local", "hydra.launcher.threads=0", "stage=info"),
                                   ("hydra.launcher.threads=0",)),
    "local_launcher_nodes": Case(W, ("-m", "hydra/launcher=local", "stage=info", "trainer.num_nodes=2"),
                                 ("job 0", "trainer.num_nodes=2", "hydra/launcher=slurm")),
    "local_launcher_gpus": Case(W, ("-m", "hydra/launcher=local", "hydra.launcher.devices=[0]", "stage=info",
                                    "trainer=gpu", "trainer.devices=2"),
                                ("job 0", "trainer.devices=2", "hydra.launcher.devices", "2", "1"),
                                env={"CUDA_VISIBLE_DEVICES": "0,1"}),  # two GPUs seen, the launcher given one
    "local_launcher_unseen_gpu": Case(W, ("-m", "hydra/launcher=local", "hydra.launcher.devices=[1,3]", "stage=info"),
                                      ("hydra.launcher.devices='1,3'", "3", "0, 1", "CUDA_VISIBLE_DEVICES"),
                                      env={"CUDA_VISIBLE_DEVICES": "0,1"}),
    "local_launcher_device_ids": Case(W, ("-m", "hydra/launcher=local", "stage=info", "trainer=gpu",
                                          "trainer.devices=[0,1]"), ("job 0", "trainer.devices", "hydra.launcher.devices")),

    # ---- paths and manifest integrity ----
    "run_outside_root": Case(G, ("run=../x",), ("run='../x'", "BAM_STAGES_DIR")),
    "run_nested": Case(G, ("run=a/b",), ("run='a/b'", "BAM_STAGES_DIR")),
    "run_dot": Case(G, ("run=.",), ("run='.'",)),
    "weights_off_the_list": Case(G, ("stage=branch", "domain=code"), ("{run}/seed/main", "model.safetensors",
                                                                     "delete {run}/seed/main"),
                                 setup=_unlisted("seed/main", "model.safetensors", ("branch/code",)), needs_run=True),
    "data_off_the_list": Case(G, ("stage=seed",), ("{run}/data", "tokenizer.json", "stage=data data.rebuild=true"),
                              setup=_unlisted("data", "tokenizer.json", ("seed",)), needs_run=True),
    "checkpoint_cut": Case(G, ("stage=seed",), ("{run}/.work/seed/main", "step=4.ckpt", "delete {run}/.work/seed/main"),
                           setup=_bad_checkpoint(_cut_checkpoint), needs_run=True),
    "checkpoint_tampered": Case(G, ("stage=seed",), ("{run}/.work/seed/main", "step=4.ckpt",
                                                     "delete {run}/.work/seed/main"),
                                setup=_bad_checkpoint(_tampered_checkpoint), needs_run=True),
    "generate_output_folder": Case(G, ("stage=generate", "artifact=seed", "generate.prompt=the",
                                       "generate.output={scratch}"), ("generate.output='{scratch}'",
                                                                     "{scratch}/continuations.jsonl"), needs_run=True),
    "generate_output_in_artifact": Case(G, ("stage=generate", "artifact=seed", "generate.prompt=the",
                                            "generate.output={run}/seed/main/out.jsonl"),
                                        ("generate.output='{run}/seed/main/out.jsonl'", "{run}/seed/main"),
                                        needs_run=True),
    "generate_output_under_file": Case(G, ("stage=generate", "artifact=seed", "generate.prompt=the",
                                           "generate.output={scratch}/afile/out.jsonl"),
                                       ("generate.output='{scratch}/afile/out.jsonl'", "{scratch}/afile"),
                                       needs_run=True),

}


def test_the_catalogue_covers_every_category():
    counts = {}
    for case in CASES.values():
        counts[case.category] = counts.get(case.category, 0) + 1
    assert len(CASES) >= 60 and all(n >= 5 for n in counts.values()), counts
    assert set(counts) == {H, C, M, P, S, D, A, K, N, L, X, I, W, G, T}  # SIGTERM: tests/stages/test_faults.py


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
    if case.needs_run:  # only these wait for the smoke run (minutes, once per session)
        shutil.copytree(request.getfixturevalue("smoke_run")[0], root)
    else:
        root.mkdir()
    run = root / "smoke"
    if case.interrupt:
        module, name = case.interrupt.split(":")
        target = importlib.import_module(module)
        request.getfixturevalue("monkeypatch").setattr(target, name, _interrupting(getattr(target, name)))
    try:
        extra = case.setup(run, scratch) if case.setup else []
        before = _files(root)
        env = {k: v.format(scratch=scratch) for k, v in case.env.items()}
        args = tuple(a.format(scratch=scratch, run=run) for a in case.args)
        r = cli_here(Path(env.get("BAM_STAGES_DIR", root)), *(args if "stage=" in " ".join(args) else
                                                               ("stage=info", *args)), *extra, env=env)
    finally:
        pids = [str(p.pid) for p in SLEEPERS]
        for p in SLEEPERS:
            p.kill()
        SLEEPERS.clear()
    errors = [line for line in r.out.splitlines() if line.startswith("error:")]
    assert r.returncode == case.code, r.out[-3000:]
    assert len(errors) == 1, r.out[-3000:]
    places = {"{scratch}": str(scratch), "{run}": str(run), "{host}": socket.gethostname()}
    facts = [_placed(f, places, pids) for f in case.facts]
    missing = [f for f in facts if not _names(errors[0], f)]
    assert not missing, f"the error line does not name {missing}: {errors[0]}"
    assert "Traceback" not in r.out and "unexpected" not in errors[0]
    after = {f for f in _files(root) if not any(fnmatch.fnmatch(f, f"{run.name}/{g}") for g in case.may_leave)}
    assert after <= before, f"left behind: {sorted(after - before)}"  # no output, no temporary, no lock
    if case.category == H:  # refused while Hydra composes: before it makes even its log directory
        assert not any(root.iterdir()), sorted(root.rglob("*"))


def _placed(fact: str, places: dict[str, str], pids: list[str]) -> str:
    """``fact`` with this test's directories, host and lock holder's pid in place of their placeholders."""
    if "{pid}" in fact:
        assert len(pids) == 1, f"{fact!r} needs the one live lock holder its setup started; there are {pids}"
        fact = fact.replace("{pid}", pids[0])
    for key, value in places.items():
        fact = fact.replace(key, value)
    return fact


def test_facts_are_matched_as_whole_names():
    assert _names("error: unknown mix 'bamm' in mix=bamm: did you mean mix=bam? (options: bam, btx)", "mix=bam")
    assert not _names("error: unknown mix 'bamm' in mix=bamm: options: bam_frozen", "mix=bam")
    assert not _names("error: at most 620", "62") and _names("error: at most 62", "62")
    assert _names("error: /tmp/x/docs.jsonl line 2 is bad", "docs.jsonl") and not _names("line 21", "line 2")
    assert _names("error: invalid data.sources.cdoe={'max_bytes': 5}", "data.sources.cdoe={'max_bytes': 5}")


@pytest.mark.parametrize("spelling", ["mapping", "plus"])
def test_your_own_data_in_either_spelling_is_accepted(spelling, tmp_path):
    """The good spellings beside the bad ones above (README, "Your own corpus"): a files source for code reading a
    local JSONL file, and general's byte cap merged into what experiment=smoke sets for it."""
    (tmp_path / "code.jsonl").write_bytes(jsonl({"text": "def f(x):\n    return x\n"}))
    code = f"{{source: {{type: files, path: '{tmp_path / 'code.jsonl'}'}}}}"
    args = ({"mapping": (f"data.sources={{code: {code}, general: {{max_bytes: 1000}}}}", "model.overrides={n_layers: 3}"),
             "plus": (f"+data.sources.code={code}", "+data.sources.general.max_bytes=1000",
                      "+model.overrides.n_layers=3")}[spelling])
    r = cli_here(tmp_path / "stages", "stage=info", *args, check=True)
    assert "error:" not in r.out and "L=3" in r.out, r.out[-2000:]


def test_hydra_full_error_keeps_hydras_own_report(tmp_path):
    """HYDRA_FULL_ERROR=1, set by the user to debug, still gives Hydra's full trace of a command-line error."""
    r = cli(tmp_path, "stage=info", "domain=physics", env={"HYDRA_FULL_ERROR": "1"})
    assert r.returncode == 1, r.out[-3000:]
    assert "Traceback" in r.out and "MissingConfigException" in r.out and "Could not find 'domain/physics'" in r.out
    assert not any(line.startswith("error:") for line in r.out.splitlines())
    assert not (tmp_path / "smoke").exists()


def test_a_run_named_as_a_path_writes_nothing_outside_the_stages_root(tmp_path):
    """run=../x would put the run (and Hydra's logs) beside the stages root: refused before any directory."""
    root = tmp_path / "stages"
    root.mkdir()
    r = cli_here(root, "stage=info", "run=../x")
    assert r.returncode == 2 and "run='../x'" in r.out, r.out[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stages"] and not any(root.iterdir())
