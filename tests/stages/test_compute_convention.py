"""budget.moe.flops on the finished smoke run: the default keeps every stage identity, non_embedding changes
exactly the compute-matched runs'."""

from __future__ import annotations

import re

import pytest
from cli_runner import cli_here


def _states(out: str) -> dict[str, tuple[str, str]]:
    """stage=status's model rows: label -> (state, detail)."""
    return {lab: (state, detail.strip()) for lab, state, detail in
            re.findall(r"^  ((?:seed|branch|mix|moe)\S*)\s+(fresh|stale|missing)(.*)$", out, re.M)}


@pytest.mark.slow  # about 4 s: stage=status over a copy of the smoke run
def test_only_the_compute_matched_runs_depend_on_the_flop_convention(smoke_copy):
    """The smoke run was built with the default (total); under non_embedding only the compute-matched runs are
    stale, for their budget: the data-matched ones count no FLOPs, and the default changed no identity."""
    states = _states(cli_here(smoke_copy, "stage=status", "budget.moe.flops=non_embedding", check=True).out)
    stale = {lab: detail for lab, (state, detail) in states.items() if state == "stale"}
    assert len(states) == 13 and {s for s, _ in states.values()} == {"fresh", "stale"}, states
    assert set(stale) == {"moe/bam_cm", "moe/dense"} and all("budget" in d for d in stale.values()), states
