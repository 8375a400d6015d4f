"""PNG figures (matplotlib, Agg backend): routing heatmaps, perplexity per domain per model, training
loss against tokens. Each function draws from plain data and writes one file atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import EngFormatter  # noqa: E402

from bam_pipeline.eval.names import column_name  # noqa: E402
from bam_pipeline.eval.routing import heatmap_values  # noqa: E402
from bam_pipeline.eval.table import PplTable  # noqa: E402
from bam_pipeline.store.files import atomic_path  # noqa: E402
from bam_pipeline.store.layout import MODEL_STAGES, parse_label  # noqa: E402

ROUTER_TITLES = {"attn": "attention router: mean soft weight", "ffn": "FFN router: fraction of assignments"}


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def routing_heatmap(model_routing: dict[str, Any], kind: str, path: Path) -> Path | None:
    """Domain x expert heatmap of one model's routing.json entry, one panel per layer; None when the
    model has no ``kind`` router."""
    domains, layers = heatmap_values(model_routing, kind)
    if not layers:
        return None
    experts = model_routing.get("experts", {}).get(kind) or [f"e{i}" for i in range(len(layers[0][0]))]
    n = len(layers)
    fig, axes = plt.subplots(1, n, figsize=(1.2 + 0.6 * len(experts) * n + 0.8 * n, 0.9 + 0.45 * len(domains)),
                             squeeze=False)
    for i, (ax, mat) in enumerate(zip(axes[0], layers)):
        im = ax.imshow(mat, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_title(f"layer {i}", fontsize=9)
        ax.set_xticks(range(len(experts)), experts, fontsize=8, rotation=45, ha="right")
        ax.set_yticks(range(len(domains)), [column_name(d) for d in domains] if i == 0 else [""] * len(domains),
                      fontsize=8)
        for r, row in enumerate(mat):
            for c, v in enumerate(row):
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(f"{model_routing['display']}: {ROUTER_TITLES[kind]}", fontsize=10, y=1.04)
    return _save(fig, path)


def perplexity_bars(table: PplTable, path: Path) -> Path:
    """Grouped bars: one group per source column, one bar per model (log scale)."""
    labels = [lab for lab in table.labels if lab in table.values]
    cols = list(table.columns)
    width = 0.8 / max(1, len(labels))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(cols) * max(1, len(labels)) * 0.35 + 2), 4))
    for j, lab in enumerate(labels):
        xs = [i + (j - (len(labels) - 1) / 2) * width for i in range(len(cols))]
        ys = [table.get(lab, c) or 0.0 for c in cols]
        ax.bar(xs, ys, width, label=table.name(lab))
    ax.set_xticks(range(len(cols)), [column_name(c) for c in cols])
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (lower is better)")
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Perplexity per domain per model")
    return _save(fig, path)


def loss_curves(logs: dict[str, list[dict[str, Any]]], names: dict[str, str], path: Path) -> Path | None:
    """Training loss (and validation loss, dashed) against tokens, per model label (display ``names``);
    one panel per stage."""
    present = {parse_label(lab)[0] for lab, rows in logs.items() if rows}
    stages = [s for s in MODEL_STAGES if s in present]
    if not stages:
        return None
    fig, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages), 3.4), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        for lab, rows in logs.items():
            if parse_label(lab)[0] != stage or not rows:
                continue
            train = [(r["tokens"], r["loss"]) for r in rows if "loss" in r and "tokens" in r]
            val = [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r and "tokens" in r]
            line = ax.plot(*zip(*train), label=names.get(lab, lab), lw=1.2)[0] if train else None
            if val:
                ax.plot(*zip(*val), ls="--", marker=".", lw=1.0, color=line.get_color() if line else None,
                        label=f"{names.get(lab, lab)} (val)")
        ax.set_title(stage)
        ax.set_xlabel("tokens")
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 200k, 1M: no overlapping raw counts
        ax.set_ylabel("loss (nats/token)")
        ax.legend(fontsize=7)
    fig.suptitle("Training loss against tokens", fontsize=10)
    return _save(fig, path)


def interval_panels(panels: dict[str, list[tuple[str, float, float, float]]], path: Path, *, xlabel: str,
                    title: str, zero_line: bool = False) -> Path | None:
    """One panel per key of ``panels`` (a column, a claim), one row per ``(name, estimate, low, high)``:
    the estimate as a dot and its interval as a bar. ``zero_line`` marks 0 (for differences)."""
    panels = {k: v for k, v in panels.items() if v}
    if not panels:
        return None
    n_rows = max(len(v) for v in panels.values())
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 2.5, 0.8 + 0.32 * n_rows),
                             squeeze=False, sharey=True)
    names = list(dict.fromkeys(name for rows in panels.values() for name, *_ in rows))
    for ax, (key, rows) in zip(axes[0], panels.items()):
        for name, est, low, high in rows:
            y = names.index(name)
            # an interval of zero width (one test document) may sit a rounding error beside its estimate
            ax.errorbar([est], [y], xerr=[[max(0.0, est - low)], [max(0.0, high - est)]], fmt="o", ms=4, capsize=3,
                        lw=1.2)
        if zero_line:
            ax.axvline(0.0, color="k", lw=0.8, ls=":")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(names)), names)
    axes[0][0].invert_yaxis()
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def entropy_curves(logs: dict[str, list[dict[str, Any]]], names: dict[str, str], path: Path) -> Path | None:
    """Router entropy relative to uniform (``entropy/<kind>/L<i>`` of the train logs) against tokens, one
    panel per model with routers, one line per (router kind, layer): attention solid, FFN dashed."""
    series: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for lab, rows in logs.items():
        for r in rows:
            for key, v in r.items():
                if key.startswith("entropy/") and "tokens" in r:
                    series.setdefault(lab, {}).setdefault(key, []).append((r["tokens"], v))
    if not series:
        return None
    n = len(series)
    cols = min(n, 4)
    rows_n = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.8 * cols, 2.9 * rows_n), squeeze=False, sharey=True)
    for ax, (lab, lines) in zip(axes.flat, series.items()):
        for key in sorted(lines):
            _, kind, layer = key.split("/")
            ax.plot(*zip(*lines[key]), ls="-" if kind == "attn" else "--", lw=1.1, label=f"{kind} {layer}")
        ax.set_title(names.get(lab, lab), fontsize=9)
        ax.set_xlabel("tokens", fontsize=8)
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=6, ncol=2)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes[0][0].set_ylabel("entropy / ln E")
    fig.suptitle("Router entropy per layer over training (1 = uniform weights)", fontsize=10, y=1.03)
    return _save(fig, path)
