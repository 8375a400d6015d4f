"""The run's report: ``stages/<run>/report/`` with report.md, a self-contained report.html and PNGs.

Built only from files: ``eval/metrics.json``, ``eval/routing.json`` and each artifact's
train_log.jsonl. Sections: provenance, Table 1 analogue beside the paper's, ordering claims on both,
cost table, routing summary, plots, and what was skipped and why.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from bam_pipeline.errors import BamError
from bam_pipeline.eval.claims import check_claims
from bam_pipeline.eval.names import column_name
from bam_pipeline.eval.paper import CITATION, PAPER_COLUMNS, PAPER_NAMES, PAPER_ROLES, PAPER_TABLE1
from bam_pipeline.eval.plots import loss_curves, perplexity_bars, routing_heatmap
from bam_pipeline.eval.render import Block, to_html, to_markdown
from bam_pipeline.eval.routing import ROUTER_KINDS
from bam_pipeline.eval.table import PplTable, order_columns, table_cells, table_from_rows
from bam_pipeline.store.artifacts import find_model_artifacts, publish, read_train_log
from bam_pipeline.store.layout import RunLayout

REPORT_MD, REPORT_HTML = "report.md", "report.html"

SCALE_NOTE = (
    "This run is far smaller than the paper's (tiny models, a few hundred thousand tokens per stage), so "
    "some of the paper's orderings may not hold here; a claim marked \"does not hold\" is what this run "
    "measured, reported as is."
)


def load_eval(layout: RunLayout) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics.json, routing.json) of a run; BamError when eval has not run."""
    if not layout.metrics.is_file():
        raise BamError(f"no eval results in {layout.eval}; run `python -m bam_pipeline stage=eval` first")
    routing = json.loads(layout.routing.read_text()) if layout.routing.is_file() else {}
    return json.loads(layout.metrics.read_text()), routing


def run_table(metrics: dict[str, Any], key: str = "perplexity") -> PplTable:
    """The run's Table 1 analogue: rows in artifact order, general source first."""
    labels = list(dict.fromkeys(r["model"] for r in metrics["rows"]))
    return table_from_rows(metrics["rows"], labels, order_columns(metrics["sources"], metrics.get("general_source")),
                           key)


def paper_table() -> PplTable:
    return PplTable(tuple(PAPER_TABLE1), PAPER_COLUMNS, PAPER_TABLE1, PAPER_NAMES, PAPER_ROLES)


def _si(n: float) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def cost_rows(metrics: dict[str, Any]) -> list[list[str]]:
    """Header + one row per model: total/active params, forward FLOPs/token (and vs the seed), tokens/s."""
    per: dict[str, dict[str, Any]] = {}
    for r in metrics["rows"]:
        per.setdefault(r["model"], r)
    seed_flops = per.get("seed", {}).get("flops_per_token")
    out = [["model", "total params", "active params", "FLOPs/token (fwd)", "FLOPs vs seed", "tokens/s (measured)",
            "tokens trained"]]
    for lab, p in per.items():
        out.append([p.get("display", lab), _si(p["params_total"]), _si(p["params_active"]),
                    _si(p["flops_per_token"]),
                    f"{p['flops_per_token'] / seed_flops:.2f}x" if seed_flops else "-",
                    f"{p.get('tokens_per_s', math.nan):,.0f}",
                    "-" if p.get("tokens_trained") is None else _si(p["tokens_trained"])])
    return out


def routing_rows(routing: dict[str, Any]) -> list[list[str]]:
    """Header + one row per (model, router kind, domain): entropy relative to uniform, averaged over
    layers (1.00 = uniform averaging), the largest mean share and the expert holding it."""
    out = [["model", "router", "domain", "entropy / ln E", "top expert", "top share"]]
    for label, entry in routing.items():
        for kind in ROUTER_KINDS:
            names = entry.get("experts", {}).get(kind, [])
            for domain, stats in entry["domains"].items():
                if kind not in stats or len(names) < 2:
                    continue
                s = stats[kind]
                share = s["mean_prob"] if kind == "attn" else s["fraction"]
                ent = s["entropy"] or [math.nan]
                mean_share = [sum(col) / len(share) for col in zip(*share)]  # (E,) averaged over layers
                top = max(range(len(mean_share)), key=mean_share.__getitem__)
                out.append([entry["display"], kind, column_name(domain),
                            f"{sum(ent) / len(ent) / math.log(len(names)):.3f}", names[top], f"{mean_share[top]:.3f}"])
    return out


def _claim_rows(run: PplTable) -> list[list[str]]:
    paper = {c.key: c for c in check_claims(paper_table())}
    out = [["claim (PAPER.md section 8)", "paper", "this run", "this run's numbers"]]
    for c in check_claims(run):
        out.append([c.text, paper[c.key].status, f"**{c.status}**", c.detail])
    return out


def _blocks(layout: RunLayout, metrics: dict[str, Any], routing: dict[str, Any], images: dict[str, str],
            command: str, config_hash: str) -> list[Block]:
    ppl, bpb = run_table(metrics), run_table(metrics, "bits_per_byte")
    paper_cells = table_cells(paper_table())
    paper_cells[0] = ["model", "General (Pretrain)", *paper_cells[0][2:]]
    s = metrics["settings"]
    b: list[Block] = [
        ("h", 1, f"BAM pipeline report: run {metrics.get('run', layout.run)}"),
        ("h", 2, "Provenance"),
        ("p", "Command:"),
        ("code", command),
        ("list", [f"config hash: `{config_hash}`", f"data hash: `{metrics.get('data_hash', '-')}`",
                  f"eval: up to {s.get('max_tokens_per_source')} test tokens per source, seq_len "
                  f"{s.get('seq_len') or 'model max'}, batch {s.get('batch_size')}, device {s.get('device')}",
                  f"generated {time.strftime('%Y-%m-%d %H:%M:%S %z')}"]),
        ("h", 2, "Perplexity per domain (this run's Table 1)"),
        ("p", "Test-split perplexity, lower is better; best per column in bold (untrained mixtures included). "
              "Average = arithmetic mean of the row's perplexities, as in the paper."),
        ("table", table_cells(ppl)),
        ("p", "Bits per byte (comparable across tokenizers):"),
        ("table", table_cells(bpb)),
        ("h", 2, "The paper's Table 1"),
        ("p", f"Source: {CITATION}. Their models are trained on hundreds of billions of tokens; compare "
              f"orderings, not magnitudes."),
        ("table", paper_cells),
        ("h", 2, "Ordering claims"),
        ("p", SCALE_NOTE),
        ("table", _claim_rows(ppl)),
        ("h", 2, "Cost (cf. paper Tables 7 and 9)"),
        ("p", "Parameters and forward FLOPs per token from the model config "
              "(bam_pipeline.model.counting); tokens/s of the forward pass measured by this evaluation on the device "
              "above, every model afresh in one process, interleaved (the median of "
              f"{(metrics.get('speed') or {}).get('rounds', '-')} rounds on the same batch)."),
        ("table", cost_rows(metrics)),
        ("h", 2, "Plots"),
    ]
    b += [("img", name, caption) for name, caption in images.items() if not name.startswith("routing_")]
    b.append(("h", 2, "Routing"))
    if routing:
        b += [("p", "Is soft attention routing close to uniform averaging, or does each domain pick its own expert? "
                    "Entropy / ln E near 1 means near-uniform weights; a different top expert per domain means "
                    "domain-specific routing. Averages over layers; heatmaps give every layer."),
              ("table", routing_rows(routing))]
        b += [("img", name, caption) for name, caption in images.items() if name.startswith("routing_")]
    else:
        b.append(("p", "No evaluated model has routers."))
    b.append(("h", 2, "Skipped"))
    skipped = metrics.get("skipped", [])
    b.append(("list", [f"{x['name']}: {x['reason']}" for x in skipped]) if skipped else ("p", "Nothing was skipped."))
    return b


def build_report(layout: RunLayout, *, command: str, config_hash: str) -> Path:
    """Write the run's report directory (report.md, report.html, PNGs) atomically; returns report.md's path."""
    metrics, routing = load_eval(layout)
    skipped_models = {x["name"] for x in metrics.get("skipped", []) if x.get("kind") == "model"}
    logs = {a.label: read_train_log(a) for a in find_model_artifacts(layout) if a.label not in skipped_models}
    table = run_table(metrics)
    with publish(layout.report) as tmp:
        images: dict[str, str] = {}
        if metrics["rows"]:
            perplexity_bars(table, tmp / "perplexity.png")
            images["perplexity.png"] = "Perplexity per domain per model"
        if loss_curves(logs, table.names, tmp / "training_loss.png"):
            images["training_loss.png"] = "Training loss against tokens, every stage"
        for label, entry in routing.items():
            for kind in ROUTER_KINDS:
                path = layout.heatmap(label, kind, tmp)
                if routing_heatmap(entry, kind, path):
                    images[path.name] = f"{entry['display']}: {kind} routing per domain and layer"
        blocks = _blocks(layout, metrics, routing, images, command, config_hash)
        (tmp / REPORT_MD).write_text(to_markdown(blocks))
        (tmp / REPORT_HTML).write_text(to_html(blocks, tmp, f"BAM report: {layout.run}"))
    return layout.report / REPORT_MD


def report_files(layout: RunLayout) -> list[Path]:
    """The report's files (report.md, report.html, PNGs), e.g. for logging to wandb."""
    out = layout.report
    if not out.is_dir():
        return []
    return [out / REPORT_MD, out / REPORT_HTML, *sorted(out.glob("*.png"))]


def print_summary(layout: RunLayout) -> None:
    """Print the run's Table 1 analogue (best per column marked *), the ordering claims and the report's path."""
    metrics, _ = load_eval(layout)
    table = run_table(metrics)
    cells = table_cells(table, mark_best="*")
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    for r in cells:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    for c in check_claims(table):
        print(f"{c.status:>15}: {c.text}")
    print(f"report: {layout.report / REPORT_MD}")
