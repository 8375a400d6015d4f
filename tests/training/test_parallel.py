"""The trainer section's strategies: what fsdp and fsdp2 are built with, and what is refused."""

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

from bam_pipeline.errors import ConfigError
from bam_pipeline.model.transformer import Block
from bam_pipeline.training.parallel import CPUFSDPStrategy, build_strategy, clean_name
from bam_pipeline.training.settings import TrainerSpec


def spec(**changes) -> TrainerSpec:
    base = {"accelerator": "gpu", "devices": 8, "num_nodes": 2, "strategy": "fsdp", "precision": "bf16-mixed",
            "activation_checkpointing": True}
    return TrainerSpec(**{**base, **changes})


def test_fsdp_wraps_each_block_in_bf16_with_float32_reduction_and_sharded_checkpoints():
    s = build_strategy(spec())
    assert type(s) is FSDPStrategy
    assert s.kwargs["auto_wrap_policy"]._module_classes == {Block}
    assert s._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {Block}
    mp = s.mixed_precision
    assert (mp.param_dtype, mp.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert s._state_dict_type == "sharded"
    assert not build_strategy(spec(activation_checkpointing=False))._activation_checkpointing_kwargs
    assert type(build_strategy(spec(accelerator="cpu", devices=2, num_nodes=1, precision="32-true"))) is CPUFSDPStrategy


def test_fsdp2_states_both_mesh_sizes():
    s = build_strategy(spec(strategy="fsdp2"))
    assert isinstance(s, ModelParallelStrategy)
    assert (s._data_parallel_size, s._tensor_parallel_size) == (16, 1)  # 8 devices x 2 nodes, never tensor-parallel
    assert s._save_distributed_checkpoint


@pytest.mark.parametrize("changes,match", [
    ({"strategy": "deepspeed"}, "trainer strategy|strategy='deepspeed'"),
    ({"strategy": "fsdp2", "precision": "16-mixed"}, "precision='16-mixed'"),
    ({"devices": 0}, "devices=0"),
])
def test_refused_settings_name_their_key(changes, match):
    with pytest.raises(ConfigError, match=match):
        spec(**changes)


def test_wrapper_parts_leave_parameter_names():
    assert clean_name("layers.0._fsdp_wrapped_module._checkpoint_wrapped_module.attn.wq") == "layers.0.attn.wq"
