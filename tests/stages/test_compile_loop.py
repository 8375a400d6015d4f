"""``train.compile=true`` through the real training loop (issue 24, item 4): a smoke moe stage of every mix variant
trains with its blocks under torch.compile (inductor, on the CPU) and publishes; the manifest records the blocks
compiled and the graphs Dynamo made for them; and compiled BAM (soft Mixture of Attention, top-1 FFN) logs the
losses of eager BAM. Where torch.compile cannot run here, each test skips with the reason
``training.compile.compile_unsupported`` gives."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
from cli_runner import cli_here

from bam_pipeline.config.files import group_options
from bam_pipeline.store.artifacts import read_artifact, read_train_log
from bam_pipeline.training.compile import compile_unsupported

COMPILE = "train.compile=true"
# graphs the blocks of a variant give on the loop dispatch (docs/measurements.md, the graph-break table): 1 for a
# dense block, 4 for one whose loop dispatch reads the counts, 7 for expert choice (its mask and threshold); under
# router_scope=model block 1 reuses block 0's routing, another 4
BLOCK_GRAPHS = {"dense": 1, "bam_expert_choice": 7, "bam_router_shared_layers": 8}
LOOP_BLOCK_GRAPHS = 4
# a stage compiles its blocks' graphs for training, for validation (no grad) and for validation's last, smaller
# batch (dynamic shapes; measured: 3, 13, 19 and 25 graphs for the four counts above): at most 4 such sets.
# Recompiling per step (code after a graph break specialised to the step's expert counts) would pass it.
COMPILES_PER_STAGE = 4


@pytest.fixture
def compiles() -> None:
    why = compile_unsupported()
    if why is not None:
        pytest.skip(f"torch.compile cannot run here: {why}")


@pytest.fixture(scope="module")
def run_root(smoke_run, tmp_path_factory) -> Path:
    """One copy of the smoke run for this module's stages (each test writes only its own variant's mix and moe)."""
    root = tmp_path_factory.mktemp("compiled")
    shutil.copytree(smoke_run[0] / "smoke", root / "smoke",
                    ignore=shutil.ignore_patterns("eval", "report", "downstream"))
    return root


def _train_compiled(root: Path, variant: str):
    """stage=moe of ``variant`` with train.compile=true (its mixture made first where the smoke run has none)."""
    run = root / "smoke"
    if not (run / "mix" / variant).is_dir():
        cli_here(root, "stage=mix", f"mix={variant}", check=True)
    shutil.rmtree(run / "moe" / variant, ignore_errors=True)  # the eager one: compile is not part of its identity
    cli_here(root, "stage=moe", f"mix={variant}", COMPILE, check=True)
    art = read_artifact(run / "moe" / variant)
    art.verify()
    return art


def _losses(art, key: str) -> dict[int, float]:
    return {row["step"]: row[key] for row in read_train_log(art) if key in row}


def _check_compiled_stage(art, variant: str) -> None:
    """What a compiled smoke moe stage (8 steps, or dense's 9; validation every 4) must show: the manifest says both
    blocks were compiled, and Dynamo made graphs for them but did not recompile per step; the training loss is finite
    and lower at the last logged step than at the first, and so is the validation loss."""
    record = art.manifest["compile"]
    block_graphs = BLOCK_GRAPHS.get(variant, LOOP_BLOCK_GRAPHS)
    assert record["blocks"] == 2 and 0 < record["graphs"] <= COMPILES_PER_STAGE * block_graphs, record
    assert art.manifest.get("moe_dispatch", {"used": "loop"})["used"] == "loop"  # a dense model has no MoE layer
    train, val = _losses(art, "loss"), _losses(art, "val_loss")
    assert len(train) >= 4 and all(math.isfinite(v) for v in train.values()), train  # dense: 9 steps, compute-matched
    assert train[max(train)] < train[min(train)], train
    assert len(val) >= 2 and val[max(val)] < val[min(val)], val


# 18-63 s a variant (inductor's C++ compilation; measured on 2 loaded cores with its cache partly warm), 14 min for
# this module with the smoke run, serially
@pytest.mark.slow
@pytest.mark.parametrize("variant", [v for v in group_options("mix") if v != "bam"])  # bam: the test below
def test_every_mix_variant_trains_a_compiled_moe_stage(compiles, run_root, variant):
    """A compiled smoke moe stage of each ``conf/mix/`` variant publishes and passes :func:`_check_compiled_stage`."""
    _check_compiled_stage(_train_compiled(run_root, variant), variant)


@pytest.mark.slow  # 28 s with inductor's cache warm, 76 s cold: the compiled stage (the eager one is the smoke run's)
def test_compiled_bam_logs_the_losses_of_eager_bam(compiles, smoke_run, run_root):
    """moe/bam compiled (checked as every variant is) against moe/bam eager (the smoke run's: the same data, seed and
    identity): every logged training and validation loss agrees within 1e-5 relative (measured: equal to the last
    float32 digit at all 6 points)."""
    eager = read_artifact(smoke_run[0] / "smoke" / "moe" / "bam")
    art = _train_compiled(run_root, "bam")
    _check_compiled_stage(art, "bam")
    assert art.manifest["config"] == eager.manifest["config"]  # the same stage: compile is how it runs
    assert "compile" not in eager.manifest
    for key in ("loss", "val_loss"):
        want, got = _losses(eager, key), _losses(art, key)
        assert sorted(got) == sorted(want) and len(want) >= 2, (key, got, want)
        for step, loss in want.items():
            assert abs(got[step] - loss) <= 1e-5 * abs(loss), (key, step, got[step], loss)
