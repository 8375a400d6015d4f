"""Render report blocks to Markdown and to a self-contained HTML page (images embedded as base64).

A block is a tuple: ("h", level, text), ("p", text), ("code", text), ("list", [items]),
("table", [header, *rows]) or ("img", filename, caption). ``**x**`` in a table cell is bold.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any

Block = tuple[Any, ...]

_BOLD = re.compile(r"\*\*(.+?)\*\*")
_STYLE = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
          "table{border-collapse:collapse;margin:1em 0;font-size:14px}"
          "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}"
          "td:first-child,th:first-child{text-align:left}th{background:#eee}"
          "pre{background:#f4f4f4;padding:8px;overflow-x:auto}img{max-width:100%}")


def to_markdown(blocks: list[Block]) -> str:
    out = []
    for b in blocks:
        kind = b[0]
        if kind == "h":
            out.append("#" * b[1] + " " + b[2])
        elif kind == "p":
            out.append(b[1])
        elif kind == "code":
            out.append("```\n" + b[1] + "\n```")
        elif kind == "list":
            out.append("\n".join(f"- {item}" for item in b[1]))
        elif kind == "table":
            header, *rows = b[1]
            lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
            out.append("\n".join(lines))
        elif kind == "img":
            out.append(f"![{b[2]}]({b[1]})")
    return "\n\n".join(out) + "\n"


def _cell(text: Any) -> str:
    return _BOLD.sub(r"<strong>\1</strong>", html.escape(str(text)))


def to_html(blocks: list[Block], image_dir: Path, title: str) -> str:
    """One HTML page; every image is read from ``image_dir`` and embedded."""
    body = []
    for b in blocks:
        kind = b[0]
        if kind == "h":
            body.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
        elif kind == "p":
            body.append(f"<p>{_cell(b[1])}</p>")
        elif kind == "code":
            body.append(f"<pre>{html.escape(b[1])}</pre>")
        elif kind == "list":
            body.append("<ul>" + "".join(f"<li>{_cell(i)}</li>" for i in b[1]) + "</ul>")
        elif kind == "table":
            header, *rows = b[1]
            head = "<tr>" + "".join(f"<th>{_cell(h)}</th>" for h in header) + "</tr>"
            trs = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in r) + "</tr>" for r in rows)
            body.append(f"<table>{head}{trs}</table>")
        elif kind == "img":
            data = base64.b64encode((Path(image_dir) / b[1]).read_bytes()).decode()
            body.append(f'<figure><img alt="{html.escape(b[2])}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{html.escape(b[2])}</figcaption></figure>")
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def text_table(cells: list[list[str]], *, left: int = 1, indent: str = "") -> str:
    """A header + rows table as aligned plain text for the terminal: the first ``left`` columns
    left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    return "\n".join(indent + "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in cells)
