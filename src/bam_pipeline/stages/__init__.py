"""The stages: ``stage=<name>`` maps to one runner each (:data:`STAGES`), over one
:class:`~bam_pipeline.stages.context.RunContext`. The training stages share one path
(:mod:`~bam_pipeline.stages.train`); every stage finds its inputs and decides freshness the same way
(:mod:`~bam_pipeline.stages.inputs`)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from bam_pipeline.errors import BamError
from bam_pipeline.stages.context import RunContext


@dataclass(frozen=True)
class Stage:
    """A stage's name, its runner as ``module:function`` (imported when it runs: a command refused for its
    config never imports Lightning, the trainer or the eval harness, which takes seconds) and its summary."""

    name: str
    target: str
    summary: str

    @property
    def run(self) -> Callable[[RunContext], Any]:
        module, _, function = self.target.partition(":")
        return getattr(importlib.import_module(f"bam_pipeline.stages.{module}"), function)


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("data", "data:run_data", "corpora, splits, tokenizer and token shards"),
    Stage("seed", "train:run_seed", "pretrain the dense seed"),
    Stage("branch", "train:run_branch", "train one domain expert from the seed (domain=<name>)"),
    Stage("mix", "mix:run_mix", "upcycle seed + experts into a mixture, no training (mix=<variant>)"),
    Stage("moe", "train:run_moe", "train a mixture (mix=<variant>; budget.moe.match=compute for <variant>_cm)"),
    Stage("eval", "eval:run_eval_stage", "perplexity per domain, routing, report"),
    Stage("downstream", "downstream:run_downstream",
          "lm-evaluation-harness tasks of every model (downstream=offline|paper)"),
    Stage("all", "all:run_all", "every stage above, each skipped when up to date"),
    Stage("results", "results:run_results",
          "the evaluated run's summary into docs/results/<experiment>.json, then docs/results.md from every summary"),
    Stage("info", "info:run_info", "parameters and FLOPs per token of model= and mix=, no data"),
    Stage("status", "status:run_status", "every artifact of the run: fresh, stale or missing"),
    Stage("export", "export:run_export", "a model artifact as a Hugging Face model directory (artifact=<label>)"),
    Stage("generate", "generate:run_generate",
          "continue prompts with a model, KV cache (artifact=<label> generate.prompt=...)"),
)}


def stage_named(name: str) -> Stage:
    """The registered stage ``name``; a BamError listing the stages otherwise."""
    if name not in STAGES:
        raise BamError(f"unknown stage {name!r}; choose one of: {', '.join(STAGES)}")
    return STAGES[name]
