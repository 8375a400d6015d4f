"""stage=status: every artifact the run's config asks for, with fresh, stale or missing and why, and
the names that ``artifact=``, ``domain=`` and ``mix=`` accept. Reads manifests only: no weights."""

from __future__ import annotations

from typing import Callable, NamedTuple

from bam_pipeline.config.files import group_options
from bam_pipeline.data.prepare import PreparedData
from bam_pipeline.errors import BamError
from bam_pipeline.stages.context import RunContext
from bam_pipeline.stages.inputs import Plan, model_artifact, open_data
from bam_pipeline.stages.mix import plan_mix
from bam_pipeline.stages.train import parse_moe_name, plan_branch, plan_moe, plan_seed
from bam_pipeline.store.artifacts import Artifact, find_model_artifacts, try_read_artifact
from bam_pipeline.store.layout import label, parse_label

FRESH, STALE, MISSING = "fresh", "stale", "missing"


class ArtifactState(NamedTuple):
    label: str
    state: str  # FRESH, STALE or MISSING
    detail: str  # why stale or missing
    known: bool = True  # False: the run's config cannot plan it (an unknown variant, a missing input)


def _input_key(art) -> str:
    return "data" if art.stage == "data" else art.label


def artifact_states(ctx: RunContext) -> list[ArtifactState]:
    """The state of the data and of every model artifact the config asks for (or the run has), in build order."""
    try:
        prepared: PreparedData | None = open_data(ctx, verify=False)
        states = {"data": ArtifactState("data", FRESH, "")}
    except BamError as e:
        prepared = None
        states = {"data": ArtifactState("data", STALE if (ctx.layout.data / "manifest.json").is_file() else MISSING,
                                        str(e))}
    planners: list[tuple[str, Callable[[PreparedData], Plan]]] = [("seed", lambda p: plan_seed(ctx, p))]
    planners += [(label("branch", d), lambda p, d=d: plan_branch(ctx, p, d)) for d in ctx.data.domains]
    mixes = dict.fromkeys([*ctx.pipeline.mix_variants, *(a.name for a in find_model_artifacts(ctx.layout)
                                                        if a.stage == "mix")])
    planners += [(label("mix", v), lambda p, v=v: plan_mix(ctx, p, v)) for v in mixes]
    runs = [parse_moe_name(r, ctx.budget.moe.match)[2] for r in ctx.pipeline.moe_runs]
    runs = dict.fromkeys([*runs, *(a.name for a in find_model_artifacts(ctx.layout) if a.stage == "moe")])
    planners += [(label("moe", r), lambda p, r=r: plan_moe(ctx, p, r)) for r in runs]
    for lab, planner in planners:
        exists = try_read_artifact(ctx.layout.artifact(*parse_label(lab))) is not None
        if prepared is None:
            states[lab] = ArtifactState(lab, STALE if exists else MISSING, "the prepared data is not current")
            continue
        try:
            plan = planner(prepared)
        except BamError as e:
            states[lab] = ArtifactState(lab, STALE if exists else MISSING, str(e), known=False)
            continue
        behind = [k for k in map(_input_key, plan.inputs.values()) if k in states and states[k].state != FRESH]
        art = try_read_artifact(plan.out)
        if art is None:
            states[lab] = ArtifactState(lab, MISSING, f"needs {', '.join(behind)} first" if behind else "not built yet")
        elif behind:  # as sure as its inputs' states are
            states[lab] = ArtifactState(lab, STALE, f"{', '.join(behind)} will be rebuilt first",
                                        known=all(states[k].known for k in behind))
        else:
            why = plan.stale_reason(art)
            states[lab] = ArtifactState(lab, FRESH, "") if why is None else ArtifactState(lab, STALE, why)
    return list(states.values())


def stale_models(ctx: RunContext) -> dict[str, str]:
    """Label -> why, for each model artifact of the run that exists but is not what the run's config
    builds now (an input or a setting changed since); a BamError when the prepared data itself is not
    current, since every model would be scored or used on other data than it was built from."""
    rows = artifact_states(ctx)
    if rows[0].state != FRESH:  # the data
        raise BamError(rows[0].detail)
    return {r.label: r.detail for r in rows if r.state == STALE and r.known}


def rebuild_hint(ctx: RunContext) -> str:
    """How to bring stale models up to date: stage=all rebuilds what is stale and skips what is fresh."""
    return f"rebuild with `{ctx.cmd('stage=all')}` (`{ctx.cmd('stage=status')}` says what changed)"


def current_model(ctx: RunContext, text: str, prepared: PreparedData, *, key: str = "artifact") -> Artifact:
    """:func:`~bam_pipeline.stages.inputs.model_artifact`, refused in one line when the model is stale:
    exported, generated from or scored, it would not be the model this run's config describes."""
    art = model_artifact(ctx, text, prepared, key=key)
    why = stale_models(ctx).get(art.label)
    if why is not None:
        raise BamError(f"{key}={text} is stale ({why}): it is not the model this run's config builds now; "
                       f"{rebuild_hint(ctx)}")
    return art


def run_status(ctx: RunContext) -> None:
    print(f"run {ctx.run} ({ctx.layout.run_dir})")
    rows = artifact_states(ctx)
    width = max(len(r.label) for r in rows)
    for lab, state, detail, _ in rows:
        print(f"  {lab:<{width}}  {state:<7}  {detail}")
    existing = [a.label for a in find_model_artifacts(ctx.layout)]
    print(f"artifact= accepts: {', '.join(existing) or '(nothing built yet)'}")
    print(f"domain= accepts: {', '.join(ctx.data.domains)}")
    print(f"mix= accepts: {', '.join(group_options('mix'))}")
