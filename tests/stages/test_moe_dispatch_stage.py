"""train.moe_dispatch through a real training stage (training/dispatch.py): the manifest records the path and
why; a forced path is the one the stage ran."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from cli_runner import cli_here

from bam_pipeline.model.moe import grouped_mm_supported


def _manifest(root, label):
    return json.loads((root / "smoke" / label / "manifest.json").read_text())


def test_the_moe_manifest_records_the_dispatch(smoke_run):
    assert _manifest(smoke_run[0], "moe/bam")["moe_dispatch"] == {
        "setting": "auto", "used": "loop", "why": "on the CPU the loop (grouped_mm measured slower there)"}
    assert "moe_dispatch" not in _manifest(smoke_run[0], "seed/main")  # a dense model has no MoE layer


def test_a_forced_path_is_the_one_the_stage_ran(smoke_copy):
    if not grouped_mm_supported(torch.zeros(1, 32), torch.zeros(4, 32, 64)):
        pytest.skip("grouped_mm does not run float32 on this CPU")
    shutil.rmtree(smoke_copy / "smoke" / "moe" / "btx")  # the dispatch is not part of its identity: train it anew
    r = cli_here(smoke_copy, "stage=moe", "mix=btx", "train.moe_dispatch=grouped", check=True)
    assert _manifest(smoke_copy, "moe/btx")["moe_dispatch"] == {
        "setting": "grouped", "used": "grouped", "why": "train.moe_dispatch=grouped"}, r.out[-2000:]
