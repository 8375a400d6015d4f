"""Sharded training on two CPU processes (gloo): trainer=fsdp_cpu and fsdp2_cpu train the BAM mixture to
the losses and weights of one process on the same global batch, shard what they hold, and resume after a
SIGKILL. Judged on the published artifact and its train log, not on exit codes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from cli_runner import cli, cli_here, kill_when_checkpointed
from safetensors.torch import load_file

from bam_pipeline.store.artifacts import Artifact, read_artifact, read_model_config, read_train_log
from bam_pipeline.training.memory import MemorySetup, estimate
from bam_pipeline.model.state_dict import EXPERT_TENSORS

# the BAM mixture for 16 steps of 512 tokens (a checkpoint every 8): one process with 8 sequences a
# step, or two with 4 each
MOE_ARGS = ("stage=moe", "mix=bam", "budget.moe.tokens=8192", "train.val_every=8")


def _moe_inputs(smoke_run, root: Path) -> Path:
    """A run directory holding what stage=moe mix=bam reads (data, seed, branches, mix/bam)."""
    shutil.copytree(smoke_run[0] / "smoke", root / "smoke", ignore=shutil.ignore_patterns("moe", "eval", "report"))
    return root


@pytest.fixture(scope="session")
def one_process(smoke_run, tmp_path_factory) -> Artifact:
    """moe/bam trained by one process on the global batch of 8 sequences."""
    root = _moe_inputs(smoke_run, tmp_path_factory.mktemp("one_process"))
    cli_here(root, *MOE_ARGS, "trainer=cpu", "train.batch_size=8", check=True)  # one process: this one
    return read_artifact(root / "smoke" / "moe" / "bam")


def _losses(art: Artifact) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_train_log(art) if "loss" in row}


@pytest.mark.parametrize("trainer,extra", [
    ("fsdp_cpu", ()),
    # fsdp2 with the chunked loss too: it calls model.hidden, which fully_shard must gather for
    pytest.param("fsdp2_cpu", ("trainer.activation_checkpointing=true", "train.chunked_loss_above=0"),
                 marks=pytest.mark.slow),  # ~30 s each
])
def test_two_sharded_processes_train_like_one_and_resume_after_sigkill(smoke_run, one_process, tmp_path, trainer,
                                                                         extra):
    root = _moe_inputs(smoke_run, tmp_path)
    args = [*MOE_ARGS, f"trainer={trainer}", "train.batch_size=4", *extra]
    kill_when_checkpointed(root, args, "moe/bam")
    r = cli(root, *args, check=True, timeout=600)
    assert "resuming from" in r.out and "Traceback" not in r.out
    art = read_artifact(root / "smoke" / "moe" / "bam")
    art.verify()
    assert art.manifest["budget"] == one_process.manifest["budget"]  # 16 steps of 512 tokens, as one process

    want, got = _losses(one_process), _losses(art)
    assert sorted(got) == sorted(want) and len(got) == 8  # every logged step, none twice after the resume
    for step, loss in want.items():
        assert abs(got[step] - loss) <= 1e-5 * loss, (step, got[step], loss)
    ref = load_file(str(one_process.path / "model.safetensors"))
    weights = load_file(str(art.path / "model.safetensors"))
    assert weights.keys() == ref.keys()  # the single-device artifact format
    for k in ref:
        torch.testing.assert_close(weights[k], ref[k], rtol=0, atol=1e-5)

    sharding = art.manifest["sharding"]
    layers = [f"model.layers.{i}" for i in range(2)]
    assert sharding["world_size"] == 2
    assert sorted(u for u in sharding["units"] if u not in ("", "model")) == layers  # one unit per block + root
    assert len(sharding["units"]) == 3
    whole = 4 * sum(t.numel() for t in ref.values())
    # the planner, against the tensors each rank held after a step (FSDP pads shards by a few elements)
    strategy = trainer.removesuffix("_cpu")
    planned = estimate(read_model_config(art), MemorySetup(4, 64, 2, strategy, "32-true", bool(extra), None))
    for rank in sharding["per_rank"]:
        assert abs(rank["params_bytes"] - whole / 2) <= 0.01 * whole, (rank, whole)
        for key, want in (("params_bytes", planned.params), ("grads_bytes", planned.grads),
                          ("optimizer_bytes", planned.optimizer)):
            assert abs(rank[key] - want) <= 0.01 * want, (key, rank[key], want)
    if trainer == "fsdp2_cpu":
        assert sharding["mesh"] == {"data_parallel": 2, "tensor_parallel": 1}


@pytest.mark.slow  # ~35 s
def test_frozen_experts_stay_bit_identical_under_fsdp_and_the_plan_holds(smoke_run, tmp_path):
    """bam_frozen's moe stage on two fsdp_cpu processes: every stacked expert tensor published as the
    upcycled mixture had it, the routers trained, and each rank's gradients and AdamW state as the
    planner says with the experts frozen."""
    root = _moe_inputs(smoke_run, tmp_path)
    cli(root, "stage=mix", "mix=bam_frozen", check=True)
    cli(root, "stage=moe", "mix=bam_frozen", "budget.moe.tokens=16384", "train.val_every=8", "trainer=fsdp_cpu",
        "train.batch_size=4", check=True, timeout=600)
    art = read_artifact(root / "smoke" / "moe" / "bam_frozen")
    art.verify()
    before = load_file(str(root / "smoke" / "mix" / "bam_frozen" / "model.safetensors"))
    after = load_file(str(art.path / "model.safetensors"))
    experts = [k for k in before if k.endswith(EXPERT_TENSORS) and before[k].shape[0] > 1]
    assert len(experts) == 2 * 7
    for k in experts:
        assert torch.equal(after[k], before[k]), k
    assert not torch.equal(after["layers.0.ffn.router.weight"], before["layers.0.ffn.router.weight"])
    planned = estimate(read_model_config(art), MemorySetup(4, 64, 2, "fsdp", "32-true", False, None),
                       frozen_experts=True)
    for rank in art.manifest["sharding"]["per_rank"]:
        for key, want in (("grads_bytes", planned.grads), ("optimizer_bytes", planned.optimizer)):
            assert abs(rank[key] - want) <= 0.01 * want, (key, rank[key], want)
