"""OutputIdentity: what eval, the report, downstream and the seeds report were made from, and why a rerun
redoes one (the models that changed, by label) or skips it."""

from __future__ import annotations

import json

from bam_pipeline.stages.inputs import OutputIdentity


def identity(tmp_path, **config) -> OutputIdentity:
    base = {"models": {"seed": "h1", "moe/bam": "h2"}, "skipped": {}, "data": "d", "eval": {"batch_size": 8}}
    return OutputIdentity("eval", tmp_path / "eval" / "identity.json", {**base, **config})


def test_a_recorded_identity_is_fresh_until_what_it_was_made_from_changes(tmp_path):
    first = identity(tmp_path)
    assert first.stale_reason() == "not built yet"
    first.write()
    assert identity(tmp_path).stale_reason() is None
    assert json.loads((tmp_path / "eval" / "identity.json").read_text())["hash"] == first.hash
    retrained = identity(tmp_path, models={"seed": "h1", "moe/bam": "h3"})
    assert retrained.stale_reason() == "models changed: moe/bam"
    added = identity(tmp_path, models={"seed": "h1", "moe/bam": "h2", "moe/btx": "h4"})
    assert added.stale_reason() == "models changed: moe/btx"
    left_out = identity(tmp_path, models={"seed": "h1"}, skipped={"moe/bam": "outdated (seed was rebuilt since)"})
    assert left_out.stale_reason() == "models changed: moe/bam; models skipped: moe/bam"
    settings = identity(tmp_path, eval={"batch_size": 4}, data="e")
    assert settings.stale_reason() == "config changed: data, eval"


def test_a_forgotten_or_unreadable_record_is_stale_never_fresh(tmp_path):
    first = identity(tmp_path)
    first.write()
    first.forget()  # what a run does before it rewrites the output: cut short, it leaves no fresh record
    assert first.stale_reason() == "no record of what it was made from"
    first.record.write_text("{not json")
    assert first.stale_reason() == "no record of what it was made from"


def test_fresh_skips_unless_rebuild_and_says_which(tmp_path, capsys):
    first = identity(tmp_path)
    assert not first.fresh(rebuild=False, hint="eval.rebuild=true")
    first.write()
    assert first.fresh(rebuild=False, hint="eval.rebuild=true")
    out = capsys.readouterr().out
    assert out.startswith("eval: up to date") and "eval.rebuild=true" in out
    assert not first.fresh(rebuild=True, hint="eval.rebuild=true")
    changed = identity(tmp_path, data="e")
    assert not changed.fresh(rebuild=False, hint="eval.rebuild=true")
    assert "config changed: data" in capsys.readouterr().out
