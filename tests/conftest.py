"""Test-wide settings: offline hubs, offline wandb, few threads (CI has 2 cores); ``one_thread`` for
modules that run chains of tiny ops (decoding, lm-eval requests)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# pytest-xdist runs a worker per core (`-n auto` in pyproject.toml): one torch thread each, or they oversubscribe
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist, one test that reads the shared smoke pipeline first and the others last: the worker
    that meets it builds the pipeline (the run's one `stage=all`, a minute) while the other workers run the
    tests that need none of it, and by the time those are done it is there for every worker."""
    smoke = [item for item in items if "smoke_run" in getattr(item, "fixturenames", ())]
    if smoke:
        later = set(smoke)
        items[:] = [smoke[0], *(item for item in items if item not in later), *smoke[1:]]


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: decoding a tiny model is a chain of tiny ops, and two OpenMP
    threads on a shared 2-core machine spin-wait on each other at each (up to 100x slower under
    load; docs/measurements.md). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
