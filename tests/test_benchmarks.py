"""The GPU benchmark runs where only torch is installed, measures the mixtures the pipeline builds, and
runs end to end (on the CPU, a tiny shape)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bam_pipeline.config.files import load_option
from bam_pipeline.config.reading import read_section
from bam_pipeline.mixing.variant import MixVariant
from bam_pipeline.model import preset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

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
