"""The Lightning strategy the ``trainer:`` section names (its spec is
:class:`~bam_pipeline.training.settings.TrainerSpec`).

- ``auto``: Lightning's own, by name; ``ddp``: Lightning's ``DDPStrategy``.
- Every strategy but ``auto`` gets ``trainer.collective_timeout_s`` as its process group's timeout.
- ``fsdp``: Lightning's ``FSDPStrategy`` with one FSDP unit per transformer block
  (``auto_wrap_policy={Block}``); the embedding, final norm and head belong to the root unit. A
  block's stacked expert weights are flattened into its unit with the rest of the block, so they
  stay whole in it and are sharded with it, never split across units by expert. Checkpoints are
  sharded (each rank writes its shard; no full gather at every checkpoint).
- ``fsdp2``: Lightning's ``ModelParallelStrategy`` over a (data_parallel = world size,
  tensor_parallel = 1) mesh, both sizes given explicitly so that it never becomes tensor-parallel;
  :func:`configure_model` applies ``fully_shard`` to every block and then to the model. Stacked
  expert weights ``(E, in, out)`` are sharded along dim 1, not by expert (dim 0 would leave ranks
  empty whenever E < world size). Sharded checkpoints.
- ``activation_checkpointing``: each block's activations are recomputed in the backward pass
  (under ``fsdp`` by Lightning's policy, elsewhere by torch's checkpoint wrapper per block).
- Precision ``bf16-mixed`` under ``fsdp``/``fsdp2``: bfloat16 parameters and compute, float32
  master weights and gradient reduction; routers and the loss compute in float32 from the
  bfloat16 weights (:mod:`bam_pipeline.model.routing`, :mod:`bam_pipeline.model.loss`).

Publishing gathers the full state dict from the shards (:func:`full_state_dict`). On CPU
processes (``trainer=fsdp_cpu``, ``fsdp2_cpu``: gloo) two things differ from the GPU path:
Lightning refuses FSDP on a CPU accelerator and hands FSDP no device, so :class:`CPUFSDPStrategy`
names the CPU device; and torch's offload of gathered FSDP parameters "to the CPU" frees them when
they already live there, so CPU runs gather without that offload.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

from bam_pipeline.errors import ConfigError
from bam_pipeline.model.transformer import BAMTransformer, Block
from bam_pipeline.training.settings import TrainerSpec


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy for CPU processes: the model is wrapped with the CPU named as its
    device (Lightning passes none, and torch's FSDP then refuses a machine without an accelerator)."""

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if not any(isinstance(m, FSDP) for m in model.modules()):
            model = FSDP(module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                         sharding_strategy=self.sharding_strategy, device_id=self.root_device, **self.kwargs)
            self.kwargs.pop("auto_wrap_policy")  # applied; Lightning's own wrapping would warn about it
        return super()._setup_model(model)


def trainer_kwargs(spec: TrainerSpec) -> dict[str, Any]:
    """Keyword arguments of ``lightning.Trainer`` for the ``trainer:`` section (its strategy built)."""
    return {**spec.flags(), "strategy": build_strategy(spec)}


def build_strategy(spec: TrainerSpec) -> Any:
    """The Lightning strategy of ``spec``: ``auto`` by name, the others as objects that carry the process
    group's timeout (``trainer.collective_timeout_s``) and what FSDP and FSDP2 need."""
    timeout = timedelta(seconds=spec.collective_timeout_s)
    if spec.strategy == "ddp":
        return DDPStrategy(timeout=timeout)
    if spec.strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecision

        cls = CPUFSDPStrategy if spec.accelerator == "cpu" else FSDPStrategy
        mixed = None
        if spec.precision == "bf16-mixed":  # Lightning's default would reduce gradients in bfloat16
            mixed = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        return cls(auto_wrap_policy={Block}, mixed_precision=mixed, state_dict_type="sharded",
                   activation_checkpointing_policy={Block} if spec.activation_checkpointing else None,
                   timeout=timeout)
    if spec.strategy == "fsdp2":
        return ModelParallelStrategy(data_parallel_size=spec.world_size, tensor_parallel_size=1,
                                     save_distributed_checkpoint=True, timeout=timeout)
    return spec.strategy


def _expert_dim(param: torch.nn.Parameter) -> Any:
    """FSDP2 placement: stacked expert weights (E, in, out) along dim 1; everything else dim 0."""
    from torch.distributed.tensor import Shard

    return Shard(1) if param.ndim == 3 else None


def configure_model(model: BAMTransformer, strategy: Any, spec: TrainerSpec) -> None:
    """What a strategy needs done to the model before it trains (LightningModule.configure_model):
    per-block activation checkpointing outside ``fsdp`` (where Lightning applies it), and
    ``fully_shard`` per block and for the whole model under ``fsdp2``."""
    if isinstance(strategy, FSDPStrategy):
        return
    if spec.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Block))
    if isinstance(strategy, ModelParallelStrategy):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        mesh = strategy.device_mesh
        if mesh["tensor_parallel"].size() != 1:
            raise ConfigError("trainer.strategy", spec.strategy, "fsdp2 here is data parallel only (tensor parallel 1)")
        policy = MixedPrecisionPolicy()
        if spec.precision == "bf16-mixed":
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        dp = mesh["data_parallel"]
        for block in model.layers:
            fully_shard(block, mesh=dp, mp_policy=policy, shard_placement_fn=_expert_dim)
        fully_shard(model, mesh=dp, mp_policy=policy, shard_placement_fn=_expert_dim)
        # the chunked loss calls model.hidden, not forward: it must gather the root's parameters too
        register_fsdp_forward_method(model, "hidden")


def clip_gradients(module: Any, optimizer: Any, value: float | None, algorithm: str | None) -> None:
    """Gradient clipping that works under every strategy: FSDP's own norm over the shards for an
    ``fsdp`` root (Lightning refuses to clip there), Lightning's clipping otherwise."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    root = module.trainer.strategy.model
    if isinstance(root, FSDP) and value:
        root.clip_grad_norm_(value)
    else:
        module.clip_gradients(optimizer, gradient_clip_val=value, gradient_clip_algorithm=algorithm)


def full_state_dict(trainer: Any) -> dict[str, torch.Tensor]:
    """The LightningModule's whole state dict on global rank 0 (gathered from the shards under
    fsdp/fsdp2; every rank must call this); other ranks may get an empty dict."""
    strategy = trainer.strategy
    if not isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)):
        return strategy.lightning_module_state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    offload = strategy.root_device.type != "cpu"  # see the module docstring: CPU shards are not offloaded
    return get_model_state_dict(strategy.model, options=StateDictOptions(full_state_dict=True, cpu_offload=offload))


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _bytes(tensors) -> int:
    return sum(local_tensor(t).numel() * local_tensor(t).element_size() for t in tensors if t is not None)


WRAPPER_PARTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def clean_name(name: str) -> str:
    """A parameter or module name without the parts FSDP, checkpoint and compile wrappers insert."""
    return ".".join(p for p in name.split(".") if p not in WRAPPER_PARTS)


def fsdp_units(root: torch.nn.Module) -> list[str]:
    """Names of the modules that are FSDP units (FSDP1 wrappers or FSDP2 ``fully_shard`` modules),
    each named by the module it shards; ``""`` is the root."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return [clean_name(name) for name, module in root.named_modules() if isinstance(module, (FSDP, FSDPModule))]


class ShardingReport(Callback):
    """Measures, after this fit's first optimizer step, each rank's bytes of parameters, gradients
    and optimizer state (the tensors themselves: local shards), the FSDP units and the device mesh;
    rank 0 keeps the result in ``summary`` (for the manifest)."""

    def __init__(self) -> None:
        self.summary: dict[str, Any] | None = None
        self._grad_bytes: int | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._grad_bytes is None:
            self._grad_bytes = _bytes(p.grad for p in trainer.strategy.model.parameters())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.summary is not None or self._grad_bytes is None:
            return
        optimizer = trainer.optimizers[0]
        mine = {
            "params_bytes": _bytes(trainer.strategy.model.parameters()),
            "grads_bytes": self._grad_bytes,
            "optimizer_bytes": _bytes(v for state in optimizer.state.values() for v in state.values()
                                      if isinstance(v, torch.Tensor)),
        }
        per_rank = [mine]
        if trainer.world_size > 1:
            per_rank = [None] * trainer.world_size
            torch.distributed.all_gather_object(per_rank, mine)
        strategy = trainer.strategy
        mesh = None
        if isinstance(strategy, ModelParallelStrategy):
            mesh = {name: strategy.device_mesh[name].size() for name in strategy.device_mesh.mesh_dim_names}
        self.summary = {"strategy": type(strategy).__name__, "world_size": trainer.world_size, "mesh": mesh,
                        "units": fsdp_units(strategy.model), "per_rank": per_rank}
