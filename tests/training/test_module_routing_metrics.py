"""The mixture phase's per-layer routing metrics: router entropy relative to uniform, logged over training."""

import math
from types import SimpleNamespace

import pytest
import torch

from bam_pipeline.training.module import LMModule


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
