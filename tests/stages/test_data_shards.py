"""stage=data at scale (issue 22): sources streamed into token shards by worker processes, in parts across
machines (a Hydra sweep over data.part) and merged, resumed after a SIGKILL: every way gives the same files
and the same data hash, with copies of a text dropped across shards, parts and sources."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runner import REPO, _env, _with_defaults, cli, cli_here

from bam_pipeline.data.prepare import open_prepared
from bam_pipeline.data.splits import SPLITS

WORDS = "alpha beta gamma delta lemma proof theorem def return class import court statute clause the of".split()
FILES, DOCS = 6, 10  # per source: 6 files of 10 documents (about 3.5 KB each); 2 files a shard, 3 shards a source


def _corpus(root: Path) -> list[str]:
    """Four `files` sources (web the general one), each text once except: a text in code's first and last files
    (shards 0 and 2: parts 0 and 2 of 3), a text of code's second file in web's fourth (another source, part 1), and a copy inside
    one law file (one shard)."""
    rng = random.Random(0)

    def text(tag: str) -> str:
        return f"{tag}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 80)))

    names = ("code", "math", "law", "web")
    files = {n: [[text(f"{n} {f}.{i}") for i in range(DOCS)] for f in range(FILES)] for n in names}
    files["code"][5][3] = files["code"][0][7]
    files["web"][3][4] = files["code"][1][2]
    files["law"][2][6] = files["law"][2][1]
    args = []
    for name in names:
        folder = root / "src" / name
        folder.mkdir(parents=True)
        for f, docs in enumerate(files[name]):
            (folder / f"{f:02d}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
        args.append(f"+data.sources.{name}={{source:{{type:files,path:'{folder}'}}}}")
    return [*args, "data.general=web", "data.max_bytes_per_source=null", "data.shard_bytes=7000", "data.tokenizer.vocab_size=300"]


def _shard_files(data: Path) -> dict[str, bytes]:
    return {str(p.relative_to(data)): p.read_bytes() for p in sorted((data / "tokens").rglob("*.arrow"))}


def test_parts_and_processes_equal_one_process(tmp_path):
    """One process, two worker processes, and three parts (a sweep over data.part, merged by a last
    stage=data) give identical token shards and the same data hash; a merge with a part missing names it and
    the command that prepares it, and stage=status shows the shards of each part done and missing."""
    args = _corpus(tmp_path)
    cli_here(tmp_path / "one", "stage=data", *args, "data.num_proc=1", check=True)
    cli_here(tmp_path / "two", "stage=data", *args, "data.num_proc=2", check=True)
    parts = tmp_path / "parts"
    cli(parts, "-m", "stage=data", *args, "data.parts=3", "data.part=0,2", check=True)  # a sweep over parts
    status = cli_here(parts, "stage=status", *args, "data.parts=3", check=True)
    assert "8 of 12 shards prepared" in status.out and "part 1: 0 done, 4 missing" in status.out, status.out
    early = cli_here(parts, "stage=data", *args, "data.parts=3")
    assert early.returncode == 2 and "part 1 (4 shard(s)" in early.out and "data.part=1" in early.out, early.out
    cli_here(parts, "stage=data", *args, "data.parts=3", "data.part=1", check=True)
    merged = cli_here(parts, "stage=data", *args, "data.parts=3", check=True)

    data = {k: tmp_path / k / "smoke" / "data" for k in ("one", "two", "parts")}
    prepared = {k: open_prepared(d) for k, d in data.items()}
    assert len({p.manifest["hash"] for p in prepared.values()}) == 1
    files = _shard_files(data["one"])
    assert len(files) == 4 * 3 * len(SPLITS) and all(_shard_files(d) == files for d in data.values())
    m = prepared["parts"].manifest
    assert m["stats"] == prepared["one"].manifest["stats"]
    assert m["duplicates_removed"] == {"web": 0, "code": 1, "math": 0, "law": 1}  # code across shards, law within
    assert m["cross_source_duplicates_removed"]["web"] == {"code": 1}  # across sources and parts
    assert [s["duplicates_dropped_at_merge"] for s in m["shards"]["code"]] == [0, 0, 1]
    assert sum(m["stats"][n][s]["documents"] for n in m["sources"] for s in SPLITS) == 4 * FILES * DOCS - 3
    tok = prepared["parts"].tokenizer()
    decoded = [tok.decode(prepared["parts"].stream(n, s).document(i).tolist())
               for n in m["sources"] for s in SPLITS for i in range(m["stats"][n][s]["documents"])]
    assert len(decoded) == len(set(decoded))  # every text once
    assert "exact duplicates removed: 1 within code; 1 within law; 1 from web also in code (kept there)" in merged.out


KILLER = """
import os, signal, sys
import bam_pipeline.data.prepare as prepare
log, kill_after = sys.argv[1], int(sys.argv[2])
def published(record):
    with open(log, "a") as f:
        f.write(f"{record['source']}/{record['index']}\\n")
    if kill_after and len(open(log).read().split()) == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
prepare.on_shard_published = published
sys.argv = ["bam_pipeline", *sys.argv[3:]]
from bam_pipeline.cli import main
main()
"""


def _run_logging_shards(root: Path, log: Path, kill_after: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", KILLER, str(log), str(kill_after), *_with_defaults(args)],
                          cwd=REPO, env=_env(root, None), capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # ~20 s: two data stages; make test keeps the SIGTERM-mid-data resume (test_faults)
def test_a_data_stage_killed_after_its_third_shard_resumes_without_redoing_a_shard(tmp_path):
    """SIGKILL right after the third shard is published (from the stage's own hook, not a timer), with two
    worker processes running: nothing looks finished, and the rerun prepares only the other shards, to the
    tokens of a run never killed. The sources are capped here: the capped path (one read into a spill file)."""
    args = [*_corpus(tmp_path), "data.max_bytes_per_source=30000", "data.num_proc=2"]
    killed = _run_logging_shards(tmp_path / "killed", tmp_path / "first.log", 3, "stage=data", *args)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    run = tmp_path / "killed" / "smoke"
    assert not (run / "data").exists()
    first = (tmp_path / "first.log").read_text().split()
    [build] = run.glob("data.build-*")
    assert sorted(p.stem for p in (build / "shards").rglob("*.json")) and len(list((build / "shards").rglob("*.json"))) == 3
    resumed = _run_logging_shards(tmp_path / "killed", tmp_path / "second.log", 0, "stage=data", *args)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    second = (tmp_path / "second.log").read_text().split()
    assert "3 of 12 shards already prepared" in resumed.stdout
    assert len(second) == 12 - 3 and not set(first) & set(second)  # no finished shard redone
    cli_here(tmp_path / "whole", "stage=data", *args, check=True)
    assert _shard_files(run / "data") == _shard_files(tmp_path / "whole" / "smoke" / "data")
    assert open_prepared(run / "data").manifest["hash"] == open_prepared(tmp_path / "whole" / "smoke" / "data").manifest["hash"]


def test_a_part_without_a_shard_of_a_source_says_so_and_goes_on(tmp_path):
    """With more parts than a source has shards, a part holding none of them names the source and prepares the
    rest: here part 3 of 4 holds no shard at all (every source has 3)."""
    args = _corpus(tmp_path)
    r = cli_here(tmp_path / "stages", "stage=data", *args, "data.parts=4", "data.part=3", check=True)
    for name in ("code", "math", "law", "web"):
        assert f"source {name!r} has no shard in part 3 of 4 (it has 3)" in r.out, r.out[-2000:]
    assert "part 3 of 4 prepared" in r.out and "data.parts=4" in r.out
