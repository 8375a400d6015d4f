"""The stages: ``stage=<name>`` maps to one runner each (:data:`STAGES`), over one
:class:`~bam_pipeline.stages.context.RunContext`. The training stages share one path
(:mod:`~bam_pipeline.stages.train`); every stage finds its inputs and decides freshness the same way
(:mod:`~bam_pipeline.stages.inputs`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from bam_pipeline.errors import BamError
from bam_pipeline.stages.all import run_all
from bam_pipeline.stages.context import RunContext
from bam_pipeline.stages.data import run_data
from bam_pipeline.stages.downstream import run_downstream
from bam_pipeline.stages.eval import run_eval_stage
from bam_pipeline.stages.export import run_export
from bam_pipeline.stages.generate import run_generate
from bam_pipeline.stages.info import run_info
from bam_pipeline.stages.mix import run_mix
from bam_pipeline.stages.status import run_status
from bam_pipeline.stages.train import run_branch, run_moe, run_seed


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[RunContext], Any]
    summary: str


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("data", run_data, "corpora, splits, tokenizer and token shards"),
    Stage("seed", run_seed, "pretrain the dense seed"),
    Stage("branch", run_branch, "train one domain expert from the seed (domain=<name>)"),
    Stage("mix", run_mix, "upcycle seed + experts into a mixture, no training (mix=<variant>)"),
    Stage("moe", run_moe, "train a mixture (mix=<variant>; budget.moe.match=compute for <variant>_cm)"),
    Stage("eval", run_eval_stage, "perplexity per domain, routing, report"),
    Stage("downstream", run_downstream, "lm-evaluation-harness tasks of every model (downstream=offline|paper)"),
    Stage("all", run_all, "every stage above, each skipped when up to date"),
    Stage("info", run_info, "parameters and FLOPs per token of model= and mix=, no data"),
    Stage("status", run_status, "every artifact of the run: fresh, stale or missing"),
    Stage("export", run_export, "a model artifact as a Hugging Face model directory (artifact=<label>)"),
    Stage("generate", run_generate, "continue prompts with a model, KV cache (artifact=<label> generate.prompt=...)"),
)}


def stage_named(name: str) -> Stage:
    """The registered stage ``name``; a BamError listing the stages otherwise."""
    if name not in STAGES:
        raise BamError(f"unknown stage {name!r}; choose one of: {', '.join(STAGES)}")
    return STAGES[name]
