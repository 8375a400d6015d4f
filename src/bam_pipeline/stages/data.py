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
from bam_pipeline.training.ranks import is_rank_zero, wait_for


def link_shared_data(ctx: RunContext, prepared: PreparedData) -> None:
    """Record in a run that reads another run's prepared data (a seed of ``pipeline.seeds``) where that
    data is and its hash (``data.json``), so commands naming the run alone (``run=<run>-seed1``) find it."""
    if not ctx.layout.shares_data or not is_rank_zero():
        return
    ref = {"data_dir": os.path.relpath(ctx.layout.data.resolve(), ctx.layout.run_dir.resolve()),
           "data_hash": prepared.manifest["hash"]}
    if not ctx.layout.data_ref.is_file() or json.loads(ctx.layout.data_ref.read_text()) != ref:
        write_json(ctx.layout.data_ref, ref)


def run_data(ctx: RunContext) -> PreparedData:
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

        return wait_for(ready, "the data stage")
    lock = StageLock(ctx.layout.lock("data"), "the prepared data")
    if lock.try_acquire() is not None:  # another run prepares it: wait, then use what it made
        prepared = open_data(ctx)
    else:
        for p in remove_dead_temporaries(ctx.layout.data):
            print(f"data: removed {p}, left by a run that was killed while publishing")
        try:
            prepared = prepare_data(ctx.data, ctx.layout.data, seed_tokenizer=seed_tokenizer(ctx))
        finally:
            lock.release()
    print_stats_table(prepared)
    return prepared
