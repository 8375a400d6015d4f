"""Sharded training on two CPU processes (gloo): trainer=fsdp_cpu and fsdp2_cpu train the BAM mixture to
the losses and weights of one process on the same global batch (train.global_batch_tokens, whatever the
micro-batch and accumulation), shard what they hold, and resume after a SIGKILL. Judged on the published
artifact and its train log, not on exit codes."""

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

# the BAM mixture for 16 steps of 512 tokens (a checkpoint every 8): one process with a micro-batch of 8
# sequences, or two with 4 each, or two accumulating two micro-batches of 2 each
MOE_ARGS = ("stage=moe", "mix=bam", "budget.moe.tokens=8192", "train.val_every=8", "train.global_batch_tokens=512")


def _moe_inputs(smoke_run, root: Path) -> Path:
    """A run directory holding what stage=moe mix=bam reads (data, seed, branches, mix/bam)."""
    shutil.copytree(smoke_run[0] / "smoke", root / "smoke", ignore=shutil.ignore_patterns("moe", "eval", "report"))
    return root


@pytest.fixture(scope="session")
def one_process(smoke_run, tmp_path_factory):
    """moe/bam trained by one process on the global batch of 8 sequences, in micro-batches of a given size
    (each built once): ``one_process(4)`` accumulates two micro-batches of 4 a step."""
    built: dict[int, Artifact] = {}

    def train(batch: int) -> Artifact:
        if batch not in built:
            root = _moe_inputs(smoke_run, tmp_path_factory.mktemp(f"one_process_{batch}"))
            cli_here(root, *MOE_ARGS, "trainer=cpu", f"train.batch_size={batch}", check=True)  # this process
            built[batch] = read_artifact(root / "smoke" / "moe" / "bam")
        return built[batch]
    return train


def _losses(art: Artifact) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_train_log(art) if "loss" in row}


@pytest.mark.parametrize("trainer,batch,extra", [
    ("fsdp_cpu", 2, ()),  # two micro-batches of 2 sequences a step on each process
    # fsdp2 with the chunked loss too: it calls model.hidden, which fully_shard must gather for
    pytest.param("fsdp2_cpu", 4, ("trainer.activation_checkpointing=true", "train.chunked_loss_above=0"),
                 marks=pytest.mark.slow),  # ~30 s each
])
def test_two_sharded_processes_train_like_one_and_resume_after_sigkill(smoke_run, one_process, tmp_path, trainer,
                                                                         batch, extra):
    """Two processes against one whose micro-batch holds both of theirs: the same global batch and the same
    routing batch (what one forward's load balancing sees), so the same stage."""
    one = one_process(2 * batch)
    root = _moe_inputs(smoke_run, tmp_path)
    args = [*MOE_ARGS, f"trainer={trainer}", f"train.batch_size={batch}", *extra]
    kill_when_checkpointed(root, args, "moe/bam")
    r = cli(root, *args, check=True, timeout=600)
    assert "resuming from" in r.out and "Traceback" not in r.out
    art = read_artifact(root / "smoke" / "moe" / "bam")
    art.verify()
    # the same stage as one process's, by identity and plan: 16 steps of 512 tokens; only the layout differs
    assert art.manifest["config_hash"] == one.manifest["config_hash"]
    assert art.manifest["budget"] == one.manifest["budget"]
    assert one.manifest["batch"] == {"global_batch_tokens": 512, "devices": 1, "batch_size": 2 * batch,
                                     "accumulate": 4 // batch}
    assert art.manifest["batch"] == {"global_batch_tokens": 512, "devices": 2, "batch_size": batch,
                                     "accumulate": 4 // batch}

    rows = {row["step"]: row for row in read_train_log(art) if "loss" in row}
    want_rows = {row["step"]: row for row in read_train_log(one) if "loss" in row}
    assert sorted(rows) == sorted(want_rows) and len(rows) == 8  # every logged step, none twice after the resume
    for step, want in want_rows.items():  # the same tokens and learning rate at every step: the same schedule
        assert (rows[step]["tokens"], rows[step]["lr"]) == (want["tokens"], want["lr"]), (step, rows[step], want)
    # and the same sequences in each step: the step's loss over its whole global batch agrees
    want, got = _losses(one), _losses(art)
    for step, loss in want.items():
        assert abs(got[step] - loss) <= 1e-5 * loss, (step, got[step], loss)
    ref = load_file(str(one.path / "model.safetensors"))
    weights = load_file(str(art.path / "model.safetensors"))
    assert weights.keys() == ref.keys()  # the single-device artifact format
    for k in ref:
        # accumulated micro-batches sum in another order, which AdamW's normalised first steps amplify
        torch.testing.assert_close(weights[k], ref[k], rtol=0, atol=1e-5 if batch == 4 else 5e-5)

    sharding = art.manifest["sharding"]
    layers = [f"model.layers.{i}" for i in range(2)]
    assert sharding["world_size"] == 2
    assert sorted(u for u in sharding["units"] if u not in ("", "model")) == layers  # one unit per block + root
    assert len(sharding["units"]) == 3
    whole = 4 * sum(t.numel() for t in ref.values())
    # the planner, against the tensors each rank held after a step (FSDP pads shards by a few elements)
    strategy = trainer.removesuffix("_cpu")
    planned = estimate(read_model_config(art), MemorySetup(batch, 64, 2, strategy, "32-true", bool(extra), None))
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
