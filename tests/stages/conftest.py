"""Fixtures: one smoke pipeline run through the real CLI, and private copies of it for tests that modify it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from filelock import FileLock
from cli_runner import SEED_ARGS, Result, cli, cli_here


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, worker_id) -> tuple[Path, Result]:
    """One whole smoke pipeline (data, seed, 3 branches, 4 mixtures trained, eval, downstream, report), the
    one `stage=all` of a test run: built by the first pytest-xdist worker that needs it, read by the others
    (tests change private copies only: ``smoke_copy``)."""
    if worker_id == "master":  # no xdist
        root = tmp_path_factory.mktemp("stages")
        return root, cli(root, "stage=all", check=True, timeout=600)
    shared = tmp_path_factory.getbasetemp().parent  # the same for every worker of this run
    root, done = shared / "smoke-stages", shared / "smoke-stages.json"
    with FileLock(str(done) + ".lock"):
        if not done.is_file():
            r = cli(root, "stage=all", check=True, timeout=900)  # downstream included: minutes on a busy CPU
            done.write_text(json.dumps({"returncode": r.returncode, "out": r.out}))
    return root, Result(**json.loads(done.read_text()))


@pytest.fixture
def smoke_copy(smoke_run, tmp_path) -> Path:
    """A private copy of the finished smoke run that a test may modify."""
    root, _ = smoke_run
    dst = tmp_path / "stages"
    shutil.copytree(root, dst)
    return dst


@pytest.fixture(scope="session")
def reference_seed(smoke_run, tmp_path_factory) -> Path:
    """The weights file of SEED_ARGS trained without interruption (what every resumed run must equal)."""
    root = tmp_path_factory.mktemp("reference")
    shutil.copytree(smoke_run[0] / "smoke" / "data", root / "smoke" / "data")
    cli_here(root, *SEED_ARGS, check=True)
    return root / "smoke" / "seed" / "main" / "model.safetensors"
