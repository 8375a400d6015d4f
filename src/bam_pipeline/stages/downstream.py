"""stage=downstream: every model of the run (or ``downstream.models``) through lm-evaluation-harness
with our ``LM`` (:mod:`bam_pipeline.eval.harness`), on the offline suite built from the run's
held-out test documents (``downstream=offline``, the default) or on the paper's Table 3 tasks
(``downstream=paper``, online; HumanEval and MBPP only with ``downstream.allow_code_execution``).

Results go to ``stages/<run>/downstream/results.json`` and, when the run has been evaluated, into
its report (rebuilt). A run on some of the models (``downstream.models``) keeps the other models'
rows of the file it replaces where they scored the same tasks with the same settings and their
artifacts are unchanged. Each (model, task) result is cached in ``downstream/cache/`` under the hash of
the model artifact, the task's configuration (the offline items themselves, or the paper task's
name, shots and limit) and the settings that change numbers; only what changed runs again.

BTM (the eval-time ensemble of the seed and the experts) is not an artifact and has no ``LM`` here:
it is skipped, with a line in the results and the report.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from bam_pipeline.data.prepare import PreparedData
from bam_pipeline.errors import BamError
from bam_pipeline.eval.downstream import TASK_PREFIX, build_offline_suite, paper_tasks, run_tasks, task_yaml
from bam_pipeline.eval.downstream import PAPER_TASKS
from bam_pipeline.eval.downstream_table import results_table, task_row
from bam_pipeline.eval.harness import harness_lm, require_lm_eval
from bam_pipeline.eval.names import about
from bam_pipeline.eval.render import text_table
from bam_pipeline.eval.serving import torch_threads
from bam_pipeline.model.counting import count_params
from bam_pipeline.eval.runner import BTM_LABEL, resolve_device, sources_with_test_split
from bam_pipeline.stages.context import RunContext
from bam_pipeline.stages.eval import stage_ranks, write_report
from bam_pipeline.stages.inputs import OutputIdentity, current_model, model_artifact, open_data, rebuild_hint
from bam_pipeline.store.artifacts import Artifact, find_model_artifacts, load_model, outdated_models, read_model_config
from bam_pipeline.store.files import canonical_hash, sha256_file, write_json
from bam_pipeline.store.layout import RunLayout
from bam_pipeline.store.locks import StageLock

CACHE_SCHEMA = 1


def _lm_eval_version() -> str:
    import importlib.metadata as md

    return md.version("lm_eval")


def selected_models(ctx: RunContext, prepared: PreparedData) -> tuple[list[Artifact], list[dict[str, str]]]:
    """The models to evaluate (``downstream.models``, else every model of the run not outdated), each made
    with the run's tokenizer, and skip records (BTM, outdated models; an outdated model named is refused)."""
    spec = ctx.downstream
    skipped = []
    btm = "BTM is an eval-time ensemble of the seed and the domain experts (eval/btm.py), not one model: it has no "\
          "lm-eval LM here, so no downstream row"
    if spec.models is None:
        found = find_model_artifacts(ctx.layout)
        if not found:
            raise BamError(f"no trained model in {ctx.layout.run_dir}; run `{ctx.cmd('stage=all')}` first")
        arts = [model_artifact(ctx, a.label, prepared) for a in found]  # another tokenizer's: refused first
        outdated = outdated_models(ctx.layout, prepared.manifest["hash"], found)
        for label, why in outdated.items():
            skipped.append({"name": label, "reason": f"outdated ({why}); {rebuild_hint(ctx, label)}"})
        arts = [a for a in arts if a.label not in outdated]
        if not arts:
            raise BamError(f"every model of run {ctx.run} is outdated ({', '.join(outdated)}: built from inputs "
                           f"rebuilt since); rebuild them from the seed on (`{ctx.cmd('stage=all')}` for the "
                           "variants the run lists), then run this command again")
        if ctx.layout.metrics.is_file() and any(r["model"] == BTM_LABEL for r in
                                                json.loads(ctx.layout.metrics.read_text())["rows"]):
            skipped.append({"name": BTM_LABEL, "reason": btm})
        return arts, skipped
    arts = []
    for label in spec.models:
        if label == BTM_LABEL:
            skipped.append({"name": BTM_LABEL, "reason": btm})
        else:
            arts.append(current_model(ctx, label, prepared, key="downstream.models"))
    if not arts:
        raise BamError("downstream.models names no model to evaluate (BTM has no downstream row); name artifacts "
                       "as stage=status lists them, e.g. downstream.models=[seed,moe/bam]")
    return arts, skipped


def offline_tasks(prepared: PreparedData) -> list[str]:
    """The offline suite's task names: one per source with a test split."""
    sources, _ = sources_with_test_split(prepared)
    return [f"{TASK_PREFIX}_{s}" for s in sources]


def selected_tasks(ctx: RunContext, prepared: PreparedData) -> list[str]:
    """The tasks to run (``downstream.tasks`` checked against the suite's), before anything is built."""
    spec = ctx.downstream
    if spec.suite == "offline":
        known = offline_tasks(prepared)
    else:
        known = [t.task for t in paper_tasks(allow_code_execution=spec.allow_code_execution)]
    if spec.tasks is None:
        return known
    for task in spec.tasks:
        if task not in known:
            code = next((t for t in PAPER_TASKS if t.task == task and t.executes_code), None)
            if spec.suite == "paper" and code is not None:
                raise BamError(f"task {task!r} ({code.paper}) executes generated code; add "
                               "downstream.allow_code_execution=true to run it")
            none = next((t for t in PAPER_TASKS if t.paper.lower() == task.lower() and t.task is None), None)
            why = f" ({none.paper}: {none.note})" if none is not None else ""
            raise BamError(f"unknown task {task!r} for downstream={spec.suite}{why}; its tasks: {', '.join(known)}")
    return list(spec.tasks)


def _offline_task_configs(ctx: RunContext, prepared: PreparedData, tasks: list[str]
                          ) -> tuple[Path, dict[str, dict[str, Any]]]:
    """Build the offline suite (the selected sources) and each task's identity: its items and YAML."""
    spec = ctx.downstream
    sources = [t[len(TASK_PREFIX) + 1:] for t in tasks]
    suite = build_offline_suite(prepared, ctx.layout.downstream_suite, sources=sources,
                                context_tokens=spec.context_tokens, passage_tokens=spec.passage_tokens,
                                max_items=spec.max_items, seed=spec.seed)
    configs = {task: {"suite": "offline", "items_sha256": sha256_file(suite.dir / f"{task}.jsonl"),
                      "yaml": task_yaml(task, Path("data.jsonl"), Path("cache")), "items": suite.items[task]}
               for task in suite.tasks}
    return suite.dir, configs


def _paper_task_configs(ctx: RunContext, tasks: list[str]) -> dict[str, dict[str, Any]]:
    by_task = {t.task: t for t in PAPER_TASKS}
    return {task: {"suite": "paper", "task": task, "num_fewshot": by_task[task].num_fewshot,
                   "limit": ctx.downstream.limit, "lm_eval": _lm_eval_version(), "items": None} for task in tasks}


def _run(lm: Any, ctx: RunContext, tasks: list[str], configs: dict[str, dict[str, Any]], suite_dir: Path | None
         ) -> dict[str, dict[str, Any]]:
    """lm-eval's results of ``tasks`` for one model: task -> (its results entry, items scored)."""
    spec = ctx.downstream
    if spec.suite == "offline":
        out = run_tasks(lm, tasks, include_path=suite_dir, seed=spec.seed)
        return {t: task_row(t, out["results"][t], configs[t]["items"]) for t in tasks}
    rows = {}
    for task in tasks:  # one lm-eval run per task: shot counts differ
        try:
            out = run_tasks(lm, [task], num_fewshot=configs[task]["num_fewshot"], limit=spec.limit,
                            allow_code_execution=spec.allow_code_execution, seed=spec.seed)
        except BamError:
            raise
        except Exception as e:  # datasets offline, hub errors, lm-eval's own
            raise BamError(f"lm-evaluation-harness could not run {task} ({type(e).__name__}: "
                           f"{' '.join(str(e).split())[:200]}); downstream=paper downloads its datasets: run it "
                           "online, or use downstream=offline") from None
        n = out.get("n-samples", {}).get(task, {}).get("effective")
        rows[task] = task_row(task, out["results"][task], n)
    return rows


def run_downstream(ctx: RunContext, *, with_report: bool = True) -> Path | None:
    """stage=downstream: write ``downstream/results.json`` (and, ``with_report``, the report's section);
    returns its path (None on a rank other than 0). Under a multi-device ``trainer:`` the ranks share the
    models that have tasks to run; rank 0 alone writes the suite, results.json and the report."""
    spec = ctx.downstream
    require_lm_eval()
    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its per-task INFO lines; warnings still show
    prepared = open_data(ctx)
    arts, skipped = selected_models(ctx, prepared)
    tasks = selected_tasks(ctx, prepared)
    ranks = stage_ranks(ctx)
    layout = ctx.layout
    device = resolve_device(spec.device)
    identity = downstream_identity(ctx, prepared, arts, skipped, tasks, device) if ranks.is_zero else None
    fresh = identity is not None and identity.fresh(rebuild=spec.rebuild, hint="downstream.rebuild=true")
    if ranks.broadcast(fresh, "rank 0 to check whether downstream is up to date"):
        if with_report and ranks.is_zero:
            _report(ctx)
        return layout.downstream_results if ranks.is_zero else None
    t0 = time.perf_counter()
    lock = StageLock(layout.lock("downstream", "results"), "the downstream results") if ranks.is_zero else nullcontext()
    with lock, _cpu_threads(spec.threads, device):
        plan = None
        if ranks.is_zero:
            assert identity is not None
            identity.forget()
            if spec.suite == "offline":
                suite_dir, configs = _offline_task_configs(ctx, prepared, tasks)
            else:
                suite_dir, configs = None, _paper_task_configs(ctx, tasks)
            settings = {"batch_size": spec.batch_size, "max_gen_toks": spec.max_gen_toks, "seed": spec.seed,
                        "device": str(device)}  # threads change no number: not part of the cache key
            files = {a.label: _cache_files(layout, a, tasks, configs, settings) for a in arts}
            work = [(a.label, [t for t in tasks if not files[a.label][t].is_file()]) for a in arts]
            plan = suite_dir, configs, settings, files, [(label, missing) for label, missing in work if missing]
        suite_dir, configs, settings, files, work = ranks.broadcast(plan, "rank 0 to build the downstream tasks")
        by_label = {a.label: a for a in arts}
        run_on = ranks.device(device)

        def run_model(unit: tuple[str, list[str]]) -> list[str]:
            label, missing = unit
            model, _ = load_model(by_label[label], verify=False, device=str(run_on))
            lm = harness_lm(model, prepared.tokenizer(), prepared.eos_id, batch_size=spec.batch_size,
                            max_gen_toks=spec.max_gen_toks, seed=spec.seed)
            for task, row in _run(lm, ctx, missing, configs, suite_dir).items():
                write_json(files[label][task], row)  # each rank caches what it ran
            return missing

        params = {label: count_params(read_model_config(by_label[label])).active for label, _ in work}
        shared = ranks.run_shares(work, [params[label] * len(missing) for label, missing in work], run_model,
                                  "the other ranks' downstream tasks")
        if not ranks.is_zero:
            return None
        assert identity is not None
        evaluated = [label for label, _ in work]
        reused = [a.label for a in arts if a.label not in evaluated]
        rows = []
        for art in arts:
            info = about(art)
            for t in tasks:
                row = json.loads(files[art.label][t].read_text())
                rows.append({"model": art.label, "display": info.display, "role": info.role,
                             "artifact_hash": art.hash, **row})
        used = {f.name for per_task in files.values() for f in per_task.values()}
        # only what this selection replaced: another model's, task's or suite's results stay cached
        prefixes = tuple(f"{art.stage}-{art.name}-{t}-" for art in arts for t in tasks)
        for stale in layout.downstream_cache.glob("*.json"):
            if stale.name not in used and stale.name.startswith(prefixes):
                stale.unlink()
        results = {"run": ctx.run, "suite": spec.suite, "lm_eval": _lm_eval_version(),
                   "settings": {**settings, "context_tokens": spec.context_tokens,
                                "passage_tokens": spec.passage_tokens, "max_items": spec.max_items,
                                "limit": spec.limit, "allow_code_execution": spec.allow_code_execution},
                   "tasks": {t: {k: v for k, v in configs[t].items() if k != "yaml"} for t in tasks},
                   "rows": rows, "skipped": skipped, "reused": reused, "evaluated": evaluated,
                   "ranks": {"world": ranks.world, "ran": {str(r): [] for r in range(ranks.world)}
                             | shared.by_rank(evaluated)}}
        kept = _keep_earlier_rows(ctx, prepared, results, {a.label for a in arts})
        write_json(layout.downstream_results, results)
        identity.write()
    if reused:
        print(f"[downstream] reused cached results for: {', '.join(reused)}")
    if kept:
        print(f"[downstream] kept the earlier results (same tasks and settings, same artifact) of: {', '.join(kept)}")
    if evaluated:
        print(f"[downstream] evaluated: {', '.join(evaluated)} ({time.perf_counter() - t0:.0f} s)")
    if ranks.world > 1:
        print(f"[downstream] ran on {ranks.world} ranks: " + "; ".join(
            f"rank {r}: {', '.join(labels) or '-'}" for r, labels in results["ranks"]["ran"].items()))
    for x in skipped:
        print(f"[downstream] skip {x['name']}: {x['reason']}")
    print(text_table(results_table(results)))
    print(f"[downstream] {len(rows)} (model, task) rows -> {layout.downstream_results}")
    if with_report:
        _report(ctx)
    return layout.downstream_results


def _cache_files(layout: RunLayout, art: Artifact, tasks: list[str], configs: dict[str, dict[str, Any]],
                 settings: dict[str, Any]) -> dict[str, Path]:
    """Task -> the cache file of ``art``'s result on it, named by the hash of the artifact, the task's
    configuration and the settings."""
    keys = {t: canonical_hash({"schema": CACHE_SCHEMA, "artifact": art.hash, "task": configs[t],
                               "settings": settings}) for t in tasks}
    return {t: layout.downstream_cache / f"{art.stage}-{art.name}-{t}-{keys[t][:16]}.json" for t in tasks}


def downstream_identity(ctx: RunContext, prepared: PreparedData, arts: list[Artifact], skipped: list[dict[str, str]],
                        tasks: list[str], device: torch.device) -> OutputIdentity:
    """What ``downstream/results.json`` is made from: the models scored (labels and hashes) and those left
    out, the prepared data, the tasks, the settings that change numbers, the device and lm-eval's version."""
    settings = asdict(ctx.downstream)
    for key in ("models", "tasks", "threads", "in_all", "rebuild"):  # the selection is named below; the rest
        settings.pop(key)                                            # changes no number
    return OutputIdentity("downstream", RunLayout.identity(ctx.layout.downstream), {
        "version": CACHE_SCHEMA, "models": {a.label: a.hash for a in arts},
        "skipped": {x["name"]: "skipped" for x in skipped}, "data": prepared.manifest["hash"], "tasks": tasks,
        "downstream": settings, "device": str(device), "lm_eval": _lm_eval_version()})


def _report(ctx: RunContext) -> None:
    """The run's report with the downstream table (rebuilt when either changed), once the run has eval results."""
    if ctx.layout.metrics.is_file():
        write_report(ctx)
    else:
        print(f"the run has no eval results yet; `{ctx.cmd('stage=eval')}` writes the report with this table")


def _keep_earlier_rows(ctx: RunContext, prepared: PreparedData, results: dict[str, Any], selected: set[str]
                       ) -> list[str]:
    """Add to ``results`` the rows of models outside this selection from the results.json it replaces,
    where those were measured on the same suite, tasks and settings and the model's artifact is still
    the one they scored and not outdated; so evaluating one new model keeps the others in the table and
    the report.
    Rows are put in the run's model order. Returns the labels kept."""
    path = ctx.layout.downstream_results
    try:
        earlier = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        earlier = None
    same = ("suite", "settings", "tasks")
    if not isinstance(earlier, dict) or any(earlier.get(k) != results[k] for k in same):
        return []
    # an outdated model's rows are not kept
    current: dict[str, str | None] = dict.fromkeys(outdated_models(ctx.layout, prepared.manifest["hash"]))
    kept_rows = []
    for row in earlier.get("rows", []):
        label = row.get("model")
        if label in selected:
            continue
        if label not in current:
            try:
                current[label] = model_artifact(ctx, label, prepared).hash
            except BamError:  # gone, or made with another tokenizer since
                current[label] = None
        if current[label] is not None and current[label] == row.get("artifact_hash"):
            kept_rows.append(row)
    order = {a.label: i for i, a in enumerate(find_model_artifacts(ctx.layout))}
    tasks = list(results["tasks"])
    results["rows"] = sorted([*results["rows"], *kept_rows],
                             key=lambda r: (order.get(r["model"], len(order)), tasks.index(r["task"])))
    kept = list(dict.fromkeys(r["model"] for r in kept_rows))
    results["kept"] = kept
    return kept


def _cpu_threads(threads: int | None, device: torch.device) -> Any:
    """torch's CPU threads set to ``threads`` while scoring on the CPU, then restored."""
    return torch_threads(threads) if threads is not None and device.type == "cpu" else nullcontext()


def run_downstream_in_all(ctx: RunContext) -> None:
    """The downstream stage as part of stage=all (``downstream.in_all``), which writes the report after it;
    lm-eval is an optional extra, so without it this says so in one line and the pipeline goes on."""
    if not ctx.downstream.in_all:
        return
    try:
        require_lm_eval()
    except BamError as e:
        print(f"[downstream] skipped: {e}")
        return
    run_downstream(ctx, with_report=False)

