"""A run's routing.json and its heatmaps, the only place they are drawn: one PNG per (model, routed block),
drawn by eval beside routing.json (``RunLayout.heatmap``) and copied from there into the report.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from bam_pipeline.eval.plots import routing_heatmap
from bam_pipeline.eval.routing import ROUTED_BLOCKS, heatmap_values
from bam_pipeline.store.files import canonical_hash, write_json
from bam_pipeline.store.layout import RunLayout


def read_routing(path: Path) -> dict[str, Any]:
    """A routing.json, or nothing where there is none (or it cannot be read)."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return old if isinstance(old, dict) else {}


def write_routing(layout: RunLayout, routing: dict[str, Any]) -> None:
    """Eval's routing.json and a heatmap per model and routed block: a model's pictures are kept (touched: no
    older than routing.json, so the report copies them) where its entry is the one they were drawn from (the
    routing.json this replaces), drawn anew otherwise."""
    drawn_from = read_routing(layout.routing)
    write_json(layout.routing, routing)
    for label, entry in routing.items():
        same = label in drawn_from and canonical_hash(drawn_from[label]) == canonical_hash(entry)
        for block in ROUTED_BLOCKS:
            path = layout.heatmap(label, block)
            if same and path.is_file():
                os.utime(path)
            else:
                routing_heatmap(entry, block, path)


def report_heatmaps(layout: RunLayout, routing: dict[str, Any], directory: Path) -> dict[str, str]:
    """The report's heatmaps of ``routing`` (the run's routing.json) in ``directory``, file name -> caption: a
    copy of the one eval drew from the same routing.json (drawing dozens of them again cost seconds a report),
    drawn anew where eval's is missing or older than it."""
    images = {}
    for label, entry in routing.items():
        for block in ROUTED_BLOCKS:
            if not heatmap_values(entry, block)[1]:
                continue  # the model has no router of this block
            path = layout.heatmap(label, block, directory)
            drawn = layout.heatmap(label, block)
            if drawn.is_file() and drawn.stat().st_mtime_ns >= layout.routing.stat().st_mtime_ns:
                shutil.copyfile(drawn, path)
            else:
                routing_heatmap(entry, block, path)
            images[path.name] = f"{entry['display']}: {block} routing per domain and layer"
    return images
