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

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: decoding a tiny model is a chain of tiny ops, and two OpenMP
    threads on a shared 2-core machine spin-wait on each other at each (up to 100x slower under
    load; docs/measurements.md). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
