"""Document-level splits: deterministic, disjoint, stable across processes, duplicates removed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bam_pipeline.data.sources import Document
from bam_pipeline.data.splits import SPLITS, dedupe_and_split, split_of

IDS = [f"pkg/module_{i}.py" for i in range(5000)]
SCRIPT = "import json,sys; from bam_pipeline.data.splits import split_of; print(json.dumps([split_of(i, 0.05, 0.05) for i in json.load(sys.stdin)]))"


def _splits_in_subprocess(hashseed: str) -> list[str]:
    env = {**os.environ, "PYTHONHASHSEED": hashseed}
    out = subprocess.run([sys.executable, "-c", SCRIPT], input=json.dumps(IDS), capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout)


def test_split_is_stable_across_processes():
    a, b = _splits_in_subprocess("1"), _splits_in_subprocess("2")
    assert a == b == [split_of(i, 0.05, 0.05) for i in IDS]


def test_split_fractions_match_the_config():
    got = [split_of(i, 0.05, 0.05) for i in IDS]
    for split, want in (("val", 0.05), ("test", 0.05), ("train", 0.9)):
        assert abs(got.count(split) / len(IDS) - want) < 0.015


def test_exact_duplicates_are_removed_before_splitting():
    docs = [Document(f"d{i}", f"text {i % 7}") for i in range(50)]
    out, dups = dedupe_and_split(docs, 0.2, 0.2)
    assert dups == 43
    kept = [d for s in SPLITS for d in out[s]]
    assert sorted(d.text for d in kept) == sorted({f"text {i}" for i in range(7)})
    assert all(split_of(d.id, 0.2, 0.2) == s for s in SPLITS for d in out[s])


def test_prepared_splits_are_disjoint(synthetic):
    cfg, prepared = synthetic
    for name in prepared.sources:
        ids = {s: set(prepared.stream(name, s).dataset["id"]) for s in SPLITS}
        assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
        assert sum(len(v) for v in ids.values()) == sum(prepared.stats[name][s]["documents"] for s in SPLITS)
        assert all(split_of(i, 0.1, 0.1) == s for s in SPLITS for i in ids[s])
