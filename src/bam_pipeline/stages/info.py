"""stage=info: a configuration's architecture, parameters and FLOPs per token (paper Tables 7 and 9),
with no data and no training."""

from __future__ import annotations

from typing import Any

from bam_pipeline.mixing.variant import MixVariant
from bam_pipeline.model.config import ModelConfig
from bam_pipeline.model.counting import describe
from bam_pipeline.stages.checkpoints import checkpoint_model_config
from bam_pipeline.stages.context import RunContext


def _fmt(n: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def info_rows(dense: ModelConfig, variant: MixVariant, *, n_domains: int, seq_len: int) -> list[dict[str, Any]]:
    """describe() rows of the dense seed and of the variant's mixture."""
    mixed = variant.layout(dense, n_domains)
    return [{"model": f"{dense.name} (dense seed)", **describe(dense, seq_len)},
            {"model": f"{dense.name} + mix={variant.name} ({variant.display_name()})", **describe(mixed, seq_len)}]


def run_info(ctx: RunContext) -> None:
    variant = ctx.variant(ctx.mix_name)
    dense = ctx.model.dense_config() if ctx.seed.kind == "pretrain" else \
        checkpoint_model_config(ctx.seed.checkpoint, ctx.model.seq_len)
    rows = info_rows(dense, variant, n_domains=len(ctx.data.domains), seq_len=ctx.model.seq_len)
    base = rows[0]
    for r in rows:
        print(f"{r['model']}\n  {r['architecture']}")
        print(f"  parameters: total {_fmt(r['params_total'])} ({r['params_total']:,}), "
              f"active per token {_fmt(r['params_active'])} ({r['params_active']:,})")
        print(f"  forward FLOPs per token at context {r['seq_len']}: {_fmt(r['flops_per_token_forward'])} "
              f"(attention {_fmt(r['flops_per_token_attention'])}, FFN {_fmt(r['flops_per_token_ffn'])}, "
              f"LM head {_fmt(r['flops_per_token_lm_head'])}); "
              f"x{r['flops_per_token_forward'] / base['flops_per_token_forward']:.2f} the dense seed")
        if r["flops_per_token_forward_implementation"] != r["flops_per_token_forward"]:
            print(f"  as implemented here (every attention expert computed, unchosen ones zero-weighted): "
                  f"{_fmt(r['flops_per_token_forward_implementation'])} (attention "
                  f"{_fmt(r['flops_per_token_attention_implementation'])}); budgets use the ideal sparse kernel "
                  "above (k experts' Q, O and attention, every expert's K/V)")
    gaps = variant.function_gaps(variant.layout(dense, len(ctx.data.domains)))
    if gaps:
        print(f"  upcycled from identical experts this is NOT the seed's function: {'; '.join(gaps)} (exact: "
              "renormalize: true in the router; the paper's top-1 gate stays unrenormalised so its router learns)")
    else:
        print("  upcycled from identical experts this is exactly the seed's function (gates sum to one)")
