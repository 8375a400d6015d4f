"""Mean router inputs of a dense model on some tokens: what ``router_init=hidden`` builds routers from.

A router reads its block's normed hidden state ``h`` (the block's norm output; in a sequential block
the FFN router reads the FFN norm's). :func:`hidden_means` runs a dense model over token batches and
averages, per layer, the input each kind of router would read, over every token position. The mix
stage calls it once per expert origin (the seed on general text, each domain expert's origin on its
domain's validation tokens) and passes the result to :func:`~bam_pipeline.mixing.upcycle.upcycle`,
which stays a pure function of its inputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from bam_pipeline.errors import BamError
from bam_pipeline.model.config import ModelConfig
from bam_pipeline.model.transformer import BAMTransformer


@torch.no_grad()
def hidden_means(cfg: ModelConfig, state: Mapping[str, Tensor], batches: Iterable[Tensor]) -> dict[str, Tensor]:
    """``{"attn": (L, D), "ffn": (L, D)}`` float32: the mean router input of each layer of the dense
    model ``(cfg, state)`` over every position of ``batches`` ((B, T) token ids each). In a parallel
    block both kinds read the same ``h``, so the two are equal."""
    if not cfg.is_dense:
        raise BamError("hidden-state routers are computed from the dense seed, not a mixture")
    model = BAMTransformer(cfg)
    model.load_state_dict(dict(state), strict=True)
    model.eval()
    L, D = cfg.n_layers, cfg.d_model
    sums = {"attn": torch.zeros(L, D, dtype=torch.float64), "ffn": torch.zeros(L, D, dtype=torch.float64)}
    seen = {"n": 0}
    hooks = []

    def add(kind: str, layer: int):
        def hook(_module, _inputs, output):
            sums[kind][layer] += output.reshape(-1, D).double().sum(0)
        return hook

    for i, block in enumerate(model.layers):
        hooks.append(block.norm.register_forward_hook(add("attn", i)))
        ffn_input = block.ffn_norm if block.ffn_norm is not None else block.norm
        hooks.append(ffn_input.register_forward_hook(add("ffn", i)))
    try:
        for batch in batches:
            model(batch.long())
            seen["n"] += batch.numel()
    finally:
        for h in hooks:
            h.remove()
    if seen["n"] == 0:
        raise BamError("no tokens to average hidden states over; give at least one batch")
    return {kind: (s / seen["n"]).float() for kind, s in sums.items()}
