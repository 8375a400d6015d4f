"""World-size planning and rank detection used before any process group exists."""

import pytest

from bam_pipeline.errors import BamError
from bam_pipeline.training.ranks import is_rank_zero, wait_for
from bam_pipeline.training.ranks import world_size


@pytest.mark.parametrize(
    ("devices", "nodes", "expected"),
    [(1, 1, 1), (8, 4, 32), ("2", 1, 2), ("0,1", 2, 4), ([0, 1, 2], 1, 3), (-1, 1, 1), ("auto", 3, 3)],
)
def test_world_size_on_a_cpu_machine(devices, nodes, expected):
    cfg = {"accelerator": "cpu", "devices": devices, "num_nodes": nodes}
    assert world_size(cfg) == expected


@pytest.mark.parametrize("var", ["RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"])
def test_rank_zero_unless_a_launcher_says_otherwise(monkeypatch, var):
    for v in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(v, raising=False)
    assert is_rank_zero()
    monkeypatch.setenv(var, "0")
    assert is_rank_zero()
    monkeypatch.setenv(var, "1")
    assert not is_rank_zero()


def test_wait_for_returns_the_result_or_times_out():
    calls = iter([None, None, "done"])
    assert wait_for(lambda: next(calls), "x", poll_s=0.0) == "done"
    with pytest.raises(BamError, match="waited"):
        wait_for(lambda: None, "the data stage", timeout_s=0.05, poll_s=0.01)
