"""The questions the paper leaves open (docs/paper.md section 9, and its Tables 4-6), each answered from the
models of one run (or several seeds' runs) by paired comparisons against a reference model.

A question names a reference model and the models it is compared with, by label. Its answer is a table
(each model's perplexity per column with its interval, parameters, and the difference in mean loss
against the reference on average, with its paired interval) and one sentence per model. Each answer is the
verdict of :func:`~bam_pipeline.eval.stats.claim_verdict` on the claim "the model beats the reference on
every column", from the same paired intervals (:meth:`~bam_pipeline.eval.claims.LossColumns.difference`) and
the same document minimum as the ordering claims, with the columns on each side named: better on every
column; worse where some interval lies above 0 and none below; mixed (better on some columns, worse on
others); otherwise not resolved at this scale, naming the columns where it is better, or, with too few test
documents, why. So a row and the claim over the same two models (Table 4's BTX row and "BAM beats BTX")
state the same columns on the same side: the claim fails on the columns where the row is better. A question
whose reference or models this run did not train is left out of the report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from bam_pipeline.eval.aggregate import Aggregate
from bam_pipeline.eval.names import column_name
from bam_pipeline.eval.runner import probed_label
from bam_pipeline.eval.scores import ScoreRow
from bam_pipeline.eval.stats import HOLDS, Interval, claim_verdict
from bam_pipeline.eval.table import AVERAGE


@dataclass(frozen=True)
class PaperRow:
    """A row of one of the paper's tables, beside ours: its name there and its perplexities (by our source
    names), or a note when the extracted numbers cannot be attributed to one row."""

    name: str
    values: Mapping[str, float] | None = None
    note: str = ""


@dataclass(frozen=True)
class Question:
    key: str
    question: str
    reference: str  # the label every row is compared against
    rows: tuple[str, ...]  # labels compared with the reference, in table order
    how: str  # what the comparison measures, one sentence
    paper: str = ""  # the paper's table this reproduces, if any
    paper_rows: tuple[PaperRow, ...] = ()
    paper_columns: tuple[str, ...] = ("code", "law", "math", "general")  # the paper's column order


TABLE4 = (
    PaperRow("BAM (776M total, 663M active)", {"code": 3.44, "law": 6.04, "math": 5.31, "general": 24.06}),
    PaperRow("BTX, 4 experts (700M)", {"code": 3.78, "law": 6.63, "math": 5.77, "general": 26.72}),
    PaperRow("BTX, 5-8 experts (738M-851M total, 587M active)",
             note="Code 3.90-4.11, Law 6.84-7.19, Math 6.00-6.25, Pre-train 27.36-29.08 (rows uncertain in the "
                  "extracted text): every one worse than BAM"),
)
TABLE5 = (
    PaperRow("BAM", {"code": 3.44, "law": 6.04, "math": 5.31, "general": 24.06}),
    PaperRow("BTX top-3, 6 experts (776M total, 662M active)", {"code": 3.55, "law": 6.23, "math": 5.48,
                                                                "general": 24.13}),
)
TABLE6 = (
    PaperRow("BTX", {"general": 26.72, "code": 3.78, "law": 6.63, "math": 5.77}),
    PaperRow("soft attention routing", {"general": 26.00, "code": 3.72, "law": 6.51, "math": 5.64}),
    PaperRow("top-2 attention routing", {"general": 26.68, "code": 3.78, "law": 6.69, "math": 5.75}),
    PaperRow("top-1 attention routing (likely shared KV)", {"general": 26.89, "code": 3.83, "law": 6.69,
                                                            "math": 5.82}),
)

QUESTIONS: tuple[Question, ...] = (
    Question("uniform_attention", "Are the soft attention weights close to uniform, i.e. just averaging?",
             "moe/bam", ("moe/bam+uniform_attn",),
             "BAM scored again with every attention router forced to uniform weights (the attention experts "
             "averaged); the routing entropy of its soft attention relative to uniform is below."),
    Question("frozen", "Would frozen experts keep their specialisation?", "moe/bam", ("moe/bam_frozen",),
             "BAM whose mixture phase trains only the routers and the averaged weights, the experts frozen "
             "bit for bit, against BAM trained fully."),
    Question("shared_routing", "Would one routing decision shared across layers, or between attention and "
                               "FFN, do as well?", "moe/bam",
             ("moe/bam_router_shared_layers", "moe/bam_router_joint"),
             "Layer 0's routers deciding for every layer, and one router per layer for attention and FFN, "
             "against BAM's own routers; how often BAM's separate routers agree is below."),
    Question("routing_rule", "Would expert-choice or hash routing do as well?", "moe/bam",
             ("moe/bam_expert_choice", "moe/bam_hash"),
             "Expert-choice FFN routing (causal thresholds at eval) and a fixed balanced hash of the token id, "
             "against BAM's learned top-1 token choice."),
    Question("router_init", "Does initialising each router row from its expert's mean hidden state help?",
             "moe/bam", ("moe/bam_router_hidden",),
             "Router rows set to the seed's mean normed hidden state on each expert's domain (mergekit's "
             "'hidden' mode) against BAM's random router initialisation."),
    Question("parameters", "Is BAM's edge over BTX just more parameters? (paper Table 4)", "moe/bam",
             ("moe/btx", "moe/btx_e5", "moe/btx_e6", "moe/btx_e7", "moe/btx_e8"),
             "BTX given more FFN experts copied from the seed (top-1), up to and beyond BAM's parameter count, "
             "against BAM.", "Table 4", TABLE4),
    Question("btx_routing", "Does BTX catch up with more active experts? (paper Table 5)", "moe/bam",
             ("moe/btx_top2", "moe/btx_matched"),
             "BTX with its own paper's top-2 routing, and top-3 over 6 experts (3 domain + 3 seed copies, "
             "BAM's total and active parameters), against BAM.", "Table 5", TABLE5),
    Question("attention_routing", "Soft or top-k attention routing, at equal compute? (paper Table 6)",
             "moe/bam_cm", ("moe/btx", "moe/bam_attn_top2_cm", "moe/bam_attn_top1_cm"),
             "Compute-matched against BTX's training FLOPs (top-k attention counted as an ideal sparse kernel "
             "computes it): BAM's soft attention routing against top-2 and top-1 attention routing and BTX.",
             "Table 6", TABLE6, ("general", "code", "law", "math")),
)

BETTER, WORSE, MIXED, UNRESOLVED = "better", "worse", "mixed", "not resolved at this scale"


@dataclass(frozen=True)
class RowAnswer:
    label: str
    verdict: str  # BETTER (every column below 0), WORSE (some above, none below), MIXED (some each), UNRESOLVED
    deciding: str  # the column that decides it
    average: Interval  # the difference in mean loss against the reference on Average
    intervals: dict[str, Interval]
    better_on: tuple[str, ...] = ()  # columns whose interval lies below 0
    worse_on: tuple[str, ...] = ()  # columns whose interval lies above 0
    reason: str = ""  # why no side is taken whatever the intervals say (too few test documents)

    def cell(self) -> str:
        """The verdict as the question's table shows it."""
        cols = lambda cs: ", ".join(column_name(c) for c in cs)  # noqa: E731
        if self.reason:
            return f"**{self.verdict}**: {self.reason}"
        if self.verdict == BETTER:
            return f"**{BETTER}**"
        if self.verdict == WORSE:
            return f"**{WORSE}** ({cols(self.worse_on)})"
        if self.verdict == MIXED:
            return f"**{MIXED}**: better on {cols(self.better_on)}, worse on {cols(self.worse_on)}"
        return f"**{UNRESOLVED}** ({column_name(self.deciding)})" + (
            f"; better on {cols(self.better_on)}" if self.better_on else "")


def present(q: Question, agg: Aggregate) -> list[str]:
    """The question's rows this aggregate has (empty when it lacks the reference)."""
    if q.reference not in agg.table.labels:
        return []
    return [lab for lab in q.rows if lab in agg.table.labels]


def _columns(agg: Aggregate) -> tuple[str, ...]:
    return agg.table.claim_columns


def answer_row(agg: Aggregate, q: Question, label: str) -> RowAnswer:
    """``label`` against the question's reference: the paired interval of the difference in mean loss per
    column, and the verdict they give."""
    lc = agg.losses
    intervals = {c: lc.difference(label, q.reference, c, agg.level) for c in _columns(agg)
                 if lc.has(label, c) and lc.has(q.reference, c)}
    v = claim_verdict(intervals, min_documents=agg.min_documents)
    if v.status == HOLDS:
        verdict = BETTER
    elif v.above:
        verdict = MIXED if v.below else WORSE
    else:
        verdict = UNRESOLVED
    return RowAnswer(label, verdict, v.column, intervals.get(AVERAGE, v.interval), intervals, v.below, v.above,
                     v.reason)


def _params(rows: Sequence[ScoreRow]) -> dict[str, tuple[int, int]]:
    out = {}
    for r in rows:
        out.setdefault(r.model, (r.params_total, r.params_active))
        out.setdefault(probed_label(r.model), out[r.model])
    return out


def _si(n: float) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _cell(iv: Interval) -> str:
    return f"{iv.estimate:.2f} [{iv.low:.2f}, {iv.high:.2f}]"


def _diff(iv: Interval) -> str:
    return f"{iv.estimate:+.4f} [{iv.low:+.4f}, {iv.high:+.4f}]"


def question_table(q: Question, agg: Aggregate, rows: Sequence[ScoreRow]) -> list[list[str]]:
    """Header + the reference's row + one row per compared model: perplexity per column (the paper's column
    order) with its interval, parameters, and the difference in mean loss against the reference."""
    t = agg.table
    cols = [c for c in q.paper_columns if c in t.columns] + [c for c in t.columns if c not in q.paper_columns]
    cols.append(AVERAGE)
    params = _params(rows)
    out = [["model", *(column_name(c) for c in cols), "total params", "active params",
            f"vs {t.name(q.reference)}: mean loss, Average [interval]", "verdict (every column)"]]
    for lab in [q.reference, *present(q, agg)]:
        total, active = params.get(lab, (0, 0))
        row = [t.name(lab), *(_cell(agg.cells[lab][c]) if c in agg.cells[lab] else "-" for c in cols),
               _si(total), _si(active)]
        if lab == q.reference:
            row += ["reference", "-"]
        else:
            a = answer_row(agg, q, lab)
            row += [_diff(a.average), a.cell()]
        out.append(row)
    return out


def paper_table(q: Question) -> list[list[str]]:
    """Header + the paper's rows of the table this question reproduces."""
    out = [["paper's model", *(column_name(c) if c != "general" else "Pre-train" for c in q.paper_columns),
            "Average", "note"]]
    for r in q.paper_rows:
        vals = r.values or {}
        cells = [f"{vals[c]:.2f}" if c in vals else "-" for c in q.paper_columns]
        avg = f"{sum(vals.values()) / len(vals):.2f}" if len(vals) == len(q.paper_columns) else "-"
        out.append([r.name, *cells, avg, r.note])
    return out


def sentence(q: Question, agg: Aggregate) -> str:
    """What this run says, one clause per compared model, with the Average interval."""
    t = agg.table
    parts = []
    cols = lambda cs: ", ".join(column_name(c) for c in cs)  # noqa: E731
    for lab in present(q, agg):
        a = answer_row(agg, q, lab)
        ref = t.name(q.reference)
        if a.reason:
            said = f"is not judged against {ref} ({a.reason})"
        elif a.verdict == BETTER:
            said = f"is better than {ref} on every column"
        elif a.verdict == WORSE:
            said = f"is worse than {ref} (on {cols(a.worse_on)})"
        elif a.verdict == MIXED:
            said = f"is better than {ref} on {cols(a.better_on)} and worse on {cols(a.worse_on)}"
        else:
            said = f"is not distinguishable from {ref} on at least one column ({column_name(a.deciding)})" + (
                f", better on {cols(a.better_on)}" if a.better_on else "")
        parts.append(f"{t.name(lab)} {said}; on Average its mean loss differs by {_diff(a.average)} nats per token")
    return "; ".join(parts) + f" ({agg.level:.0%} paired intervals over {agg.covers})."


def attention_entropy(routing: Mapping[str, Any], label: str) -> str | None:
    """The soft attention routing of ``label`` relative to uniform: entropy / ln E averaged over layers, per
    domain, and the largest mean weight any expert gets in any (domain, layer)."""
    entry = routing.get(label)
    if not entry:
        return None
    per_domain, top = [], 0.0
    for domain, stats in entry["domains"].items():
        s = stats.get("attn")
        if not s or not s.get("entropy"):
            continue
        n = len(s["mean_prob"][0])
        per_domain.append(f"{column_name(domain)} {sum(s['entropy']) / len(s['entropy']) / math.log(n):.3f}")
        top = max(top, max(max(layer) for layer in s["mean_prob"]))
    if not per_domain:
        return None
    return (f"{entry['display']}'s soft attention weights have entropy / ln E of {', '.join(per_domain)} (1 = uniform), "
            f"averaged over layers; the largest mean weight of one expert in any domain and layer is {top:.3f}.")


def agreement(routing: Mapping[str, Any], label: str) -> str | None:
    """How often the reference's own routers agree (consecutive layers, attention and FFN), over domains."""
    entry = routing.get(label)
    if not entry:
        return None
    keys = (("ffn", "agree_next_layer", "its FFN routers pick the same expert in consecutive layers"),
            ("attn", "agree_next_layer", "its attention routers' top expert is the same in consecutive layers"),
            ("attn", "agree_with_ffn", "attention and FFN pick the same top expert in one layer"))
    parts = []
    for kind, key, text in keys:
        vals = [(sum(s[kind][key]) / len(s[kind][key]), sum(s[kind][key + "_chance"]) / len(s[kind][key + "_chance"]))
                for s in entry["domains"].values() if kind in s and s[kind].get(key)]
        if vals:
            parts.append(f"{text} for {sum(v for v, _ in vals) / len(vals):.0%} of tokens "
                         f"(chance {sum(c for _, c in vals) / len(vals):.0%})")
    return f"In {entry['display']}, " + "; ".join(parts) + "." if parts else None
