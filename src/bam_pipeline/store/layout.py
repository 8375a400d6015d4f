"""The layout of a run directory ``stages/<run>/``: the one place that spells its paths.

```
stages/<run>/
  data/                      prepared data (tokenizer, token shards, manifest.json)
  seed/main/                 model artifacts: <stage>/<name>/ (seed's name is "main")
  branch/<domain>/
  mix/<variant>/
  moe/<variant>[_cm]/
  .work/<stage>/<name>/      a training stage's checkpoints and growing train log (resume)
  .locks/<stage>/<name>.lock who is building an output right now (store.locks)
  eval/                      metrics.json, routing.json, documents.json, heatmaps, cache/
  report/                    report.md, report.html, plots
  logs/                      Hydra and logger output
```
A model artifact's label is ``seed`` or ``<stage>/<name>`` (``branch/code``, ``moe/bam_cm``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MODEL_STAGES = ("seed", "branch", "mix", "moe")
SEED_NAME = "main"
CM_SUFFIX = "_cm"  # moe/<variant>_cm: the compute-matched run of a variant


def label(stage: str, name: str) -> str:
    """``seed`` for the seed, else ``<stage>/<name>``."""
    return stage if stage == "seed" else f"{stage}/{name}"


def parse_label(text: str) -> tuple[str, str]:
    """(stage, name) of a label; ``seed`` -> (``seed``, ``main``)."""
    stage, _, name = text.partition("/")
    return stage, name or SEED_NAME


@dataclass(frozen=True)
class RunLayout:
    """Every path of one run directory."""

    run_dir: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "run_dir", Path(self.run_dir))

    @property
    def run(self) -> str:
        return self.run_dir.name

    @property
    def data(self) -> Path:
        return self.run_dir / "data"

    def artifact(self, stage: str, name: str = SEED_NAME) -> Path:
        return self.run_dir / stage / name

    def work(self, stage: str, name: str = SEED_NAME) -> Path:
        return self.run_dir / ".work" / stage / name

    def lock(self, stage: str, name: str = SEED_NAME) -> Path:
        """The lock file of one output (``stage="data"`` for the prepared data)."""
        return self.run_dir / ".locks" / (f"{stage}.lock" if stage == "data" else f"{stage}/{name}.lock")

    @property
    def eval(self) -> Path:
        return self.run_dir / "eval"

    @property
    def eval_cache(self) -> Path:
        return self.eval / "cache"

    @property
    def metrics(self) -> Path:
        return self.eval / "metrics.json"

    @property
    def routing(self) -> Path:
        return self.eval / "routing.json"

    @property
    def documents(self) -> Path:
        """Per-document test losses of every model (what intervals resample)."""
        return self.eval / "documents.json"

    def heatmap(self, model_label: str, kind: str, directory: Path | None = None) -> Path:
        """A routing heatmap of one model and router kind, in ``eval/`` (or ``directory``)."""
        return (directory or self.eval) / f"routing_{model_label.replace('/', '_')}_{kind}.png"

    @property
    def report(self) -> Path:
        return self.run_dir / "report"

    def stage_dirs(self, stage: str) -> list[Path]:
        """The finished-looking artifact directories of a stage (temporaries of a publish left out)."""
        root = self.run_dir / stage
        if not root.is_dir():
            return []
        return sorted(p for p in root.iterdir() if p.is_dir() and ".tmp-" not in p.name and ".old-" not in p.name)
