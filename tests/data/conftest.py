"""Fixtures for the data-stage tests: small synthetic `files` sources and prepared directories.

The synthetic sources use disjoint alphabets with no whitespace (general: a-e, code: f-j,
math: k-o, law: p-t), so every BPE token but the end-of-document token belongs to exactly one
source and token shares can be measured from the token stream itself.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from bam_pipeline.data.prepare import PreparedData, prepare_data
from bam_pipeline.data.spec import read_data_spec

ALPHABETS = {"general": "abcde", "code": "fghij", "math": "klmno", "law": "pqrst"}


def write_jsonl_source(folder: Path, alphabet: str, n_docs: int, seed: int, size: int = 400) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "docs.jsonl"
    with path.open("w") as f:
        for i in range(n_docs):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(size // 2, size)))
            f.write(json.dumps({"id": f"doc{i}", "text": text}) + "\n")
    return folder


def synthetic_cfg(root: Path, n_docs: int = 200, **over: Any) -> dict[str, Any]:
    sources = {}
    for k, (name, alphabet) in enumerate(ALPHABETS.items()):
        folder = write_jsonl_source(root / "src" / name, alphabet, n_docs, seed=k)
        sources[name] = {"source": {"type": "files", "path": str(folder), "text_field": "text"}}
    cfg = {
        "general": "general",
        "domains": ["code", "math", "law"],
        "ood": [],
        "sources": sources,
        "max_bytes_per_source": None,
        "split": {"val": 0.1, "test": 0.1},
        "tokenizer": {"path": None, "vocab_size": 320, "train_bytes": 100_000, "eos_token": "<|endoftext|>"},
        "mixtures": {"seed_general": 0.7, "branch_general": 0.1},
        "rebuild": False,
        "num_proc": 1,
        "parts": 1,
        "part": None,
        "shard_bytes": 256_000_000,
    }
    cfg.update(over)
    return cfg


@pytest.fixture(scope="session")
def make_cfg():
    """``synthetic_cfg`` (write the synthetic sources under a folder and return a data config)."""
    return synthetic_cfg


@pytest.fixture(scope="session")
def alphabets() -> dict[str, str]:
    return ALPHABETS


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], PreparedData]:
    root = tmp_path_factory.mktemp("synthetic")
    cfg = synthetic_cfg(root)
    return cfg, prepare_data(read_data_spec(cfg), root / "data", progress=False)


@pytest.fixture(scope="session")
def real_prepared(tmp_path_factory: pytest.TempPathFactory) -> PreparedData:
    """The real embedded sources, 150 kB each, with a 512-entry tokenizer."""
    from omegaconf import OmegaConf

    from bam_pipeline.config.files import conf_dir  # noqa: F811

    cfg = OmegaConf.load(conf_dir() / "data" / "default.yaml")
    cfg.max_bytes_per_source = 150_000
    cfg.ood = []  # the out-of-domain source has its own test (test_sources.py)
    cfg.split = {"val": 0.1, "test": 0.1}
    cfg.tokenizer.vocab_size = 512
    cfg.tokenizer.train_bytes = 200_000
    return prepare_data(read_data_spec(cfg), tmp_path_factory.mktemp("real") / "data", progress=False)
