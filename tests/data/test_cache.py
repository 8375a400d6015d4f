"""Prepared-data cache: reuse without work, rebuild on change, corrupt or half-written data refused."""

from __future__ import annotations

import json

import pytest

from bam_pipeline.data import prepare as prep
from bam_pipeline.data.spec import read_data_spec
from bam_pipeline.data.prepare import open_prepared, prepare_data, print_stats_table
from bam_pipeline.errors import BamError


@pytest.fixture
def fresh(tmp_path, make_cfg):
    cfg = make_cfg(tmp_path, n_docs=80)
    return cfg, prepare_data(read_data_spec(cfg), tmp_path / "data", progress=False)


def _no_work(*args, **kwargs):
    raise AssertionError("prepare_data did work on a cached directory")


def test_second_prepare_reuses_and_does_no_work(fresh, monkeypatch, capsys):
    cfg, first = fresh
    monkeypatch.setattr(prep, "build_shard", _no_work)
    monkeypatch.setattr(prep.tk, "train_bpe", _no_work)
    monkeypatch.setattr(prep, "_make_setup", _no_work)
    monkeypatch.setattr(prep, "_merge", _no_work)
    again = prepare_data(read_data_spec(cfg), first.dir, progress=True)
    assert "reusing prepared data in" in capsys.readouterr().out
    assert again.config_hash == first.config_hash and again.tokenizer_hash == first.tokenizer_hash


def test_changed_config_or_sources_rebuild(fresh, tmp_path, capsys):
    cfg, first = fresh
    changed = dict(cfg, split={"val": 0.2, "test": 0.1})
    again = prepare_data(read_data_spec(changed), first.dir, progress=True)
    line = next(line for line in capsys.readouterr().out.splitlines() if str(first.dir) in line)
    assert "split" in line.replace(str(first.dir), ""), line  # the setting that changed; prepared again below
    assert again.config_hash != first.config_hash
    assert again.stats["code"]["val"]["documents"] > first.stats["code"]["val"]["documents"]
    with open(tmp_path / "src" / "law" / "docs.jsonl", "a") as f:
        f.write(json.dumps({"id": "extra", "text": "pqrstpqrst" * 30}) + "\n")
    third = prepare_data(read_data_spec(changed), first.dir, progress=False)
    assert sum(s["documents"] for s in third.stats["law"].values()) == 81


def test_manifest_records_stats_and_hashes(fresh):
    _, prepared = fresh
    m = json.loads((prepared.dir / "manifest.json").read_text())
    assert m["stage"] == "data" and m["config_hash"] == prepared.config_hash
    assert set(m["stats"]) == {"general", "code", "math", "law"}
    assert set(m["stats"]["law"]["train"]) == {"documents", "bytes", "tokens"}
    assert "tokenizer.json" in m["files"] and any(f.endswith(".arrow") for f in m["files"])
    n_tokens = len(prepared.stream("law", "train"))
    assert m["stats"]["law"]["train"]["tokens"] == n_tokens


def test_stats_table(fresh, capsys):
    _, prepared = fresh
    print_stats_table(prepared)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["source", "split", "documents", "MB", "tokens"]
    assert len(lines) == 1 + 4 * 3 + 1 + 1 + 1
    assert lines[-2] == "exact duplicates removed: none"  # the synthetic sources repeat no text
    total = lines[-3].split()
    assert total[0] == "total" and int(total[-1].replace(",", "")) == sum(
        s["tokens"] for by in prepared.stats.values() for s in by.values()
    )


def test_altered_file_is_reported_as_corrupt(fresh):
    cfg, prepared = fresh
    arrow = next((prepared.dir / "tokens" / "math" / "train").glob("*.arrow"))
    data = bytearray(arrow.read_bytes())
    data[len(data) // 2] ^= 0xFF
    arrow.write_bytes(bytes(data))
    rel = str(arrow.relative_to(prepared.dir))
    with pytest.raises(BamError) as e:
        prepare_data(read_data_spec(cfg), prepared.dir, progress=False)
    assert all(fact in str(e.value) for fact in ("checksum", rel, "stage=data data.rebuild=true")), e.value
    with pytest.raises(BamError, match="corrupt"):
        open_prepared(prepared.dir)
    rebuilt = prepare_data(read_data_spec(dict(cfg, rebuild=True)), prepared.dir, progress=False)
    assert rebuilt.stats == prepared.stats
    open_prepared(prepared.dir)


def test_truncated_manifest_is_reported_as_corrupt(fresh):
    cfg, prepared = fresh
    mpath = prepared.dir / "manifest.json"
    mpath.write_text(mpath.read_text()[:100])
    with pytest.raises(BamError) as e:
        prepare_data(read_data_spec(cfg), prepared.dir, progress=False)
    assert all(fact in str(e.value) for fact in ("manifest.json", "stage=data data.rebuild=true")), e.value


def test_interrupted_prepare_leaves_nothing_that_looks_finished_and_resumes(tmp_path, monkeypatch, make_cfg):
    """Stopped while preparing its third shard, the stage leaves no data directory, the two shards it finished
    in its build directory, and a second call prepares only the two shards left, to the same data as a call
    that was never stopped."""
    cfg = make_cfg(tmp_path, n_docs=40)
    real = prep.build_shard
    calls = []

    def fail_on_third(task):
        calls.append(task.shard.name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(prep, "build_shard", fail_on_third)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(read_data_spec(cfg), tmp_path / "data", progress=False)
    assert not (tmp_path / "data").exists()
    [build] = [p for p in tmp_path.iterdir() if p.name.startswith("data.")]
    assert build.name.startswith("data.build-") and len(list((build / "shards").glob("*/*.json"))) == 2
    assert not list(build.rglob("*.tmp-*"))  # the shard in flight left no half-written file
    with pytest.raises(BamError) as e:
        open_prepared(tmp_path / "data")
    assert str(tmp_path / "data") in str(e.value) and "stage=data" in str(e.value), e.value
    calls.clear()
    monkeypatch.setattr(prep, "build_shard", lambda task: calls.append(task.shard.name) or real(task))
    resumed = prepare_data(read_data_spec(cfg), tmp_path / "data", progress=False)
    assert len(calls) == 2 and not build.exists()
    fresh = prepare_data(read_data_spec(cfg), tmp_path / "again", progress=False)
    assert resumed.manifest["hash"] == fresh.manifest["hash"]
