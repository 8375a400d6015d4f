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
  eval/                      metrics.json, routing.json, documents.json, heatmaps, cache/, identity.json
  report/                    report.md, report.html, claims.json, plots, identity.json
  export/<stage>/<name>/     stage=export: a Hugging Face model directory of a model artifact (not scanned as one)
  downstream/                stage=downstream: results.json, suite/ (the offline tasks), cache/, identity.json
  seeds/                     with pipeline.seeds: the aggregate over the seeds' runs (report.md, table.json, ...,
                             identity.json)
  logs/                      Hydra and logger output; sweep/<job>.log: a job of hydra/launcher=local
  data.json                  a run that reads another run's prepared data (a seed of pipeline.seeds): its path
```
``identity.json`` in eval/, report/, downstream/ and seeds/ records what that output was made from
(``stages.inputs.OutputIdentity``): a rerun with the same identity skips it.
A model artifact's label is ``seed`` or ``<stage>/<name>`` (``branch/code``, ``moe/bam_cm``).

Training seed ``s`` of ``pipeline.seeds`` other than the run's own ``train.seed`` is the run
``<run>-seed<s>`` beside it, with no ``data/`` of its own: its ``data.json`` names the shared one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bam_pipeline.errors import ConfigError

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


def stage_args(text: str) -> str:
    """The overrides that select the stage (re)building the model artifact a label names (its own stage, not
    stage=all): ``stage=seed``, ``stage=branch domain=<d>``, ``stage=mix mix=<v>``, ``stage=moe mix=<v>``
    (a ``_cm`` name adds ``budget.moe.match=compute``)."""
    stage, name = parse_label(text)
    if stage == "branch":
        return f"stage=branch domain={name}"
    if stage in ("mix", "moe"):
        variant = name.removesuffix(CM_SUFFIX)
        return f"stage={stage} mix={variant}" + (" budget.moe.match=compute" if variant != name else "")
    return f"stage={stage}"


DATA_REF = "data.json"
IDENTITY = "identity.json"  # what eval, the report, downstream and the seeds report were made from


def check_run_name(run: str) -> None:
    """``run`` names one directory under the stages root: a single path component, so a run never writes
    outside the root (``run=../x``) or into another run's directory (``run=a/b``)."""
    if run in ("", ".", "..") or any(c in run for c in ("/", "\\", "\0")):
        raise ConfigError("run", run, "a run is one directory name under the stages root, not a path; use "
                          "run=<name> (no '/'), and point BAM_STAGES_DIR (paths.root) at the folder to write in")


def seed_run_name(run: str, seed: int) -> str:
    """The run directory name of training seed ``seed`` of run ``run`` (not its own train.seed)."""
    return f"{run}-seed{seed}"


@dataclass(frozen=True)
class RunLayout:
    """Every path of one run directory. ``data_dir``: where its prepared data lives when not in the run
    directory itself; None reads ``data.json`` when the run has one, else uses ``<run_dir>/data``."""

    run_dir: Path
    data_dir: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "run_dir", Path(self.run_dir))
        if self.data_dir is None and (self.run_dir / DATA_REF).is_file():
            ref = json.loads((self.run_dir / DATA_REF).read_text())["data_dir"]
            object.__setattr__(self, "data_dir", (self.run_dir / ref).resolve())
        if self.data_dir is not None:
            object.__setattr__(self, "data_dir", Path(self.data_dir))

    @property
    def run(self) -> str:
        return self.run_dir.name

    @property
    def data(self) -> Path:
        return self.data_dir if self.data_dir is not None else self.run_dir / "data"

    @property
    def shares_data(self) -> bool:
        """Whether the prepared data lives in another run's directory."""
        return self.data.resolve() != (self.run_dir / "data").resolve()

    @property
    def data_ref(self) -> Path:
        return self.run_dir / DATA_REF

    def artifact(self, stage: str, name: str = SEED_NAME) -> Path:
        return self.run_dir / stage / name

    def work(self, stage: str, name: str = SEED_NAME) -> Path:
        return self.run_dir / ".work" / stage / name

    def lock(self, stage: str, name: str = SEED_NAME) -> Path:
        """The lock file of one output (``stage="data"`` for the prepared data, beside the data's directory)."""
        if stage == "data":  # name: "data", or one part of its preparation ("part<i>-of-<n>")
            return self.data.parent / ".locks" / ("data.lock" if name in ("data", SEED_NAME) else f"data-{name}.lock")
        return self.run_dir / ".locks" / f"{stage}/{name}.lock"

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

    def export(self, stage: str, name: str = SEED_NAME) -> Path:
        """The Hugging Face export of model artifact ``<stage>/<name>``: under ``export/``, which no
        model scan reads (:meth:`stage_dirs` lists ``<run>/<stage>/`` of the model stages only)."""
        return self.run_dir / "export" / stage / name

    @property
    def downstream(self) -> Path:
        return self.run_dir / "downstream"

    @property
    def downstream_results(self) -> Path:
        return self.downstream / "results.json"

    @property
    def downstream_suite(self) -> Path:
        """The offline suite's lm-eval task files and their JSONL items."""
        return self.downstream / "suite"

    @property
    def downstream_cache(self) -> Path:
        return self.downstream / "cache"

    @property
    def report(self) -> Path:
        return self.run_dir / "report"

    def sweep_log(self, job: str) -> Path:
        """The log of one job of a sweep run by hydra/launcher=local (``job``: its file name)."""
        return self.run_dir / "logs" / "sweep" / job

    @staticmethod
    def identity(output_dir: Path) -> Path:
        """The identity record of a derived output directory (eval, report, downstream, seeds)."""
        return Path(output_dir) / IDENTITY

    @property
    def seeds_report(self) -> Path:
        """The aggregate over the training seeds of ``pipeline.seeds`` (in the run of the first seed)."""
        return self.run_dir / "seeds"

    def stage_dirs(self, stage: str) -> list[Path]:
        """The finished-looking artifact directories of a stage (temporaries of a publish left out)."""
        root = self.run_dir / stage
        if not root.is_dir():
            return []
        return sorted(p for p in root.iterdir() if p.is_dir() and ".tmp-" not in p.name and ".old-" not in p.name)
