"""Generation benchmark: greedy decoding with the KV cache vs recomputing the whole prefix for every
new token, on the ``tiny`` preset's BAM mixture (4 soft expert-KV attention experts, 4 top-1 FFN
experts, random weights); and the KV cache bytes per token of bam, bam_kv_shared and btx, measured
from the cache tensors.

One prompt of ``--prompt-tokens`` random ids, then ``--new-tokens`` new tokens. The tiny preset's
context (256) is raised to hold prompt + new tokens when they exceed it (RoPE tables only; the
weights are random anyway). Both decoders produce the same tokens (checked); times are medians of
``--repeats`` runs after one warm-up run each, run interleaved.

    python benchmarks/bench_generate.py [--prompt-tokens 32] [--new-tokens 256] [--repeats 3] [--threads N]
                                        [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bam_pipeline.model import BAMTransformer, ModelConfig, preset
from bam_pipeline.model.generation import cache_bytes_per_token, generate, greedy_without_cache

MIXTURES = {
    "bam": dict(attn_experts=4, ffn_experts=4),
    "bam_kv_shared": dict(attn_experts=4, attn_kv="shared", ffn_experts=4),
    "btx": dict(ffn_experts=4),
}


def tiny(variant: str, context: int) -> ModelConfig:
    base = preset("tiny")
    return base.replace(name=f"tiny-{variant}", max_seq_len=max(base.max_seq_len, context), **MIXTURES[variant])


def timed(fn, device: torch.device) -> tuple[float, list[int]]:
    start = time.perf_counter()
    tokens = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    context = args.prompt_tokens + args.new_tokens

    torch.manual_seed(0)
    model = BAMTransformer(tiny("bam", context)).to(device).eval()
    prompt = torch.randint(0, model.cfg.vocab_size, (args.prompt_tokens,)).tolist()

    def cached() -> list[int]:
        return generate(model, [prompt], max_new_tokens=args.new_tokens).tokens[0]

    def uncached() -> list[int]:
        return greedy_without_cache(model, prompt, args.new_tokens)

    timed(cached, device), timed(uncached, device)  # warm-up
    runs = [(timed(cached, device), timed(uncached, device)) for _ in range(args.repeats)]
    assert all(c[1] == u[1] for c, u in runs), "cached and cache-free greedy decoding disagree"
    t_cached = statistics.median(c[0] for c, _ in runs)
    t_uncached = statistics.median(u[0] for _, u in runs)

    print(f"tiny BAM (4 soft expert-KV attention experts, 4 top-1 FFN experts), {args.prompt_tokens}-token prompt, "
          f"{args.new_tokens} new tokens, greedy, batch 1, {device}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}" + (f"; context raised to {context}" if context > preset("tiny").max_seq_len
                                         else ""))
    print(f"{'decoding':<24} {'seconds':>8} {'tokens/s':>9}")
    print(f"{'with KV cache':<24} {t_cached:>8.3f} {args.new_tokens / t_cached:>9.1f}")
    print(f"{'without (recompute)':<24} {t_uncached:>8.3f} {args.new_tokens / t_uncached:>9.1f}")
    print(f"{'speed-up':<24} {t_uncached / t_cached:>8.2f}x")
    print()
    print(f"{'KV cache per token':<24} {'bytes':>8} {'vs btx':>9}")
    measured = {name: cache_bytes_per_token(BAMTransformer(tiny(name, context)).to(device)) for name in MIXTURES}
    for name, nbytes in measured.items():
        print(f"{name:<24} {nbytes:>8.0f} {nbytes / measured['btx']:>8.2f}x")


if __name__ == "__main__":
    main()
