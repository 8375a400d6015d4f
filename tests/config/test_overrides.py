"""Your own data on the command line (issue 22, item 1): a section whose entries are the user's
(``data.sources``, ``model.overrides``) takes a whole mapping as written, or one key appended with ``+``; both read
into the same typed specs, merged with what the experiment already set. A single key the config does not have yet,
given without ``+``, is one line with the ``+`` command that adds it."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_runner import cli_here
from composed import run_context

from bam_pipeline.config.overrides import merged_assignments
from bam_pipeline.stages import RunContext


def test_a_mapping_at_or_under_an_open_section_is_merged_and_nothing_else_is_respelt():
    assigned = {
        "data.sources={code: {source: {type: files, path: x.jsonl}}}": True,
        "data.sources.general={max_bytes: 1000}": True,
        "model.overrides={n_layers: 3}": True,
        "callbacks={lr: {_target_: a.B}}": True,
        "branch={code: {path: /ckpt}}": True,
        "data.sources={a: {max_bytes: 1}},{a: {max_bytes: 2}}": True,  # a sweep over mappings
        "data.sources={}": True,
        "data.sources.code.source.path=x.jsonl": False,  # one key: Hydra's rule (+ adds it)
        "+data.sources.code={source: {type: files}}": False,  # already an add
        "++model.overrides={n_layers: 3}": False,
        "~data.sources.general": False,
        "train={batch_size: 4}": False,  # not an open section: its keys are the config's
        "data.sourcesx={a: 1}": False,
        "branch=hf": False,  # a config group's option
        "data.sources=[code]": False,
        "data.sources={a: 1},[b]": False,  # a sweep that is not all mappings
        "data.sources={code: ": False,  # unparsable: Hydra says why
        "-m": False,
    }
    args = ["--cfg", "job", *assigned]
    assert merged_assignments(args) == ["--cfg", "job", *(("++" if m else "") + a for a, m in assigned.items())]


def _context(*overrides: str) -> RunContext:
    """The run context of ``stage=info experiment=smoke <overrides>``, composed as the command line is."""
    return run_context("stage=info", "experiment=smoke", *overrides)


def _corpus(tmp_path: Path) -> Path:
    path = tmp_path / "my code.jsonl"  # a space: the value needs Hydra's quotes
    path.write_text('{"content": "def f(x):\\n    return x\\n"}\n')
    return path


SPELLINGS = {
    "mapping": lambda p: (f"data.sources={{code: {{source: {{type: files, path: '{p}', text_field: content}}}}, "
                          "general: {max_bytes: 1000}}", "model.overrides={n_layers: 3, n_heads: 2}"),
    "plus": lambda p: (f"+data.sources.code={{source: {{type: files, path: '{p}', text_field: content}}}}",
                       "+data.sources.general.max_bytes=1000", "+model.overrides.n_layers=3",
                       "+model.overrides.n_heads=2"),
    "mapping_per_entry": lambda p: (f"data.sources.code={{source: {{type: files, path: '{p}', text_field: content}}}}",
                                    "data.sources.general={max_bytes: 1000}",
                                    "model.overrides={n_layers: 3}", "model.overrides={n_heads: 2}"),
}


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_every_spelling_reads_into_the_same_sources_and_model(spelling, tmp_path):
    path = _corpus(tmp_path)
    ctx = _context(*SPELLINGS[spelling](path))
    code, general = ctx.data.resolved["code"], ctx.data.resolved["general"]
    assert (code.type, code.options.path, code.options.text_field) == ("files", str(path), "content")
    # merged into what experiment=smoke sets for general (section_bytes 4000), not in place of it
    assert (general.type, general.max_bytes, general.options.section_bytes) == ("shakespeare", 1000, 4000)
    model = ctx.model.dense_config()
    assert (model.n_layers, model.n_heads) == (3, 2)


def test_a_misspelt_option_in_a_mapping_is_checked_against_the_source_types_options(tmp_path):
    r = cli_here(tmp_path, "stage=info", "data.sources={code: {source: {type: files, pth: x.jsonl}}}")
    assert r.returncode == 2 and r.out.strip().splitlines()[-1] == (
        "error: invalid data.sources.code.source.pth='x.jsonl': unknown setting (known: path, text_field, id_field)")
    r = cli_here(tmp_path, "stage=info", "model.overrides={n_layer: 3}")
    assert r.returncode == 2 and r.out.strip().splitlines()[-1].startswith(
        "error: invalid model.overrides.n_layer=3: unknown setting (known: vocab_size, d_model, n_layers,")


@pytest.mark.parametrize("override, section, has", [
    ("data.sources.code.max_bytes=1000", "data.sources", "general"),
    ("data.sources.general.max_bytes=1000", "data.sources.general", "source"),
    ("model.overrides.n_layers=3", "model.overrides", "no keys"),
])
def test_one_key_the_config_lacks_names_the_plus_command(override, section, has, tmp_path):
    r = cli_here(tmp_path, "stage=info", override)
    errors = [line for line in r.out.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1, r.out[-2000:]
    assert f"in {override}: {section} has {has}; use +{override} to add it" in errors[0], errors[0]
    assert not any(tmp_path.iterdir())  # refused while Hydra composes
    cli_here(tmp_path, "stage=info", "+" + override, check=True)  # the command it names works


def test_a_sweep_takes_the_mapping_and_the_stage_sees_the_command_as_typed(tmp_path, monkeypatch):
    import sys

    seen = []
    from_config = RunContext.from_config.__func__

    def spy(cls, cfg, **kwargs):
        seen.append((list(kwargs["overrides"]), sys.argv[1:], dict(cfg.data.sources.code.source)))
        return from_config(cls, cfg, **kwargs)

    monkeypatch.setattr(RunContext, "from_config", classmethod(spy))
    path = _corpus(tmp_path)
    mapping = f"data.sources={{code: {{source: {{type: files, path: '{path}'}}}}}}"
    r = cli_here(tmp_path, "stage=info", mapping, check=True)
    assert seen[-1] == (["stage=info", mapping, "experiment=smoke", "logger=none"],
                        ["stage=info", mapping, "experiment=smoke", "logger=none"],
                        {"type": "files", "path": str(path)})
    seen.clear()
    r = cli_here(tmp_path, "-m", "stage=info", mapping, "train.batch_size=2,4", check=True)
    assert r.out.count("parameters: total") == 4 and len(seen) == 2  # two jobs, two models each
    assert all(code == {"type": "files", "path": str(path)} for _, _, code in seen)
