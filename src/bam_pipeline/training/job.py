"""One training stage's job: Lightning Trainer, resumable work directory, published artifact.

The work directory (``RunLayout.work(stage, name)``) holds Lightning checkpoints and the growing
train log. It is tied to the stage's config hash: a re-run with the same config resumes from the
newest complete checkpoint; a different config starts afresh. Checkpoints are ``step=<n>.ckpt``
every ``train.val_every`` steps (the previous one is removed only after the next is complete),
``stop-step=<n>.ckpt`` on a stop signal and Lightning's SLURM ``hpc_ckpt_<n>.ckpt``; each is a file,
or under fsdp/fsdp2 a directory of shards that is complete once its ``meta.pt`` exists. On success
the model is published atomically to ``RunLayout.artifact(stage, name)`` and the work directory is
removed. The manifest records where the wall time went (train, validation, checkpoint, publish)
and, for a distributed run, each rank's bytes of parameters, gradients and optimizer state.
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
import signal
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from bam_pipeline.errors import BamError
from bam_pipeline.ranks import current_ranks
from bam_pipeline.model.config import ModelConfig
from bam_pipeline.store import artifacts as A
from bam_pipeline.store.files import canonical_hash, read_jsonl, write_json, write_text
from bam_pipeline.store.layout import RunLayout, label
from bam_pipeline.training.budget import Budget
from bam_pipeline.training.dispatch import ChooseDispatch
from bam_pipeline.training.host_memory import keep_freed_memory
from bam_pipeline.training.loggers import close_logger, make_logger
from bam_pipeline.training.module import LMModule, OptimConfig, StepOptions
from bam_pipeline.training.parallel import ShardingReport, full_state_dict, trainer_kwargs
from bam_pipeline.training.preemption import Stopped, defer, received
from bam_pipeline.training.schedule import warmup_steps_for
from bam_pipeline.training.settings import BatchSplit, TrainerSpec, TrainSettings
from bam_pipeline.training.throughput import PhaseTimer, peak_tflops

FINGERPRINT = "fingerprint.json"
CKPT_DIR = "checkpoints"


FULL_PRECISION = "32-true"
_PRECISION_ALIASES = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "64": "64-true"}  # Lightning's


def precision_name(precision: str | int) -> str:
    """Lightning's full name of a ``trainer.precision`` value (``32`` and ``32-true`` train alike)."""
    return _PRECISION_ALIASES.get(str(precision), str(precision))


@dataclass(frozen=True)
class TrainJob:
    """One stage's training, resolved from its inputs and the typed settings."""

    stage: str
    name: str
    layout: RunLayout
    model_cfg: ModelConfig
    init: A.Artifact | None  # the model the stage starts from (None: random initialisation)
    proportions: dict[str, float]
    budget: Budget
    lr: float  # the stage's peak learning rate
    train: TrainSettings
    freeze_experts: bool = False  # train routers and averaged weights only (mix variant's freeze_experts)
    precision: str = FULL_PRECISION  # trainer.precision: what the forward and backward compute in
    devices: int = 1  # processes that train it together (trainer.devices x trainer.num_nodes)

    @property
    def label(self) -> str:
        return label(self.stage, self.name)

    @property
    def batch_split(self) -> BatchSplit:
        """train.global_batch_tokens over the devices: each one's micro-batch and accumulation (the manifest's
        ``batch``; not the identity)."""
        return self.train.split(self.devices)

    @property
    def optim(self) -> OptimConfig:
        t = self.train
        return OptimConfig(
            lr=self.lr, total_steps=self.budget.steps,
            warmup_steps=warmup_steps_for(self.budget.steps, t.warmup_frac, t.warmup_steps_max),
            min_lr_ratio=t.min_lr_ratio, weight_decay=t.weight_decay, betas=tuple(t.betas),
        )

    def identity(self, inputs: dict[str, A.Artifact]) -> dict[str, Any]:
        """What the stage's result depends on (not the logger or device layout): its config hash.

        The batch is the global one, in sequences per optimizer step, whatever the devices, micro-batch and
        accumulation that train it (rank r takes every world-th row of one seeded order, so each step sees the
        same sequences: :mod:`bam_pipeline.data.datamodule`). It is spelt as the one-device batch it equals
        (``batch_size`` = the step's sequences, ``accumulate`` = 1), the form the identity had before the global
        batch was configured, so artifacts trained on one device without accumulation keep their hashes. The
        split goes to the manifest (:attr:`batch_split`).

        One exception: a mixture's routing statistics are taken over one forward's batch, not the whole step's:
        the load-balancing f_i over every device's micro-batch, an expert-choice expert's tokens from its own
        device's. Where that routing batch is smaller than the step, it changes what an MoE stage trains, so its
        identity records it (``routing_batch``, in sequences); a dense model's does not depend on it."""
        t, split = self.train, self.batch_split
        routing = split.micro_batch if self.model_cfg.ffn_router.kind == "expert_choice" else split.routing_batch
        return {
            "model": self.model_cfg.to_dict(),
            "proportions": self.proportions,
            "budget": self.budget.identity(),
            "optim": asdict(self.optim),
            "train": {"seq_len": t.seq_len, "batch_size": t.step_sequences, "accumulate": 1, "seed": t.seed,
                      "grad_clip": t.grad_clip,
                      **({"routing_batch": routing} if routing != t.step_sequences and not self.model_cfg.is_dense
                         else {})},
            # windows and row order are seeded by (seed, stage, source name); stages built when they
            # were seeded otherwise are stale
            "data_order": "seed,stage,source",
            "inputs": {k: a.hash for k, a in inputs.items()},
            **({"freeze_experts": True} if self.freeze_experts else {}),
            # other weights: a stage trained in bf16 is not the one trained in float32. Recorded when not the
            # default, so artifacts trained in float32 before it was recorded keep their identity
            **({"precision": precision_name(self.precision)} if precision_name(self.precision) != FULL_PRECISION
               else {}),
        }


class TrainLogWriter(Callback):
    """Appends train and validation rows to the work directory's train_log.jsonl (rank 0 only)."""

    def __init__(self, path: Path, log_every: int):
        self.path = path
        self.log_every = log_every

    def _append(self, trainer: L.Trainer, row: dict[str, Any]) -> None:
        if trainer.is_global_zero:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def on_train_start(self, trainer, pl_module):
        # after a resume, drop rows logged past the restored step (they will be trained again)
        if trainer.is_global_zero and self.path.exists():
            kept = [r for r in read_jsonl(self.path) if r["step"] <= trainer.global_step]
            write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # inside an accumulation window: no optimizer step yet
        step = trainer.global_step
        if step % self.log_every == 0 or step == trainer.max_steps:
            self._append(trainer, pl_module.last_train)

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        val = trainer.callback_metrics.get("val/loss")
        if val is not None:
            tokens = pl_module.last_train.get("tokens", 0)
            self._append(trainer, {"step": trainer.global_step, "tokens": tokens, "val_loss": float(val)})


class TokensProgressBar(TQDMProgressBar):
    """Progress bar over optimizer steps that shows tokens seen and tokens/s; its bars end their line
    when the fit stops on an exception, so the error line that follows stands on its own."""

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        for bar in (self._val_progress_bar, self._train_progress_bar):
            if bar is not None and not bar.disable:
                bar.close()

    def get_metrics(self, trainer, pl_module):
        """The validation values Lightning keeps, and the training values of the last logging step (the module's
        ``last_train``, read on the device only there), when the bar redraws (on logging steps)."""
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        last = getattr(pl_module, "last_train", {})
        if "loss" in last:
            items["train/loss"] = f"{last['loss']:.3f}"
        if "tokens" in last:
            items["tokens"] = f"{float(last['tokens']):,.0f}"
        if "tokens_per_s" in last:
            items["tok_s"] = f"{float(last['tokens_per_s']):,.0f}"
        return items


class CheckpointOnStop(Callback):
    """Defers stop signals while the fit runs; on Lightning's stop-at-step-end (a SIGTERM) saves a
    resumable checkpoint ``stop-step=<n>.ckpt`` into ``folder`` (a new name: a checkpoint killed
    while being written never replaces a complete one)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.saved_at: int | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        defer(True)

    def on_fit_end(self, trainer, pl_module) -> None:
        defer(False)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        defer(False)
        # no checkpoint of weights that are not finite, or trained on a loss that was not: the rerun resumes from an
        # older one
        finite = getattr(pl_module, "weights_finite", lambda: True)
        loss_finite = getattr(pl_module, "loss_finite", lambda: True)
        if isinstance(exception, SIGTERMException) and loss_finite() and finite():
            trainer.save_checkpoint(self.folder / f"stop-step={trainer.global_step}.ckpt")
            self.saved_at = trainer.global_step


class TimedCheckpoint(ModelCheckpoint):
    """Lightning's periodic checkpoint, its writing time added to a :class:`PhaseTimer`; none is written while
    a weight is not finite, so the previous one, the last good checkpoint, stays (Lightning removes it only
    once its successor is written) and a rerun never resumes from weights that are not finite."""

    def __init__(self, timer: PhaseTimer, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.timer = timer

    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        trainer.lightning_module.check_finite()  # a loss that was not finite since the last check: stop here
        if trainer.lightning_module.weights_finite():  # every rank decides alike
            super()._save_topk_checkpoint(trainer, monitor_candidates)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        t0 = time.perf_counter()
        super()._save_checkpoint(trainer, filepath)
        self.timer.add_checkpoint(time.perf_counter() - t0)


def complete_checkpoint(path: Path) -> bool:
    """A checkpoint file (written atomically), or a sharded checkpoint directory whose ``meta.pt``,
    written after every shard, exists."""
    return path.is_file() or (path.is_dir() and (path / _METADATA_FILENAME).is_file())


def _prepare_work_dir(work: Path, config_hash: str) -> Path | None:
    """Reset the work dir unless it belongs to this exact config; return the newest complete
    checkpoint to resume from (periodic, saved on a stop signal, or Lightning's SLURM one)."""
    fp = work / FINGERPRINT
    if work.exists():
        try:
            same = json.loads(fp.read_text()).get("config_hash") == config_hash
        except (OSError, ValueError):
            same = False  # no or unreadable fingerprint: not this config's work
        if not same:
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    write_json(fp, {"config_hash": config_hash})
    return newest_checkpoint(work)


def newest_checkpoint(work: Path) -> Path | None:
    """The newest complete checkpoint of a work directory (periodic, saved on a stop signal, or Lightning's
    SLURM one), or None."""
    newest_first = checkpoints_newest_first(work)
    for path in newest_first:
        why = unreadable_checkpoint(path)
        if why is None:
            return path
        print(f"not resuming from {path}: {why}; trying an older checkpoint")
    if newest_first:
        raise BamError(f"no readable checkpoint to resume from in {work} (the newest, {newest_first[0].name}: "
                       f"{unreadable_checkpoint(newest_first[0])}); delete {work} to train this stage from the start")
    return None


def checkpoints_newest_first(work: Path) -> list[Path]:
    """The complete checkpoints of a work directory (periodic, saved on a stop signal, or Lightning's SLURM one),
    the newest first."""
    found = [p for p in [*(work / CKPT_DIR).glob("*.ckpt"), *work.glob("hpc_ckpt_*.ckpt")] if complete_checkpoint(p)]
    return sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True)


def unreadable_checkpoint(path: Path) -> str | None:
    """Why the checkpoint file ``path`` cannot be resumed from (None: it can), read as Lightning will: tensors
    and plain values only, never unpickling an object (a sharded checkpoint directory is left to its loader)."""
    if not path.is_file():
        return None
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        return "it holds objects other than tensors and plain values, which are never unpickled (changed or tampered)"
    except Exception as e:  # torch raises RuntimeError, EOFError, ValueError ... for a cut or garbled file
        return f"truncated or corrupt ({type(e).__name__})"
    return None


def check_world_size(trainer: L.Trainer, job: TrainJob) -> None:
    """The accumulation was planned for a number of processes; refuse to train with another one."""
    split = job.batch_split
    actual = trainer.world_size * split.micro_batch * split.accumulate * split.seq_len
    if actual != job.budget.tokens_per_step:
        raise BamError(
            f"{job.label}: planned {job.budget.tokens_per_step:,} tokens per step over {job.devices} process(es) "
            f"but the trainer runs {trainer.world_size} ({actual:,} tokens per step); give trainer.devices and "
            "trainer.num_nodes as integers matching the processes launched"
        )


def extra_callbacks(cfgs: dict[str, dict[str, Any]]) -> list[Callback]:
    """The ``callbacks:`` section's Lightning callbacks, instantiated; a BamError naming one that cannot be."""
    from hydra.utils import instantiate

    out = []
    for name, cfg in cfgs.items():
        try:
            cb = instantiate(cfg, _convert_="all")
        except Exception as e:  # hydra wraps the import or constructor error
            cause = " ".join(str(e.__cause__ or e).split())[:200]
            raise BamError(f"callbacks.{name}: cannot build {cfg['_target_']} ({cause}); fix its _target_ and "
                           f"arguments, or switch it off with callbacks.{name}=null") from None
        if not isinstance(cb, Callback):
            raise BamError(f"callbacks.{name}: {cfg['_target_']} is not a Lightning Callback; name a subclass of "
                           "lightning.pytorch.callbacks.Callback")
        out.append(cb)
    return out


@dataclass
class StageFit:
    """One training stage's Lightning objects, built as the stage trains them (:func:`build_fit`): ``make bench``
    times ``trainer.fit(module, datamodule=data)`` with the same objects."""

    module: LMModule
    data: Any  # bam_pipeline.data.datamodule.MixtureDataModule
    logger: Any  # a Lightning logger, or None
    trainer: L.Trainer
    timer: PhaseTimer
    on_stop: CheckpointOnStop
    sharding: ShardingReport
    dispatch: ChooseDispatch


def build_fit(job: TrainJob, *, prepared, trainer_spec: TrainerSpec, logger_cfg: dict | None,
              stage_config: dict[str, Any], init_state: dict[str, torch.Tensor] | None, work: Path,
              extra: Sequence[Callback] = ()) -> StageFit:
    """The module (from ``init_state``, else a seeded random initialisation), the data, the logger (which records
    ``stage_config``, the stage's identity), the callbacks (``extra`` last) and the trainer of ``job``, with ``work``
    as its work directory; the RNGs seeded first."""
    from bam_pipeline.data.datamodule import MixtureDataModule

    t, batch = job.train, job.batch_split
    accumulate = batch.accumulate
    L.seed_everything(t.seed, workers=True, verbose=False)
    options = StepOptions(chunking=t.loss_chunking, trainer=trainer_spec, compile=t.compile)
    module = LMModule(job.model_cfg, job.optim, init_state, log_every=t.log_every, options=options,
                      freeze_experts=job.freeze_experts)
    data = MixtureDataModule(
        prepared, job.proportions, seq_len=t.seq_len, batch_size=batch.micro_batch,
        train_tokens=job.budget.tokens, val_tokens=t.val_tokens, seed=t.seed,
        order_key=job.stage, num_workers=t.num_workers,
    )
    logger = make_logger(logger_cfg, run=job.layout.run, stage=job.stage, name=job.name, config=stage_config)
    timer = PhaseTimer(batch.micro_batch * t.seq_len * trainer_spec.world_size,
                       job.budget.train_flops / job.budget.tokens, peak_tflops(t.peak_tflops), t.log_every)
    # the newest periodic checkpoint only: Lightning removes the previous one once this one is written
    ckpt = TimedCheckpoint(timer, dirpath=work / CKPT_DIR, filename="{step}", save_top_k=1,
                           every_n_train_steps=t.val_every)
    on_stop = CheckpointOnStop(work / CKPT_DIR)
    sharding = ShardingReport()
    dispatch = ChooseDispatch(t.moe_dispatch, work, batch.micro_batch * t.seq_len, str(trainer_spec.precision), job.label)
    trainer = _trainer(
        trainer_kwargs(trainer_spec),
        max_steps=job.budget.steps,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=t.grad_clip,
        # Lightning counts validation intervals in micro-batches, checkpoints in optimizer steps
        val_check_interval=min(t.val_every, job.budget.steps) * accumulate,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        limit_val_batches=0 if t.val_tokens == 0 else None,  # train.val_tokens=0: no validation
        log_every_n_steps=t.log_every,
        logger=logger if logger is not None else False,
        callbacks=[dispatch, timer, ckpt, on_stop, sharding, TrainLogWriter(work / A.TRAIN_LOG, t.log_every),
                   TokensProgressBar(refresh_rate=t.log_every * accumulate), *extra],  # redrawn on logging steps
        enable_model_summary=False,
        default_root_dir=str(work),
    )
    check_world_size(trainer, job)
    return StageFit(module, data, logger, trainer, timer, on_stop, sharding, dispatch)


def train_and_publish(job: TrainJob, *, prepared, trainer_spec: TrainerSpec, logger_cfg: dict | None,
                      inputs: dict[str, A.Artifact], describe: dict[str, Any],
                      callback_cfgs: dict[str, dict[str, Any]] | None = None) -> A.Artifact | None:
    """Train ``job`` (resuming when possible) and publish the model artifact (rank 0).

    ``describe`` adds the model's description (display name, role) to the manifest; ``callback_cfgs``
    are the ``callbacks:`` section's extra Lightning callbacks. Returns the artifact on rank 0 and None
    on other ranks.
    """
    t = job.train
    extra = extra_callbacks(callback_cfgs or {})  # a bad one refused before any work
    stage_config = job.identity(inputs)
    init_state = A.load_state(job.init)[1] if job.init is not None else None  # checksums verified first
    # the artifact keeps its input's dtype (a bfloat16 import stays bfloat16); training runs in float32
    # master weights whatever trainer.precision computes in
    # (its floating tensors': integer buffers such as a hash router's table keep their own)
    dtype = next((v.dtype for v in init_state.values() if v.is_floating_point()), torch.float32) if init_state \
        else torch.float32
    work = job.layout.work(job.stage, job.name)
    resume = _prepare_work_dir(work, canonical_hash(stage_config))
    if resume is not None:
        print(f"{job.label}: resuming from {resume}")
    if t.keep_host_memory and trainer_spec.accelerator == "cpu" and keep_freed_memory():
        print(f"{job.label}: host memory kept for reuse for the rest of this process "
              "(train.keep_host_memory=false to leave libc's defaults)")
    fit = build_fit(job, prepared=prepared, trainer_spec=trainer_spec, logger_cfg=logger_cfg,
                    stage_config=stage_config, init_state=init_state, work=work, extra=extra)
    trainer, logger, timer, on_stop, sharding, dispatch = (fit.trainer, fit.logger, fit.timer, fit.on_stop,
                                                           fit.sharding, fit.dispatch)
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            # MixtureDataModule restores the data position itself (its state_dict), which Lightning's
            # check for resumable *dataloaders* does not see; and Lightning 2.6 still calls a torch
            # pytree API that torch 2.13 deprecates.
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
            trainer.fit(fit.module, datamodule=fit.data, ckpt_path=str(resume) if resume else None)
    except SIGTERMException:
        signum = received()
        name = signal.Signals(signum).name
        if on_stop.saved_at is None:  # the weights were not finite: no checkpoint of them (CheckpointOnStop)
            raise Stopped(signum, f"{job.label}: stopped by {name} at step {trainer.global_step} of {job.budget.steps}, "
                                  "whose weights are not finite, so none was saved there; run the same command again "
                                  f"to resume from the last good checkpoint in {work / CKPT_DIR}, or lower train.lr"
                          ) from None
        raise Stopped(signum, f"{job.label}: stopped by {name} after step {on_stop.saved_at} of "
                              f"{job.budget.steps}; a resumable checkpoint is in {work / CKPT_DIR}; run the same "
                              "command again to resume") from None
    finally:
        defer(False)
        close_logger(logger)
    t_publish = time.perf_counter()
    # a collective under fsdp/fsdp2 (full weights gathered from the shards): every rank calls it
    full_state = full_state_dict(trainer)
    state, metrics, refusal = {}, {}, None
    if trainer.is_global_zero:
        # floating tensors in the artifact's dtype; integer buffers (a hash router's table) as they are
        state = {k.removeprefix("model."): (v.detach().to(dtype) if v.is_floating_point() else v.detach()).cpu()
                 for k, v in full_state.items()}
        metrics = _train_metrics(read_jsonl(work / A.TRAIN_LOG))
        refusal = nonfinite_refusal(job, state, metrics["final_val_loss"], master=full_state,
                                    precision=trainer_spec.precision, steps=trainer.global_step, work=work)
    ranks = current_ranks(trainer_spec.collective_timeout_s)
    refusal = ranks.broadcast(refusal, f"rank 0 to check the trained weights of {job.label}")  # all stop, or none
    if refusal is not None:
        raise NonFiniteModel(refusal)
    published = f"rank 0 to publish {job.label}"
    if not trainer.is_global_zero:
        ranks.barrier(published)  # wait until rank 0 has published the artifact
        return None
    out_dir = job.layout.artifact(job.stage, job.name)
    with A.publish(out_dir) as tmp:
        A.save_model(tmp, job.model_cfg, state)
        if (work / A.TRAIN_LOG).exists():
            shutil.copy(work / A.TRAIN_LOG, tmp / A.TRAIN_LOG)
        now = time.perf_counter()
        split = timer.split(total=now - t0, publish=now - t_publish)
        A.write_manifest(
            tmp, stage=job.stage, name=job.name, run=job.layout.run, config=stage_config, inputs=inputs,
            tokenizer_hash=prepared.tokenizer_hash, metrics=metrics,
            tokens=job.budget.tokens, flops=job.budget.train_flops, budget=asdict(job.budget),
            wall_time_s=split["total_s"], wall_time=split, resumed=resume is not None,
            trainer=trainer_spec.to_dict(), batch=job.batch_split.to_dict(), sharding=sharding.summary,
            **({"moe_dispatch": dispatch.chosen.to_dict()} if dispatch.chosen is not None else {}),
            **({"compile": fit.module.compiled.record()} if fit.module.compiled is not None else {}), **describe,
        )
    shutil.rmtree(work, ignore_errors=True)
    parts = ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in split.items() if k != "total_s")
    val = "" if metrics["final_val_loss"] is None else f", final validation loss {metrics['final_val_loss']:.4f}"
    print(f"{job.label}: done in {split['total_s']:.1f} s ({parts}){val} -> {out_dir}")
    ranks.barrier(published)
    return A.read_artifact(out_dir)


class NonFiniteModel(BamError):
    """A training stage's final weights or validation loss are not finite: nothing is published."""


LR_SCALE = {"branch": "train.branch_lr_scale", "moe": "train.moe_lr_scale"}  # the stage's lr = train.lr x this
WIDE_PRECISIONS = (FULL_PRECISION, "64-true")  # no mixed-precision overflow to blame


def nonfinite_refusal(job: TrainJob, state: dict[str, torch.Tensor], val_loss: float | None, *,
                      master: dict[str, torch.Tensor], precision: str, steps: int, work: Path) -> str | None:
    """Why ``job``'s trained model is not published, or None when every tensor of ``state`` (the artifact's,
    in its dtype) and the final validation loss are finite: what is not finite, the settings that change
    it, and what stays in the work directory ``work``. ``master``: the float32 weights ``state`` was cast
    from; when they are finite, the cast to the artifact's dtype made the values that are not."""
    bad = A.nonfinite_values(state)
    loss_bad = val_loss is not None and not math.isfinite(val_loss)
    if not bad and not loss_bad:
        return None
    what, fix = [], ""
    if bad:
        dtype = str(next(v.dtype for k, v in state.items() if k in bad)).removeprefix("torch.")
        cast = not A.nonfinite_values(master)  # the float32 weights are finite: the cast made the values that are not
        what.append(f"its weights hold {A.describe_nonfinite(bad)}" + (f" once cast to {dtype}" if cast else ""))
        if cast:
            fix = (f"the trained weights outgrow {dtype}, the dtype of its input: import the seed in a wider dtype "
                   "(seed.dtype=bfloat16 or float32), or lower train.lr")
    if loss_bad:
        what.append(f"its final validation loss is {val_loss}")
    if not fix:
        scale = f" or {LR_SCALE[job.stage]}" if job.stage in LR_SCALE else ""
        fix = (f"lower train.lr{scale} (this stage's peak learning rate is {job.lr:g}) or warm up for longer "
               f"(train.warmup_frac={job.train.warmup_frac:g})")
        if precision_name(precision) not in WIDE_PRECISIONS:
            fix += f", or train in float32 (trainer.precision=32-true instead of {precision})"
    kept = next((p for p in checkpoints_newest_first(work) if unreadable_checkpoint(p) is None), None)
    keeps = f"its newest checkpoint with finite weights ({kept.name})" if kept else "no checkpoint with finite weights"
    return (f"{job.label}: not published: after {steps} steps {' and '.join(what)}; {fix}. {work} keeps its train "
            f"log and {keeps}")


def _trainer(trainer_kwargs: dict, **settings: Any) -> L.Trainer:
    """A Lightning Trainer from the ``trainer:`` section's arguments and the job's settings; a
    BamError when Lightning refuses the combination."""
    try:
        return L.Trainer(**trainer_kwargs, **settings)
    except (MisconfigurationException, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BamError(f"Lightning refuses the trainer settings {trainer_kwargs}: {first}; fix trainer= / "
                       "trainer.* (e.g. trainer=cpu on a machine without a GPU)") from None


def _train_metrics(log_rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Final train and validation loss, median training tokens/s (training steps only), from a train log."""
    train_rows = [r for r in log_rows if "loss" in r]
    val_rows = [r for r in log_rows if "val_loss" in r]
    tok_s = [r["tokens_per_s"] for r in train_rows if math.isfinite(r.get("tokens_per_s", math.nan))]
    return {
        "final_train_loss": train_rows[-1]["loss"] if train_rows else None,
        "final_val_loss": val_rows[-1]["val_loss"] if val_rows else None,
        "tokens_per_s": float(sorted(tok_s)[len(tok_s) // 2]) if tok_s else None,
    }
