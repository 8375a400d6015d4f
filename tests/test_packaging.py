"""A non-editable install works from any directory: the wheel ships every config, and the installed
package (not this source tree) runs `stage=info` from elsewhere."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from bam_pipeline.config.files import conf_dir

REPO = Path(__file__).resolve().parents[1]


def test_the_wheel_ships_every_config_and_runs_from_another_directory(tmp_path):
    tree = tmp_path / "tree"  # build from a copy: setuptools writes build/ and *.egg-info in place
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tree / name)
    shutil.copytree(REPO / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(tree)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("bam_pipeline-*.whl"))
    shipped = {f"bam_pipeline/conf/{p.relative_to(conf_dir()).as_posix()}" for p in conf_dir().rglob("*.yaml")}
    assert shipped and shipped <= set(zipfile.ZipFile(wheel).namelist())
    assert {"hydra_plugins/bam_pipeline_sweeper/__init__.py",  # the sweeper (-m)
            "hydra_plugins/bam_pipeline_launcher/__init__.py"} <= set(zipfile.ZipFile(wheel).namelist())  # its launcher

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "BAM_STAGES_DIR": str(elsewhere / "stages")}
    code = "import bam_pipeline, sys; print(bam_pipeline.__file__); sys.argv = ['bam-pipeline', *sys.argv[1:]]; " \
           "from bam_pipeline.cli import main; main()"
    out = subprocess.run([sys.executable, "-c", code, "stage=info", "model=bam-590m", "mix=bam",
                          "data.tokenizer.vocab_size=256000"], cwd=elsewhere,
                         env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[0].startswith(str(site))  # the installed copy ran, not the source tree
    assert "total 776.00M (776,002,560)" in out.stdout
