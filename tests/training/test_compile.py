"""torch.compile of the blocks (training/compile.py): what ``compile_blocks`` records, and the graph breaks of block 0
of every mix variant, pinned: a break that comes back in our code fails here (the table in docs/measurements.md is
``benchmarks/bench_model.py --graph-breaks``)."""

from __future__ import annotations

import pytest
import torch

from bam_pipeline.config.files import group_options, load_option
from bam_pipeline.config.reading import read_section
from bam_pipeline.mixing.variant import MixVariant
from bam_pipeline.model import BAMTransformer, ModelConfig, preset
from bam_pipeline.model.transformer import Block
from bam_pipeline.training import compile as compile_module
from bam_pipeline.training.compile import block_graph_breaks, compile_blocks

# the graph breaks our code makes on purpose: a torch.compiler.disable'd function each, with its reason
LOOP_READ = "the loop dispatch reads the expert counts to the host"
MASK = "the sizes of the expert-choice mask's pairs depend on its values"
THRESHOLD = "the threshold update asks autograd's engine whether a backward runs it"


def _variant(name: str) -> ModelConfig:
    """The smoke mixture of ``conf/mix/<name>.yaml`` (3 domains and the seed)."""
    return read_section(MixVariant, load_option("mix", name), f"mix/{name}", name=name).layout(preset("smoke"), 3)


def test_where_torch_compile_cannot_run_the_blocks_stay_eager_and_the_record_says_why(monkeypatch, capsys):
    model = BAMTransformer(preset("smoke"))
    monkeypatch.setattr(compile_module, "compile_unsupported", lambda: "no C++ compiler for torch.compile on the CPU")
    assert compile_blocks(model).record() == {"blocks": 0, "why": "no C++ compiler for torch.compile on the CPU"}
    assert "train.compile=true: running eager, no C++ compiler" in capsys.readouterr().out
    assert not any(getattr(b, "_compiled_call_impl", None) for b in model.layers)


@pytest.mark.slow  # about 35 s: Dynamo tracing a forward of 10 models
def test_every_model_compiled_in_one_process_gets_graphs_of_its_own(monkeypatch):
    """stage=all trains its stages in one process: each stage's model is compiled afresh, its blocks and nothing else
    renamed, not left eager once Dynamo's recompile limit (8 per code object) is spent on the models before it.
    (Dynamo's eager backend: inductor's code is not what is checked here.)"""
    monkeypatch.setattr(Block, "compile", lambda self: torch.nn.Module.compile(self, backend="eager"))
    names = group_options("mix")[:10]
    for name in names:
        cfg = _variant(name)
        model = BAMTransformer(cfg)
        keys = list(model.state_dict())
        compiled = compile_blocks(model)
        assert compiled.record() == {"blocks": 2, "graphs": 0}  # compiled at the first call
        assert all(block._compiled_call_impl is not None for block in model.layers) and list(model.state_dict()) == keys
        idx = torch.randint(0, cfg.vocab_size, (2, 16))
        model.loss(idx, idx)
        assert compiled.record()["graphs"] > 0, name


@pytest.mark.slow  # 4-9 s a variant (Dynamo tracing the block four times), 20 variants
@pytest.mark.parametrize("variant", group_options("mix"))
def test_a_block_breaks_only_where_our_code_runs_eager_on_purpose(variant):
    """On the loop dispatch in float32 (train.compile on the CPU), a block breaks only at the torch.compiler.disable'd
    functions: the loop's count read (one call, nested three frames deep: 3 breaks, 4 graphs) or, under expert
    choice, the mask dispatch and the threshold update; a dense block is one graph. Every forward graph that
    carries a gradient gets one backward graph. On grouped_mm in bfloat16 (a GPU's path) a block is one graph,
    expert choice apart (its mask is data-dependent whatever the dispatch)."""
    cfg = _variant(variant)
    loop = block_graph_breaks(cfg)
    grouped = block_graph_breaks(cfg, dispatch="grouped", autocast=torch.bfloat16)
    reasons = {reason.split(": ", 1)[-1] for reason, _ in loop.reasons}
    if cfg.is_dense:
        assert (loop.graphs, loop.breaks, loop.reasons, loop.backward_graphs) == (1, 0, (), 1)
    elif cfg.ffn_router.kind == "expert_choice":
        assert (loop.graphs, loop.breaks, reasons) == (7, 6, {MASK, THRESHOLD}), loop
        assert (grouped.graphs, grouped.breaks) == (7, 6), grouped
        return
    else:
        assert (loop.graphs, loop.breaks, reasons) == (4, 3, {LOOP_READ}), loop
        assert [where.split(":")[0] for _, where in loop.reasons] == ["model/moe.py"], loop.reasons
        assert loop.backward_graphs == loop.graphs
    assert (grouped.graphs, grouped.breaks, grouped.reasons, grouped.backward_graphs) == (1, 0, (), 1), grouped
