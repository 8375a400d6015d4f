"""prepare_data's identity: what makes prepared data current, and what it says when it is not."""

import json
import shutil

import pytest


def test_changes_names_what_differs_and_the_seed_tokenizer_it_needs():
    from bam_pipeline.data.prepare import REVISION, changes

    old = {"config": {"split": {"val": 0.1}, "tokenizer": {"from_seed_checkpoint": {"sha": "x"}}}, "sources_hash": "a",
           "revision": REVISION}
    now = {"split": {"val": 0.1}, "tokenizer": {"vocab_size": 512}}
    why = changes(old, now, "a")
    assert why.startswith("data config changed: tokenizer;") and "seed=hf seed.path=" in why, why
    assert changes(old, {**now, "split": {"val": 0.2}}, "b").startswith(
        "data config changed: split, tokenizer; a source's contents changed")
    assert changes(old, old["config"], "a") == "data config changed"  # the hashes differ by nothing we record


def test_data_prepared_under_older_rules_is_prepared_again_and_keeps_its_hash(synthetic, tmp_path, capsys):
    """Data prepared before duplicates were removed across sources (revision 1, no `revision` in its manifest)
    is not current; preparing it again gives the same files, so its hash, and every model made from it, stay."""
    from bam_pipeline.data.prepare import REVISION, changes, is_current, open_current, prepare_data, _identity
    from bam_pipeline.data.spec import read_data_spec
    from bam_pipeline.errors import BamError

    cfg, prepared = synthetic
    spec = read_data_spec(cfg)
    hashed, sources_hash = _identity(spec)
    old = tmp_path / "data"
    shutil.copytree(prepared.dir, old)
    manifest = json.loads((old / "manifest.json").read_text())
    assert manifest["revision"] == REVISION and is_current(manifest, hashed, sources_hash)
    del manifest["revision"]  # as the data stage wrote it before revision 2
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert not is_current(manifest, hashed, sources_hash)
    assert f"rules changed (revision 1, now {REVISION}" in changes(manifest, hashed, sources_hash)
    with pytest.raises(BamError, match="stage=data"):
        open_current(spec, old)
    again = prepare_data(spec, old, progress=True)
    assert "rules changed" in capsys.readouterr().out
    assert again.manifest["hash"] == prepared.manifest["hash"] and again.config_hash == prepared.config_hash
