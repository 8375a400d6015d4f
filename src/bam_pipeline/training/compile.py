"""``train.compile``: every transformer block run under ``torch.compile``, or the eager model with one
line saying why not; and the graph breaks of one block, counted by ``torch._dynamo.explain``
(:func:`block_graph_breaks`; the table in docs/measurements.md: ``benchmarks/bench_model.py --graph-breaks``).

Blocks are compiled one by one (``nn.Module.compile``: parameter names and the state dict stay as
they are), so FSDP units, activation checkpointing and the chunked loss keep working around them.
The MoE loop dispatch's host read of the expert counts (and expert choice's mask dispatch and
threshold update) run eagerly between graphs (model/moe.py, model/routing.py): a graph break each,
by design; a block under ``grouped_mm`` dispatch in bfloat16 has none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bam_pipeline.model.config import ModelConfig
from bam_pipeline.model.moe import MoEFeedForward
from bam_pipeline.model.transformer import BAMTransformer, Block


def compile_unsupported() -> str | None:
    """Why ``torch.compile`` cannot run here (its default backend needs dynamo and, on the CPU, a
    C++ compiler), or None."""
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python"
    if not torch.cuda.is_available():
        from torch._inductor import cpp_builder

        try:
            cpp_builder.get_cpp_compiler()
        except (RuntimeError, OSError) as e:
            return f"no C++ compiler for torch.compile on the CPU ({str(e).splitlines()[0]})"
    return None


def _graphs_compiled() -> int:
    """Graphs Dynamo has compiled in this process (a counter that :func:`torch._dynamo.reset` keeps)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@dataclass(frozen=True)
class CompiledBlocks:
    """What ``train.compile`` did to a model: ``blocks`` compiled (0: it runs eager, for the reason ``why``)."""

    blocks: int
    why: str | None = None
    graphs_at_start: int = 0

    def record(self) -> dict[str, Any]:
        """For the manifest: the blocks compiled and the graphs Dynamo compiled for them so far (every graph
        break and recompilation adds one: training and evaluation mode each compile their own), or why none."""
        if not self.blocks:
            return {"blocks": 0, "why": self.why}
        return {"blocks": self.blocks, "graphs": _graphs_compiled() - self.graphs_at_start}


def compile_blocks(model: BAMTransformer) -> CompiledBlocks:
    """Compile each block of ``model`` in place, with one printed line; where torch.compile cannot run, leave it
    eager and say why.

    Dynamo's caches are cleared first: they hold the graphs of any model compiled earlier in this process
    (``stage=all`` trains its stages in one process), and a code object recompiled for more than
    ``torch._dynamo.config.recompile_limit`` (8) models silently runs eager from then on.
    """
    why = compile_unsupported()
    if why is not None:
        print(f"train.compile=true: running eager, {why}")
        return CompiledBlocks(0, why)
    torch._dynamo.reset()
    blocks = [module for module in model.modules() if isinstance(module, Block)]
    for block in blocks:
        block.compile()
    print(f"train.compile=true: {len(blocks)} blocks under torch.compile (inductor)")
    return CompiledBlocks(len(blocks), None, _graphs_compiled())


@dataclass(frozen=True)
class GraphBreaks:
    """One block's graphs under ``torch.compile``: what ``torch._dynamo.explain`` finds in its training forward
    (``graphs``, ``breaks``, and each distinct ``(reason, where)``: the reason in one line and the innermost
    frame of our code, ``file:line function``), and the backward graphs AOTAutograd compiles for them."""

    graphs: int
    breaks: int
    reasons: tuple[tuple[str, str], ...]
    backward_graphs: int


def _reason(text: str) -> str:
    """A break's reason in one line: Dynamo's first line, and the reason a ``torch.compiler.disable`` gives."""
    first = text.strip().splitlines()[0]
    given = re.search(r"\(reason: (.+?)\)\s*$", text, re.MULTILINE)
    return first if given is None or given.group(1) == "None" else f"{first}: {given.group(1)}"


def _where(stack: list[Any]) -> str:
    """``model/moe.py:213 _experts``: the innermost frame of bam_pipeline's code in a break's user stack."""
    ours = [f for f in stack if "bam_pipeline" in f.filename] or stack
    if not ours:
        return "?"
    frame = ours[-1]
    return f"{Path(frame.filename).parent.name}/{Path(frame.filename).name}:{frame.lineno} {frame.name}"


def block_graph_breaks(cfg: ModelConfig, *, dispatch: str = "loop", autocast: torch.dtype | None = None,
                       batch: int = 2, seq_len: int = 16, seed: int = 0) -> GraphBreaks:
    """The graph breaks of block 0 of ``cfg`` (the block that decides the routing) in training mode on the CPU,
    on random ``(batch, seq_len)`` inputs, its MoE layer on ``dispatch``, under CPU autocast to ``autocast`` when
    given. Forward: ``torch._dynamo.explain``. Backward: the block compiled with AOTAutograd and counting
    compilers, then a forward and backward of a loss over its output and auxiliary losses."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        block = Block(cfg, 0).train()
    for module in block.modules():
        if isinstance(module, MoEFeedForward):
            module.dispatch = dispatch
    x = torch.randn(batch, seq_len, cfg.d_model, generator=gen)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=gen)
    autocasting = torch.autocast("cpu", dtype=autocast, enabled=autocast is not None)

    torch._dynamo.reset()
    with autocasting:
        explained = torch._dynamo.explain(block)(x, ids)
    reasons = sorted({(_reason(b.reason), _where(b.user_stack)) for b in explained.break_reasons})

    backward: list[torch.fx.GraphModule] = []

    def forward_compiler(gm: torch.fx.GraphModule, _inputs: list[Any]):
        return make_boxed_func(gm.forward)

    def backward_compiler(gm: torch.fx.GraphModule, _inputs: list[Any]):
        backward.append(gm)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    compiled = torch.compile(block, backend=aot_autograd(fw_compiler=forward_compiler, bw_compiler=backward_compiler))
    with autocasting:
        y, routing = compiled(x, ids)
        loss = y.float().square().mean() + routing.lb_loss + routing.z_loss
        if routing.attn_lb_loss is not None:
            loss = loss + routing.attn_lb_loss
    loss.backward()
    torch._dynamo.reset()
    return GraphBreaks(explained.graph_count, explained.graph_break_count, tuple(reasons), len(backward))
