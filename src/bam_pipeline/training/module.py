"""The one LightningModule that trains every stage (seed, branch, moe): LM loss + MoE aux losses.

Under data parallelism each process computes the loss of its part of the global batch; MoE load
balancing counts the whole global batch (:meth:`BAMTransformer.balance_globally`), so the mean of
the processes' losses, which is what is logged and what the averaged gradient descends, is the
loss one process would compute on the whole batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import lightning as L
import torch

from bam_pipeline.errors import BamError
from bam_pipeline.model.config import ModelConfig
from bam_pipeline.model.loss import LossChunking
from bam_pipeline.model.state_dict import EXPERT_TENSORS
from bam_pipeline.model.transformer import BAMTransformer
from bam_pipeline.training.compile import CompiledBlocks, compile_blocks
from bam_pipeline.training.parallel import clean_name, clip_gradients, configure_model, local_tensor
from bam_pipeline.training.schedule import lr_at
from bam_pipeline.training.settings import TrainerSpec


class NonFiniteLoss(BamError):
    """Training loss became NaN/inf."""


@dataclass(frozen=True)
class OptimConfig:
    lr: float
    total_steps: int
    warmup_steps: int
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)


def freeze_expert_tensors(model: torch.nn.Module) -> list[str]:
    """Stop training every stacked expert tensor with more than one expert (E > 1): no gradient, so
    the optimiser (which only gets trainable parameters) neither steps nor decays them. Averaged
    tensors (E = 1: shared K/V, a BTX attention), routers, norms and embeddings stay trainable.
    Returns the frozen names."""
    frozen = []
    for name, p in model.named_parameters():
        if name.endswith(EXPERT_TENSORS) and p.shape[0] > 1:
            p.requires_grad_(False)
            frozen.append(name)
    return frozen

@dataclass(frozen=True)
class StepOptions:
    """How a step runs, not what it computes: the loss chunking rule, the trainer (its strategy's
    sharding and checkpointing), whether blocks are compiled."""

    chunking: LossChunking | None = None
    trainer: TrainerSpec | None = None
    compile: bool = False


class LMModule(L.LightningModule):
    """Next-token prediction on (B, T+1) token batches; loss = LM NLL + sum of per-layer aux losses.
    ``freeze_experts``: train routers and averaged weights only (:func:`freeze_expert_tensors`)."""

    def __init__(self, model_cfg: ModelConfig, optim: OptimConfig, init_state: dict | None = None,
                 log_every: int = 10, options: StepOptions = StepOptions(), freeze_experts: bool = False):
        super().__init__()
        self.model_cfg = model_cfg
        self.optim = optim
        self.log_every = log_every
        self.options = options
        self.model = BAMTransformer(model_cfg)
        if init_state is not None:
            self.model.load_state_dict(init_state, strict=True)
        if freeze_experts and not freeze_expert_tensors(self.model):
            raise BamError("freeze_experts: this model has no expert tensors with more than one expert to freeze")
        # weight decay on matrices, by name: FSDP turns parameters into flat (1-D) shards
        self._decayed = {name for name, p in self.model.named_parameters() if p.ndim >= 2}
        self._configured = False
        self.compiled: CompiledBlocks | None = None  # what train.compile did (None: not asked)
        self.last_train: dict[str, float] = {}
        self._first_bad: torch.Tensor | None = None  # the first step whose loss was not finite (-1: none), on device
        self._bad_loss: torch.Tensor | None = None
        self._window: tuple[int, list[torch.Tensor], list[torch.Tensor]] = (-1, [], [])  # step, its NLLs, aux losses

    def configure_model(self) -> None:
        if self._configured:
            return
        self._configured = True
        if self.trainer.world_size > 1:
            self.model.balance_globally()
        if self.options.trainer is not None:
            configure_model(self.model, self.trainer.strategy, self.options.trainer)
        if self.options.compile:
            self.compiled = compile_blocks(self.model)

    def weights_finite(self) -> bool:
        """Whether every parameter is finite on every process (each checks its own shards; one host sync)."""
        local = torch.stack([torch.isfinite(local_tensor(p)).all() for p in self.model.parameters()]).all()
        return self.trainer.strategy.reduce_boolean_decision(bool(local), all=True)

    # ---- steps ---------------------------------------------------------------------------
    def _lm_loss(self, batch: torch.Tensor):
        """Mean next-token NLL of a (B, T+1) batch, and the model output."""
        return self.model.loss(batch[:, :-1], batch[:, 1:], chunking=self.options.chunking)

    def _global_mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over the processes (the global batch's), detached."""
        value = value.detach()
        return self.trainer.strategy.reduce(value, reduce_op="mean") if self.trainer.world_size > 1 else value

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """One micro-batch's loss. Nothing here waits for the device except on the steps that log (every
        ``log_every`` optimizer steps, and the last): the loss's finiteness accumulates on the device
        (:meth:`check_finite` reads it there, and before every validation and checkpoint), and the logged
        scalars are read only then."""
        nll, out = self._lm_loss(batch)
        loss = nll + out.aux_loss
        self._track_finite(loss)
        step = self.global_step + 1
        tokens_step = batch[:, :-1].numel() * self.trainer.world_size
        tokens_seen = step * tokens_step * self.trainer.accumulate_grad_batches
        self.last_train = {"step": step, "tokens": tokens_seen}
        means = self._step_means(nll, out.aux_loss)
        if means is not None and (step % self.log_every == 0 or step == self.trainer.max_steps):
            self.check_finite()
            lr = self.trainer.optimizers[0].param_groups[0]["lr"]
            global_nll, global_aux = self._global_mean(means[0]), self._global_mean(means[1])
            # not prog_bar: Lightning would read every progress-bar value at every step's end (TokensProgressBar
            # shows last_train's instead, when it redraws)
            self.log("train/loss", global_nll)
            self.log("tokens", float(tokens_seen), reduce_fx="max")
            self.log("lr", lr)
            self.last_train.update({"loss": global_nll.item(), "lr": lr, "aux_loss": global_aux.item()})
            if not self.model_cfg.is_dense:
                self.log("train/aux_loss", global_aux)
                routing = self._routing_metrics(out.routing)  # a host sync per layer: logging steps
                self.last_train.update(routing)
                self._to_loggers(routing)
        return loss

    def _step_means(self, nll: torch.Tensor, aux: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The optimizer step's mean NLL and aux loss over its micro-batches, on the device, once its last
        micro-batch is in (None before): the loss of the step's whole global batch, whatever its accumulation
        (micro-batches are equal, so the mean of their means is the batch's mean)."""
        if self._window[0] != self.global_step:
            self._window = (self.global_step, [], [])
        nlls, auxes = self._window[1], self._window[2]
        nlls.append(nll.detach())
        auxes.append(aux.detach())
        if len(nlls) < self.trainer.accumulate_grad_batches:
            return None
        self._window = (-1, [], [])
        return torch.stack(nlls).mean(), torch.stack(auxes).mean()

    def _to_loggers(self, metrics: dict[str, float]) -> None:
        """Host values straight to the trainer's loggers (rank 0's, as ``self.log``), at the step Lightning gives
        this step's ``self.log`` values (``global_step`` before the optimizer steps). Not through ``self.log``: on
        a CPU it costs about 0.7 ms a key (it moves each key's state to the value's device and forwards it), some
        30 ms per logging step for a 4-layer mixture's 48 routing metrics (docs/measurements.md)."""
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=self.global_step)

    def _track_finite(self, loss: torch.Tensor) -> None:
        """Remember, on the device, the first step whose loss is not finite, and that loss."""
        bad = ~torch.isfinite(loss.detach())
        if self._first_bad is None or self._first_bad.device != loss.device:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._bad_loss = torch.zeros((), dtype=torch.float32, device=loss.device)
        first = bad & (self._first_bad < 0)
        self._first_bad = torch.where(first, torch.full_like(self._first_bad, self.global_step), self._first_bad)
        self._bad_loss = torch.where(first, loss.detach().float(), self._bad_loss)

    def loss_finite(self) -> bool:
        """Whether every process's training loss has been finite since training began (one host sync; every
        process decides alike)."""
        if self._first_bad is None:
            return True
        mine = int(self._first_bad.item()) < 0
        return self.trainer.strategy.reduce_boolean_decision(mine, all=True) if self.trainer.world_size > 1 else mine

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteLoss` where :meth:`loss_finite` is false. Called on logging steps and before
        every validation and checkpoint, so no checkpoint holds weights trained on a loss that was not finite."""
        if self.loss_finite():
            return
        step = int(self._first_bad.item())
        where = f"{self._bad_loss.item()} at step {step}" if step >= 0 else "not finite on another process"
        raise NonFiniteLoss(
            f"training loss became {where}; the last good checkpoint is kept in stages/<run>/.work/ (re-running "
            "the same config resumes from it). To change course, lower train.lr or train.grad_clip (this restarts "
            "the stage), or check the data"
        )

    def on_validation_start(self) -> None:
        self.check_finite()

    def _routing_metrics(self, routing) -> dict[str, float]:
        """Per-layer aux losses and expert load: fraction of FFN assignments, mean attention router
        probability (with top-k attention routing, the router's preference, not the share selected),
        and each router's mean entropy relative to uniform (entropy / ln E: 1 = uniform, 0 = one expert);
        this process's part of the batch."""
        metrics: dict[str, float] = {}
        for i, r in enumerate(routing):
            for kind, probs in (("attn", r.attn_probs), ("ffn", r.ffn_probs)):
                if probs is not None and probs.shape[-1] > 1:
                    p = probs.detach().float()
                    ent = -(p * p.clamp_min(1e-30).log()).sum(-1).mean() / math.log(p.shape[-1])
                    metrics[f"entropy/{kind}/L{i}"] = float(ent)
            if r.ffn_counts is not None:
                frac = (r.ffn_counts.float() / r.ffn_counts.sum().clamp_min(1)).tolist()
                metrics.update({f"load/ffn/L{i}/e{e}": f for e, f in enumerate(frac)})
                metrics[f"aux/lb/L{i}"] = float(r.lb_loss.detach())
                metrics[f"aux/z/L{i}"] = float(r.z_loss.detach())
            if r.attn_probs is not None:
                weights = r.attn_probs.float().mean(0).tolist()
                metrics.update({f"load/attn/L{i}/e{e}": w for e, w in enumerate(weights)})
        return metrics

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        nll, _ = self._lm_loss(batch)
        self.log("val/loss", nll, prog_bar=True, sync_dist=True, batch_size=batch.size(0))

    def on_validation_epoch_end(self) -> None:
        val = self.trainer.callback_metrics.get("val/loss")
        if val is not None:
            self.log("val/ppl", torch.exp(val.float()), sync_dist=True)

    # ---- optimiser -----------------------------------------------------------------------
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        # frozen experts get no optimiser state and no decay
        named = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        decay = [p for name, p in named if clean_name(name) in self._decayed]
        no_decay = [p for name, p in named if clean_name(name) not in self._decayed]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.optim.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=self.optim.lr,
            betas=tuple(self.optim.betas),
        )
        o = self.optim
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt,
            lambda step: lr_at(step, peak=1.0, total_steps=o.total_steps, warmup_steps=o.warmup_steps,
                               min_ratio=o.min_lr_ratio),
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
