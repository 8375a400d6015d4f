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


def onehot(idx, e=3):
    return torch.nn.functional.one_hot(torch.tensor(idx), e).float()


def test_agreement_between_layers_and_between_attention_and_ffn_with_chance_levels():
    s = RoutingStats()
    # 4 tokens, 3 experts. FFN tops: layer 0 [0,1,2,0], layer 1 [0,1,1,0] -> 3 of 4 agree.
    # attention tops: layer 0 [0,1,2,2] (= FFN on 3 of 4), layer 1 [2,2,2,2] (= FFN on 0 of 4)
    l0 = layer(onehot([0, 1, 2, 2]), onehot([0, 1, 2, 0]), torch.tensor([2, 1, 1]))
    l1 = layer(onehot([2, 2, 2, 2]), onehot([0, 1, 1, 0]), torch.tensor([2, 2, 0]))
    s.update([l0, l1])
    out = s.summary()
    assert out["ffn"]["agree_next_layer"] == pytest.approx([0.75])
    # chance: marginals f0 = (2,1,1)/4, f1 = (2,2,0)/4 -> 0.5*0.5 + 0.25*0.5 + 0 = 0.375
    assert out["ffn"]["agree_next_layer_chance"] == pytest.approx([0.375])
    assert out["attn"]["agree_next_layer"] == pytest.approx([0.5])  # [0,1,2,2] vs [2,2,2,2]
    assert out["attn"]["agree_with_ffn"] == pytest.approx([0.75, 0.0])
    # layer 0: attention marginals (1,1,2)/4, FFN (2,1,1)/4 -> 0.125 + 0.0625 + 0.125
    assert out["attn"]["agree_with_ffn_chance"] == pytest.approx([0.3125, 0.0])


def test_attention_and_ffn_over_different_experts_are_not_compared():
    s = RoutingStats()
    s.update([layer(onehot([0, 1], 2), onehot([0, 1], 3), torch.tensor([1, 1, 0]))])
    assert "agree_with_ffn" not in s.summary()["attn"]
