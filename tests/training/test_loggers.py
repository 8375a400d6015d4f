"""The eval report reaches wandb (offline) when the wandb logger is on, and nothing happens otherwise."""

import os
import subprocess
import sys
import textwrap

import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bam_pipeline.training.loggers import log_report  # noqa: E402


def _report(tmp_path):
    d = tmp_path / "report"
    d.mkdir()
    (d / "report.md").write_text("# report\n")
    (d / "report.html").write_text("<html><body><h1>report</h1></body></html>")
    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    fig.savefig(d / "perplexity.png")
    plt.close(fig)
    return [d / "report.md", d / "report.html", d / "perplexity.png"]


def test_report_is_logged_to_an_offline_wandb_run(tmp_path):
    files = _report(tmp_path)
    cfg = {"_target_": "lightning.pytorch.loggers.WandbLogger", "project": "bam-test", "offline": True,
           "save_dir": str(tmp_path / "logs")}
    run_dir = log_report(cfg, run="smoke", files=files, metrics_rows=[{"model": "seed", "domain": "code",
                                                                        "perplexity": 12.5}])
    assert run_dir is not None and run_dir.is_dir() and "offline-run" in run_dir.name
    logged = {p.name for p in run_dir.rglob("*") if p.is_file()}
    assert any(name.endswith(".wandb") for name in logged)  # the offline run's record, for `wandb sync`
    assert any(name.startswith("perplexity") and name.endswith(".png") for name in logged)


def test_no_wandb_logger_logs_nothing(tmp_path):
    files = _report(tmp_path)
    assert log_report({}, run="smoke", files=files, metrics_rows=[]) is None
    assert log_report({"_target_": "lightning.pytorch.loggers.CSVLogger"}, run="smoke", files=files,
                      metrics_rows=[]) is None


@pytest.mark.slow  # ~7 s: two wandb runs in one process
def test_a_training_logger_after_another_wandb_run_in_the_process_stays_offline(tmp_path):
    """stage=all with pipeline.seeds: seed 0's report is a wandb run; seed 1's training then opens
    another in the same process, which must not ask for a login. A fresh interpreter without this
    suite's WANDB_MODE, as a user's has (wandb reads its settings once per process)."""
    script = textwrap.dedent(f"""
        from pathlib import Path
        from bam_pipeline.training.loggers import close_logger, log_report, make_logger
        cfg = {{"_target_": "lightning.pytorch.loggers.WandbLogger", "project": "bam-test", "offline": True,
               "save_dir": {str(tmp_path / "logs")!r}}}
        report = Path({str(tmp_path / "report.md")!r})
        report.write_text("# report")
        assert log_report(cfg, run="tiny", files=[report], metrics_rows=[]) is not None
        logger = make_logger(cfg, run="tiny-seed1", stage="seed", name="main", config={{"train": {{"seed": 1}}}})
        print("mode", logger.experiment.settings.mode)
        close_logger(logger)
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") or k == "WANDB_SILENT"}
    env["HOME"] = str(tmp_path)  # no ~/.netrc with a key
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "mode offline" in r.stdout, (r.stdout + r.stderr)[-3000:]
