"""Router statistics per layer: mean soft attention weight per expert, fraction of FFN token
assignments per expert, and mean router entropy (nats), accumulated over batches.

Reads ``ModelOutput.routing`` (one ``LayerRouting`` per layer with ``attn_probs`` (N, E_a),
``ffn_probs`` (N, E_f), ``ffn_counts`` (E_f,); None where the layer has no such router).
"""

from __future__ import annotations

from typing import Any

import torch

ROUTER_KINDS = ("attn", "ffn")


def entropy_sum(probs: torch.Tensor) -> float:
    """Sum over rows of the entropy (nats) of each row of ``probs`` (N, E)."""
    p = probs.float()
    return float(-(p * torch.log(p.clamp_min(1e-30))).sum())


class RoutingStats:
    """Accumulates one model's router statistics on one domain's data."""

    def __init__(self) -> None:
        self.prob_sum: dict[str, list[torch.Tensor]] = {"attn": [], "ffn": []}
        self.entropy: dict[str, list[float]] = {"attn": [], "ffn": []}
        self.tokens: dict[str, list[int]] = {"attn": [], "ffn": []}
        self.counts: list[torch.Tensor] = []

    def _add(self, kind: str, i: int, probs: torch.Tensor) -> None:
        s, h, n = probs.float().sum(0).cpu(), entropy_sum(probs), probs.shape[0]
        if i == len(self.prob_sum[kind]):
            self.prob_sum[kind].append(s)
            self.entropy[kind].append(h)
            self.tokens[kind].append(n)
        else:
            self.prob_sum[kind][i] += s
            self.entropy[kind][i] += h
            self.tokens[kind][i] += n

    def update(self, routing: list[Any]) -> None:
        """Add one batch's per-layer routing."""
        for i, layer in enumerate(routing):
            if layer.attn_probs is not None:
                self._add("attn", i, layer.attn_probs)
            if layer.ffn_probs is not None:
                self._add("ffn", i, layer.ffn_probs)
            if layer.ffn_counts is not None:
                c = layer.ffn_counts.detach().double().cpu()
                if i == len(self.counts):
                    self.counts.append(c)
                else:
                    self.counts[i] += c

    def summary(self) -> dict[str, dict[str, Any]]:
        """JSON-ready stats; per kind lists are indexed by layer. Empty kinds are omitted."""
        out: dict[str, dict[str, Any]] = {}
        if self.prob_sum["attn"]:
            out["attn"] = {
                "mean_prob": [(s / n).tolist() for s, n in zip(self.prob_sum["attn"], self.tokens["attn"])],
                "entropy": [h / n for h, n in zip(self.entropy["attn"], self.tokens["attn"])],
                "tokens": self.tokens["attn"][0],
            }
        if self.prob_sum["ffn"] or self.counts:
            out["ffn"] = {
                "fraction": [(c / c.sum()).tolist() for c in self.counts],
                "mean_prob": [(s / n).tolist() for s, n in zip(self.prob_sum["ffn"], self.tokens["ffn"])],
                "entropy": [h / n for h, n in zip(self.entropy["ffn"], self.tokens["ffn"])],
                "tokens": self.tokens["ffn"][0] if self.tokens["ffn"] else 0,
            }
        return out


def heatmap_values(model_routing: dict[str, Any], kind: str) -> tuple[list[str], list[list[list[float]]]]:
    """(domains, per-layer matrices (domain x expert)) of one model's routing.json entry for a router kind:
    mean soft weight for attention, fraction of assignments for the FFN."""
    key = "mean_prob" if kind == "attn" else "fraction"
    domains = [d for d, stats in model_routing["domains"].items() if kind in stats]
    if not domains:
        return [], []
    n_layers = len(model_routing["domains"][domains[0]][kind][key])
    return domains, [[model_routing["domains"][d][kind][key][i] for d in domains] for i in range(n_layers)]
