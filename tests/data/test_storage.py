"""Shard files: written batch by batch, and rewritten without some documents (the merge's cross-shard dedupe)
one batch at a time, with the same rows and counts as filtering the whole table."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from bam_pipeline.data import storage
from bam_pipeline.data.storage import ShardWriter, filter_shard, read_shard
from bam_pipeline.errors import BamError


def _shard(path, batches=((0, 3), (3, 5), (5, 9))):
    writer = ShardWriter(path, 512)
    for lo, hi in batches:
        rows = range(lo, hi)
        writer.write([f"d{i}" for i in rows], [[i] * (i + 1) for i in rows], [bytes([i]) * 16 for i in rows],
                     [10 * (i + 1) for i in rows])
    return writer.close()


def test_filtering_a_shard_batch_by_batch_equals_filtering_the_table(tmp_path, monkeypatch):
    _shard(tmp_path / "src.arrow")
    drop = np.array([True, False, False, True, True, False, False, True, False])  # batch 2 dropped whole
    whole = read_shard(tmp_path / "src.arrow").filter(pa.array(~drop))
    monkeypatch.setattr(storage, "read_shard", lambda path: pytest.fail("the shard was read whole"))
    counts = filter_shard(tmp_path / "src.arrow", tmp_path / "dst.arrow", drop, 512)
    monkeypatch.undo()
    out = read_shard(tmp_path / "dst.arrow")
    assert out.to_pylist() == whole.to_pylist() and out.column("ids").to_pylist()[0] == [1, 1]
    kept = [i for i in range(9) if not drop[i]]
    assert (counts.documents, counts.bytes, counts.tokens) == (len(kept), sum(10 * (i + 1) for i in kept),
                                                               sum(i + 1 for i in kept))


def test_a_mask_that_does_not_fit_the_shard_is_refused_and_writes_nothing(tmp_path):
    _shard(tmp_path / "src.arrow")
    with pytest.raises(BamError, match="holds 9 documents, its record 8"):
        filter_shard(tmp_path / "src.arrow", tmp_path / "dst.arrow", np.zeros(8, dtype=bool), 512)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.arrow"]
