"""stage=data on sources that share texts (issue 20): the same texts under other file names in two `files`
sources are kept by one source, in one split, and the stage says how many it removed from the other."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

from cli_runner import cli_here

from bam_pipeline.data.prepare import open_prepared
from bam_pipeline.data.splits import SPLITS

WORDS = "alpha beta gamma delta lemma proof theorem def return class import court statute clause the of and".split()


def _folder(path: Path, names_and_texts: list[tuple[str, str]]) -> str:
    path.mkdir(parents=True)
    for name, text in names_and_texts:
        (path / name).write_text(text)
    return f"+data.sources.{path.name}={{source:{{type:files,path:'{path}'}}}}"


def test_texts_shared_by_two_sources_are_in_one_split_of_one_source(tmp_path):
    rng = random.Random(0)

    def texts(tag: str, n: int) -> list[str]:
        return [f"{tag} {i}: " + " ".join(rng.choice(WORDS) for _ in range(60)) for i in range(n)]

    shared = texts("shared", 60)
    corpora = {"code": [(f"c{i:03d}.txt", t) for i, t in enumerate(shared + texts("code", 140))],
               "math": [(f"m{i:03d}.txt", t) for i, t in enumerate(texts("math", 140) + shared)],  # other names
               "law": [(f"l{i:03d}.txt", t) for i, t in enumerate(texts("law", 150))]}  # general: Shakespeare
    args = [_folder(tmp_path / "src" / name, docs) for name, docs in corpora.items()]
    r = cli_here(tmp_path / "stages", "stage=data", *args, "+data.sources.general.max_bytes=60000", check=True)

    prepared = open_prepared(tmp_path / "stages" / "smoke" / "data")
    text_of = {(name, file): text for name, docs in corpora.items() for file, text in docs}
    held = {(name, split): [text_of[name, i] for i in prepared.stream(name, split).doc_ids()]
            for name in corpora for split in SPLITS}
    for (a, split_a), (b, split_b) in itertools.permutations(held, 2):
        if split_a != "train" and split_b == "train":  # the leak: a held-out text trained on elsewhere
            assert not set(held[a, split_a]) & set(held[b, split_b]), (a, split_a, b)
    every = [t for texts_ in held.values() for t in texts_]
    assert len(every) == len(set(every)) == 60 + 140 + 140 + 150  # each text once, in one split of one source
    assert sum(prepared.stats["math"][s]["documents"] for s in SPLITS) == 140  # code keeps the shared texts
    manifest = json.loads((prepared.dir / "manifest.json").read_text())
    assert manifest["cross_source_duplicates_removed"] == {"code": {}, "general": {}, "law": {}, "math": {"code": 60}}
    assert "exact duplicates removed: 60 from math also in code (kept there)" in r.out, r.out[-2000:]
