"""Two gloo processes joined the way a stage joins them (``ranks.join_ranks`` under a launcher's environment,
through Lightning Fabric): the configured timeout reaches the process group, work is split and gathered, and
a wait on a rank that does not come fails with one line, decided by a hold rather than by a timer."""

from __future__ import annotations

import os
import socket

import pytest
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, port: int, timeout_s: float):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0",
                      WORLD_SIZE="2")
    from bam_pipeline.ranks import join_ranks

    return join_ranks({"accelerator": "cpu", "devices": 2, "num_nodes": 1}, timeout_s)


def _hold_worker(rank: int, port: int, out, rank_zero_done) -> None:
    import torch
    import torch.distributed as dist

    from bam_pipeline.errors import BamError

    ranks = _join(rank, port, 3.0)
    group = dist.distributed_c10d._get_default_group()
    out.put((rank, "timeout", group._get_backend(torch.device("cpu")).options._timeout.total_seconds()))
    shared = ranks.run_shares(["a", "b", "c"], [1.0, 2.0, 1.0], lambda u: (u, rank), "the test's units")
    out.put((rank, "shares", shared.results, shared.owners))
    if rank == 1:
        rank_zero_done.wait()  # held until rank 0 has given up: its wait cannot end before its timeout
    try:
        ranks.barrier("the held rank")
    except BamError as e:
        out.put((rank, "error", str(e)))
    if rank == 0:
        rank_zero_done.set()


def _spawn(target, *extra):
    ctx = mp.get_context("spawn")
    out, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=target, args=(r, port, out, *extra)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    items = []
    while not out.empty():
        items.append(out.get())
    return items, [p.exitcode for p in procs]


def test_the_timeout_reaches_the_process_group_and_a_held_rank_fails_the_wait_in_one_line():
    ctx = mp.get_context("spawn")
    items, codes = _spawn(_hold_worker, ctx.Event())
    got = {(r, kind): rest for r, kind, *rest in items}
    assert got[(0, "timeout")] == got[(1, "timeout")] == [3.0]
    # both ranks hold every result, each unit computed by the rank assign_shares gave it
    assert got[(0, "shares")] == got[(1, "shares")] == [[("a", 1), ("b", 0), ("c", 1)], [1, 0, 1]]
    [message] = got[(0, "error")]
    assert message.startswith("rank 0 waited longer than trainer.collective_timeout_s=3 s for the held rank; "
                              "raise trainer.collective_timeout_s")
    assert "\n" not in message
    assert codes == [0, 0]


def _failing_worker(rank: int, port: int, out, how: str) -> None:
    from bam_pipeline.errors import BamError
    from bam_pipeline.ranks import RankStopped

    ranks = _join(rank, port, 60.0)

    def compute(unit: int) -> int:
        if rank == 1 and how == "dies":
            os._exit(3)
        if rank == 1:
            raise BamError("model b gives a test loss of nan")
        return unit

    try:
        ranks.run_shares([0, 1, 2, 3], [1.0] * 4, compute, "the other ranks' scores")
    except RankStopped:
        out.put((rank, "stopped"))
    except BamError as e:
        out.put((rank, str(e)))


@pytest.mark.slow  # ~20 s: two process pairs
@pytest.mark.parametrize("how", ["raises", "dies"])
def test_a_rank_that_fails_while_the_ranks_share_work_stops_every_rank_with_one_line(how):
    items, codes = _spawn(_failing_worker, how)
    got = dict(items)
    if how == "raises":  # rank 0 says why, naming the rank; rank 1 stops without a word once rank 0 has gone
        assert got == {0: "rank 1: model b gives a test loss of nan", 1: "stopped"}
    else:
        assert got[0].startswith("rank 0 lost another rank while waiting for the other ranks' scores (")
        assert "trainer.collective_timeout_s=60 s" in got[0] and codes[1] == 3
