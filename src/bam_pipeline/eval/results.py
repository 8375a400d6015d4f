"""The repository's results: a finished run's summary (``docs/results/<experiment>.json``) and the page
``docs/results.md`` written from the committed summaries, with its plots.

A summary is what the run's report computed, kept after the run directory is gone: the Table 1 analogue with
intervals (:func:`~bam_pipeline.eval.report.interval_cells`, and every cell as numbers for the plots), the claims
(:func:`~bam_pipeline.eval.report.claims_json`), the cost table (:func:`~bam_pipeline.eval.report.cost_rows`,
total training compute and budget conventions included), each open question's table and answer where the run
trained its models (:mod:`~bam_pipeline.eval.ablations`), one mixture's routing for its heatmap, and the
provenance: the command that produced the run, the git commit, the machine, the date and the seeds.

``docs/results.md`` is generated, never edited: :func:`results_markdown` is a function of the summaries alone,
byte for byte, so a test regenerates it from the committed summaries. Its sections are :data:`SECTIONS` (a
missing summary is said so, with the command that makes it), then any other experiment a summary exists for.
Each section's "what we found" sentences are made from the summary's numbers and verdicts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from bam_pipeline.errors import BamError
from bam_pipeline.eval import ablations
from bam_pipeline.eval.aggregate import Aggregate, RunEval
from bam_pipeline.eval.names import column_name
from bam_pipeline.eval.render import Block, to_markdown
from bam_pipeline.eval.report import claims_json, cost_rows, interval_cells, training_costs
from bam_pipeline.eval.stats import FAILS, HOLDS
from bam_pipeline.eval.table import AVERAGE
from bam_pipeline.store.files import write_json, write_text

SUMMARY_FORMAT = 1
RESULTS_DIR, RESULTS_MD = "results", "results.md"  # under the repository's docs/
ROUTED_MIXTURE = "moe/bam"  # the mixture whose routing the page draws, when the run trained it
UNTRAINED = ("untrained", "probe")  # rows of the table the perplexity plot leaves out (mixtures before training)


@dataclass(frozen=True)
class Section:
    """A section of docs/results.md: the experiment whose summary it shows, its title and the command that
    produces the run (then ``make results`` exports it)."""

    experiment: str
    title: str
    produce: str


SECTIONS = (
    Section("tiny", "The tiny experiment over 3 seeds", "make full-run SEEDS=3"),
    Section("ablations", "The open questions (`make ablations`)", "make ablations"),
    Section("smollm2_cpu", "BAM from SmolLM2-135M (`experiment=smollm2_cpu`)", "make smollm2-cpu"),
)


def summary_path(docs: Path, experiment: str) -> Path:
    return Path(docs) / RESULTS_DIR / f"{experiment}.json"


def _cells(agg: Aggregate) -> list[dict[str, Any]]:
    return [{"model": lab, "display": agg.table.name(lab), "role": agg.table.role(lab), "column": c,
             "estimate": iv.estimate, "low": iv.low, "high": iv.high}
            for lab in agg.table.labels for c, iv in agg.cells[lab].items()]


def _questions(agg: Aggregate, runs: Sequence[RunEval]) -> list[dict[str, Any]]:
    return [{"key": q.key, "question": q.question, "how": q.how,
             "table": ablations.question_table(q, agg, runs[0].rows), "answer": ablations.sentence(q, agg)}
            for q in ablations.QUESTIONS if ablations.present(q, agg)]


def _routing(run: RunEval) -> dict[str, Any] | None:
    """The routing.json entry of :data:`ROUTED_MIXTURE` (else the first model with routers), with its label."""
    path = run.layout.routing
    routing = json.loads(path.read_text()) if path.is_file() else {}
    label = ROUTED_MIXTURE if ROUTED_MIXTURE in routing else next(iter(routing), None)
    return None if label is None else {"label": label, **routing[label]}


def summarize(runs: Sequence[RunEval], agg: Aggregate, *, experiment: str, provenance: Mapping[str, Any],
              resamples: int) -> dict[str, Any]:
    """A finished run's summary (the module docstring) from its evaluated runs (one per training seed) and their
    aggregate; the cost table and routing are the first seed's run's."""
    first = runs[0]
    return {
        "format": SUMMARY_FORMAT,
        "experiment": experiment,
        "provenance": dict(provenance),
        "seeds": list(agg.seeds),
        "level": agg.level,
        "covers": agg.covers,
        "resamples": resamples,
        "min_documents": agg.min_documents,
        "table": interval_cells(agg),
        "cells": _cells(agg),
        "claims": claims_json(agg),
        "questions": _questions(agg, runs),
        "cost": cost_rows(first.rows, *training_costs(first.layout)),
        "cost_run": first.layout.run,
        "routing": _routing(first),
        "left_out": agg.left_out,
    }


def write_summary(docs: Path, summary: Mapping[str, Any]) -> Path:
    path = summary_path(docs, summary["experiment"])
    write_json(path, summary)
    return path


def read_summaries(docs: Path) -> dict[str, dict[str, Any]]:
    """Experiment -> summary, for every ``docs/results/*.json``; a BamError naming one that does not read."""
    out = {}
    for path in sorted((Path(docs) / RESULTS_DIR).glob("*.json")):
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise BamError(f"cannot read the summary {path} ({e}); export it again with `make results`") from None
        if not isinstance(summary, dict) or summary.get("format") != SUMMARY_FORMAT:
            raise BamError(f"{path} is not a summary this version writes (format {SUMMARY_FORMAT}); export it again "
                           "with `make results`")
        out[path.stem] = summary
    return out


# ---- the page -------------------------------------------------------------------------------------
def _iv(d: Mapping[str, Any], fmt: str = "+.4f") -> str:
    return f"{d['estimate']:{fmt}} [{d['low']:{fmt}}, {d['high']:{fmt}}]"


def _claim_rows(summary: Mapping[str, Any]) -> list[list[str]]:
    out = [["claim", "verdict", "decided by", "difference in mean loss [interval]", "seeds where it held"]]
    for c in summary["claims"]:
        status = c["status"] + (f": {c['reason']}" if c.get("reason") else "")
        out.append([c["claim"] + ("" if c["in_paper"] else " (not in the paper)"), f"**{status}**",
                    c.get("decided_by") or "-", "-" if c["interval"] is None else _iv(c["interval"]),
                    f"{c['seeds_holding']} of {c['n_seeds']}" if c["interval"] is not None else "-"])
    return out


def _provenance(summary: Mapping[str, Any]) -> list[str]:
    p = summary["provenance"]
    machine = p.get("machine") or {}
    return [f"command: `{p.get('command', '-')}`",
            f"commit: `{p.get('commit', '-')}`" + (" (with uncommitted changes)" if p.get("dirty") else ""),
            f"machine: {machine.get('cpu', '-')}, {machine.get('cores', '-')} cores; eval device "
            f"{p.get('eval_device', '-')}",
            f"date: {p.get('date', '-')}",
            f"train seeds: {', '.join(str(s) for s in summary['seeds'])}; intervals: {summary['level']:.0%} over "
            f"{summary['covers']} ({summary['resamples']} resamples), a verdict needs {summary['min_documents']} "
            "scored test documents per source",
            f"summary: `docs/{RESULTS_DIR}/{summary['experiment']}.json` (exported by `{p.get('exported_by', '-')}`)"]


def found(summary: Mapping[str, Any]) -> list[str]:
    """The section's "what we found" sentences, each made from the summary's numbers and verdicts."""
    claims = summary["claims"]
    counts: dict[str, int] = {}
    for c in claims:
        counts[c["status"]] = counts.get(c["status"], 0) + 1
    out = []
    if claims:
        out.append(f"Of {len(claims)} ordering claims ({summary['level']:.0%} paired intervals over "
                   f"{summary['covers']}): " + ", ".join(f"{status} {n}" for status, n in counts.items()) + ".")
    for c in claims:
        if c["status"] in (HOLDS, FAILS) and c["interval"] is not None:
            out.append(f"\"{c['claim']}\" {c['status']}: {c['decided_by']} differs by {_iv(c['interval'])} nats "
                       "per token.")
    average = [c for c in summary["cells"] if c["column"] == AVERAGE]
    if average:
        best = min(average, key=lambda c: c["estimate"])
        out.append(f"The lowest Average perplexity is {best['display']}'s, {_iv(best, '.2f')}.")
    out += [f"{q['question']} {q['answer']}" for q in summary["questions"]]
    return out


def _section(section: Section, summary: Mapping[str, Any] | None, images: Mapping[str, str]) -> list[Block]:
    blocks: list[Block] = [("h", 2, section.title)]
    if summary is None:
        return blocks + [("p", f"No summary committed yet: run `{section.produce}`, then `make results` to export "
                               f"it into `docs/{RESULTS_DIR}/{section.experiment}.json`.")]
    blocks += [("list", _provenance(summary)), ("h", 3, "What we found"), ("p", " ".join(found(summary))),
               ("h", 3, "Perplexity per domain (this run's Table 1)"),
               ("p", "Each cell: estimate and interval over the train seeds and test documents; best per column in "
                     "bold; Average = the mean of the in-domain columns."),
               ("table", summary["table"])]
    if summary["claims"]:
        blocks += [("h", 3, "Ordering claims"), ("table", _claim_rows(summary))]
    for q in summary["questions"]:
        blocks += [("h", 3, q["question"]), ("p", q["how"]), ("table", q["table"]), ("p", "**This run:** " + q["answer"])]
    blocks += [("h", 3, "Cost"),
               ("p", f"From run `{summary['cost_run']}`. Total training FLOPs: a model's own and those of every model "
                     "it was built from, each counted once (FLOPs with the LM head); budget: how its stage's length "
                     "was set, naming the FLOP convention of a compute-matched run."),
               ("table", summary["cost"])]
    if summary["left_out"]:
        blocks.append(("list", [f"left out: {lab}: {why}" for lab, why in summary["left_out"].items()]))
    blocks += [("img", f"{RESULTS_DIR}/{name}", caption) for name, caption in images.items()]
    return blocks


def plot_names(summary: Mapping[str, Any]) -> dict[str, str]:
    """The PNGs of a summary (file name under docs/results/ -> caption)."""
    exp = summary["experiment"]
    out = {f"{exp}_perplexity.png": "Perplexity per domain with its interval, every trained model"}
    routing = summary.get("routing")
    if routing and any("attn" in d for d in routing.get("domains", {}).values()):
        out[f"{exp}_routing_attn.png"] = f"{routing['display']}: attention routing per domain and layer"
    return out


def results_markdown(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """docs/results.md from the summaries (experiment -> summary), byte for byte a function of them."""
    blocks: list[Block] = [
        ("h", 1, "Results"),
        ("p", "Generated by `make results` from the summaries in `docs/results/` (never edit this page: export a "
              "run again). Every number below is in a summary, and every summary names the command that produced "
              "its run."),
    ]
    known = [s.experiment for s in SECTIONS]
    extra = [Section(e, f"`experiment={e}`", f"python -m bam_pipeline stage=all experiment={e}")
             for e in sorted(summaries) if e not in known]
    for section in (*SECTIONS, *extra):
        summary = summaries.get(section.experiment)
        blocks += _section(section, summary, plot_names(summary) if summary else {})
    return to_markdown(blocks)


def draw_plots(docs: Path, summary: Mapping[str, Any]) -> list[Path]:
    """The summary's PNGs under docs/results/: perplexity per domain with intervals, and its mixture's attention
    routing heatmap (eval.plots)."""
    from bam_pipeline.eval.plots import interval_panels, routing_heatmap

    names = list(plot_names(summary))
    directory = Path(docs) / RESULTS_DIR
    panels: dict[str, list[tuple[str, float, float, float]]] = {}
    for c in summary["cells"]:
        if c.get("role") in UNTRAINED:
            continue
        panels.setdefault(column_name(c["column"]), []).append((c["display"], c["estimate"], c["low"], c["high"]))
    seeds = len(summary["seeds"])
    out = [interval_panels(panels, directory / names[0], xlabel="perplexity",
                           title=f"{summary['experiment']}: perplexity over {seeds} seed{'s' * (seeds > 1)} with "
                                 f"{summary['level']:.0%} intervals")]
    if len(names) > 1:
        out.append(routing_heatmap(summary["routing"], "attn", directory / names[1]))
    return [p for p in out if p is not None]


def write_results(docs: Path, *, plots: bool = True) -> Path:
    """docs/results.md (and, with ``plots``, every summary's PNGs) from the summaries in docs/results/."""
    summaries = read_summaries(docs)
    if plots:
        for summary in summaries.values():
            draw_plots(docs, summary)
    path = Path(docs) / RESULTS_MD
    write_text(path, results_markdown(summaries))
    return path

