"""The ``eval:`` config section as one typed, validated spec (defaults in ``conf/eval/default.yaml``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

from bam_pipeline.errors import ConfigError
from bam_pipeline.eval.stats import MIN_DOCUMENTS

DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


@dataclass(frozen=True)
class EvalSpec:
    """Which test tokens every model is scored on, in what batches, on which device."""

    max_tokens_per_source: Optional[int]  # test tokens per source and model (null: the whole split)
    batch_size: int  # sequences per forward pass
    seq_len: Optional[int]  # null: each model's max_seq_len
    device: str  # auto = cuda when available, else cpu
    btm: bool  # also score BTM: the seed and the domain experts ensembled at eval (docs/paper.md section 10)
    btm_prior_sequences: int  # validation sequences per source that estimate BTM's prior over its models
    resamples: int = 2000  # bootstrap resamples behind every interval of the report (at least 2000)
    # scored test documents a source needs before any verdict (claim, open question, out of domain) rests on
    # it: fewer and the verdict is "not resolved", naming the source (bam_pipeline.eval.stats explains 5)
    min_documents: int = MIN_DOCUMENTS
    # mixtures (labels, e.g. moe/bam) also scored with their soft attention weights forced uniform: is
    # soft attention routing more than averaging the attention experts?
    uniform_attention: tuple[str, ...] = ()
    # interleaved rounds of the decode latency measurement (bam_pipeline.eval.serving); 0: not timed
    latency_rounds: int = 3
    rebuild: bool = False  # redo eval and the report even when what they are made from is unchanged

    def __post_init__(self) -> None:
        if self.max_tokens_per_source is not None and self.max_tokens_per_source <= 0:
            raise ConfigError("max_tokens_per_source", self.max_tokens_per_source, "must be positive or null")
        if self.batch_size < 1:
            raise ConfigError("batch_size", self.batch_size, "must be a positive integer")
        if self.seq_len is not None and self.seq_len < 1:
            raise ConfigError("seq_len", self.seq_len, "must be positive or null (the model's max_seq_len)")
        if self.seq_len is not None:
            self.check_budget(self.seq_len, key="max_tokens_per_source")
        if self.btm_prior_sequences < 1:
            raise ConfigError("btm_prior_sequences", self.btm_prior_sequences, "must be a positive integer")
        if self.resamples < 2000:
            raise ConfigError("resamples", self.resamples, "use at least 2000 bootstrap resamples for 95% intervals")
        if self.min_documents < 2:
            raise ConfigError("min_documents", self.min_documents,
                              "use at least 2: one document gives a bootstrap interval of zero width")
        if self.latency_rounds < 0:
            raise ConfigError("latency_rounds", self.latency_rounds,
                              "must be a number of rounds >= 0 (0: decode latency is not timed)")
        object.__setattr__(self, "uniform_attention", tuple(self.uniform_attention))
        for label in self.uniform_attention:
            if not str(label).startswith(("moe/", "mix/")):
                raise ConfigError("uniform_attention", list(self.uniform_attention),
                                  "name mixtures by label, e.g. [moe/bam]")
        if not DEVICE.match(self.device):
            raise ConfigError("device", self.device, "use auto, cpu, cuda, cuda:<index> or mps")

    def check_budget(self, seq_len: int, key: str = "eval.max_tokens_per_source") -> None:
        """ConfigError unless ``max_tokens_per_source`` holds one eval sequence of ``seq_len`` positions: those
        and the token after the last, ``seq_len + 1`` tokens (each position is scored on the token after it)."""
        need = seq_len + 1
        if self.max_tokens_per_source is not None and self.max_tokens_per_source < need:
            where = "eval.seq_len" if self.seq_len is not None else "the models' max_seq_len; eval.seq_len is null"
            raise ConfigError(key, self.max_tokens_per_source,
                              f"fewer than one eval sequence: {seq_len} positions ({where}) and the token after "
                              f"the last, {need} tokens; set eval.max_tokens_per_source to at least {need}, or null "
                              "for the whole test split")

    def cache_key(self) -> dict[str, Any]:
        """The settings that change results (part of the eval cache key; the device is added apart)."""
        return {"seq_len": self.seq_len, "max_tokens_per_source": self.max_tokens_per_source,
                "batch_size": self.batch_size, "btm_prior_sequences": self.btm_prior_sequences}


SUITES = ("offline", "paper")


@dataclass(frozen=True)
class DownstreamSpec:
    """The ``downstream:`` config section (``stage=downstream``; ``downstream=offline`` or ``paper``,
    ``conf/downstream/``): which suite, which models and tasks, and the offline suite's shape."""

    suite: str = "offline"  # offline: next-passage tasks from the run's test documents; paper: Table 3 (online)
    models: Optional[tuple[str, ...]] = None  # artifact labels (seed, branch/code, moe/bam); null: every model
    tasks: Optional[tuple[str, ...]] = None  # a subset of the suite's tasks; null: all of them
    max_items: int = 200  # offline: items per source
    context_tokens: int = 64  # offline: tokens of a document before the passage to pick
    passage_tokens: int = 32  # offline: tokens of a passage (cut where a word begins)
    limit: Optional[int] = None  # paper: items per task (null: every item)
    allow_code_execution: bool = False  # paper: also HumanEval and MBPP, which run generated code
    batch_size: int = 16  # log-likelihood requests per forward pass
    max_gen_toks: int = 256  # generate_until: new tokens at most
    device: str = "auto"
    threads: Optional[int] = 1  # torch CPU threads while scoring (null: torch's default)
    seed: int = 0  # suite item order, few-shot sampling and generation
    in_all: bool = True  # stage=all runs this stage after eval
    rebuild: bool = False  # run the tasks again even when what the results are made from is unchanged

    def __post_init__(self) -> None:
        if self.suite not in SUITES:
            raise ConfigError("suite", self.suite, f"use downstream={' or downstream='.join(SUITES)}")
        for key in ("max_items", "context_tokens", "passage_tokens", "batch_size", "max_gen_toks"):
            if getattr(self, key) < 1:
                raise ConfigError(key, getattr(self, key), "must be a positive integer")
        if self.limit is not None and self.limit < 1:
            raise ConfigError("limit", self.limit, "must be a positive number of items per task, or null (all)")
        for key in ("models", "tasks"):
            names = getattr(self, key)
            if names is not None:
                names = tuple(names)
                if not names or len(set(names)) != len(names):
                    raise ConfigError(key, list(names), "list distinct names, or null for all")
                object.__setattr__(self, key, names)
        if self.seed < 0:
            raise ConfigError("seed", self.seed, "must be a non-negative integer")
        if self.threads is not None and self.threads < 1:
            raise ConfigError("threads", self.threads, "must be a positive number of threads, or null (torch's default)")
        if not DEVICE.match(self.device):
            raise ConfigError("device", self.device, "use auto, cpu, cuda, cuda:<index> or mps")
