"""stage=info: a configuration's architecture, parameters and FLOPs per token (paper Tables 7 and 9),
the memory each training stage needs per device and whether it fits (``info.device_memory``), and
the run's wall time projected from the speeds ``make bench`` measured (``info.speeds``); no data,
no training, no devices needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bam_pipeline.data.prepare import open_current
from bam_pipeline.data.tokenizer import load_tokenizer
from bam_pipeline.errors import BamError
from bam_pipeline.eval.render import text_table
from bam_pipeline.mixing.variant import MixVariant
from bam_pipeline.model.config import ModelConfig
from bam_pipeline.model.counting import describe
from bam_pipeline.stages.context import RunContext
from bam_pipeline.stages.hf_model_dirs import hf_dense_config
from bam_pipeline.stages.train import parse_moe_name
from bam_pipeline.training.budget import plan_budget
from bam_pipeline.training.memory import ASSUMPTIONS, MemoryEstimate, MemorySetup, estimate, format_bytes
from bam_pipeline.training.speeds import SpeedTable, StageWork, format_duration, model_key, project


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


def memory_setup(ctx: RunContext, vocab_size: int) -> MemorySetup:
    """One device's share of a training stage of this run (the ``train:`` and ``trainer:`` sections)."""
    t = ctx.train
    return MemorySetup(
        batch_size=ctx.batch_split.micro_batch, seq_len=t.seq_len, world_size=ctx.world_size,
        strategy=ctx.trainer.strategy, precision=ctx.trainer.precision,
        activation_checkpointing=ctx.trainer.activation_checkpointing,
        loss_chunk_tokens=t.loss_chunking.chunk_tokens(vocab_size, ctx.batch_split.micro_batch * t.seq_len),
    )


def memory_table(rows: list[tuple[str, str, MemoryEstimate]], device_bytes: int) -> list[list[str]]:
    """Header + one row per (stage, model): bytes per device and whether they fit."""
    out = [["stage", "model", "params", "grads", "AdamW", "activations", "working", "total",
            f"fits {format_bytes(device_bytes)}"]]
    for stage, model, m in rows:
        cells = [m.params, m.grads, m.optimizer, m.activations, m.working, m.total]
        out.append([stage, model, *map(format_bytes, cells), "yes" if m.fits(device_bytes) else "NO"])
    return out


def _val_passes(steps: int, val_every: int, val_tokens: int) -> int:
    return 0 if val_tokens == 0 else steps // min(val_every, steps)


def pipeline_work(ctx: RunContext, dense: ModelConfig) -> tuple[list[StageWork], dict[str, int]]:
    """The training stages ``stage=all`` runs (seed, every branch, every moe run), and eval's tokens
    per model, for a projection."""
    t, n = ctx.train, len(ctx.data.domains)
    preset = ctx.model.preset

    def stage(label: str, layout: str, tokens: int, cfg: ModelConfig, match: str = "data",
              reference: ModelConfig | None = None) -> StageWork:
        budget = plan_budget(tokens, cfg, seq_len=t.seq_len, tokens_per_step=ctx.tokens_per_step, match=match,
                             reference=reference, flops=ctx.budget.moe.flops)
        return StageWork(label, model_key(preset, layout), budget.tokens,
                         _val_passes(budget.steps, t.val_every, t.val_tokens), t.val_tokens)

    work = [stage("seed", "dense", ctx.budget.seed.tokens, dense)]
    work += [stage(f"branch/{d}", "dense", ctx.budget.branch.tokens, dense) for d in ctx.data.domains]
    reference = ctx.variant(ctx.budget.moe.reference).layout(dense, n)
    for run in ctx.pipeline.moe_runs:
        name, match, art = parse_moe_name(run, ctx.budget.moe.match)
        variant = ctx.variant(name)
        layout = "dense" if variant.method == "dense" else name
        work.append(stage(f"moe/{art}", layout, ctx.budget.moe.tokens, variant.layout(dense, n), match, reference))
    eval_models = ["dense"] * (1 + n)
    for name in ctx.pipeline.mix_variants:
        eval_models.append("dense" if ctx.variant(name).method == "dense" else name)
    eval_models += [w.model.split("/", 1)[1] for w in work if w.label.startswith("moe/")]
    per_model = (ctx.eval.max_tokens_per_source or 0) * (1 + n)
    eval_tokens: dict[str, int] = {}
    for layout in eval_models:
        key = model_key(preset, layout)
        eval_tokens[key] = eval_tokens.get(key, 0) + per_model
    return work, eval_tokens


def print_projection(ctx: RunContext, dense: ModelConfig) -> None:
    """The wall time of ``stage=all`` projected from measured speeds, or how to measure them."""
    path = Path(ctx.info.speeds)
    speeds = SpeedTable.read(path)
    if speeds is None:
        print(f"projected wall time: no speeds measured on this machine ({path} does not exist); run `make bench` "
              "here (it writes that file) to project this run's wall time from its budgets")
        return
    work, eval_tokens = pipeline_work(ctx, dense)
    p = project(work, eval_tokens, speeds)
    used = sorted({" x ".join(map(str, speeds.batch[w.model])) for w in work if w.model in speeds.batch})
    print(f"projected wall time of stage=all from the speeds `make bench` measured on {speeds.machine} "
          f"({speeds.device}, {speeds.dtype}, {speeds.measured}, at {' / '.join(used) or '-'} tokens a step; "
          f"this run: {ctx.tokens_per_step:,} tokens a step, micro-batch {ctx.batch_split.micro_batch} x "
          f"{ctx.train.seq_len} x {ctx.batch_split.accumulate} accumulated on {ctx.world_size} process(es)):")
    for r in p["stages"]:
        print(f"  {r['stage']:<20} {r['model']:<22} {format_duration(r['seconds'])}")
    eval_note = "" if ctx.eval.max_tokens_per_source else " (eval.max_tokens_per_source=null: not projected)"
    print(f"  {'eval':<20} {'':<22} {format_duration(p['eval_s'])}{eval_note}")
    print(f"  total {format_duration(p['total_s'])} (training steps, validation and eval at the measured speeds; "
          "data preparation, checkpoints and process start-up not included)")
    if p["missing"]:
        print(f"  no measured speed for {', '.join(p['missing'])}: left out of the total (make bench measures "
              "the presets tiny and small with the dense, bam, bam_kv_shared and btx layouts)")


def run_vocabulary(ctx: RunContext) -> tuple[int, str]:
    """The vocabulary size a pretrained seed of this run gets, and where it comes from: the run's
    prepared tokenizer when its data is prepared for this config, else the tokenizer the data stage
    would load (``data.tokenizer.path``) or train (``data.tokenizer.vocab_size``). The model preset's
    own vocab_size is a placeholder the pipeline never builds with."""
    try:  # not open_data: planning never waits for another run's data stage
        return open_current(ctx.data, ctx.layout.data, verify=False).vocab_size, \
            f"the run's prepared tokenizer ({ctx.layout.data})"
    except BamError:
        pass
    tok = ctx.data.tokenizer
    if tok.path is not None:
        return load_tokenizer(tok.path, tok.eos_token).get_vocab_size(), f"data.tokenizer.path={tok.path}"
    return tok.vocab_size, "data.tokenizer.vocab_size, the tokenizer the data stage trains (no data prepared yet)"


def run_info(ctx: RunContext) -> None:
    variant = ctx.variant(ctx.mix_name)
    if ctx.seed.kind == "pretrain":
        vocab, source = run_vocabulary(ctx)
        dense = ctx.model.dense_config(vocab)
    else:
        dense = hf_dense_config(ctx.seed.hf_model, ctx.model.seq_len)
        vocab, source = dense.vocab_size, f"the seed checkpoint {ctx.seed.hf_model.path}"
    preset_vocab = ctx.model.dense_config().vocab_size
    note = f"; the {dense.name} preset was sized with {preset_vocab:,}: add data.tokenizer.vocab_size={preset_vocab} " \
           "to plan with that" if ctx.seed.kind == "pretrain" and vocab != preset_vocab and ctx.data.tokenizer.path is None \
        else ""
    print(f"vocabulary: {vocab:,} tokens, from {source}{note}")
    n_domains = len(ctx.data.domains)
    rows = info_rows(dense, variant, n_domains=n_domains, seq_len=ctx.model.seq_len)
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
    mixed = variant.layout(dense, n_domains)
    gaps = variant.function_gaps(mixed)
    if gaps:
        print(f"  upcycled from identical experts this is NOT the seed's function: {'; '.join(gaps)} (exact: "
              "renormalize: true in the router; the paper's top-1 gate stays unrenormalised so its router learns)")
    else:
        print("  upcycled from identical experts this is exactly the seed's function (gates sum to one)")

    setup = memory_setup(ctx, dense.vocab_size)
    loss = "plain" if setup.loss_chunk_tokens is None else f"chunked, {setup.loss_chunk_tokens} tokens a chunk"
    trainer = ctx.trainer
    print(f"memory per device: trainer strategy={trainer.strategy} on {setup.world_size} process(es), precision "
          f"{trainer.precision}, micro-batch {setup.batch_size} x {setup.seq_len} tokens (accumulated {ctx.batch_split.accumulate} "
          f"times: {ctx.tokens_per_step:,} tokens a step over every device), activation checkpointing "
          f"{'on' if setup.activation_checkpointing else 'off'}, LM loss {loss}")
    device = ctx.info.device_bytes
    table = [("seed", f"{dense.name} dense", estimate(dense, setup)),
             ("branch", f"{dense.name} dense", estimate(dense, setup)),
             ("moe", f"{dense.name} + {variant.name}" + (" (frozen experts)" if variant.freeze_experts else ""),
              estimate(mixed, setup, frozen_experts=variant.freeze_experts))]
    print(text_table(memory_table(table, device), left=2, indent="  "))
    print("  assumptions:")
    for a in ASSUMPTIONS:
        print(f"  - {a}")
    print_projection(ctx, dense)
