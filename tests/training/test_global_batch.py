"""train.global_batch_tokens: the tokens of an optimizer step are configured, and the accumulation each device
runs is derived from them; a stage's identity holds the global batch, not the devices that train it.
(tests/stages/test_sharded.py trains one process against two; the catalogue has the refusals' lines.)"""

from __future__ import annotations

import dataclasses

import pytest
from composed import run_context as context

from bam_pipeline.errors import ConfigError
from bam_pipeline.store.artifacts import canonical_hash
from bam_pipeline.training.settings import split_batch


@pytest.mark.parametrize("sequences,batch,devices,micro,accumulate", [
    (16, 16, 1, 16, 1), (16, 8, 1, 8, 2), (16, 8, 2, 8, 1), (16, 2, 2, 2, 4), (16, 1, 16, 1, 1),
    (512, 8, 32, 8, 2), (512, 8, 1, 8, 64),
    (16, 16, 2, 8, 1), (16, 16, 16, 1, 1),  # batch_size bounds a micro-batch: a device's whole share is smaller
])
def test_the_split_fills_the_global_batch(sequences, batch, devices, micro, accumulate):
    split = split_batch(sequences, batch, devices, seq_len=64)
    assert (split.devices, split.micro_batch, split.accumulate) == (devices, micro, accumulate)
    assert split.step_sequences == sequences  # every step trains the global batch, no more, no less
    assert split.routing_batch == devices * micro
    assert split.to_dict() == {"global_batch_tokens": sequences * 64, "devices": devices, "batch_size": micro,
                               "accumulate": accumulate}


def test_a_batch_that_does_not_split_is_refused_naming_what_would():
    with pytest.raises(ConfigError) as e:
        split_batch(3, 1, 2, seq_len=64)  # 3 sequences over 2 devices
    assert e.value.key == "global_batch_tokens" and e.value.value == 192
    assert "3 sequences" in e.value.problem and "2 devices" in e.value.problem and "(1, 3)" in e.value.problem
    assert "multiple of 128" in e.value.problem
    with pytest.raises(ConfigError) as e:
        split_batch(12, 4, 2, seq_len=64)  # 6 sequences a device in micro-batches of 4
    assert "6 sequences per device" in e.value.problem and "train.batch_size=4" in e.value.problem
    assert "e.g. 3" in e.value.problem and "multiple of 512" in e.value.problem


def _train(*overrides: str):
    return context("experiment=smoke", *overrides).train


def test_null_is_one_micro_batch_of_one_device():
    t = _train()
    assert t.global_batch_tokens is None and t.step_tokens == 4 * 64 and t.split(1).accumulate == 1
    assert t.split(2).micro_batch == 2  # the one micro-batch shared by two devices
    with pytest.raises(ConfigError) as e:
        t.split(3)
    assert e.value.value is None and e.value.problem.startswith("null, so one micro-batch of one device (256 tokens)")
    assert _train("train.global_batch_tokens=1024").split(2).accumulate == 2


@pytest.mark.parametrize("bad", ["100", "32", "0", "-64"])
def test_a_global_batch_of_partial_sequences_is_refused(bad):
    with pytest.raises(ConfigError) as e:
        _train(f"train.global_batch_tokens={bad}")
    assert e.value.key == "train.global_batch_tokens" and "whole number of sequences of seq_len=64" in e.value.problem


def _plan(stage: str, *overrides: str, variant: str = "bam"):
    """The training job ``stage`` would run (planned from the shipped config; the seed needs no inputs)."""
    from bam_pipeline.model.config import ModelConfig
    from bam_pipeline.stages.train import _budget
    from bam_pipeline.training.job import TrainJob

    ctx = context("experiment=tiny", *overrides)
    dense = ctx.model.dense_config(512)
    cfg: ModelConfig = dense if stage == "seed" else ctx.variant(variant).layout(dense, len(ctx.data.domains))
    return TrainJob(stage, "x", ctx.layout, cfg, None, {}, _budget(ctx, 1_024_000, cfg), ctx.train.lr, ctx.train,
                    devices=ctx.world_size)


def _identity(job) -> str:
    return canonical_hash(job.identity({}))


def test_the_identity_holds_the_global_batch_not_the_devices():
    one = _plan("seed")
    assert one.batch_split.accumulate == 1 and one.budget.tokens_per_step == 4096
    # the form one device without accumulation always had: tiny's artifacts keep their hashes
    assert one.identity({})["train"] == {"seq_len": 256, "batch_size": 16, "accumulate": 1, "seed": 0,
                                         "grad_clip": 1.0}
    layouts = [dataclasses.replace(one, devices=2, train=dataclasses.replace(one.train, batch_size=8)),
               dataclasses.replace(one, train=dataclasses.replace(one.train, batch_size=4)),
               dataclasses.replace(one, devices=4, train=dataclasses.replace(one.train, batch_size=2))]
    assert [j.batch_split.accumulate for j in layouts] == [1, 4, 2]  # the manifest says which ran
    assert {_identity(j) for j in layouts} == {_identity(one)}  # a dense model: any layout, one stage
    other = dataclasses.replace(one, train=dataclasses.replace(one.train, global_batch_tokens=8192))
    assert _identity(other) != _identity(one)


def test_an_moe_identity_also_holds_the_routing_batch_when_micro_batches_accumulate():
    """Load balancing sees one forward's batch over every device: with accumulation that is smaller than the
    step's, and a different routing batch trains a different mixture."""
    one = _plan("moe")

    def layout(devices: int, batch: int):
        return dataclasses.replace(one, devices=devices, train=dataclasses.replace(one.train, batch_size=batch))

    assert "routing_batch" not in one.identity({})["train"]
    assert _identity(layout(2, 8)) == _identity(layout(4, 4)) == _identity(one)  # no accumulation: 16 sequences
    assert layout(1, 4).identity({})["train"]["routing_batch"] == 4
    assert _identity(layout(1, 4)) == _identity(layout(2, 2)) == _identity(layout(4, 1))  # 4 a forward, any devices
    assert _identity(layout(1, 4)) != _identity(layout(1, 8)) != _identity(one)


def test_an_expert_choice_identity_holds_each_devices_own_batch():
    """Expert choice picks each expert's tokens from its own device's micro-batch: that is the routing batch."""
    one = _plan("moe", variant="bam_expert_choice")

    def layout(devices: int, batch: int):
        return dataclasses.replace(one, devices=devices, train=dataclasses.replace(one.train, batch_size=batch))

    assert "routing_batch" not in one.identity({})["train"]  # one device, one micro-batch: the whole step
    assert layout(2, 8).identity({})["train"]["routing_batch"] == 8
    assert _identity(layout(2, 8)) == _identity(layout(1, 8)) != _identity(layout(2, 4)) != _identity(one)
