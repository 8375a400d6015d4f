"""Model micro-benchmarks, printed as one table of ratios measured in the same run.

(1) MoE FFN, 4 experts top-1, vs a dense SwiGLU FFN of the same d_ff (forward + backward time),
    once per dispatch path; (2) fused Mixture of Attention (4 experts, soft) vs the per-expert
loop, at the ``small`` and the ``tiny`` layer shapes; (3) shared-KV vs expert-KV fused MoA;
(4) forward + backward tokens/s of the ``tiny`` and ``small`` presets, dense vs the BAM mixture
(4 soft expert-KV attention experts + 4 top-1 FFN experts). Baseline and candidate run interleaved; times are medians of
``--repeats`` runs after ``--warmup`` runs, ratios the median of per-repeat ratios (robust to load
from other processes).

    python benchmarks/bench_model.py [--device cpu|cuda] [--dtype float32|bfloat16] [--repeats 9] [--threads N]
                                     [--libc-malloc]

On the CPU the process keeps freed host memory as CPU training stages do
(:mod:`bam_pipeline.training.host_memory`); ``--libc-malloc`` measures with glibc's defaults.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from bam_pipeline.errors import BamError
from bam_pipeline.model import BAMTransformer, preset
from bam_pipeline.model.attention import MixtureOfAttention, mixture_of_attention_loop
from bam_pipeline.model.moe import MoEFeedForward
from bam_pipeline.training.host_memory import keep_freed_memory

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def paired_seconds(
    base: Callable[[], None], cand: Callable[[], None], device: torch.device, repeats: int, warmup: int
) -> tuple[float, float, float]:
    """Median wall times of ``base`` and ``cand`` and the median of their per-repeat ratios.

    The two run interleaved (base, cand, base, cand, ...) after ``warmup`` untimed runs each, so
    load from other processes hits both alike; the ratio is the median of cand / base pairs.
    """

    def timed(step: Callable[[], None]) -> float:
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for _ in range(warmup):
        timed(base)
        timed(cand)
    pairs = [(timed(base), timed(cand)) for _ in range(repeats)]
    t_base = statistics.median(b for b, _ in pairs)
    t_cand = statistics.median(c for _, c in pairs)
    return t_base, t_cand, statistics.median(c / b for b, c in pairs)


def layer_step(module: torch.nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor):
    """One forward + backward of a layer on input ``h`` (which gets a gradient too)."""
    h = h.detach().requires_grad_(True)
    upstream = torch.randn_like(h)

    def step() -> None:
        module.zero_grad(set_to_none=True)
        h.grad = None
        forward(h).backward(upstream)

    return step


def model_step(model: BAMTransformer, idx: torch.Tensor):
    """One forward + backward of the training objective (LM loss + aux loss)."""

    def step() -> None:
        model.zero_grad(set_to_none=True)
        lm_loss, out = model.loss(idx, idx)
        (lm_loss + out.aux_loss).backward()

    return step


def run(device: torch.device, dtype: torch.dtype, repeats: int, warmup: int) -> list[tuple[str, str, str, float, str]]:
    """Rows (measurement, baseline, candidate, ratio or value, target)."""
    gen = torch.Generator().manual_seed(0)
    rows = []

    def compare(base, cand) -> tuple[float, float, float]:
        return paired_seconds(base, cand, device, repeats, warmup)

    # (1) MoE FFN top-1 of 4 vs dense FFN of the same active size: N = 8 * 512 tokens, D = 256.
    ffn_cfg = preset("small")
    h = torch.randn(8, 512, ffn_cfg.d_model, generator=gen).to(device, dtype)
    dense = MoEFeedForward(ffn_cfg).to(device, dtype)
    dense_step = layer_step(dense, lambda x: dense(x).out, h)
    for dispatch in ("auto", "grouped", "loop"):
        moe = MoEFeedForward(ffn_cfg.replace(ffn_experts=4), dispatch=dispatch).to(device, dtype)
        name = f"(1) MoE FFN 4e top-1 / dense FFN, dispatch={dispatch}"
        try:
            t_dense, t_moe, ratio = compare(dense_step, layer_step(moe, lambda x, m=moe: m(x).out, h))
        except (BamError, RuntimeError) as err:  # grouped_mm unavailable for this device/dtype
            rows.append((name, "-", "unsupported", float("nan"), str(err)[:40]))
            continue
        rows.append((name, f"dense {t_dense * 1e3:.1f} ms", f"moe {t_moe * 1e3:.1f} ms", ratio,
                     "<= 1.3x" if dispatch == "auto" else "(info)"))

    # (2), (3) Mixture of Attention, 4 experts soft: B = 8, T = 256, D = 256, 8 heads (small); also
    # the tiny preset's shape (B = 16, D = 128, 4 heads), the layer the CPU demo trains.
    for name, batch, target in (("tiny", 16, "(info)"), ("small", 8, "<= 1.0x")):
        attn_cfg = preset(name, max_seq_len=256).replace(attn_experts=4)
        h = torch.randn(batch, 256, attn_cfg.d_model, generator=gen).to(device, dtype)
        expert_kv = MixtureOfAttention(attn_cfg).to(device, dtype)
        fused_step = layer_step(expert_kv, lambda x, m=expert_kv: m(x).out, h)
        loop_step = layer_step(expert_kv, lambda x, m=expert_kv: mixture_of_attention_loop(m, x).out, h)
        t_loop, t_fused, ratio = compare(loop_step, fused_step)
        rows.append((f"(2) MoA 4e soft expert-KV ({name}): fused / loop", f"loop {t_loop * 1e3:.1f} ms",
                     f"fused {t_fused * 1e3:.1f} ms", ratio, target))
    # (3) at the small shape, the loop's last
    shared = MixtureOfAttention(attn_cfg.replace(attn_kv="shared")).to(device, dtype)
    t_expert, t_shared, ratio = compare(fused_step, layer_step(shared, lambda x: shared(x).out, h))
    rows.append(("(3) MoA 4e soft fused (small): shared-KV / expert-KV", f"expert {t_expert * 1e3:.1f} ms",
                 f"shared {t_shared * 1e3:.1f} ms", ratio, "(info)"))

    # (4) whole-model training step throughput (LM + aux loss), dense vs BAM mixture.
    for name, batch in (("tiny", 8), ("small", 4)):
        cfg = preset(name)
        idx = torch.randint(0, cfg.vocab_size, (batch, cfg.max_seq_len), generator=gen).to(device)
        steps = [model_step(BAMTransformer(c).to(device, dtype), idx)
                 for c in (cfg, cfg.replace(attn_experts=4, ffn_experts=4))]
        t_dense, t_bam, ratio = compare(*steps)
        rows.append((f"(4) {name} fwd+bwd tokens/s, bam / dense ({idx.numel()} tok/step)",
                     f"dense {idx.numel() / t_dense:.0f}", f"bam {idx.numel() / t_bam:.0f}", 1.0 / ratio, "(info)"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch CPU threads (default: the core count)")
    parser.add_argument("--libc-malloc", action="store_true",
                        help="leave glibc's allocator defaults (CPU training stages keep freed memory)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but CUDA is not available; use --device cpu")
    kept = args.device == "cpu" and not args.libc_malloc and keep_freed_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    rows = run(device, DTYPES[args.dtype], args.repeats, args.warmup)

    print(f"# bench_model: device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} "
          f"repeats={args.repeats} warmup={args.warmup} (medians, interleaved pairs) torch={torch.__version__} "
          f"host memory={'kept' if kept else 'libc defaults'}")
    header = ("measurement", "baseline", "candidate", "ratio", "target")
    widths = [max(len(str(r[i])) if i != 3 else 6 for r in [header, *rows]) for i in range(5)]
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        cells = [r[0], r[1], r[2], f"{r[3]:.2f}x", r[4]]
        print(" | ".join(c.ljust(w) for c, w in zip(cells, widths)))


if __name__ == "__main__":
    main()
