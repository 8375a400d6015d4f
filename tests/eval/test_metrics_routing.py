"""Metric arithmetic and router statistics on fake routing records."""

import math
from types import SimpleNamespace

import pytest
import torch

from bam_pipeline.eval.metrics import bits_per_byte, evaluated_bytes
from bam_pipeline.eval.routing import RoutingStats, entropy_sum, heatmap_values


def test_bits_per_byte_and_evaluated_bytes():
    assert bits_per_byte(math.log(2) * 80, 10) == pytest.approx(8.0)
    assert evaluated_bytes(1000, 400, 100) == pytest.approx(250.0)
    assert evaluated_bytes(1000, 400, 800) == 1000  # capped at the whole split


def test_entropy_sum():
    uniform = torch.full((3, 4), 0.25)
    assert entropy_sum(uniform) == pytest.approx(3 * math.log(4))
    assert entropy_sum(torch.tensor([[1.0, 0.0]])) == pytest.approx(0.0)


def layer(attn, ffn, counts):
    return SimpleNamespace(attn_probs=attn, ffn_probs=ffn, ffn_counts=counts)


def test_routing_stats_accumulate_over_batches():
    s = RoutingStats()
    a1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    a2 = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    f = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    s.update([layer(a1, f, torch.tensor([1, 1])), layer(a2, f, torch.tensor([2, 0]))])
    s.update([layer(a2, f, torch.tensor([0, 2])), layer(a2, f, torch.tensor([1, 1]))])
    out = s.summary()
    assert out["attn"]["mean_prob"][0] == pytest.approx([0.5, 0.5])
    assert out["attn"]["entropy"][0] == pytest.approx(math.log(2) / 2)  # two one-hot rows, two uniform rows
    assert out["attn"]["entropy"][1] == pytest.approx(math.log(2))
    assert out["ffn"]["fraction"][0] == pytest.approx([0.25, 0.75])
    assert out["ffn"]["fraction"][1] == pytest.approx([0.75, 0.25])
    assert out["ffn"]["mean_prob"][1] == pytest.approx([0.55, 0.45])
    for fr in out["ffn"]["fraction"]:
        assert sum(fr) == pytest.approx(1.0)


def test_dense_model_has_no_routing_and_heatmap_values_shape():
    s = RoutingStats()
    s.update([layer(None, None, None)])
    assert s.summary() == {}
    entry = {"domains": {"a": {"ffn": {"fraction": [[0.1, 0.9], [0.5, 0.5]]}}, "b": {"ffn": {"fraction": [[1, 0], [0, 1]]}}}}
    domains, layers = heatmap_values(entry, "ffn")
    assert domains == ["a", "b"]
    assert layers == [[[0.1, 0.9], [1, 0]], [[0.5, 0.5], [0, 1]]]
    assert heatmap_values(entry, "attn") == ([], [])
