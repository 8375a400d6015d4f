"""Stage budgets: the typed ``budget:`` settings, and tokens (data-matched) or training FLOPs
(compute-matched) turned into steps."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from bam_pipeline.errors import BamError, ConfigError
from bam_pipeline.model.config import ModelConfig
from bam_pipeline.model.counting import FLOP_CONVENTIONS, training_flops_per_token

MATCHES = ("data", "compute")


@dataclass(frozen=True)
class StageBudget:
    """Tokens one run of a stage trains on."""

    tokens: int

    def __post_init__(self) -> None:
        if self.tokens <= 0:
            raise ConfigError("tokens", self.tokens, "must be a positive number of tokens")


@dataclass(frozen=True)
class BranchBudget:
    """Tokens each domain expert trains on; 0: the expert is a copy of the seed (identical experts, the
    control under which a mixture whose gates sum to one is the seed's function)."""

    tokens: int

    def __post_init__(self) -> None:
        if self.tokens < 0:
            raise ConfigError("tokens", self.tokens, "must be a number of tokens >= 0 (0: copy the seed)")


@dataclass(frozen=True)
class MoeBudget(StageBudget):
    """The mixture phase: ``tokens`` for every variant (data-matched), or the training FLOPs that
    ``reference`` (a mix variant) spends on ``tokens`` (compute-matched), FLOPs counted as ``flops`` says:
    ``total`` (the LM head included) or ``non_embedding`` (without it; model.counting)."""

    match: str
    reference: str
    flops: str = "total"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.match not in MATCHES:
            raise ConfigError("match", self.match, f"use one of {', '.join(MATCHES)}")
        if self.flops not in FLOP_CONVENTIONS:
            raise ConfigError("flops", self.flops, f"use one of {', '.join(FLOP_CONVENTIONS)} (total: the LM head "
                                                   "counted; non_embedding: without it)")


@dataclass(frozen=True)
class BudgetSettings:
    """The ``budget:`` config section."""

    seed: StageBudget
    branch: BranchBudget
    moe: MoeBudget


@dataclass(frozen=True)
class Budget:
    """How long a stage trains: planned tokens, steps, and the training FLOPs they cost."""

    match: str
    tokens: int            # tokens actually trained (steps x tokens per step)
    steps: int
    tokens_per_step: int
    train_flops: float     # 3 x forward FLOPs per token x tokens (total: the LM head counted)
    reference_tokens: int  # the budget's token count before compute matching
    flops: str | None = None  # compute-matched: the FLOP convention matched (model.counting); None: data-matched

    def identity(self) -> dict[str, Any]:
        """The budget as a stage's identity records it: ``flops`` only where compute was matched in another
        convention than ``total``, so every budget planned before the convention existed keeps its hash."""
        out = asdict(self)
        if out["flops"] in (None, "total"):
            del out["flops"]
        return out


def plan_budget(
    tokens: int,
    cfg: ModelConfig,
    *,
    seq_len: int,
    tokens_per_step: int,
    match: str = "data",
    reference: ModelConfig | None = None,
    flops: str = "total",
) -> Budget:
    """Steps for a stage.

    ``data``: train ``tokens`` tokens. ``compute``: spend the training FLOPs ``reference`` would spend
    on ``tokens`` tokens, so a model with more FLOPs per token sees proportionally fewer tokens; both counted
    in the convention ``flops`` (``total`` or ``non_embedding``: without the LM head). The budget's
    ``train_flops`` are always the total training FLOPs of the tokens it trains.
    """
    if match not in MATCHES:
        raise BamError(f"budget match must be one of {MATCHES}, got {match!r}")
    if tokens <= 0:
        raise BamError(f"budget tokens must be positive, got {tokens}")
    own = training_flops_per_token(cfg, seq_len)
    target = tokens
    if match == "compute":
        if reference is None:
            raise BamError("a compute-matched budget needs a reference model (budget.moe.reference)")
        target = (tokens * training_flops_per_token(reference, seq_len, convention=flops)
                  / training_flops_per_token(cfg, seq_len, convention=flops))
    steps = max(1, math.ceil(target / tokens_per_step))
    return Budget(
        match=match,
        tokens=steps * tokens_per_step,
        steps=steps,
        tokens_per_step=tokens_per_step,
        train_flops=own * steps * tokens_per_step,
        reference_tokens=tokens,
        flops=flops if match == "compute" else None,
    )
