"""The mixture phase's per-layer routing metrics: router entropy relative to uniform, logged over training, and
handed to the loggers directly on the logging steps."""

import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader

from bam_pipeline.model.config import preset
from bam_pipeline.training.module import LMModule, OptimConfig


def test_router_entropy_is_logged_per_layer_relative_to_uniform(monkeypatch):
    module = LMModule.__new__(LMModule)
    monkeypatch.setattr(LMModule, "log_dict", lambda self, metrics: None)
    uniform, onehot = torch.full((4, 4), 0.25), torch.eye(4)
    half = torch.tensor([[0.5, 0.5, 0.0, 0.0]]).expand(4, 4)
    routing = [SimpleNamespace(attn_probs=uniform, ffn_probs=onehot, ffn_counts=None),
               SimpleNamespace(attn_probs=half, ffn_probs=None, ffn_counts=None)]
    m = LMModule._routing_metrics(module, routing)
    assert m["entropy/attn/L0"] == pytest.approx(1.0)
    assert m["entropy/ffn/L0"] == pytest.approx(0.0, abs=1e-6)
    assert m["entropy/attn/L1"] == pytest.approx(math.log(2) / math.log(4))
    assert "entropy/ffn/L1" not in m


class Captured(Logger):
    """A Lightning logger that keeps every (step, metrics) it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    name, version = "captured", 0

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def test_routing_metrics_reach_the_loggers_at_the_logging_steps_beside_the_loss_not_through_self_log():
    cfg = preset("smoke").replace(attn_experts=2, ffn_experts=2)
    torch.manual_seed(0)
    module = LMModule(cfg, OptimConfig(lr=1e-3, total_steps=4, warmup_steps=1), log_every=2)
    logger = Captured()
    trainer = L.Trainer(max_steps=4, accelerator="cpu", devices=1, logger=logger, log_every_n_steps=2,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    rows = torch.randint(0, cfg.vocab_size, (16, 17), generator=torch.Generator().manual_seed(0))
    trainer.fit(module, train_dataloaders=DataLoader(list(rows), batch_size=4))
    steps = {key: sorted(step for step, m in logger.rows if key in m) for key in ("train/loss", "load/ffn/L0/e0")}
    assert steps["train/loss"] == steps["load/ffn/L0/e0"] == [1, 3]  # logging steps 2 and 4, Lightning's step - 1
    routing = next(m for _, m in logger.rows if "load/ffn/L0/e0" in m)
    assert set(routing) == {k for k in module.last_train if k.startswith(("load/", "entropy/", "aux/"))}
    assert not any(k.startswith(("load/", "entropy/", "aux/")) for k in trainer.callback_metrics)  # not self.log
