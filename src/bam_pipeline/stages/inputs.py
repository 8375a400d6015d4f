"""How a stage finds its inputs, decides whether its output is up to date, and holds its lock.

A stage's output depends on its config and on its inputs' hashes (``Plan.config``, whose hash is
the stage's identity). An existing artifact with the same identity is fresh and is not rebuilt; a
stale one is rebuilt (``pipeline.on_stale=rebuild``) or refused, with the reason named. An output
is built under its lock (:mod:`bam_pipeline.store.locks`), held by global rank 0 for its launch: a
second run of the same stage stops at once naming the holder; prepared data another run is
building is waited for.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from bam_pipeline.data.prepare import PreparedData, open_current
from bam_pipeline.eval.runner import BTM_LABEL
from bam_pipeline.errors import BamError
from bam_pipeline.stages.context import RunContext
from bam_pipeline.stages.hf_model_dirs import seed_tokenizer
from bam_pipeline.store.artifacts import (MANIFEST, WEIGHTS, Artifact, find_model_artifacts, outdated_models,
                                         read_artifact, remove_dead_temporaries, try_read_artifact)
from bam_pipeline.store.files import canonical_hash, changed_keys, write_json
from bam_pipeline.store.layout import MODEL_STAGES, RunLayout, label, parse_label, stage_args
from bam_pipeline.store.locks import StageLock, read_holder, stale_reason, wait_while_held
from bam_pipeline.ranks import is_rank_zero


@dataclass
class Plan:
    """What one stage run would build: its output, identity, inputs and the model's description."""

    stage: str
    name: str
    out: Path
    config: dict[str, Any]  # what the result depends on (its hash is the identity); holds the inputs' hashes
    inputs: dict[str, Artifact]
    about: dict[str, Any] = field(default_factory=dict)  # written into the manifest as "about"

    @property
    def label(self) -> str:
        return label(self.stage, self.name)

    def stale_reason(self, art: Artifact) -> str | None:
        """None when ``art`` was built from this plan, else what changed."""
        if art.manifest.get("config_hash") == canonical_hash(self.config):
            return None
        old_inputs = art.manifest.get("inputs", {})
        changed = [k for k, a in self.inputs.items() if old_inputs.get(k, {}).get("hash") != a.hash]
        old_cfg = art.manifest.get("config", {})
        keys = changed_keys(old_cfg, self.config, ignore=("inputs",))
        return "; ".join(filter(None, [f"inputs changed: {', '.join(changed)}" if changed else "",
                                       f"config changed: {', '.join(keys)}" if keys else ""])) or "config changed"


def open_data(ctx: RunContext, *, verify: bool = True) -> PreparedData:
    """The run's prepared data, refused when it was made from another data config or other sources;
    waits first while another run is preparing it."""
    wait_while_held(ctx.layout.lock("data"), "the prepared data", timeout_s=ctx.pipeline.wait_s)
    return open_current(ctx.data, ctx.layout.data, seed_tokenizer=seed_tokenizer(ctx), verify=verify,
                        command=ctx.cmd)


def data_input(prepared: PreparedData) -> Artifact:
    """The prepared data as a stage input; its hash covers every token and tokenizer file."""
    return Artifact(Path(prepared.dir), {"stage": "data", "name": "data", "hash": prepared.manifest["hash"],
                                         "files": {}})


def require(ctx: RunContext, stage: str, name: str, prepared: PreparedData) -> Artifact:
    """The finished upstream artifact ``<stage>/<name>``, made with the run's tokenizer, or a BamError
    naming the command that (re)produces it (:func:`producer`; or the run that is building it right now)."""
    path = ctx.layout.artifact(stage, name)
    command = producer(ctx, label(stage, name))
    if not (path / MANIFEST).is_file():
        holder = read_holder(ctx.layout.lock(stage, name))
        if holder is not None and stale_reason(holder) is None:
            raise BamError(f"input {label(stage, name)} is being built by another run ({holder.describe()}); wait "
                           "for it to finish, then run this command again")
        raise BamError(f"missing input {path}: run `{command}` first")
    try:
        return read_artifact(path, tokenizer=prepared.tokenizer_hash)
    except BamError as e:
        raise BamError(f"{e} (`{command}`)") from None




def model_artifact(ctx: RunContext, text: str, prepared: PreparedData, *, key: str = "artifact") -> Artifact:
    """The finished model artifact a label names (``seed``, ``branch/code``, ``moe/bam``, as ``stage=status``
    lists them), made with the run's tokenizer; a BamError naming what this run has otherwise."""
    stage, name = parse_label(text)
    path = ctx.layout.artifact(stage, name) if stage in MODEL_STAGES and name and "/" not in name else None
    if path is None or try_read_artifact(path) is None or not (path / WEIGHTS).is_file():
        known = ", ".join(a.label for a in find_model_artifacts(ctx.layout)) or "none yet"
        if text == BTM_LABEL:  # the eval-time ensemble of eval/btm.py: a row of the eval table, no artifact
            raise BamError(f"{key}={text}: BTM is an eval-time ensemble of the seed and the domain experts, not one "
                           f"model; name one of this run's models ({known})")
        raise BamError(f"unknown {key} {text!r}: run {ctx.run} has no such model ({known}; "
                       "`python -m bam_pipeline stage=status` lists them)")
    return read_artifact(path, tokenizer=prepared.tokenizer_hash)  # a BamError naming it when another tokenizer's


def producer(ctx: RunContext, text: str) -> str:
    """The command that (re)builds the model artifact ``text`` names (:func:`~bam_pipeline.store.layout.stage_args`
    and this command's own overrides)."""
    return ctx.cmd(stage_args(text))


def rebuild_hint(ctx: RunContext, text: str) -> str:
    """How to bring an outdated model ``text`` up to date: its producer, after what it is built from."""
    return f"rebuild it with `{producer(ctx, text)}` once its inputs are current, or delete it"


def current_model(ctx: RunContext, text: str, prepared: PreparedData, *, key: str = "artifact") -> Artifact:
    """:func:`model_artifact`, refused in one line when it was built from inputs the run has rebuilt since
    (:func:`~bam_pipeline.store.artifacts.outdated_models`): exported, generated from or scored, it would
    not be the model of this run's seed, experts and data."""
    art = model_artifact(ctx, text, prepared, key=key)
    why = outdated_models(ctx.layout, prepared.manifest["hash"]).get(art.label)
    if why is not None:
        raise BamError(f"{key}={text} is outdated ({why}): it is not built from this run's current models; "
                       f"{rebuild_hint(ctx, art.label)}")
    return art


@contextmanager
def building(ctx: RunContext, plan: Plan) -> Iterator[None]:
    """Hold the lock of ``plan``'s output while building it (global rank 0, for its whole launch)."""
    if not is_rank_zero():
        yield
        return
    with StageLock(ctx.layout.lock(plan.stage, plan.name), plan.label):
        yield


def fresh_artifact(plan: Plan, on_stale: str) -> Artifact | None:
    """The existing artifact when the plan built it (a skip), else None; says why a stale one is
    rebuilt, or refuses with the override that forces it. Temporaries a killed run left are removed."""
    for p in remove_dead_temporaries(plan.out):
        print(f"{plan.label}: removed {p}, left by a run that was killed while publishing")
    art = try_read_artifact(plan.out)
    if art is None:
        return None
    why = plan.stale_reason(art)
    if why is None:
        print(f"{plan.label}: up to date in {plan.out}, skipping (delete it to retrain)")
        return art
    if on_stale == "refuse":
        raise BamError(f"{plan.label} is stale ({why}); re-run with pipeline.on_stale=rebuild to rebuild it")
    print(f"{plan.label}: stale ({why}), rebuilding")
    return None


def read_identity(record: Path) -> dict[str, Any] | None:
    """An output's identity record (``what``, ``hash``, ``config``), or None where there is none readable."""
    try:
        old = json.loads(Path(record).read_text())
    except (OSError, ValueError):
        return None
    return old if isinstance(old, dict) and isinstance(old.get("config"), dict) else None


def recorded_hash(output_dir: Path) -> str | None:
    """The hash of the identity an output directory (eval, report, ...) was last made with, if any."""
    return (read_identity(RunLayout.identity(output_dir)) or {}).get("hash")


@dataclass(frozen=True)
class OutputIdentity:
    """The identity of an output derived from the run's models rather than trained (eval, the report,
    downstream, the seeds report): what it was made from, recorded in ``record`` (``identity.json``
    beside it) once it is complete. A rerun whose identity equals the record skips it, like a fresh
    artifact; ``models`` and ``skipped`` map model labels to artifact hashes and to skip reasons, so a
    stale reason names the models that changed."""

    what: str  # how messages name it: "eval", "report", "downstream", "seeds report"
    record: Path
    config: dict[str, Any]

    @property
    def hash(self) -> str:
        return canonical_hash(self.config)

    def recorded(self) -> dict[str, Any] | None:
        """The identity the output was last made with (None: never made, or made before outputs had one)."""
        return read_identity(self.record)

    def stale_reason(self) -> str | None:
        """None when the output was made with this identity, else what changed (the models by label)."""
        old = self.recorded()
        if old is None:
            return "not built yet" if not self.record.parent.is_dir() else "no record of what it was made from"
        if old.get("hash") == self.hash:
            return None
        before = old["config"]
        parts = []
        for key, what in (("models", "models changed"), ("skipped", "models skipped")):
            a, b = before.get(key) or {}, self.config.get(key) or {}
            labels = [lab for lab in dict.fromkeys([*b, *a]) if a.get(lab) != b.get(lab)]
            if labels:
                parts.append(f"{what}: {', '.join(labels)}")
        keys = changed_keys(before, self.config, ignore=("models", "skipped"))
        if keys:
            parts.append(f"config changed: {', '.join(keys)}")
        return "; ".join(parts) or "changed"

    def fresh(self, *, rebuild: bool, hint: str) -> bool:
        """Whether to skip the output (its identity is unchanged and ``rebuild`` is off); says which."""
        why = self.stale_reason()
        if why is None and not rebuild:
            print(f"{self.what}: up to date in {self.record.parent}, skipping ({hint} to redo it)")
            return True
        if why is None:
            print(f"{self.what}: up to date, redoing it ({hint})")
        elif why != "not built yet":
            print(f"{self.what}: stale ({why}), redoing it")
        return False

    def forget(self) -> None:
        """Drop the record before the output is rewritten: a run cut short leaves it stale, never fresh."""
        self.record.unlink(missing_ok=True)

    def as_record(self) -> dict[str, Any]:
        """The record's content (what a publish that writes it itself puts at ``record``'s name)."""
        return {"what": self.what, "hash": self.hash, "config": self.config}

    def write(self) -> None:
        """Record the identity once the output is complete."""
        write_json(self.record, self.as_record())
