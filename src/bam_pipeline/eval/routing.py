"""Router statistics per layer: mean soft attention weight per expert, fraction of FFN token
assignments per expert, mean router entropy (nats), and how often routing decisions agree, accumulated
over batches.

Agreement compares each token's top expert (the argmax of the router's probabilities): between
consecutive layers of one router kind (does a token keep its expert from layer l to l+1?), and between
the attention and FFN routers of one layer when both have the same experts (does a token pick the same
expert for both?). Each comes with the agreement two independent decisions with the same marginal
frequencies would reach by chance, ``sum_e f(e) g(e)``.

Reads ``ModelOutput.routing`` (one ``LayerRouting`` per layer with ``attn_probs`` (N, E_a),
``ffn_probs`` (N, E_f), ``ffn_counts`` (E_f,); None where the layer has no such router).
"""

from __future__ import annotations

from typing import Any

import torch

ROUTED_BLOCKS = ("attn", "ffn")  # the blocks a router can route: attention and the FFN


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
        self.top: dict[str, list[torch.Tensor]] = {"attn": [], "ffn": []}  # (E,) top-expert counts per layer
        self.same_next: dict[str, list[float]] = {"attn": [], "ffn": []}  # layer l and l+1 agree, per l
        self.same_kinds: list[float] = []  # attention and FFN agree, per layer (None-free only when E_a == E_f)
        self.joint_top: list[torch.Tensor] = []  # (E, E) attention-top x FFN-top counts per layer

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

    @staticmethod
    def _accumulate(acc: list, i: int, value) -> None:
        if i == len(acc):
            acc.append(value)
        else:
            acc[i] += value

    def _agreement(self, routing: list[Any]) -> None:
        tops = {kind: [None if p is None else p.argmax(-1) for p in
                       (getattr(layer, f"{kind}_probs") for layer in routing)] for kind in ROUTED_BLOCKS}
        for kind, per_layer in tops.items():
            for i, top in enumerate(per_layer):
                if top is not None:
                    n_exp = getattr(routing[i], f"{kind}_probs").shape[-1]
                    self._accumulate(self.top[kind], i, torch.bincount(top, minlength=n_exp).double().cpu())
            for i, (a, b) in enumerate(zip(per_layer, per_layer[1:])):
                if a is not None and b is not None:
                    self._accumulate(self.same_next[kind], i, float((a == b).sum()))
        for i, (a, f) in enumerate(zip(tops["attn"], tops["ffn"])):
            if a is None or f is None or routing[i].attn_probs.shape[-1] != routing[i].ffn_probs.shape[-1]:
                continue
            e = routing[i].ffn_probs.shape[-1]
            self._accumulate(self.same_kinds, i, float((a == f).sum()))
            self._accumulate(self.joint_top, i, torch.bincount(a * e + f, minlength=e * e).double().cpu().view(e, e))

    def update(self, routing: list[Any]) -> None:
        """Add one batch's per-layer routing."""
        self._agreement(routing)
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
        for kind, stats in out.items():
            stats.update(self._layer_agreement(kind))
        if self.same_kinds and "attn" in out:
            n = self.top["attn"][0].sum().item()
            out["attn"]["agree_with_ffn"] = [s / n for s in self.same_kinds]
            out["attn"]["agree_with_ffn_chance"] = [
                float((j.sum(1) / n * j.sum(0) / n).sum()) for j in self.joint_top]
        return out

    def _layer_agreement(self, kind: str) -> dict[str, list[float]]:
        """Agreement of the top expert between layer l and l+1 (per l), and its chance level."""
        if not self.same_next[kind]:
            return {}
        tops = self.top[kind]
        n = tops[0].sum().item()
        chance = [float((a / n * b / n).sum()) if len(a) == len(b) else float("nan") for a, b in zip(tops, tops[1:])]
        return {"agree_next_layer": [s / n for s in self.same_next[kind]], "agree_next_layer_chance": chance}


def heatmap_values(model_routing: dict[str, Any], kind: str) -> tuple[list[str], list[list[list[float]]]]:
    """(domains, per-layer matrices (domain x expert)) of one model's routing.json entry for a router kind:
    mean soft weight for attention, fraction of assignments for the FFN."""
    key = "mean_prob" if kind == "attn" else "fraction"
    domains = [d for d, stats in model_routing["domains"].items() if kind in stats]
    if not domains:
        return [], []
    n_layers = len(model_routing["domains"][domains[0]][kind][key])
    return domains, [[model_routing["domains"][d][kind][key][i] for d in domains] for i in range(n_layers)]
