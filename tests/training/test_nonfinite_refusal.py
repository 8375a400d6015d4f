"""A training stage never publishes a model whose weights or final validation loss are not finite: the
refusal names what is not finite, the settings that change it and what its work directory keeps; and no
checkpoint is written while a weight is not finite, so the last good one stays."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from bam_pipeline.config.files import conf_dir
from bam_pipeline.config.reading import read_section
from bam_pipeline.model import BAMTransformer, preset
from bam_pipeline.store.layout import RunLayout
from bam_pipeline.training.budget import plan_budget
from bam_pipeline.training.job import CKPT_DIR, TrainJob, nonfinite_refusal
from bam_pipeline.training.module import LMModule, OptimConfig
from bam_pipeline.training.settings import TrainSettings


def _job(tmp_path, stage: str, lr: float = 1e30) -> TrainJob:
    section = OmegaConf.load(conf_dir() / "config.yaml").train  # the shipped defaults
    section.merge_with({"seq_len": 64, "warmup_frac": 0.0})
    cfg = preset("smoke")
    return TrainJob(stage, "main" if stage == "seed" else "bam", RunLayout(tmp_path / "run"), cfg, None, {},
                    plan_budget(512, cfg, seq_len=64, tokens_per_step=256), lr,
                    read_section(TrainSettings, section, "train"))


def _state(dtype=torch.float32) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) for k, v in BAMTransformer(preset("smoke")).state_dict().items()}


def test_finite_weights_and_loss_are_published(tmp_path):
    state = _state()
    assert nonfinite_refusal(_job(tmp_path, "seed"), state, 5.5, master=state, precision="32-true", steps=2,
                             work=tmp_path) is None
    assert nonfinite_refusal(_job(tmp_path, "seed"), state, None, master=state, precision="32-true", steps=2,
                             work=tmp_path) is None  # train.val_tokens=0: no validation loss


@pytest.mark.parametrize("stage, precision, facts, absent", [
    ("seed", "32-true", ["seed: not published", "train.lr ", "1e+30", "train.warmup_frac=0"],
     ["trainer.precision", "lr_scale"]),
    ("branch", "bf16-mixed", ["branch/bam: not published", "train.branch_lr_scale", "trainer.precision=32-true"], []),
    ("moe", "16-mixed", ["moe/bam: not published", "train.moe_lr_scale", "instead of 16-mixed"], []),
])
def test_weights_that_are_not_finite_name_the_settings_to_change(tmp_path, stage, precision, facts, absent):
    state = _state()
    state["tok_emb.weight"][0, :3] = math.nan
    state["norm.weight"][:] = math.inf
    msg = nonfinite_refusal(_job(tmp_path, stage), state, math.nan, master=state, precision=precision, steps=2,
                            work=tmp_path / "work")
    assert "after 2 steps its weights hold 35 non-finite values in 2 tensors (first tok_emb.weight)" in msg
    assert "its final validation loss is nan" in msg
    assert f"{tmp_path / 'work'} keeps its train log and no checkpoint with finite weights" in msg
    assert all(f in msg for f in facts) and not any(a in msg for a in absent), msg


def test_a_loss_that_is_not_finite_alone_is_refused_and_the_kept_checkpoint_named(tmp_path):
    (tmp_path / CKPT_DIR).mkdir()
    torch.save({"global_step": 4, "state_dict": _state()}, tmp_path / CKPT_DIR / "step=4.ckpt")
    (tmp_path / CKPT_DIR / "step=8.ckpt").write_bytes(b"cut sho")  # unreadable: never named as the one kept
    state = _state()
    msg = nonfinite_refusal(_job(tmp_path, "seed"), state, math.inf, master=state, precision="32-true", steps=8,
                            work=tmp_path)
    assert "after 8 steps its final validation loss is inf" in msg and "weights" not in msg.split(";")[0]
    assert "keeps its train log and its newest checkpoint with finite weights (step=4.ckpt)" in msg


def test_weights_that_outgrow_the_artifacts_dtype_name_the_dtype(tmp_path):
    """Finite float32 master weights beyond float16's range (a float16 import trained on) become infinite
    once cast to the artifact's dtype: the refusal says so instead of blaming the learning rate."""
    master = _state()
    master["norm.weight"][:4] = 1e5  # float16 tops out at 65504
    state = {k: v.to(torch.float16) for k, v in master.items()}
    msg = nonfinite_refusal(_job(tmp_path, "moe", lr=1e-3), state, 3.0, master=master, precision="32-true", steps=2,
                            work=tmp_path)
    assert "4 non-finite values in 1 tensor (first norm.weight) once cast to float16" in msg
    assert "seed.dtype=bfloat16 or float32" in msg and "warmup" not in msg


def test_the_module_sees_a_weight_that_is_not_finite():
    module = LMModule(preset("smoke"), OptimConfig(lr=1e-3, total_steps=2, warmup_steps=0))

    class Single:  # the strategy of a one-process trainer: its decision is everyone's
        @staticmethod
        def reduce_boolean_decision(decision, all=True):
            return decision

    module._trainer = type("T", (), {"strategy": Single()})()
    assert module.weights_finite()
    with torch.no_grad():
        module.model.layers[1].ffn.w2.view(-1)[7] = math.nan
    assert not module.weights_finite()
