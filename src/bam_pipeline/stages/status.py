"""stage=status: every artifact the run's config asks for, then eval, downstream and the report, with
fresh, stale or missing and why, and the names that ``artifact=``, ``domain=`` and ``mix=`` accept.
Reads manifests and identity records only: no weights."""

from __future__ import annotations

from typing import Callable

from bam_pipeline.config.files import group_options
from bam_pipeline.data.prepare import PreparedData, build_state
from bam_pipeline.errors import BamError
from bam_pipeline.stages.context import RunContext
from bam_pipeline.eval.harness import require_lm_eval
from bam_pipeline.eval.runner import resolve_device, select_models
from bam_pipeline.stages.downstream import downstream_identity, selected_models, selected_tasks
from bam_pipeline.stages.eval import eval_identity, report_identity
from bam_pipeline.stages.hf_model_dirs import seed_tokenizer
from bam_pipeline.stages.inputs import OutputIdentity, Plan, open_data
from bam_pipeline.stages.mix import plan_mix
from bam_pipeline.stages.train import parse_moe_name, plan_branch, plan_moe, plan_seed
from bam_pipeline.store.artifacts import find_model_artifacts, try_read_artifact
from bam_pipeline.store.layout import RunLayout, label, parse_label

FRESH, STALE, MISSING = "fresh", "stale", "missing"


def _input_key(art) -> str:
    return "data" if art.stage == "data" else art.label


def artifact_states(ctx: RunContext) -> list[tuple[str, str, str]]:
    """(label, state, detail) for the data and every model artifact the config asks for, in build order."""
    try:
        prepared: PreparedData | None = open_data(ctx, verify=False)
        states = {"data": (FRESH, f"{prepared.manifest.get('shard_count', '?')} shards")}
    except BamError as e:
        prepared = None
        building = build_state(ctx.data, ctx.layout.data, seed_tokenizer(ctx))  # shards done and missing, by part
        states = {"data": (STALE if (ctx.layout.data / "manifest.json").is_file() else MISSING,
                           f"{building}; {e}" if building else str(e))}
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
            states[lab] = (STALE if exists else MISSING, "the prepared data is not current")
            continue
        try:
            plan = planner(prepared)
        except BamError as e:
            states[lab] = (STALE if exists else MISSING, str(e))
            continue
        behind = [k for k in map(_input_key, plan.inputs.values()) if states.get(k, (FRESH,))[0] != FRESH]
        art = try_read_artifact(plan.out)
        if art is None:
            states[lab] = (MISSING, f"needs {', '.join(behind)} first" if behind else "not built yet")
        elif behind:
            states[lab] = (STALE, f"{', '.join(behind)} will be rebuilt first")
        else:
            why = plan.stale_reason(art)
            states[lab] = (FRESH, "") if why is None else (STALE, why)
    rows = [(lab, state, detail) for lab, (state, detail) in states.items()]
    return rows + derived_states(ctx, prepared, [lab for lab, state, _ in rows if state != FRESH])


def _state(identity: OutputIdentity, behind: list[str]) -> tuple[str, str]:
    why = identity.stale_reason()
    if why == "not built yet":
        return MISSING, f"needs {', '.join(behind)} first" if behind else why
    if why is not None:
        return STALE, why
    return (STALE, f"{', '.join(behind)} will be redone first") if behind else (FRESH, "")


def derived_states(ctx: RunContext, prepared: PreparedData | None, behind: list[str]) -> list[tuple[str, str, str]]:
    """(label, state, detail) of eval, downstream and the report: fresh when what each is made from (its
    :class:`~bam_pipeline.stages.inputs.OutputIdentity`) is unchanged and nothing before it is rebuilt."""
    layout = ctx.layout
    if prepared is None:
        return [(lab, STALE if RunLayout.identity(d).is_file() else MISSING, "the prepared data is not current")
                for lab, d in (("eval", layout.eval), ("downstream", layout.downstream), ("report", layout.report))]
    rows = []
    try:
        ev = _state(eval_identity(ctx, prepared, select_models(layout, prepared)), behind)
    except BamError as e:  # no model yet
        ev = (MISSING, str(e))
    rows.append(("eval", *ev))
    try:
        require_lm_eval()
        arts, skipped = selected_models(ctx, prepared)
        tasks = selected_tasks(ctx, prepared)
        ds = _state(downstream_identity(ctx, prepared, arts, skipped, tasks, resolve_device(ctx.downstream.device)),
                    behind)
    except BamError as e:
        ds = (MISSING, str(e))
    rows.append(("downstream", *ds))
    first = [f"{lab} ({why})" for lab, (state, why) in (("eval", ev), ("downstream", ds)) if state != FRESH
             and (lab == "eval" or ctx.downstream.in_all)]  # what the report reads, and why it is redone
    rows.append(("report", *_state(report_identity(ctx), first)))
    return rows


def run_status(ctx: RunContext) -> None:
    print(f"run {ctx.run} ({ctx.layout.run_dir})")
    rows = artifact_states(ctx)
    width = max(len(lab) for lab, _, _ in rows)
    for lab, state, detail in rows:
        print(f"  {lab:<{width}}  {state:<7}  {detail}")
    existing = [a.label for a in find_model_artifacts(ctx.layout)]
    print(f"artifact= accepts: {', '.join(existing) or '(nothing built yet)'}")
    print(f"domain= accepts: {', '.join(ctx.data.domains)}")
    print(f"mix= accepts: {', '.join(group_options('mix'))}")
