"""The GPU benchmark runs where only torch is installed, measures the mixtures the pipeline builds, and
runs end to end (on the CPU, a tiny shape). The data benchmark's corpus, sampler and table; its run end to end.
The GGUF benchmark's comparison on a tiny GGUF file."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from bam_pipeline.config.files import load_option
from bam_pipeline.config.reading import read_section
from bam_pipeline.mixing.variant import MixVariant
from bam_pipeline.model import preset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_data  # noqa: E402
import bench_gguf  # noqa: E402
import bench_gpu  # noqa: E402


def test_bench_gpu_mixtures_are_the_pipelines():
    dense = preset("bam-590m")
    for name, cfg in bench_gpu.mixtures(dense).items():
        if name != "dense":
            variant = read_section(MixVariant, load_option("mix", name), f"mix/{name}", name=name)
            assert cfg == variant.layout(dense, 3)  # 3 domains + the seed


def test_bench_gpu_runs_end_to_end_importing_only_torch_and_the_model(tmp_path):
    code = ("import runpy, sys; "
            f"sys.argv = ['bench_gpu.py', '--device', 'cpu', '--smoke', '--out', {str(tmp_path)!r}]; "
            "runpy.run_path('benchmarks/bench_gpu.py', run_name='__main__'); "
            "bad = {'hydra', 'omegaconf', 'datasets', 'wandb', 'lightning', 'transformers'} & set(sys.modules); "
            "assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    sections = sorted(p.name for p in tmp_path.glob("*.md"))
    assert sections == ["A.md", "B.md", "C.md", "D.md", "bench_gpu.md"], sections
    assert "bam_kv_shared" in (tmp_path / "A.md").read_text() and "| chunked" in out


# ---- bench_data ----------------------------------------------------------------------------------
def _pool(n: int = 3000):
    """Lines of varied length (4-120 bytes), with non-ASCII and JSON-escaped characters."""
    rng = np.random.default_rng(1)
    return bench_data.LinePool.of([f"{i} é\t\"q\" " + "x" * int(rng.integers(0, 110)) for i in range(n)])


def _texts(root: Path) -> list[str]:
    return [json.loads(line)["text"] for f in sorted(root.rglob("*.jsonl")) for line in f.open(encoding="utf-8")]


def test_bench_data_corpus_is_seeded_sized_and_kept_by_dedupe(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_data, "CHUNK_BYTES", 100_000)
    monkeypatch.setattr(bench_data, "FILE_BYTES", 200_000)  # several files a source
    pools = {name: _pool() for name in bench_data.SOURCES}
    target = 2_000_000
    a = bench_data.write_corpus(tmp_path / "a", target, pools, seed=0)
    b = bench_data.write_corpus(tmp_path / "b", target, pools, seed=0)
    c = bench_data.write_corpus(tmp_path / "c", target, pools, seed=1)
    files = sorted(p.relative_to(a.root) for p in a.root.rglob("*.jsonl"))
    assert files == sorted(p.relative_to(b.root) for p in b.root.rglob("*.jsonl")) and len(files) == a.files >= 8
    assert all((a.root / f).read_bytes() == (b.root / f).read_bytes() for f in files)  # same seed, same corpus
    texts = _texts(a.root)
    assert texts != _texts(c.root)
    sizes = [len(t.encode()) for t in texts]
    assert sum(sizes) == a.text_bytes and len(texts) == a.documents
    for name in bench_data.SOURCES:  # a quarter each, over by less than one document
        got = sum(len(t.encode()) for t in _texts(a.root / name))
        assert target // 4 <= got < target // 4 + bench_data.DOC_BYTES[1] + 130, (name, got)
    assert min(sizes) >= bench_data.DOC_BYTES[0] and max(sizes) < bench_data.DOC_BYTES[1] + 130
    assert np.std(sizes) > 1500  # lengths spread over 200-8000 bytes, not one size
    assert len(set(texts)) == len(texts)  # nothing for dedupe to remove
    assert all(t.count("\n") + 1 >= 2 and "é\t\"q\"" in t for t in texts)


def test_bench_data_line_pool_reads_an_embedded_corpus():
    pool = bench_data.line_pool("law")
    assert len(pool.escaped) == len(pool.nbytes) > 10_000 and all(pool.nbytes > 0)


def test_bench_data_sampler_sums_the_process_tree(tmp_path):
    """A child that starts a grandchild holding 200 MB: the tree's peak holds both, the child's own RSS does not."""
    hold = ("import subprocess, sys, time; "
            "g = subprocess.Popen([sys.executable, '-c', 'import time; b = bytearray(200_000_000); time.sleep(30)']); "
            "time.sleep(30)")
    proc = subprocess.Popen([sys.executable, "-c", hold])
    try:
        sampler = bench_data.PeakTreeRSS(proc.pid, interval=0.05)
        deadline = time.monotonic() + 20
        while sampler.peak < 200_000_000 and time.monotonic() < deadline:
            time.sleep(0.05)
        own = psutil.Process(proc.pid).memory_info().rss
    finally:
        bench_data._kill_tree(proc)
    peak = sampler.stop()
    assert peak >= 200_000_000 > own and sampler.samples >= 2
    assert bench_data.tree_rss(proc.pid) == 0  # the tree is gone: _kill_tree ended the grandchild too


def test_bench_data_table_ratios():
    rows = [bench_data.Row(0.25, "num_proc=1", 100.0, 1_000_000, 400.0),
            bench_data.Row(0.25, "num_proc=2", 50.0, 1_000_000, 600.0),
            bench_data.Row(4.0, "num_proc=1", 1000.0, 16_000_000, 480.0),
            bench_data.Row(4.0, "num_proc=2", 625.0, 16_000_000, 900.0),
            bench_data.Row(4.0, bench_data.REFERENCE, skipped="no room")]
    bench_data.compare(rows)
    assert [r.tokens_per_s_vs_num_proc_1 for r in rows] == [1.0, 2.0, 1.0, 1.6, None]
    assert [r.peak_vs_smallest for r in rows] == [1.0, 1.0, 1.2, 1.5, None]
    out = bench_data.table(rows)
    assert "peak vs 0.25 GB" in out and "| 1a86aaf | skipped: no room" in out and "25,600" in out
    assert bench_data.verdicts(rows) == [
        "num_proc=1: peak at 4 GB / at 0.25 GB = 1.20 (within the 1.25x target)",
        "num_proc=2: peak at 4 GB / at 0.25 GB = 1.50 (ABOVE the 1.25x target)",
        "0.25 GB: num_proc=2 / num_proc=1 tokens/s = 2.00 (meets the 1.6x target)",
        "4 GB: num_proc=2 / num_proc=1 tokens/s = 1.60 (meets the 1.6x target)"]


def test_bench_data_leaves_nothing_behind_on_ctrl_c(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_data, "line_pool", lambda name: _pool(200))

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_data, "run_stage", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench_data.main(["--sizes", "0.001", "--no-reference", "--workdir", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []


def test_bench_data_extracts_the_reference_code(tmp_path):
    src, why = bench_data.extract_reference(tmp_path)
    if src is None:
        pytest.skip(why)
    assert (src / "bam_pipeline" / "data" / "prepare.py").is_file()
    assert "def write_split" in (src / "bam_pipeline" / "data" / "storage.py").read_text()


@pytest.mark.slow
def test_bench_data_end_to_end(tmp_path):
    """Both of this checkout's variants on 2 MB of text: the same tokens, a table, nothing left behind."""
    work = tmp_path / "work"
    subprocess.run([sys.executable, "benchmarks/bench_data.py", "--sizes", "0.002", "--no-reference", "--workdir",
                    str(work), "--json", str(tmp_path / "rows.json")], cwd=REPO, check=True)
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["num_proc=1", "num_proc=2"]
    assert rows[0]["tokens"] == rows[1]["tokens"] > 500_000 and all(r["peak_rss_mb"] > 100 for r in rows)
    assert list(work.iterdir()) == []


# ---- bench_model row (7) -------------------------------------------------------------------------
@pytest.mark.slow  # 2 x 5 steps of the tiny moe stage and its bare model (about 20 s on 2 cores)
def test_bench_model_times_the_moe_stage_through_trainer_fit_beside_its_bare_model(tmp_path):
    import torch

    import bench_model

    cfg = bench_model.layouts("tiny")["bam"]
    stage, bare, step_tokens = bench_model.stage_fit_seconds("bam", cfg, torch.device("cpu"), torch.float32, 1, 1,
                                                             tmp_path, torch.Generator().manual_seed(0))
    assert step_tokens == 16 * 256  # the tiny experiment's batch
    assert len(stage) == len(bare) == 4 and min(stage + bare) > 0  # 5 steps (one logging window), 1 warm-up
    log = (tmp_path / "bam" / "work" / "train_log.jsonl").read_text().splitlines()
    last = json.loads(log[0])  # the stage's own train log: its logging step, with the routing metrics
    assert last["step"] == 5 and "load/ffn/L0/e0" in last and last["tokens_per_s"] > 0


# ---- bench_gguf ----------------------------------------------------------------------------------
@pytest.mark.slow  # about 10 s: the four embedded corpora listed and read, transformers' model loaded twice
def test_bench_gguf_compares_the_import_with_transformers_on_the_embedded_corpora(tmp_path, capsys):
    pytest.importorskip("gguf")
    sys.path.insert(0, str(REPO / "tests" / "interop"))
    from gguf_files import tiny_llama, write_gguf

    model, tok = tiny_llama()
    bench_gguf.compare(write_gguf(tmp_path / "tiny.gguf", model, tok), "<|endoftext|>", seq=24, count=2)
    out = capsys.readouterr().out
    assert "end of document '<|endoftext|>' = 0" in out
    rows = {line.split(" | ")[0]: line.split(" | ")[1:] for line in out.splitlines() if " | " in line}
    assert set(rows) >= {*bench_gguf.DOMAINS, "all"}
    diff, floor, ours, theirs = rows["all"]
    assert float(diff) <= 1e-4 and ours == theirs  # perplexity equal to its 4 decimals


def test_bench_gguf_measures_both_loads_through_the_import_benchmarks_sampler(tmp_path):
    pytest.importorskip("gguf")
    sys.path.insert(0, str(REPO / "tests" / "interop"))
    from gguf_files import tiny_llama, write_gguf

    path = str(write_gguf(tmp_path / "tiny.gguf", *tiny_llama()))
    ours, theirs = bench_gguf.measure_load(path, "ours"), bench_gguf.measure_load(path, "transformers")
    assert ours["weights_mb"] == pytest.approx(theirs["weights_mb"], rel=0.5) and ours["weights_mb"] > 0
    for row in (ours, theirs):
        assert row["seconds"] > 0 and row["peak_mb"] >= row["baseline_mb"] > 0
