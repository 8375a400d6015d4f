"""stage=data: prepare (or reuse) the run's corpora, splits, tokenizer and token shards."""

from __future__ import annotations

import json
import os

from bam_pipeline.data.prepare import PreparedData, prepare_data, print_stats_table
from bam_pipeline.errors import BamError
from bam_pipeline.stages.context import RunContext
from bam_pipeline.stages.hf_model_dirs import seed_tokenizer
from bam_pipeline.stages.inputs import open_data
from bam_pipeline.store.artifacts import remove_dead_temporaries
from bam_pipeline.store.files import write_json
from bam_pipeline.store.locks import StageLock
from bam_pipeline.ranks import is_rank_zero, wait_for


def link_shared_data(ctx: RunContext, prepared: PreparedData) -> None:
    """Record in a run that reads another run's prepared data (a seed of ``pipeline.seeds``) where that
    data is and its hash (``data.json``), so commands naming the run alone (``run=<run>-seed1``) find it."""
    if not ctx.layout.shares_data or not is_rank_zero():
        return
    ref = {"data_dir": os.path.relpath(ctx.layout.data.resolve(), ctx.layout.run_dir.resolve()),
           "data_hash": prepared.manifest["hash"]}
    if not ctx.layout.data_ref.is_file() or json.loads(ctx.layout.data_ref.read_text()) != ref:
        write_json(ctx.layout.data_ref, ref)


def run_data(ctx: RunContext) -> PreparedData | None:
    """The run's prepared data (prepared here, or waited for); None when this command prepares one part of it
    (``data.part``), which publishes nothing."""
    if ctx.data.part is not None and ctx.stage != "data":
        raise BamError(f"data.part={ctx.data.part} prepares one part of the data and publishes nothing, so "
                       f"stage={ctx.stage} has no data to go on with; run the parts with `{ctx.cmd(f'stage=data data.parts={ctx.data.parts} data.part=<i>')}`, "
                       f"merge them with `{ctx.cmd(f'stage=data data.parts={ctx.data.parts}')}`, then run "
                       f"stage={ctx.stage} without data.part")
    if ctx.layout.shares_data:  # a seed of pipeline.seeds: the data is another run's, prepared there
        prepared = open_data(ctx)
        link_shared_data(ctx, prepared)
        return prepared
    if not is_rank_zero():  # other ranks of a distributed launch wait for rank 0's data
        def ready() -> PreparedData | None:
            try:
                return open_data(ctx)
            except BamError:
                return None

        return wait_for(ready, "the data stage", ctx.trainer.collective_timeout_s)
    part = ctx.data.part
    # the parts run at once (a sweep over data.part): each holds its own lock; the merge holds the data's
    lock = StageLock(ctx.layout.lock("data", "data") if part is None else
                     ctx.layout.lock("data", f"part{part}-of-{ctx.data.parts}"), "the prepared data")
    holder = lock.try_acquire()
    if holder is not None:  # another run prepares it: wait, then use what it made
        if part is not None:
            raise BamError(f"part {part} of {ctx.data.parts} of the data is being prepared by {holder.describe()}; "
                           "wait for it to finish (a second command would prepare the same shards)")
        prepared = open_data(ctx)
    else:
        for p in remove_dead_temporaries(ctx.layout.data):
            print(f"data: removed {p}, left by a run that was killed while publishing")
        try:
            prepared = prepare_data(ctx.data, ctx.layout.data, seed_tokenizer=seed_tokenizer(ctx), command=ctx.cmd,
                                    wait_s=ctx.pipeline.wait_s)
        finally:
            lock.release()
    if prepared is not None:
        print_stats_table(prepared)
    return prepared
