"""The eval report reaches wandb (offline) when the wandb logger is on, and nothing happens otherwise."""

import matplotlib

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
