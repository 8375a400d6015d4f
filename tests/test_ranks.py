"""World-size planning and rank detection used before any process group exists."""

import pytest

from bam_pipeline.errors import BamError
from bam_pipeline.ranks import is_rank_zero, wait_for
from bam_pipeline.ranks import world_size


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


@pytest.mark.parametrize("procid, localid, nodeid", [(0, 0, 0), (1, 1, 0), (2, 0, 1), (3, 1, 1)])
def test_ranks_under_slurm_two_nodes_of_two_tasks(monkeypatch, procid, localid, nodeid):
    """What `sbatch --nodes=2 --ntasks-per-node=2` + `srun python -m bam_pipeline ... trainer=ddp trainer.devices=2
    trainer.num_nodes=2` gives each task: Lightning takes its ranks from SLURM's variables (it launches nothing),
    and only global rank 0 counts as rank zero for the stages that write files."""
    import lightning as L

    from bam_pipeline.training.parallel import trainer_kwargs
    from bam_pipeline.training.settings import TrainerSpec

    for v in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GROUP_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(v, raising=False)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "bam", "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2",
             "SLURM_NNODES": "2", "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid),
             "SLURM_NODEID": str(nodeid), "SLURM_NODELIST": "node[1-2]"}
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    spec = TrainerSpec("cpu", 2, 2, "ddp", "32-true", False)
    trainer = L.Trainer(**trainer_kwargs(spec), logger=False, enable_progress_bar=False, enable_model_summary=False)
    assert type(trainer.strategy.cluster_environment).__name__ == "SLURMEnvironment"
    assert (trainer.global_rank, trainer.local_rank, trainer.node_rank, trainer.world_size) == (procid, localid,
                                                                                               nodeid, 4)
    assert is_rank_zero() is (procid == 0)


def test_shares_go_longest_first_to_the_least_loaded_rank():
    from bam_pipeline.ranks import assign_shares

    assert assign_shares([5, 1, 1, 1], 1) == [0, 0, 0, 0]
    assert assign_shares([5, 4, 3, 3, 1], 2) == [0, 1, 1, 0, 1]  # loads 8 and 8
    assert assign_shares([2, 2, 2], 4) == [0, 1, 2]  # more ranks than units: the last rank has none
    assert assign_shares([], 3) == []


def test_one_process_ranks_compute_in_order_and_raise_as_errors_come():
    from bam_pipeline.ranks import Ranks

    ranks = Ranks()
    assert ranks.gather("x", "w") == ["x"] and ranks.broadcast(7, "w") == 7
    ranks.barrier("nothing to wait for")
    done = []
    shared = ranks.run_shares([3, 1, 2], [3.0, 1.0, 2.0], lambda u: done.append(u) or u * 10, "w")
    assert (shared.results, shared.owners, done) == ([30, 10, 20], [0, 0, 0], [3, 1, 2])
    assert shared.by_rank(["a", "b", "c"]) == {"0": ["a", "b", "c"]}

    def fail(u):
        if u == 1:
            raise BamError("unit 1 is bad")
        return u

    with pytest.raises(BamError, match="^unit 1 is bad$"):
        ranks.run_shares([0, 1, 2], [1.0, 1.0, 1.0], fail, "w")


def test_a_wait_that_fails_names_the_rank_the_wait_and_the_setting():
    from bam_pipeline.ranks import Ranks

    ranks = Ranks(rank=1, world=2, timeout_s=90)
    with pytest.raises(BamError) as timed_out:
        with ranks.waiting("rank 0 to publish seed"):
            raise RuntimeError("[../gloo/transport/tcp/pair.cc:534] Timed out waiting 90000ms for recv operation")
    assert str(timed_out.value).startswith("rank 1 waited longer than trainer.collective_timeout_s=90 s for rank 0 "
                                           "to publish seed")
    with pytest.raises(BamError) as lost:
        with ranks.waiting("the eval scores"):
            raise RuntimeError("[/x/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1. This is "
                               "typically caused by a remote worker")
    assert str(lost.value) == ("rank 1 lost another rank while waiting for the eval scores (Connection closed by peer "
                               "[127.0.0.1]:1); that rank's output says why it stopped (a wait fails after "
                               "trainer.collective_timeout_s=90 s at the latest)")
    assert "\n" not in str(lost.value)
