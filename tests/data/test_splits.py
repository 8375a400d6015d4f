"""Document-level splits: deterministic, disjoint, stable across processes, duplicates removed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bam_pipeline.data.sources import Document
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from bam_pipeline.data.splits import SPLITS, KeptTexts, first_copies, split_of, text_key


@dataclass
class SourceSplits:
    source: str
    splits: dict
    duplicates: int = 0
    kept_elsewhere: dict = field(default_factory=dict)

    @property
    def documents(self) -> int:
        return sum(len(v) for v in self.splits.values())

    @property
    def cross_source_duplicates(self) -> int:
        return sum(self.kept_elsewhere.values())


def dedupe_and_split(sources, val, test, shard_size=None):
    """The data stage's rule, step by step: each shard (``shard_size`` documents of a source, default all of
    it) drops its own copies, then the merge drops the copies of texts an earlier shard keeps."""
    kept = KeptTexts()
    for name, docs in sources:
        docs = list(docs)
        size = shard_size or max(len(docs), 1)
        out = SourceSplits(name, {s: [] for s in SPLITS})
        elsewhere = Counter()
        for start in range(0, len(docs), size):
            copies = []
            shard = list(first_copies(docs[start:start + size], copies))
            holders = kept.claim(name, np.array([k for _, k in shard], dtype="S16"))
            held_by = {k: h for (_, k), h in zip(shard, holders) if h}
            for holder in [*held_by.values(), *(held_by.get(k, name) for k in copies)]:
                if holder == name:
                    out.duplicates += 1
                else:
                    elsewhere[holder] += 1
            for (doc, _), holder in zip(shard, holders):
                if not holder:
                    out.splits[split_of(doc.id, val, test)].append(doc)
        out.kept_elsewhere = dict(sorted(elsewhere.items()))
        yield out

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
    [out] = dedupe_and_split([("code", docs)], 0.2, 0.2)
    assert (out.duplicates, out.kept_elsewhere) == (43, {})
    kept = [d for s in SPLITS for d in out.splits[s]]
    assert sorted(d.id for d in kept) == [f"d{i}" for i in range(7)]  # the first copy of each text
    assert sorted(d.text for d in kept) == sorted({f"text {i}" for i in range(7)})
    assert all(split_of(d.id, 0.2, 0.2) == s for s in SPLITS for d in out.splits[s])


def test_a_text_in_several_sources_is_kept_once_by_the_first_source_in_order():
    """The same texts under other ids in three sources: each text is kept by the first source that reads it
    (in its id's split), removed from the later ones and counted there, per source that keeps it."""
    shared = [f"shared {i}" for i in range(40)]
    code = [Document(f"code/{i}.py", t) for i, t in enumerate(shared[:30])] + [Document("code/own", "own code")]
    math = [Document(f"math-{i}", t) for i, t in enumerate(shared[10:])] + [Document("math/own", "own math")]
    general = [Document(f"web{i}", t) for i, t in enumerate(shared)] + [Document("web/dup", "own math"),
                                                                         Document("web/own", "own web")] * 2
    code_out, math_out, general_out = dedupe_and_split([("code", code), ("math", math), ("general", general)],
                                                       0.3, 0.3)
    kept = {s.source: [d for split in SPLITS for d in s.splits[split]] for s in (code_out, math_out, general_out)}
    assert sorted(d.text for d in kept["code"]) == sorted(d.text for d in code)  # the first source loses nothing
    assert sorted(d.text for d in kept["math"]) == sorted(shared[30:] + ["own math"])
    assert [d.text for d in kept["general"]] == ["own web"]
    assert (code_out.kept_elsewhere, math_out.kept_elsewhere) == ({}, {"code": 20})
    assert general_out.kept_elsewhere == {"code": 30, "math": 12}  # 10 shared + "own math" twice
    assert (general_out.duplicates, general_out.cross_source_duplicates, general_out.documents) == (1, 42, 1)
    texts = [d.text for docs in kept.values() for d in docs]
    assert len(texts) == len(set(texts))  # every text once: in one split of one source
    assert all(split_of(d.id, 0.3, 0.3) == split for s in (code_out, math_out, general_out)
               for split in SPLITS for d in s.splits[split])


def test_shards_apply_the_same_rule_as_one_pass():
    """Cut into shards of any size, the sources keep the same documents in the same order: the merge's
    cross-shard step finishes what each shard's own step started."""
    shared = [f"shared {i % 13}" for i in range(60)]
    code = [Document(f"c{i}", t) for i, t in enumerate(shared)]
    general = [Document(f"g{i}", f"shared {i % 17}") for i in range(40)]
    whole = [(s.splits, s.duplicates, s.kept_elsewhere) for s in dedupe_and_split([("code", code), ("general", general)], 0.2, 0.2)]
    for size in (1, 5, 7, 60):
        cut = [(s.splits, s.duplicates, s.kept_elsewhere)
               for s in dedupe_and_split([("code", code), ("general", general)], 0.2, 0.2, shard_size=size)]
        assert cut == whole


def test_the_dedupe_index_costs_16_bytes_per_kept_document():
    kept = KeptTexts()
    for k in range(5):
        kept.claim("a", np.array([text_key(f"t{k}-{i}") for i in range(1000)], dtype="S16"))
    kept.claim("b", np.array([text_key(f"t0-{i}") for i in range(1000)], dtype="S16"))  # all held by "a"
    assert kept.nbytes == 16 * 5000


def test_sources_without_common_text_split_as_each_alone():
    """Disjoint sources keep every document, each in its id's split: the splits a source had when duplicates
    were removed within it alone."""
    a = [Document(f"a{i}", f"alpha {i}") for i in range(300)]
    b = [Document(f"a{i}", f"beta {i}") for i in range(300)]  # the same ids, other texts
    together = list(dedupe_and_split([("a", a), ("b", b)], 0.1, 0.1))
    alone = [next(dedupe_and_split([(name, docs)], 0.1, 0.1)) for name, docs in (("a", a), ("b", b))]
    assert [s.splits for s in together] == [s.splits for s in alone]
    assert all(s.duplicates == s.cross_source_duplicates == 0 for s in together)


def test_one_rule_makes_two_texts_duplicates():
    """Exactly equal texts are duplicates; a space, a newline or a case change makes another text."""
    assert text_key("def f():\n    pass\n") == text_key("def f():\n    pass\n")
    assert len({text_key(t) for t in ("a b", "a  b", "a b\n", "A b", "a b ")}) == 5


def test_prepared_splits_are_disjoint(synthetic):
    cfg, prepared = synthetic
    for name in prepared.sources:
        ids = {s: set(prepared.stream(name, s).doc_ids()) for s in SPLITS}
        assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
        assert sum(len(v) for v in ids.values()) == sum(prepared.stats[name][s]["documents"] for s in SPLITS)
        assert all(split_of(i, 0.1, 0.1) == s for s in SPLITS for i in ids[s])
