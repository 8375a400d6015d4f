"""`stage=info`: a configuration's architecture, parameters and FLOPs per token (paper Tables 7 and 9)."""

from __future__ import annotations

from typing import Any, Mapping

from bam_pipeline.model.config import ModelConfig
from bam_pipeline.model.counting import describe
from bam_pipeline.pipeline.mixing import mixture_config


def _fmt(n: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def info_rows(dense: ModelConfig, mix: Mapping[str, Any], *, n_domains: int, seq_len: int) -> list[dict[str, Any]]:
    """describe() rows of the dense seed and of the chosen mixture variant."""
    mixed = mixture_config(mix, dense, n_domains=n_domains)
    return [{"model": f"{dense.name} (dense seed)", **describe(dense, seq_len)},
            {"model": f"{dense.name} + mix={mix['variant']}", **describe(mixed, seq_len)}]


def print_info(dense: ModelConfig, mix: Mapping[str, Any], *, n_domains: int, seq_len: int) -> None:
    rows = info_rows(dense, mix, n_domains=n_domains, seq_len=seq_len)
    base = rows[0]
    for r in rows:
        print(f"{r['model']}\n  {r['architecture']}")
        print(f"  parameters: total {_fmt(r['params_total'])} ({r['params_total']:,}), "
              f"active per token {_fmt(r['params_active'])} ({r['params_active']:,})")
        print(f"  forward FLOPs per token at context {r['seq_len']}: {_fmt(r['flops_per_token_forward'])} "
              f"(attention {_fmt(r['flops_per_token_attention'])}, FFN {_fmt(r['flops_per_token_ffn'])}, "
              f"LM head {_fmt(r['flops_per_token_lm_head'])}); x{r['flops_per_token_forward'] / base['flops_per_token_forward']:.2f} the dense seed")
