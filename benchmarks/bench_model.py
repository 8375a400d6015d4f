"""Model micro-benchmarks, printed as one table of ratios measured in the same run, and the speeds
``stage=info`` projects wall times from.

(1) MoE FFN, 4 experts top-1, vs a dense SwiGLU FFN of the same d_ff (forward + backward time),
    once per dispatch path; (2) fused Mixture of Attention (4 experts, soft) vs the per-expert
loop, at the ``small`` and the ``tiny`` layer shapes; (3) shared-KV vs expert-KV fused MoA;
(4) training steps (forward, backward, AdamW step) of the ``tiny`` and ``small`` presets at their
experiments' batch (16 sequences), the dense seed and the mixtures BAM, BAM shared-KV and BTX
interleaved in one loop: tokens/s, and BAM's throughput relative to dense as a share of what their
FLOP ratio allows (tokens/s ratio x training-FLOPs ratio; 1.0 = BAM costs exactly its extra FLOPs);
for tiny also the attention kernel alone at BAM's shape, causal vs unmasked (a kernel that skips the
mask's upper half takes about half the time), and the efficiency with the masked scores counted, for
a kernel that computes them;
(5) peak memory of one training step of the LM head and loss alone at bam-590m's head (256k x
1024) on short sequences (2 x 512 tokens), plain vs chunked (``train.loss_chunk_logits``), from the torch
profiler's allocation events (not RSS: freed host memory stays resident); (6) ``train.compile``:
the tiny BAM training step with every block compiled vs eager, compile time apart; (7) the moe stage as it
trains: ``Trainer.fit`` with the stage's own LightningModule, DataModule, callbacks and logger
(:func:`bam_pipeline.training.job.build_fit`, the ``experiment=tiny`` settings, wandb offline) on random tokens
stored as the data stage stores them, against the bare training step of (4) on the same batches from the same
initial weights: one bare step runs after each stage step (a callback), so both see the same load. The stage's
time of a step is everything between two of those callbacks (data, hooks, logging steps, clipping, the
scheduler); the first ``--warmup`` steps are left out, and validation (at the end) is not counted, as the
stage's tokens/s leaves it out. tokens/s are totals over the timed steps, logging steps included.

``--graph-breaks`` prints instead the graph breaks of block 0 of every mix variant (``conf/mix/``) at the smoke
shape under ``torch.compile`` on the CPU (:func:`bam_pipeline.training.compile.block_graph_breaks`): its forward
graphs, graph breaks and backward graphs on the loop dispatch in float32 (what ``train.compile=true`` trains on
the CPU), the same on ``grouped_mm`` under bfloat16 autocast (a GPU's path where the dispatch probe picks grouped),
and each break's reason where our code makes it, as the markdown table of docs/measurements.md.

Baseline and candidates run interleaved; times are medians of ``--repeats`` runs after ``--warmup``
runs, ratios the median of per-repeat ratios (robust to load from other processes). Forward-only
tokens/s (validation, eval) are measured the same way. The training and forward speeds of (4) are
written to ``--speeds`` (default ``$BAM_STAGES_DIR/speeds.json``, else ``stages/speeds.json``) with
the machine's name, for ``stage=info``.

    python benchmarks/bench_model.py [--device cpu|cuda] [--dtype float32|bfloat16] [--repeats 9] [--threads N]
                                     [--libc-malloc] [--speeds PATH] [--skip 5,6,7]
    python benchmarks/bench_model.py --graph-breaks

On the CPU the process keeps freed host memory as CPU training stages do
(:mod:`bam_pipeline.training.host_memory`); ``--libc-malloc`` measures with glibc's defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from bam_pipeline.cli import quiet_lightning
from bam_pipeline.config.files import conf_dir, group_options, load_option
from bam_pipeline.config.reading import read_section
from bam_pipeline.data.mixtures import stage_mixture
from bam_pipeline.data.prepare import PreparedData
from bam_pipeline.data.splits import KEY_BYTES
from bam_pipeline.data.storage import ShardWriter, shard_file
from bam_pipeline.errors import BamError
from bam_pipeline.eval.serving import machine_name
from bam_pipeline.mixing.variant import MixVariant
from bam_pipeline.model import BAMTransformer, ModelConfig, preset
from bam_pipeline.model.attention import MixtureOfAttention, mixture_of_attention_loop
from bam_pipeline.model.counting import training_flops_per_token
from bam_pipeline.model.loss import chunked_next_token_nll, next_token_nll
from bam_pipeline.model.moe import MoEFeedForward
from bam_pipeline.stages.context import RunContext
from bam_pipeline.training.budget import plan_budget
from bam_pipeline.training.compile import block_graph_breaks, compile_blocks
from bam_pipeline.training.host_memory import keep_freed_memory
from bam_pipeline.training.job import TrainJob, build_fit
from bam_pipeline.training.loggers import close_logger
from bam_pipeline.training.speeds import SpeedTable, model_key

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LAYOUTS = ("dense", "bam", "bam_kv_shared", "btx")  # the mixtures stage=all trains by default
CHUNK_LOGITS = 2**26  # conf/config.yaml train.loss_chunk_logits


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_seconds(steps: list[Callable[[], None]], device: torch.device, repeats: int, warmup: int
                        ) -> tuple[list[float], list[float]]:
    """Median wall time of each step, and the median of each step's time over the first one's,
    the steps run in turn (a, b, c, a, b, c, ...) after ``warmup`` untimed rounds."""

    def timed(step: Callable[[], None]) -> float:
        start = time.perf_counter()
        step()
        _sync(device)
        return time.perf_counter() - start

    for _ in range(warmup):
        for step in steps:
            timed(step)
    rounds = [[timed(step) for step in steps] for _ in range(repeats)]
    medians = [statistics.median(r[i] for r in rounds) for i in range(len(steps))]
    ratios = [statistics.median(r[i] / r[0] for r in rounds) for i in range(len(steps))]
    return medians, ratios


def paired_seconds(base: Callable[[], None], cand: Callable[[], None], device: torch.device, repeats: int,
                   warmup: int) -> tuple[float, float, float]:
    """Median wall times of ``base`` and ``cand`` and the median of their per-repeat ratios."""
    (t_base, t_cand), (_, ratio) = interleaved_seconds([base, cand], device, repeats, warmup)
    return t_base, t_cand, ratio


def layer_step(module: torch.nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor):
    """One forward + backward of a layer on input ``h`` (which gets a gradient too)."""
    h = h.detach().requires_grad_(True)
    upstream = torch.randn_like(h)

    def step() -> None:
        module.zero_grad(set_to_none=True)
        h.grad = None
        forward(h).backward(upstream)

    return step


def attention_kernel_step(shape: tuple[int, int, int, int], causal: bool, gen: torch.Generator,
                          device: torch.device, dtype: torch.dtype):
    """Forward + backward of ``scaled_dot_product_attention`` on (B, heads, T, hd) inputs, causal or not."""
    q, k, v = (torch.randn(*shape, generator=gen).to(device, dtype).requires_grad_() for _ in range(3))
    upstream = torch.randn(*shape, generator=gen).to(device, dtype)

    def step() -> None:
        q.grad = k.grad = v.grad = None
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(upstream)

    return step


def batch_step(model: BAMTransformer) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """One training step on (inputs, targets) as the training stages run it: LM + aux loss, backward, AdamW step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

    def step(idx: torch.Tensor, targets: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        lm_loss, out = model.loss(idx, targets)
        (lm_loss + out.aux_loss).backward()
        opt.step()

    return step


def train_step(model: BAMTransformer, idx: torch.Tensor) -> Callable[[], None]:
    """:func:`batch_step` on ``idx`` (as inputs and targets)."""
    step = batch_step(model)
    return lambda: step(idx, idx)


def forward_step(model: BAMTransformer, idx: torch.Tensor):
    """One evaluation forward pass (the loss, no graph)."""

    def step() -> None:
        with torch.inference_mode():
            model.loss(idx, idx, reduction="sum")

    return step


def layouts(name: str) -> dict[str, ModelConfig]:
    """The preset's dense seed and the default pipeline's mixtures over it (3 domains + the seed)."""
    dense = preset(name)
    out = {"dense": dense}
    for v in LAYOUTS[1:]:
        out[v] = read_section(MixVariant, load_option("mix", v), f"mix/{v}", name=v).layout(dense, 3)
    return out


def profiled_peak_bytes(step: Callable[[], None]) -> int:
    """Peak bytes allocated during ``step`` above what was allocated when it started, from the torch
    profiler's allocation and free events (CPU)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    level = peak = 0
    for e in memory:
        level += e["args"]["Bytes"]
        peak = max(peak, level)
    return peak


def stage_context(root: Path, *overrides: str) -> RunContext:
    """The run context ``python -m bam_pipeline`` reads for ``overrides``, with its stages under ``root``."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"paths.root={root}"], return_hydra_config=True)
    choices = cfg.hydra.runtime.choices
    return RunContext.from_config(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), choices=choices)


def random_prepared(root: Path, sources: list[str], vocab_size: int, tokens: dict[str, int],
                    gen: torch.Generator) -> PreparedData:
    """Random token ids stored as the data stage stores them (one document per source and split, ``tokens``
    per split), opened as a run's prepared data: what a training stage reads, with no corpus to tokenise."""
    splits: dict[str, dict[str, list[str]]] = {}
    for name in sources:
        for split, n in tokens.items():
            path = shard_file(root, name, split, 0)
            writer = ShardWriter(path, vocab_size)
            writer.write([f"{name}-{split}"], [torch.randint(0, vocab_size, (n,), generator=gen).tolist()],
                         [bytes(KEY_BYTES)], [n])
            writer.close()
            splits.setdefault(name, {})[split] = [str(path.relative_to(root))]
    return PreparedData(root, sources, [], vocab_size, eos_id=0, tokenizer_hash="random", config_hash="random",
                        stats={}, manifest={}, splits=splits)


class BareStepAfterEach(Callback):
    """Runs ``bare_step`` on each stage batch after the stage's step, and times both: ``stage`` from the end of
    one bare step to the start of the next (everything the stage does for a step), ``bare`` the bare step."""

    def __init__(self, bare_step: Callable[[torch.Tensor], None], device: torch.device) -> None:
        self.bare_step, self.device = bare_step, device
        self.stage: list[float] = []
        self.bare: list[float] = []
        self._end: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._end is None:  # the first step: from its start
            self._end = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _sync(self.device)
        start = time.perf_counter()
        self.stage.append(start - self._end)
        self.bare_step(batch)
        _sync(self.device)
        self._end = time.perf_counter()
        self.bare.append(self._end - start)


def stage_fit_seconds(layout: str, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, warmup: int,
                      repeats: int, root: Path, gen: torch.Generator) -> tuple[list[float], list[float], int]:
    """Per step after ``warmup`` steps: the moe stage's time through ``Trainer.fit`` and the bare model's
    training step on the same batch from the same initial weights; and the tokens of a step (the tiny
    experiment's batch). The stage trains ``warmup + repeats`` steps rounded up to whole logging windows, so
    its logging steps are timed in their share."""
    ctx = stage_context(root / layout, "stage=moe", "experiment=tiny", f"mix={layout}")
    t = ctx.train
    steps = math.ceil((warmup + repeats) / t.log_every) * t.log_every
    step_tokens = ctx.tokens_per_step  # the global batch (one device: train.global_batch_tokens)
    proportions = stage_mixture("moe", ctx.data)
    train_tokens = math.ceil(steps * step_tokens / t.seq_len) * (t.seq_len + 1)  # every source: the whole budget
    prepared = random_prepared(root / layout / "data", list(proportions), cfg.vocab_size,
                               {"train": train_tokens, "val": max(t.val_tokens, t.seq_len + 1)}, gen)
    budget = plan_budget(steps * step_tokens, cfg, seq_len=t.seq_len, tokens_per_step=ctx.tokens_per_step)
    job = TrainJob("moe", layout, ctx.layout, cfg, None, proportions, budget,
                   t.lr * t.moe_lr_scale, t, freeze_experts=ctx.variant(layout).freeze_experts,
                   precision=ctx.trainer.precision, devices=ctx.world_size)
    bare = BAMTransformer(cfg).to(device, dtype)
    init = {k: v.detach().clone().cpu() for k, v in bare.state_dict().items()}
    step = batch_step(bare)
    timed = BareStepAfterEach(lambda batch: step(batch[:, :-1], batch[:, 1:]), device)
    work = root / layout / "work"
    work.mkdir(parents=True)
    fit = build_fit(job, prepared=prepared, trainer_spec=ctx.trainer, logger_cfg=ctx.logger,
                    stage_config=job.identity({}), init_state=init, work=work, extra=[timed])
    try:
        fit.trainer.fit(fit.module, datamodule=fit.data)
    finally:
        close_logger(fit.logger)
    return timed.stage[warmup:], timed.bare[warmup:], step_tokens


def machine(device: torch.device) -> str:
    """The device measured on (:func:`~bam_pipeline.eval.serving.machine_name`), on a CPU with torch's threads."""
    return machine_name(device) + ("" if device.type == "cuda" else f", {torch.get_num_threads()} threads")


def run(device: torch.device, dtype: torch.dtype, repeats: int, warmup: int, skip: set[str],
        speeds: dict[str, dict]) -> list[tuple[str, str, str, float, str]]:
    """Rows (measurement, baseline, candidate, ratio or value, target); fills ``speeds``."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    bare_ratios: dict[str, float] = {}  # (4)'s bam / dense tokens/s per preset

    def compare(base, cand) -> tuple[float, float, float]:
        return paired_seconds(base, cand, device, repeats, warmup)

    if "1" not in skip:  # MoE FFN top-1 of 4 vs dense FFN of the same active size: N = 8 * 512 tokens, D = 256.
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

    if "2" not in skip:  # Mixture of Attention, 4 experts soft, at the tiny (B = 16) and small (B = 8) layers
        for name, batch, target in (("tiny", 16, "(info)"), ("small", 8, "<= 1.0x")):
            attn_cfg = preset(name, max_seq_len=256).replace(attn_experts=4)
            h = torch.randn(batch, 256, attn_cfg.d_model, generator=gen).to(device, dtype)
            expert_kv = MixtureOfAttention(attn_cfg).to(device, dtype)
            fused_step = layer_step(expert_kv, lambda x, m=expert_kv: m(x).out, h)
            loop_step = layer_step(expert_kv, lambda x, m=expert_kv: mixture_of_attention_loop(m, x).out, h)
            t_loop, t_fused, ratio = compare(loop_step, fused_step)
            rows.append((f"(2) MoA 4e soft expert-KV ({name}): fused / loop", f"loop {t_loop * 1e3:.1f} ms",
                         f"fused {t_fused * 1e3:.1f} ms", ratio, target))
        shared = MixtureOfAttention(attn_cfg.replace(attn_kv="shared")).to(device, dtype)  # (3), small shape
        t_expert, t_shared, ratio = compare(fused_step, layer_step(shared, lambda x: shared(x).out, h))
        rows.append(("(3) MoA 4e soft fused (small): shared-KV / expert-KV", f"expert {t_expert * 1e3:.1f} ms",
                     f"shared {t_shared * 1e3:.1f} ms", ratio, "(info)"))

    if "4" not in skip:  # training steps and forward passes of the pipeline's models, interleaved
        for name, seqs in (("tiny", 16), ("small", 16)):
            cfgs = layouts(name)
            idx = torch.randint(0, cfgs["dense"].vocab_size, (seqs, cfgs["dense"].max_seq_len), generator=gen)
            idx = idx.to(device)
            models = [BAMTransformer(c).to(device, dtype) for c in cfgs.values()]
            small = name == "small"
            times, ratios = interleaved_seconds([train_step(m, idx) for m in models], device,
                                                max(3, repeats // 2) if small else repeats, 1 if small else warmup)
            fwd_times, _ = interleaved_seconds([forward_step(m, idx) for m in models], device, repeats, warmup)
            flops = {k: training_flops_per_token(c) for k, c in cfgs.items()}
            for (layout, cfg), t, f in zip(cfgs.items(), times, fwd_times):
                key = model_key(name, layout)
                speeds["train"][key] = idx.numel() / t
                speeds["forward"][key] = idx.numel() / f
                speeds["batch"][key] = list(idx.shape)
            bam = list(cfgs).index("bam")
            speed_ratio, flop_ratio = 1.0 / ratios[bam], flops["bam"] / flops["dense"]
            bare_ratios[name] = speed_ratio
            rows.append((f"(4) {name} training tokens/s ({seqs}x{idx.shape[1]}), bam / dense",
                         f"dense {idx.numel() / times[0]:.0f}", f"bam {idx.numel() / times[bam]:.0f}", speed_ratio,
                         f"(FLOPs x{flop_ratio:.2f})"))
            rows.append((f"(4) {name} bam: tokens/s ratio x FLOPs ratio (1.0 = its FLOPs exactly)", "-", "-",
                         speed_ratio * flop_ratio, ">= 0.90x" if name == "tiny" else "(info)"))
            if name == "tiny":  # what the attention kernel computes, and the efficiency counted that way
                bam_cfg = cfgs["bam"]
                shape = (seqs, bam_cfg.attn_experts * bam_cfg.n_heads, bam_cfg.max_seq_len, bam_cfg.head_dim)
                t_full, t_causal, kernel_ratio = compare(attention_kernel_step(shape, False, gen, device, dtype),
                                                         attention_kernel_step(shape, True, gen, device, dtype))
                rows.append((f"(4) {name} bam attention kernel {'x'.join(map(str, shape))}, fwd+bwd: causal / unmasked",
                             f"unmasked {t_full * 1e3:.1f} ms", f"causal {t_causal * 1e3:.1f} ms", kernel_ratio,
                             "(info; ~0.5 skips masked scores)"))
                full = {k: training_flops_per_token(c, full_scores=True) for k, c in cfgs.items()}
                full_ratio = full["bam"] / full["dense"]
                rows.append((f"(4) {name} bam: efficiency counting masked scores too (FLOPs x{full_ratio:.2f})", "-",
                             "-", speed_ratio * full_ratio, "(info; for a kernel that computes them)"))

    if "5" not in skip and device.type == "cpu":  # LM head + loss at bam-590m's head, 2 x 512 tokens
        head = preset("bam-590m")
        weight = torch.nn.Parameter(torch.randn(head.vocab_size, head.d_model, generator=gen) * 0.02)
        hidden = torch.randn(2, 512, head.d_model, generator=gen, requires_grad=True)
        targets = torch.randint(0, head.vocab_size, (2, 512), generator=gen)
        chunk = max(1, CHUNK_LOGITS // head.vocab_size)

        def loss_step(chunked: bool) -> Callable[[], None]:
            def step() -> None:
                if chunked:
                    loss = chunked_next_token_nll(hidden, weight, targets, chunk=chunk)
                else:
                    loss = next_token_nll(torch.nn.functional.linear(hidden, weight), targets)
                loss.backward()
            return step

        peaks = {}
        for chunked in (False, True):
            weight.grad = hidden.grad = None  # freed before the measured step begins
            peaks[chunked] = profiled_peak_bytes(loss_step(chunked))
        weight.grad = hidden.grad = None
        rows.append((f"(5) LM head + loss peak bytes, V=256k D=1024, 2x512 tokens: chunked ({chunk} tok) / plain",
                     f"plain {peaks[False] / 1e9:.2f} GB", f"chunked {peaks[True] / 1e9:.2f} GB",
                     peaks[True] / peaks[False], "(info)"))

    if "6" not in skip:  # torch.compile of every block, tiny BAM training step
        cfg = layouts("tiny")["bam"]
        idx = torch.randint(0, cfg.vocab_size, (16, cfg.max_seq_len), generator=gen).to(device)
        torch.manual_seed(0)
        eager = BAMTransformer(cfg).to(device, dtype)
        torch.manual_seed(0)
        compiled = BAMTransformer(cfg).to(device, dtype)
        if compile_blocks(compiled).blocks:
            compiled_step = train_step(compiled, idx)
            start = time.perf_counter()
            compiled_step()  # compiles
            compiled_step()  # nothing recompiles: the loop dispatch reads the expert loads outside the graphs
            _sync(device)
            compile_s = time.perf_counter() - start
            t_eager, t_compiled, ratio = compare(train_step(eager, idx), compiled_step)
            rows.append(("(6) tiny bam training step, compiled / eager", f"eager {t_eager * 1e3:.0f} ms",
                         f"compiled {t_compiled * 1e3:.0f} ms (compile {compile_s:.0f} s)", ratio, "(info)"))

    if "7" not in skip and device.type == "cpu" and dtype == torch.float32:  # the moe stage vs the bare step, tiny
        cfgs = layouts("tiny")
        fit_tok_s = {}
        with tempfile.TemporaryDirectory(prefix="bench-stage-") as tmp:
            for layout in ("bam", "dense"):
                stage_s, bare_s, step_tokens = stage_fit_seconds(layout, cfgs[layout], device, dtype, warmup, repeats,
                                                                 Path(tmp), gen)
                stage_tok_s, bare_tok_s = step_tokens * len(stage_s) / sum(stage_s), step_tokens * len(bare_s) / sum(bare_s)
                fit_tok_s[layout] = stage_tok_s
                rows.append((f"(7) tiny {layout}: moe stage Trainer.fit / bare step, tokens/s ({len(stage_s)} steps)",
                             f"bare {bare_tok_s:.0f}", f"stage {stage_tok_s:.0f}", stage_tok_s / bare_tok_s,
                             ">= 0.95x" if layout == "bam" else "(info)"))
        rows.append(("(7) tiny moe stage Trainer.fit tokens/s, bam / dense", f"dense {fit_tok_s['dense']:.0f}",
                     f"bam {fit_tok_s['bam']:.0f}", fit_tok_s["bam"] / fit_tok_s["dense"],
                     f"(info; bare (4): {bare_ratios['tiny']:.2f}x)" if "tiny" in bare_ratios else "(info)"))
    return rows


def graph_break_table() -> list[str]:
    """The markdown table of ``--graph-breaks`` (module docstring), one row per mix variant."""
    dense = preset("smoke")
    lines = [f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, block 0 at the smoke shape (2 x 16 tokens, "
             f"d_model {dense.d_model}, 3 domains + the seed), training mode, CPU; "
             "`PYTHONPATH=src python benchmarks/bench_model.py --graph-breaks`", "",
             "| variant | loop float32: graphs / breaks / backward graphs | grouped bf16: graphs / breaks / backward "
             "graphs | break reasons (loop), where our code makes them |",
             "|---|---|---|---|"]
    for name in group_options("mix"):
        cfg = read_section(MixVariant, load_option("mix", name), f"mix/{name}", name=name).layout(dense, 3)
        loop = block_graph_breaks(cfg)
        grouped = block_graph_breaks(cfg, dispatch="grouped", autocast=torch.bfloat16)
        reasons = "; ".join(f"{reason} ({where})" for reason, where in loop.reasons) or "-"
        lines.append(f"| {name} | {loop.graphs} / {loop.breaks} / {loop.backward_graphs} | {grouped.graphs} / "
                     f"{grouped.breaks} / {grouped.backward_graphs} | {reasons} |")
    return lines


def default_speeds_path() -> Path:
    return Path(os.environ.get("BAM_STAGES_DIR", "stages")) / "speeds.json"


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
    parser.add_argument("--speeds", type=Path, default=default_speeds_path(),
                        help="where to write the measured speeds for stage=info")
    parser.add_argument("--skip", default="", help="comma-separated rows to leave out, e.g. 1,2,3")
    parser.add_argument("--graph-breaks", action="store_true",
                        help="print only the graph breaks of every mix variant's block under torch.compile (CPU)")
    args = parser.parse_args()
    if args.graph_breaks:
        print("\n".join(graph_break_table()))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but CUDA is not available; use --device cpu")
    kept = args.device == "cpu" and not args.libc_malloc and keep_freed_memory()
    quiet_lightning()  # row (7): no Trainer banners between the rows
    os.environ.setdefault("WANDB_SILENT", "true")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    speeds: dict[str, dict] = {"train": {}, "forward": {}, "batch": {}}
    rows = run(device, DTYPES[args.dtype], args.repeats, args.warmup, set(args.skip.split(",")), speeds)

    print(f"# bench_model: device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} "
          f"repeats={args.repeats} warmup={args.warmup} (medians, interleaved) torch={torch.__version__} "
          f"host memory={'kept' if kept else 'libc defaults'} machine={machine(device)}")
    header = ("measurement", "baseline", "candidate", "ratio", "target")
    widths = [max(len(str(r[i])) if i != 3 else 6 for r in [header, *rows]) for i in range(5)]
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        cells = [r[0], r[1], r[2], f"{r[3]:.2f}x", r[4]]
        print(" | ".join(c.ljust(w) for c, w in zip(cells, widths)))
    if speeds["train"]:
        table = SpeedTable(machine=machine(device), measured=time.strftime("%Y-%m-%d"), device=args.device,
                           dtype=args.dtype, torch=torch.__version__, batch=speeds["batch"],
                           train_tokens_per_s=speeds["train"], forward_tokens_per_s=speeds["forward"])
        table.write(args.speeds)
        print(f"speeds for stage=info: {args.speeds}")


if __name__ == "__main__":
    main()
