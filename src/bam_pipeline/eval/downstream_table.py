"""Downstream results as rows and as the report's Table 3 analogue.

``stages/<run>/downstream/results.json`` (written by ``stage=downstream``) holds one row per (model,
task): lm-eval's metrics for the task (``acc``, ``acc_stderr``, ``acc_norm``, ... where the task
has them, every metric in ``metrics``), the number of items, and the model's artifact hash. The
report's section (:func:`downstream_blocks`) is a table of models x tasks, acc ± standard error
and acc_norm, with the items-weighted mean over the tasks, and the paper's Table 3 beside it only
where a task is the paper's own (docs/paper.md section 10 quotes the paper's averages over all of its
tasks, not per-task numbers, so no per-task paper number exists to put beside ours).
"""

from __future__ import annotations

import json
import math
from typing import Any

from bam_pipeline.eval.paper import TABLE3_AVERAGES, TABLE3_CITATION
from bam_pipeline.eval.render import Block
from bam_pipeline.store.layout import RunLayout

MAIN_METRICS = ("acc", "acc_norm")


def task_row(task: str, result: dict[str, Any], items: int | None) -> dict[str, Any]:
    """One task's entry of lm-eval's ``results`` as a row: every metric under its name without the
    filter suffix (``acc,none`` -> ``acc``; a filter other than ``none`` kept: ``exact_match,strict-match``),
    its standard error, and the items it was scored on."""
    metrics, stderr = {}, {}
    for key, value in result.items():
        if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        name, filt = key.split(",", 1)
        base = name[: -len("_stderr")] if name.endswith("_stderr") else name
        label = base if filt == "none" else f"{base},{filt}"
        (stderr if name.endswith("_stderr") else metrics)[label] = float(value)
    row: dict[str, Any] = {"task": task, "items": items if items is not None else result.get("sample_len"),
                           "metrics": metrics, "stderr": stderr}
    for name in MAIN_METRICS:
        row[name] = metrics.get(name)
        row[f"{name}_stderr"] = stderr.get(name)
    return row


def pooled(rows: list[dict[str, Any]], metric: str) -> tuple[float, float] | None:
    """The items-weighted mean of ``metric`` over ``rows`` (one model's tasks) and its standard error
    (the tasks' items are independent: sqrt(sum (n_i se_i)^2) / N); None when a row lacks it."""
    if not rows or any(r.get(metric) is None or not r.get("items") for r in rows):
        return None
    n = sum(r["items"] for r in rows)
    mean = sum(r[metric] * r["items"] for r in rows) / n
    se = math.sqrt(sum((r["items"] * (r.get(f"{metric}_stderr") or 0.0)) ** 2 for r in rows)) / n
    return mean, se


def result_cell(row: dict[str, Any] | None) -> str:
    """One task's result as text: accuracy ± its standard error (acc_norm), else the task's first metric."""
    if row is None:
        return "-"
    if row.get("acc") is not None:
        se = row.get("acc_stderr")
        text = f"{row['acc']:.3f}" + (f" ± {se:.3f}" if se is not None else "")
        return text + (f" ({row['acc_norm']:.3f})" if row.get("acc_norm") is not None else "")
    if row["metrics"]:
        name, value = next(iter(row["metrics"].items()))
        se = row["stderr"].get(name)
        return f"{name} {value:.3f}" + (f" ± {se:.3f}" if se is not None else "")
    return "-"


def results_table(results: dict[str, Any]) -> list[list[str]]:
    """Header + one row per model: each task's acc ± stderr (acc_norm), and their items-weighted mean."""
    tasks = list(results["tasks"])
    models = list(dict.fromkeys(r["model"] for r in results["rows"]))
    by = {(r["model"], r["task"]): r for r in results["rows"]}
    display = {r["model"]: r.get("display", r["model"]) for r in results["rows"]}
    items = {t: results["tasks"][t].get("items") for t in tasks}
    head = ["model", *(f"{t} ({items[t]})" if items[t] else t for t in tasks)]
    weighted = len(tasks) > 1 and all(by.get((m, t), {}).get("acc") is not None for m in models for t in tasks)
    out = [head + (["all tasks (items-weighted)"] if weighted else [])]
    for m in models:
        row = [display[m], *(result_cell(by.get((m, t))) for t in tasks)]
        if weighted:
            acc = pooled([by[(m, t)] for t in tasks], "acc")
            norm = pooled([by[(m, t)] for t in tasks], "acc_norm")
            row.append(f"{acc[0]:.3f} ± {acc[1]:.3f}" + (f" ({norm[0]:.3f})" if norm else "") if acc else "-")
        out.append(row)
    return out


def load_results(layout: RunLayout) -> dict[str, Any] | None:
    path = layout.downstream_results
    return json.loads(path.read_text()) if path.is_file() else None


def _paper_note(results: dict[str, Any]) -> str:
    averages = ", ".join(f"{name} {value:.2f}%" for name, value in TABLE3_AVERAGES.items())
    if results.get("suite") == "paper":
        same = ("These are the paper's tasks at its shot counts, but the paper's text (docs/paper.md section 10) gives only "
                "its averages over all of them (QuAC included, which lm-eval lacks), not a number per task, so no "
                "paper number stands beside a task here.")
    else:
        same = ("None of these tasks is one of the paper's (they are built from this run's own test documents), so no "
                "paper number stands beside them; run `downstream=paper` online for the paper's tasks.")
    return f"The paper's Table 3 ({TABLE3_CITATION}) reports averages {averages}. {same}"


def downstream_blocks(layout: RunLayout) -> list[Block]:
    """The report's downstream section from ``downstream/results.json``; nothing when it is absent."""
    results = load_results(layout)
    if results is None or not results.get("rows"):
        return []
    if results.get("suite") == "offline":
        about = (f"lm-evaluation-harness {results.get('lm_eval', '')} on this run's offline suite: per source, a "
                 f"held-out test document's first {results['settings'].get('context_tokens')} tokens and four "
                 f"candidate next passages of about {results['settings'].get('passage_tokens')} tokens (its own and "
                 "three of other test documents of the source, lengths within 10%); chance is 0.250. Each cell: acc "
                 "± its standard error (lm-eval's), acc_norm (per byte) in parentheses; items per task in the "
                 "header.")
    else:
        about = (f"lm-evaluation-harness {results.get('lm_eval', '')} on the paper's Table 3 tasks at its shot "
                 "counts. Each cell: acc ± its standard error (acc_norm in parentheses), or the task's first metric.")
    blocks: list[Block] = [("h", 2, "Downstream tasks (this run's Table 3 analogue)"), ("p", about),
                           ("table", results_table(results)), ("p", _paper_note(results))]
    if results.get("skipped"):
        blocks.append(("list", [f"{x['name']}: {x['reason']}" for x in results["skipped"]]))
    return blocks
