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
    """Under pytest-xdist: one test that reads the shared smoke pipeline first, the others after every test that
    needs none of it, and the bad-input catalogue's many short cases last. The worker that meets the first
    builds the pipeline (the run's one `stage=all`, most of a minute) while the others go on; by the time they
    reach the rest it is there; and the short cases even out when the workers finish."""
    def needs_smoke(item) -> bool:
        return "smoke_run" in getattr(item, "fixturenames", ())

    def rank(item) -> int:
        return 2 if item.path.name == "test_bad_input_catalogue.py" else 1 if needs_smoke(item) else 0

    first = next((item for item in items if needs_smoke(item)), None)
    items.sort(key=lambda item: -1 if item is first else rank(item))  # stable: file order within each part


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: decoding a tiny model is a chain of tiny ops, and two OpenMP
    threads on a shared 2-core machine spin-wait on each other at each (up to 100x slower under
    load; docs/measurements.md). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
