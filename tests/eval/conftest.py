"""A tiny fake run for the eval tests: prepared data from three local `files` sources and random-init
smoke models (seed, two branch experts, a function-preserving mixture of identical seed copies)."""

import random
import shutil
from pathlib import Path

import pytest
import torch
from eval_runs import save_artifact
from omegaconf import OmegaConf

from bam_pipeline.config.files import conf_dir
from bam_pipeline.data.prepare import prepare_data
from bam_pipeline.data.spec import read_data_spec
from bam_pipeline.eval.spec import EvalSpec
from bam_pipeline.model import BAMTransformer, RouterConfig, preset
SOURCES = ("general", "code", "law")
WORDS = {
    "general": "the a of and to in is was he she it they said time day house long river".split(),
    "code": "def return class import self for in if else None print lambda yield try except".split(),
    "law": "court shall party agreement pursuant hereby liability clause plaintiff statute".split(),
}
SEQ_LEN = 32


def write_corpus(root: Path) -> None:
    rng = random.Random(0)
    for name in SOURCES:
        d = root / name
        d.mkdir(parents=True)
        for i in range(40):
            (d / f"doc{i:03d}.txt").write_text(" ".join(rng.choice(WORDS[name]) for _ in range(60)) + "\n")


def data_cfg(corpus: Path) -> dict:
    return {
        "general": "general", "domains": ["code", "law"], "ood": [],
        "sources": {n: {"source": {"type": "files", "path": str(corpus / n)}} for n in SOURCES},
        "max_bytes_per_source": None, "split": {"val": 0.2, "test": 0.2},
        "tokenizer": {"path": None, "vocab_size": 300, "train_bytes": 100000, "eos_token": "<|endoftext|>"},
        "mixtures": {"seed_general": 0.7, "branch_general": 0.1}, "rebuild": False, "num_proc": 1, "parts": 1,
        "part": None, "shard_bytes": 256_000_000,
    }


def identical_mixture(dense_state: dict, n: int) -> dict:
    """``n`` identical copies of a dense model's experts, with random routers (function-preserving
    under soft attention routing and a renormalised top-1 FFN gate)."""
    out = {}
    g = torch.Generator().manual_seed(1)
    for k, v in dense_state.items():
        expert = any(k.endswith(s) for s in (".wq", ".wk", ".wv", ".wo", ".w1", ".w2", ".w3"))
        out[k] = v.repeat(n, *([1] * (v.dim() - 1))) if expert else v.clone()  # (E, in, out)
    d = dense_state["tok_emb.weight"].shape[1]
    layers = sorted({int(k.split(".")[1]) for k in dense_state if k.startswith("layers.")})  # in order: the same routers in every process
    for i in layers:
        for kind in ("attn", "ffn"):
            out[f"layers.{i}.{kind}.router.weight"] = torch.randn(n, d, generator=g)  # (E, D), peaked enough to route
    return out


def log_rows(scale: float) -> list[dict]:
    rows = [{"step": s, "tokens": 1000 * s, "loss": scale * (5.0 - s / 5), "lr": 1e-3, "tokens_per_s": 1.0,
             "aux_loss": 0.0} for s in range(1, 6)]
    return rows + [{"step": 5, "tokens": 5000, "val_loss": scale * 4.2}]


@pytest.fixture(scope="session")
def fake_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evalrun")
    write_corpus(root / "corpus")
    run = root / "stages" / "t"
    prepared = prepare_data(read_data_spec(data_cfg(root / "corpus")), run / "data", progress=False)
    dense = preset("smoke", vocab_size=prepared.vocab_size)
    states = {}
    for k, (stage, name) in enumerate([("seed", "main"), ("branch", "code"), ("branch", "law")]):
        torch.manual_seed(k)
        states[name] = BAMTransformer(dense).state_dict()
        save_artifact(run, stage, name, dense, states[name], prepared, log_rows(1.0 + 0.1 * k))
    mix = dense.replace(attn_experts=3, ffn_experts=3, ffn_router=RouterConfig("topk", 1, renormalize=True))
    about = {"display": "Untrained BAM (renormalised)", "role": "untrained",
             "experts": {"attn": ["seed", "seed+1", "seed+2"], "ffn": ["seed", "seed+1", "seed+2"]}}
    save_artifact(run, "mix", "bam", mix, identical_mixture(states["main"], 3), prepared, about=about)
    return run


@pytest.fixture
def run_copy(fake_run, tmp_path) -> Path:
    """A private copy of the fake run without eval results (for tests that change it)."""
    dst = tmp_path / "stages" / fake_run.name
    shutil.copytree(fake_run, dst, ignore=shutil.ignore_patterns("eval", "report"))
    return dst


@pytest.fixture(scope="session")
def eval_cfg():
    """Factory: the shipped conf/eval/default.yaml shrunk for the fake run, with overrides, as an EvalSpec."""

    def make(**eval_overrides):
        ev = OmegaConf.load(conf_dir() / "eval" / "default.yaml")
        ev.merge_with({"seq_len": SEQ_LEN, "device": "cpu", "max_tokens_per_source": 1024, "batch_size": 8,
                       "latency_rounds": 0, **eval_overrides})  # decode latency: timed by the report's test alone
        return EvalSpec(**OmegaConf.to_container(ev))

    return make
