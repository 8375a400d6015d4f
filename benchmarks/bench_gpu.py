"""The GPU benchmark (``make bench-gpu``): one GPU, bfloat16 autocast over float32 weights, the
``bam-590m`` shape (V=256k, D=1024, 6 layers, 8 x 2048 tokens a step), in at most five minutes.

Sections, each written to ``$OUT`` (``--out``) as soon as it is measured, then printed as one table:
  A. training tokens/s and model FLOPs utilisation (``bam_pipeline.model.counting``'s FLOPs over the
     device's peak) of the dense seed, BAM, BAM shared-KV and BTX, interleaved rounds;
  B. MoE dispatch, grouped_mm vs the per-expert loop: the BAM training step and the FFN layer alone;
  C. peak memory of the LM head and loss of one step, plain vs chunked (``torch.cuda.max_memory_allocated``);
  D. the memory planner's estimate (``bam_pipeline.training.memory``) vs the measured peak of a
     training step (parameters, gradients, AdamW state and activations all allocated), per model.

It runs on a bare GPU image (torch, no Hydra, omegaconf, datasets or wandb): it imports only
``bam_pipeline.model`` and the planner, which imports nothing else. The mixtures mirror
``conf/mix/{bam,bam_kv_shared,btx}.yaml`` over 3 domain experts + the seed (a CPU test checks that
they equal what the pipeline builds).

    PYTHONPATH=src python benchmarks/bench_gpu.py [--out DIR]
    PYTHONPATH=src python benchmarks/bench_gpu.py --device cpu --smoke   # end to end on a tiny shape
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from bam_pipeline.model import BAMTransformer, ModelConfig, preset
from bam_pipeline.model.counting import device_peak_tflops, mfu, training_flops_per_token
from bam_pipeline.model.loss import LossChunking, chunked_next_token_nll, next_token_nll
from bam_pipeline.model.moe import MoEFeedForward
from bam_pipeline.training.memory import MemorySetup, estimate

# conf/config.yaml's train.chunked_loss_above and train.loss_chunk_logits
CHUNKING = LossChunking(above=2**28, chunk_logits=2**26)
N_EXPERTS = 4  # 3 domain experts + the seed


def mixtures(dense: ModelConfig) -> dict[str, ModelConfig]:
    """The dense seed and the default pipeline's mixtures over it."""
    return {
        "dense": dense,
        "bam": dense.replace(attn_experts=N_EXPERTS, ffn_experts=N_EXPERTS),
        "bam_kv_shared": dense.replace(attn_experts=N_EXPERTS, attn_kv="shared", ffn_experts=N_EXPERTS),
        "btx": dense.replace(ffn_experts=N_EXPERTS),
    }


class Bench:
    """Shapes, device and output of one run."""

    def __init__(self, device: torch.device, smoke: bool, out: Path) -> None:
        self.device, self.smoke, self.out = device, smoke, out
        if smoke:
            self.dense = preset("smoke", vocab_size=4096, max_seq_len=64)
            self.batch, self.seq = 2, 64
            self.rounds, self.steps = 1, 1
            self.chunk_logits = 16 * 4096  # chunks of 16 tokens, so the smoke run chunks at all
        else:
            self.dense = preset("bam-590m")
            self.batch, self.seq = 8, 2048
            self.rounds, self.steps = 3, 3
            self.chunk_logits = CHUNKING.chunk_logits
        self.autocast = device.type == "cuda"
        self.peak = device_peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        self.tables: list[tuple[str, list[list[str]]]] = []

    # ---- helpers -------------------------------------------------------------------------
    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def tokens(self, vocab: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, vocab, (self.batch, self.seq + 1), generator=g).to(self.device)

    def chunk(self, cfg: ModelConfig) -> int | None:
        return CHUNKING.chunk_tokens(cfg.vocab_size, self.batch * self.seq)

    def train_step(self, model: BAMTransformer, batch: torch.Tensor) -> Callable[[], None]:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=self.device.type == "cuda")

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                nll, out = model.loss(batch[:, :-1], batch[:, 1:], chunking=CHUNKING)
            (nll + out.aux_loss).backward()
            opt.step()

        return step

    def timed(self, step: Callable[[], None], n: int) -> float:
        self.sync()
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        self.sync()
        return (time.perf_counter() - t0) / n

    def interleaved(self, steps: dict[str, Callable[[], None]]) -> dict[str, float]:
        """Median seconds per step of each, after one untimed step each, in interleaved rounds."""
        for step in steps.values():
            step()
        rounds = {k: [] for k in steps}
        for _ in range(self.rounds):
            for k, step in steps.items():
                rounds[k].append(self.timed(step, self.steps))
        return {k: statistics.median(v) for k, v in rounds.items()}

    def peak_bytes(self, step: Callable[[], None]) -> int | None:
        """Peak bytes allocated during ``step`` (CUDA), or None on the CPU."""
        if self.device.type != "cuda":
            step()
            return None
        self.sync()
        torch.cuda.reset_peak_memory_stats(self.device)
        step()
        self.sync()
        return torch.cuda.max_memory_allocated(self.device)

    def publish(self, name: str, rows: list[list[str]]) -> None:
        """Write one section's table to the output folder now, and keep it for the final print."""
        self.tables.append((name, rows))
        (self.out / f"{name.split('.')[0]}.md").write_text(_markdown(name, rows))
        print(f"[bench_gpu] {name}: written to {self.out}", flush=True)

    # ---- sections --------------------------------------------------------------------------
    def throughput(self) -> None:
        cfgs = mixtures(self.dense)
        batch = self.tokens(self.dense.vocab_size)
        models = {k: BAMTransformer(c).to(self.device) for k, c in cfgs.items()}
        seconds = self.interleaved({k: self.train_step(m, batch) for k, m in models.items()})
        rows = [["model", "tokens/s", "step ms", "training FLOPs/token", "MFU", "tokens/s vs dense",
                 "FLOPs vs dense"]]
        n = self.batch * self.seq
        flops = {k: training_flops_per_token(c, self.seq) for k, c in cfgs.items()}
        for k in cfgs:
            tok_s = n / seconds[k]
            util = "-" if self.peak is None else f"{mfu(tok_s, flops[k], self.peak):.1%}"
            rows.append([k, f"{tok_s:,.0f}", f"{seconds[k] * 1e3:.0f}", f"{flops[k] / 1e9:.3g}G", util,
                         f"{seconds['dense'] / seconds[k]:.2f}x", f"{flops[k] / flops['dense']:.2f}x"])
        del models
        self.publish("A. training throughput and MFU", rows)

    def dispatch(self) -> None:
        cfg = mixtures(self.dense)["bam"]
        batch = self.tokens(cfg.vocab_size)
        model = BAMTransformer(cfg).to(self.device)
        modes = {}
        for mode in ("grouped", "loop"):
            def step(mode=mode, inner=self.train_step(model, batch)) -> None:
                for m in model.modules():
                    if isinstance(m, MoEFeedForward):
                        m.dispatch = mode
                inner()
            modes[mode] = step
        rows = [["measurement", "grouped ms", "loop ms", "grouped / loop"]]
        try:
            whole = self.interleaved(modes)
            rows.append(["BAM training step", f"{whole['grouped'] * 1e3:.1f}", f"{whole['loop'] * 1e3:.1f}",
                         f"{whole['grouped'] / whole['loop']:.2f}x"])
        except RuntimeError as e:  # grouped_mm unsupported on this device or dtype
            rows.append(["BAM training step", "unsupported", "-", str(e).splitlines()[0][:60]])
        del model
        h = torch.randn(self.batch, self.seq, cfg.d_model, device=self.device, requires_grad=True)
        layers = {mode: MoEFeedForward(cfg, dispatch=mode).to(self.device) for mode in ("grouped", "loop")}
        layers["loop"].load_state_dict(layers["grouped"].state_dict())

        def layer_step(layer: MoEFeedForward) -> Callable[[], None]:
            def step() -> None:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                    out = layer(h).out
                out.float().sum().backward()
            return step

        try:
            alone = self.interleaved({k: layer_step(v) for k, v in layers.items()})
            rows.append([f"MoE FFN layer ({N_EXPERTS} experts, top-1), fwd+bwd", f"{alone['grouped'] * 1e3:.2f}",
                         f"{alone['loop'] * 1e3:.2f}", f"{alone['grouped'] / alone['loop']:.2f}x"])
        except RuntimeError as e:
            rows.append(["MoE FFN layer", "unsupported", "-", str(e).splitlines()[0][:60]])
        self.publish("B. MoE dispatch: grouped_mm vs loop", rows)

    def loss_memory(self) -> None:
        V, D = self.dense.vocab_size, self.dense.d_model
        weight = torch.nn.Parameter(torch.randn(V, D, device=self.device) * 0.02)
        hidden = torch.randn(self.batch, self.seq, D, device=self.device, requires_grad=True)
        targets = self.tokens(V)[:, 1:]
        chunk = max(1, self.chunk_logits // V)

        def step(chunked: bool) -> Callable[[], None]:
            def run() -> None:
                weight.grad = hidden.grad = None
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                    if chunked:
                        loss = chunked_next_token_nll(hidden, weight, targets, chunk=chunk)
                    else:
                        loss = next_token_nll(F.linear(hidden, weight), targets)
                loss.backward()
            return run

        rows = [["LM head + loss, one step", "peak bytes above the inputs", "ms"]]
        base = None
        peaks = {}
        for chunked in (False, True):
            weight.grad = hidden.grad = None
            self.sync()
            if self.device.type == "cuda":
                base = torch.cuda.memory_allocated(self.device)
            t0 = time.perf_counter()
            try:
                peak = self.peak_bytes(step(chunked))
            except torch.OutOfMemoryError:
                rows.append([f"{'chunked' if chunked else 'plain'}", "out of memory", "-"])
                torch.cuda.empty_cache()
                continue
            ms = (time.perf_counter() - t0) * 1e3
            peaks[chunked] = None if peak is None else peak - base
            label = f"chunked ({chunk} tokens a chunk)" if chunked else "plain (whole logits)"
            rows.append([label, "n/a on cpu" if peak is None else f"{(peak - base) / 1e9:.2f} GB", f"{ms:.0f}"])
        if peaks.get(True) and peaks.get(False):
            rows.append(["chunked / plain", f"{peaks[True] / peaks[False]:.2f}x", "-"])
        del weight, hidden
        self.publish(f"C. chunked vs plain loss memory (V={V}, {self.batch}x{self.seq} tokens)", rows)

    def planner(self) -> None:
        rows = [["model", "planned total", "measured peak", "measured / planned"]]
        batch = self.tokens(self.dense.vocab_size)
        for k, cfg in mixtures(self.dense).items():
            setup = MemorySetup(self.batch, self.seq, 1, "auto", "bf16-mixed" if self.autocast else "32-true", False,
                                self.chunk(cfg))
            planned = estimate(cfg, setup).total
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            model = BAMTransformer(cfg).to(self.device)
            step = self.train_step(model, batch)
            step()  # AdamW state allocated
            peak = self.peak_bytes(step)
            measured = "n/a on cpu" if peak is None else f"{peak / 1e9:.2f} GB"
            ratio = "-" if peak is None else f"{peak / planned:.2f}x"
            rows.append([k, f"{planned / 1e9:.2f} GB", measured, ratio])
            del model, step
        self.publish("D. memory planner vs torch.cuda.max_memory_allocated", rows)


def _markdown(name: str, rows: list[list[str]]) -> str:
    out = [f"## {name}", "", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--smoke", action="store_true", help="a tiny shape, to check the script end to end")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench_gpu_out")))
    parser.add_argument("--skip", default="", help="sections to leave out, e.g. B,D")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --device cpu --smoke to check the script on a CPU")
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    bench = Bench(device, args.smoke, args.out)
    header = (f"# bench_gpu: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
              f"torch {torch.__version__}, {'bf16 autocast' if bench.autocast else 'float32'}, model "
              f"{bench.dense.name} (V={bench.dense.vocab_size}, D={bench.dense.d_model}, L={bench.dense.n_layers}), "
              f"{bench.batch}x{bench.seq} tokens a step, peak {bench.peak or '-'} TFLOP/s")
    print(header, flush=True)
    start = time.perf_counter()
    sections = {"A": bench.throughput, "B": bench.dispatch, "C": bench.loss_memory, "D": bench.planner}
    for key, run in sections.items():
        if key not in args.skip.split(","):
            run()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    text = header + "\n\n" + "\n".join(_markdown(n, r) for n, r in bench.tables)
    text += f"\n(total {time.perf_counter() - start:.0f} s)\n"
    (args.out / "bench_gpu.md").write_text(text)
    (args.out / "bench_gpu.json").write_text(json.dumps({n: r for n, r in bench.tables}, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
