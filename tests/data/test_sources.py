"""Source adapters and the shipped configs: generic files, the paper's hub specs, the embedded corpora."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
import pyarrow.parquet as pq
from hydra import compose, initialize_config_dir

from bam_pipeline.config.files import conf_dir
from bam_pipeline.data import sources
from bam_pipeline.data.spec import read_data_spec
from bam_pipeline.data.splits import SPLITS
from bam_pipeline.errors import BamError


def files_source(path, **src):
    return sources.resolve_source("x", {"x": {"source": {"type": "files", "path": str(path), **src}}})


def _read(path, **src):
    return list(sources.iter_documents(files_source(path, **src), None))


def test_files_source_reads_text_jsonl_and_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("plain text")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(json.dumps({"body": "one", "key": "k1"}) + "\n" + json.dumps({"body": "two", "key": "k2"}) + "\n")
    pq.write_table(pa.table({"body": ["three"], "key": ["k3"]}), tmp_path / "c.parquet")
    docs = _read(tmp_path / "sub", text_field="body")
    assert [(d.id, d.text) for d in docs] == [("b.jsonl:0", "one"), ("b.jsonl:1", "two")]
    docs = _read(tmp_path, text_field="body", id_field="key")
    assert {(d.id, d.text) for d in docs} == {("a.txt", "plain text"), ("k1", "one"), ("k2", "two"), ("k3", "three")}


def test_byte_cap_stops_reading(tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": "x" * 100}) + "\n" for _ in range(50)))
    assert len(list(sources.iter_documents(files_source(tmp_path), 250))) == 3


@pytest.mark.parametrize("cap", [1, 250, 1000, 1050, 10_000])
def test_the_data_stage_caps_a_source_as_iter_documents_does(tmp_path, cap):
    """The data stage's capped read (spilled once, then shards) takes the documents iter_documents takes: blank
    documents skipped and uncounted, the last one crossing the cap, a unit cut after it."""
    from bam_pipeline.data.shards import CappedRead, spilled_documents

    for f in range(3):
        rows = [{"text": "x" * (50 + 10 * i) if i % 4 else "  "} for i in range(8)]
        (tmp_path / f"d{f}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = files_source(tmp_path)
    expected = [(d.id, d.text) for d in sources.iter_documents(source, cap)]
    plans, n_units = CappedRead(source, cap, 300, tmp_path / "spill.arrow")()
    assert [(d.id, d.text) for d in spilled_documents(tmp_path / "spill.arrow")] == expected
    assert n_units == 3 and sum(p.text_bytes for p in plans) == sum(len(t) for _, t in expected)
    assert (plans[-1].last_docs is None) == (cap == 10_000)  # a cap that is reached cuts the last unit read


def test_shipped_configs_compose_and_paper_points_at_the_hub():
    with initialize_config_dir(config_dir=str(conf_dir() / "data"), version_base="1.3"):
        default = compose(config_name="default")
        paper = compose(config_name="paper")
    assert read_data_spec(default).source_names == ["general", "code", "math", "law", "bible"]
    assert read_data_spec(default).ood == ("bible",)
    assert paper.domains == default.domains and paper.split == default.split
    specs = read_data_spec(paper).resolved
    assert {n: s.type for n, s in specs.items() if n != "bible"} == dict.fromkeys(("general", "code", "math", "law"),
                                                                                  "hub")
    assert specs["code"].options.dataset == "bigcode/starcoderdata"
    assert all(s.options.text_field for n, s in specs.items() if n != "bible")


def test_embedded_sources_are_real_text(real_prepared):
    assert real_prepared.sources == ["general", "code", "math", "law"]
    tok = real_prepared.tokenizer()
    samples = {n: tok.decode(real_prepared.stream(n, "train").take(0, 400).tolist()) for n in real_prepared.sources}
    assert "def " in samples["code"] or "import " in samples["code"]
    assert any(w in samples["law"].lower() for w in ("licen", "software", "copyright", "warrant"))
    for name in real_prepared.sources:
        for split in SPLITS:
            assert real_prepared.stats[name][split]["documents"] > 0
        assert 140_000 < sum(real_prepared.stats[name][s]["bytes"] for s in SPLITS) < 400_000
    ids = real_prepared.stream("code", "train").doc_ids()
    assert not any(part in ("test", "tests", "idle_test") for i in ids for part in i.split("/")[:-1])


def test_stdlib_source_leaves_out_generated_data_modules():
    """The gencodec code-page tables and Sphinx's pydoc topics are data, not code, and near-copies of
    each other: one in the test split would make code perplexity measure table lookups."""
    docs = list(sources.iter_documents(sources.resolve_source("code"), None))
    ids = {d.id for d in docs}
    real_code = {"textwrap.py", "encodings/idna.py", "encodings/aliases.py", "encodings/cp932.py",
                 "encodings/charmap.py", "encodings/rot_13.py"}  # the last two say "Character Mapping Codec"
    assert real_code <= ids
    left_out = {"encodings/cp437.py", "encodings/cp1125.py", "encodings/cp720.py", "encodings/mac_arabic.py",
                "pydoc_data/topics.py"}
    assert not left_out & ids
    assert not any("decoding_table = (" in d.text for d in docs)


def test_stdlib_fingerprint_names_the_adapter_revision():
    """Prepared data from before the generated modules were left out must not be reused."""
    fp = sources.resolve_source("code").fingerprint()
    assert fp["adapter"] == sources.StdlibPython.revision >= 2


@pytest.mark.slow  # ~40 s: parses the whole embedded Bible
def test_the_out_of_domain_bible_is_clean_modern_prose():
    """The World English Bible from its Debian package, footnotes and markup removed."""
    spec = sources.resolve_source("bible")
    try:
        spec.check_available()
    except sources.SourceUnavailable as e:
        pytest.skip(f"apt cannot fetch the Debian package here: {e}")
    docs = list(sources.iter_documents(spec, 200_000))
    text = " ".join(d.text for d in docs)
    assert len(docs) >= 20 and all("#" in d.id for d in docs)
    assert "<" not in text and "strong:" not in text and "  " not in text
    assert "God created the heavens and the earth" in " ".join(
        d.text for d in sources.iter_documents(spec, None) if d.id.startswith("Genesis#000"))
    assert spec.fingerprint()["version"]


def test_an_unavailable_out_of_domain_source_is_skipped_with_a_line(tmp_path, monkeypatch, make_cfg, capsys):
    from bam_pipeline.data.prepare import prepare_data

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "no-apt"))  # neither apt-get nor dpkg-deb
    cfg = make_cfg(tmp_path, n_docs=60)
    cfg["ood"] = ["bible"]
    prepared = prepare_data(read_data_spec(cfg), tmp_path / "data", progress=True)
    assert "bible" not in prepared.sources and prepared.ood == []
    line = next(line for line in capsys.readouterr().out.splitlines() if "'bible'" in line)  # skipped, and why
    assert "sword-text-web" in line and "apt-get" in line, line
    cfg["domains"] = ["code", "bible"]
    cfg["ood"] = []
    with pytest.raises(BamError) as e:  # a trained source must exist
        prepare_data(read_data_spec(cfg), tmp_path / "data2", progress=False)
    assert all(tool in str(e.value) for tool in ("sword-text-web", "apt-get", "dpkg-deb")), e.value


def test_a_byte_order_mark_is_not_text(tmp_path):
    """A UTF-8 byte-order mark (what some Windows editors write first) is the file's encoding: a .txt document
    does not start with it, and a JSONL or JSON file that starts with one reads like one without."""
    bom = "\ufeff".encode()
    (tmp_path / "a.txt").write_bytes(bom + "first line\n".encode())
    (tmp_path / "b.jsonl").write_bytes(bom + b'{"text": "one"}\n{"text": "two"}\n')
    (tmp_path / "c.json").write_bytes(bom + b'[{"text": "three"}]')
    assert {d.id: d.text for d in _read(tmp_path)} == {"a.txt": "first line\n", "b.jsonl:0": "one", "b.jsonl:1": "two",
                                                       "c.json:0": "three"}
    (tmp_path / "d.txt").write_bytes("first line\n".encode())  # the same text without the mark: a duplicate
    assert [d.text for d in _read(tmp_path / "a.txt")] == [d.text for d in _read(tmp_path / "d.txt")]


def test_a_hub_source_reads_its_data_files_one_unit_each(tmp_path):
    """A hub dataset's units are its data files: read one after another they give the rows the whole stream
    gives, in its order, numbered within their data file (``<dataset>:<file>:<row>``), so that any part of the
    data stage reads a unit on its own; fewer files than parts is refused, naming the file count."""
    import datasets

    files = []
    for name, rows in (("a", ["a1", "a2"]), ("b", ["b1"]), ("c", ["c1", "c2", "c3"])):
        files.append(str(tmp_path / f"{name}.jsonl"))
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": t, "key": f"k-{t}"}) + "\n" for t in rows))
    for id_field in (None, "key"):
        hub = sources.resolve_source("x", {"x": {"source": {"type": "hub", "dataset": "json", "data_files": files,
                                                            "id_field": id_field}}})
        assert hub.units() == [0, 1, 2]
        assert [[d.text for d in hub.read(u)] for u in hub.units()] == [["a1", "a2"], ["b1"], ["c1", "c2", "c3"]]
        stream = datasets.load_dataset("json", data_files=files, split="train", streaming=True)
        numbers = [f"{u}:{i}" for u, n in enumerate((2, 1, 3)) for i in range(n)]
        expected = [(row["key"] if id_field else f"json:{k}", row["text"]) for k, row in zip(numbers, stream)]
        assert [(d.id, d.text) for d in hub.read_all()] == expected
        hub.check_parts(3)
        with pytest.raises(BamError, match=r"json has 3 data file\(s\), fewer than data.parts=4; set "
                                           r"data.sources.x.source.reshard=true .* or use at most data.parts=3"):
            hub.check_parts(4)


def test_every_source_reads_its_units_in_reading_order(tmp_path):
    """read_all is each unit's documents, unit after unit: what the data stage reads and what a reader of one
    unit at a time would read are the same documents in the same order."""
    (tmp_path / "a.txt").write_text("plain")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    for source in (files_source(tmp_path), sources.resolve_source("law"),
                   sources.resolve_source("general", {"general": {"source": {"section_bytes": 4000}}})):
        units = source.units()
        assert len(units) >= 2
        assert [d for u in units for d in source.read(u)] == list(source.read_all())


def test_a_source_type_is_one_class(monkeypatch, tmp_path):
    """A new source type is one subclass of Source: it registers itself under its type, reads its options from
    ``source:``, and the data spec reads, fingerprints and checks it like the shipped ones."""
    from dataclasses import dataclass

    monkeypatch.setattr(sources, "SOURCES", dict(sources.SOURCES))

    class Repeated(sources.Source):
        @dataclass(frozen=True)
        class Options:
            word: str
            times: int = 3

        type = "repeated"
        corpus_option = "word"

        def fingerprint(self):
            return {"word": self.options.word}

        def units(self):
            return list(range(self.options.times))

        def read(self, unit):
            yield sources.Document(f"{self.options.word}#{unit}", f"{self.options.word} " * (unit + 1))

    assert sources.SOURCES["repeated"] is Repeated and "repeated" in sources.SOURCES
    spec = sources.resolve_source("x", {"x": {"source": {"type": "repeated", "word": "la", "times": 2}}})
    assert isinstance(spec, Repeated) and spec.to_dict()["source"] == {"type": "repeated", "word": "la", "times": 2}
    assert [(d.id, d.text) for d in sources.iter_documents(spec, None)] == [("la#0", "la "), ("la#1", "la la ")]
    with pytest.raises(BamError) as e:
        sources.resolve_source("x", {"x": {"source": {"type": "repeated", "wrod": "la"}}})
    assert "sources.x.source.wrod" in str(e.value)
    twice = {"x": {"source": {"type": "repeated", "word": "la"}}, "y": {"source": {"type": "repeated", "word": "la"}}}
    assert sources.resolve_source("x", twice).corpus() == sources.resolve_source("y", twice).corpus()
    assert sources.resolve_source("x", twice).corpus_name() == "repeated word=la"


def test_a_hub_parquet_file_resharded_by_row_group_gives_a_unit_per_group(tmp_path):
    """``reshard: true``: a dataset with fewer data files than the data stage has parts is split where
    ``datasets`` can, a Parquet file by row group; every row is read once, numbered within its unit."""
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(30)]}), tmp_path / "a.parquet", row_group_size=10)
    opts = {"type": "hub", "dataset": "parquet", "data_files": [str(tmp_path / "a.parquet")]}
    whole = sources.resolve_source("x", {"x": {"source": opts}})
    with pytest.raises(BamError, match=r"1 data file\(s\), fewer than data.parts=3"):
        whole.check_parts(3)
    split = sources.resolve_source("x", {"x": {"source": {**opts, "reshard": True}}})
    assert split.units() == [0, 1, 2]
    split.check_parts(3)
    docs = [d for u in split.units() for d in split.read(u)]
    assert [d.text for d in docs] == [f"row {i}" for i in range(30)]
    assert [d.id for d in docs][9:11] == ["parquet:0:9", "parquet:1:0"]
