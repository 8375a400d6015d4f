"""The run's report: ``stages/<run>/report/`` with report.md, a self-contained report.html and PNGs.

Built only from files: ``eval/metrics.json``, ``eval/documents.json``, ``eval/routing.json`` and each
artifact's train_log.jsonl (and ``downstream/results.json`` when present). Sections: provenance, Table 1
analogue beside the paper's, ordering claims on both (this run's with intervals over test documents),
out-of-domain verdicts, cost table, serving cost (Table 7 / section 7.3), downstream tasks, routing summary, plots, and what was skipped and why.

With several training seeds (``pipeline.seeds``) the same :func:`build_report` writes the aggregate,
``stages/<run>/seeds/``: every cell's mean and 95% interval over seeds and test documents, and every
claim's verdict from paired comparisons (per seed, and the paired bootstrap).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from bam_pipeline.errors import BamError
from bam_pipeline.eval import ablations
from bam_pipeline.eval.aggregate import Aggregate, RunEval, aggregate, skipped_models
from bam_pipeline.eval.claims import UNMEASURABLE, IntervalClaim, check_claims
from bam_pipeline.eval.downstream_table import downstream_blocks
from bam_pipeline.eval.names import column_name
from bam_pipeline.eval.paper import (CITATION, PAPER_COLUMNS, PAPER_NAMES, PAPER_ROLES, PAPER_TABLE1,
                                    SECTION73_SECONDS, SERVING_CITATION, TABLE7_FLOPS)
from bam_pipeline.eval.heatmaps import report_heatmaps
from bam_pipeline.eval.plots import entropy_curves, interval_panels, loss_curves, perplexity_bars
from bam_pipeline.eval.render import Block, to_html, to_markdown
from bam_pipeline.eval.runner import probed_label
from bam_pipeline.eval.routing import ROUTED_BLOCKS
from bam_pipeline.eval.scores import ScoreRow, rows_of
from bam_pipeline.eval.serving import ServingCosts, rounds_phrase, threads_phrase
from bam_pipeline.eval.stats import (DOCUMENTS_ONLY, FAILS, HOLDS, MIN_DOCUMENTS, MIN_RESAMPLES, Interval,
                                     claim_verdict)
from bam_pipeline.eval.table import AVERAGE, PplTable, order_columns, table_cells, table_from_rows
from bam_pipeline.store.artifacts import find_model_artifacts, publish, read_train_log
from bam_pipeline.store.files import write_json
from bam_pipeline.store.layout import RunLayout
from bam_pipeline.store.lineage import Built, lineage_of, total_compute

REPORT_MD, REPORT_HTML, CLAIMS_JSON = "report.md", "report.html", "claims.json"
# Part of the identity of eval's results, the report and the seeds report (stages.eval): bump it whenever
# this package's code changes what any of them holds, so that a finished run's next rerun redoes them.
REPORT_VERSION = 3  # 2: exact bits per byte, total training compute and the budget's convention; or the serving
# cost (metrics.json's serving, the report's Table 7 / section 7.3 analogue); 3: both

SCALE_NOTE = (
    "This run is far smaller than the paper's (tiny models, a few hundred thousand tokens per stage), so "
    "some of the paper's orderings may not hold here; a claim marked \"fails\" is what this run "
    "measured, reported as is."
)
VERDICT_NOTE = (
    "Each comparison is the difference in mean per-token loss (the log of perplexity; negative: the claim's "
    "direction) between two models on the same test tokens, with a {level:.0%} paired bootstrap interval over "
    "{covers} ({resamples} resamples). A claim holds when every interval lies below 0, fails when one lies "
    "above 0, and is not resolved at this scale otherwise; the interval shown is the one that decides it. "
    "Average compares the mean over the in-domain sources of each source's mean loss. No claim holds or fails "
    "on a source with fewer than {min_documents} scored test documents (`eval.min_documents`) or on an interval "
    "of zero width: it is not resolved, and says why. A claim over every expert, mixture or column that lacks "
    "some of them is incomplete, naming what is missing."
)
FEW_DOCUMENTS_NOTE = (
    "**Too few test documents for a document bootstrap:** {sources} (scored of those in the test split; at "
    "least {min_documents} needed, `eval.min_documents`). Intervals resting on them are too narrow (one "
    "document gives an interval of zero width), so no verdict here rests on them. {fix}"
)
ONE_SEED_NOTE = ("One training seed: these intervals cover test documents only, not training variance; run "
                 "several seeds (`make full-run SEEDS=3`, or `pipeline.seeds=[0,1,2]`) to include it.")


def _require_eval(layout: RunLayout) -> None:
    if not layout.metrics.is_file():
        raise BamError(f"no eval results in {layout.eval}; run `python -m bam_pipeline stage=eval` first")


def _routing(layout: RunLayout) -> dict[str, Any]:
    """The run's routing.json (empty when eval wrote none)."""
    return json.loads(layout.routing.read_text()) if layout.routing.is_file() else {}


def load_eval(layout: RunLayout) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics.json, routing.json) of a run; BamError when eval has not run."""
    _require_eval(layout)
    return json.loads(layout.metrics.read_text()), _routing(layout)


def run_table(metrics: dict[str, Any], key: str = "perplexity") -> PplTable:
    """The run's Table 1 analogue of ``key`` (a ScoreRow field): rows in artifact order, general source first,
    out-of-domain last; the models eval skipped are its missing ones."""
    rows = rows_of(metrics)
    labels = list(dict.fromkeys(r.model for r in rows))
    ood = [s for s in metrics["sources"] if s in metrics.get("ood_sources", [])]
    in_domain = [s for s in metrics["sources"] if s not in ood]
    general = metrics.get("general_source")
    return table_from_rows(rows, labels, order_columns(in_domain, general), key, ood=ood,
                           general=general, missing=skipped_models(metrics))


OOD_WORDS = {HOLDS: "gains", FAILS: "loses"}


def ood_rows(agg: Aggregate) -> list[list[str]]:
    """Header + one row per (trained mixture, out-of-domain source): does mixing keep, gain or lose on
    data no stage trained on, against the seed and the best single expert? Each answer is decided by the
    paired interval of the difference in mean loss ("no clear change" when it contains 0; "not resolved" with
    too few test documents)."""
    table, losses = agg.table, agg.losses
    out = [["mixture", "out-of-domain source", "perplexity", "against the seed", "against the best expert"]]
    experts = [lab for lab in table.labels if table.role(lab) == "expert"]
    for src in table.ood:
        best = table.best(src, experts)
        for lab in table.labels:
            if table.role(lab) != "mixture" or table.get(lab, src) is None:
                continue
            cells = [table.name(lab), column_name(src), _cell(agg.cells[lab][src])]
            for other in ("seed", best):
                if other is None or not losses.has(other, src):
                    cells.append("-")
                    continue
                iv = losses.difference(lab, other, src, agg.level)
                v = claim_verdict({src: iv}, min_documents=agg.min_documents)
                word = f"not resolved ({v.reason})" if v.reason else OOD_WORDS.get(v.status, "no clear change")
                who = "" if other == "seed" else f" ({table.name(other)})"
                cells.append(f"{word}{who}: {_diff(iv)}")
            out.append(cells)
    return out


def _cell(iv: Interval) -> str:
    """A perplexity with its interval: ``24.02 [23.51, 24.60]``."""
    return f"{iv.estimate:.2f} [{iv.low:.2f}, {iv.high:.2f}]"


def _diff(iv: Interval) -> str:
    """A difference in mean loss with its interval: ``-0.0310 [-0.0520, -0.0110]``."""
    return f"{iv.estimate:+.4f} [{iv.low:+.4f}, {iv.high:+.4f}]"


def paper_table() -> PplTable:
    return PplTable(tuple(PAPER_TABLE1), PAPER_COLUMNS, PAPER_TABLE1, PAPER_NAMES, PAPER_ROLES)


def _si(n: float) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def matched_convention(manifest: Mapping[str, Any]) -> str | None:
    """How a trained artifact's budget was set, from its manifest: ``compute-matched (total FLOPs)`` or
    ``(non-embedding FLOPs)`` (``budget.moe.flops``; a manifest from before the setting: total, the only
    convention then), ``data-matched`` for the other moe runs, ``tokens`` for seed and branches; None for a
    model trained on no tokens (a mixture, an import, a copy of the seed)."""
    if not manifest.get("tokens"):
        return None
    budget = manifest.get("budget") or {}
    if budget.get("match", (manifest.get("about") or {}).get("match")) == "compute":
        return f"compute-matched ({(budget.get('flops') or 'total').replace('_', '-')} FLOPs)"
    return "data-matched" if manifest.get("stage") == "moe" else "tokens"


def training_costs(layout: RunLayout) -> tuple[dict[str, Built], dict[str, str | None]]:
    """The run's lineage (total training compute, :mod:`bam_pipeline.store.lineage`) and each model's budget
    convention (:func:`matched_convention`), by label, from the manifests of its model artifacts."""
    arts = find_model_artifacts(layout)
    return lineage_of(arts), {a.label: matched_convention(a.manifest) for a in arts}


def cost_rows(rows: Sequence[ScoreRow], lineage: Mapping[str, Built] | None = None,
              budgets: Mapping[str, str | None] | None = None) -> list[list[str]]:
    """Header + one row per model: total/active params, forward FLOPs/token (and vs the seed), eval
    tokens/s (measured afresh, interleaved), and for trained models the training tokens/s over the
    training steps alone and the stage's wall time split into train / validation / checkpoint / publish.
    With the run's ``lineage`` and ``budgets`` (:func:`training_costs`): each model's total training FLOPs
    (its own and those of every model it was built from, each once; BTM's members together) and how its
    budget was set."""
    per: dict[str, ScoreRow] = {}
    for r in rows:
        per.setdefault(r.model, r)
    seed_flops = per["seed"].flops_per_token if "seed" in per else None
    out = [["model", "total params", "active params", "FLOPs/token (fwd)", "FLOPs vs seed", "eval tokens/s",
            "tokens trained", "train tokens/s", "wall s: train / val / ckpt / publish"]]
    if lineage is not None:
        out[0] += ["total training FLOPs", "budget"]
    for p in per.values():
        wall = (p.timing and p.timing.wall_time) or {}
        trained = p.tokens_trained
        train_rate = f"{trained / wall['train_s']:,.0f}" if trained and wall.get("train_s") else "-"
        split = " / ".join(f"{wall.get(k, 0):.0f}" for k in ("train_s", "validation_s", "checkpoint_s", "publish_s")) \
            if wall else "-"
        out.append([p.display, _si(p.params_total), _si(p.params_active), _si(p.flops_per_token),
                    f"{p.flops_per_token / seed_flops:.2f}x" if seed_flops else "-",
                    f"{p.timing.tokens_per_s if p.timing else math.nan:,.0f}",
                    "-" if trained is None else _si(trained), train_rate, split])
        if lineage is not None:
            total = total_compute(lineage, p.btm_models or [probed_label(p.model)])
            out[-1] += ["-" if total is None else f"{total:.3g}", (budgets or {}).get(probed_label(p.model)) or "-"]
    return out


# The ratios section 7.3 weighs (numerator, denominator): BAM with expert KV and with shared KV, each against BTX
SERVING_RATIOS = (("moe/bam", "moe/btx"), ("moe/bam_kv_shared", "moe/btx"))


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def serving_rows(costs: ServingCosts) -> list[list[str]]:
    """Header + one row per model (the Table 7 / section 7.3 analogue): total/active params, forward FLOPs per
    token at Table 7's context with and without the LM head, KV cache bytes per token, and the measured decode
    milliseconds per generated token at each thread count."""
    out = [["model", "total params", "active params", f"FLOPs/token at {costs.flops_context}", "without LM head",
            "KV cache bytes/token", *(f"ms/token, {threads_phrase(t)}" for t in costs.threads)]]
    for r in costs.rows:
        out.append([r.display, _si(r.params_total), _si(r.params_active), f"{r.flops_per_token:,.0f}",
                    f"{r.flops_per_token_without_head:,.0f}", f"{r.cost.cache_bytes_per_token:,.0f}",
                    *(_ms(r.cost.latency(t)) for t in costs.threads)])
    return out


def serving_ratio_rows(costs: ServingCosts) -> list[list[str]]:
    """Header + one row per ratio of :data:`SERVING_RATIOS` whose two models the run has: ours (FLOPs without
    the head, KV bytes, latency at each thread count) beside the paper's (Table 7's FLOPs, section 7.3's time)."""
    out = [["ratio", "FLOPs/token without head", "KV cache bytes/token",
            *(f"latency, {threads_phrase(t)}" for t in costs.threads), "paper: FLOPs (Table 7)",
            "paper: latency (section 7.3, TPUs)"]]

    def x(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}x"

    for of, to in SERVING_RATIOS:
        if costs.ratio(of, to, lambda r: r.flops_per_token_without_head) is None:
            continue
        paper_flops = TABLE7_FLOPS[of] / TABLE7_FLOPS[to] if of in TABLE7_FLOPS and to in TABLE7_FLOPS else None
        out.append([f"{PAPER_NAMES[of]} / {PAPER_NAMES[to]}",
                    x(costs.ratio(of, to, lambda r: r.flops_per_token_without_head)),
                    x(costs.ratio(of, to, lambda r: r.cost.cache_bytes_per_token)),
                    *(x(costs.ratio(of, to, lambda r, t=t: r.cost.latency(t))) for t in costs.threads),
                    x(paper_flops), x(SECTION73_SECONDS[of] / SECTION73_SECONDS[to])])
    return out


def serving_blocks(metrics: dict[str, Any]) -> list[Block]:
    """The serving-cost section (paper Table 7 and section 7.3) from metrics.json's ``serving``; none without it."""
    if "serving" not in metrics:
        return []
    costs = ServingCosts.from_dict(metrics["serving"])
    prompts = sorted({r.prompt_tokens for r in costs.rows})
    timed = (f"{rounds_phrase(costs.rounds)}, interleaved across the models in one process, each after an "
             f"untimed warm-up, with torch's threads fixed at each count, on {costs.machine} (device {costs.device})"
             if costs.rounds else "not timed here (`eval.latency_rounds=0`)")
    paper = (f"The paper ({SERVING_CITATION}): forward FLOPs per token at context 256 without the LM head "
             + ", ".join(f"{PAPER_NAMES[k]} {v:,}" for k, v in TABLE7_FLOPS.items())
             + " (the figures of one of the 6 blocks, docs/paper.md section 10); generating 16 tokens from a "
               "256-token prompt, the mean of 10 runs on TPUs: "
             + ", ".join(f"{PAPER_NAMES[k]} {v:.2f} s" for k, v in SECTION73_SECONDS.items())
             + ". The paper attributes latency ratios far below the FLOP ratio to the memory pressure of separate KV caches.")
    blocks: list[Block] = [
        ("h", 2, "Serving cost (cf. paper Table 7 and section 7.3)"),
        ("p", f"Parameters and forward FLOPs per token at context {costs.flops_context} (Table 7's), with and without "
              "the LM head, from the model config (bam_pipeline.model.counting); the KV cache's bytes per token of "
              "one sequence, read from the cache tensors; the decode latency per generated token, measured, never "
              f"computed from FLOPs: greedy, batch 1, with the KV cache, a prompt of max_seq_len - {costs.new_tokens} "
              f"tokens ({', '.join(map(str, prompts))} here) and {costs.new_tokens} new tokens, the whole call over "
              f"{costs.new_tokens}, at {' and '.join(threads_phrase(t) for t in costs.threads)}: {timed}."),
        ("table", serving_rows(costs)),
    ]
    ratios = serving_ratio_rows(costs)
    if len(ratios) > 1:
        blocks += [("p", "Ratios to BTX, this run's beside the paper's:"), ("table", ratios)]
    return blocks + [("p", paper)]


def routing_rows(routing: dict[str, Any]) -> list[list[str]]:
    """Header + one row per (model, router kind, domain): entropy relative to uniform, averaged over
    layers (1.00 = uniform averaging), the largest mean share and the expert holding it."""
    out = [["model", "router", "domain", "entropy / ln E", "top expert", "top share"]]
    for label, entry in routing.items():
        for kind in ROUTED_BLOCKS:
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


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan


def agreement_rows(routing: dict[str, Any]) -> list[list[str]]:
    """Header + one row per (model, domain): how often a token's top expert is the same in consecutive
    layers (per router kind) and for attention and FFN in one layer, each beside its chance level,
    averaged over layers."""
    out = [["model", "domain", "FFN: layer l = l+1", "attention: layer l = l+1", "attention = FFN"]]

    def pair(stats: dict[str, Any] | None, key: str) -> str:
        if not stats or key not in stats:
            return "-"
        return f"{_mean(stats[key]):.2f} (chance {_mean(stats[key + '_chance']):.2f})"

    for entry in routing.values():
        for domain, stats in entry["domains"].items():
            cells = [pair(stats.get("ffn"), "agree_next_layer"), pair(stats.get("attn"), "agree_next_layer"),
                     pair(stats.get("attn"), "agree_with_ffn")]
            if any(c != "-" for c in cells):
                out.append([entry["display"], column_name(domain), *cells])
    return out


def _claim_rows(run: PplTable, judged: list[IntervalClaim], n_seeds: int) -> list[list[str]]:
    """Header + one row per claim: the paper's status, this run's verdict with the deciding comparison
    and interval, (several seeds) in how many seeds it held, and the point perplexities compared."""
    paper = {c.key: c for c in check_claims(paper_table())}
    point = {c.key: c for c in check_claims(run)}
    header = ["claim", "paper", "this run", "decided by", "difference in mean loss [interval]"]
    out = [header + (["seeds where it held"] if n_seeds > 1 else []) + ["perplexities compared"]]
    for c in judged:
        row = [c.text + ("" if c.in_paper else " (not in the paper)"),
               paper[c.key].status if c.in_paper else "-", f"**{c.status}**" + (f": {c.reason}" if c.reason else ""),
               c.deciding, "-" if c.interval is None else _diff(c.interval)]
        if n_seeds > 1:
            row.append("-" if c.status == UNMEASURABLE else f"{c.seeds_holding} of {c.n_seeds}")
        out.append(row + [point[c.key].detail])
    return out


def few_documents_note(agg: Aggregate) -> str | None:
    """A warning naming every source with fewer scored test documents than ``agg.min_documents``, and how to
    score more (None when there is none)."""
    thin = agg.thin_sources()
    if not thin:
        return None
    fix = []
    if any(n < split for _, n, split in thin):
        fix.append("Raise `eval.max_tokens_per_source` (null: the whole test split) to score more of the split.")
    if any(split < agg.min_documents for _, _, split in thin):
        fix.append("A split with fewer documents than that needs a larger one: `data.split.test`, "
                   "`data.max_bytes_per_source` (or a larger experiment).")
    sources = ", ".join(f"{column_name(s)} {n} of {split}" for s, n, split in thin)
    return FEW_DOCUMENTS_NOTE.format(sources=sources, min_documents=agg.min_documents, fix=" ".join(fix))


def _claim_blocks(run: PplTable, agg: Aggregate, resamples: int) -> list[Block]:
    note = VERDICT_NOTE.format(level=agg.level, covers=agg.covers or DOCUMENTS_ONLY, resamples=resamples,
                               min_documents=agg.min_documents)
    blocks: list[Block] = [("p", SCALE_NOTE), ("p", note)]
    if len(agg.seeds) == 1:
        blocks.append(("p", ONE_SEED_NOTE))
    if few := few_documents_note(agg):
        blocks.append(("p", few))
    return blocks + [("table", _claim_rows(run, agg.claims(), len(agg.seeds)))]


def _ood_blocks(agg: Aggregate) -> list[Block]:
    if not agg.table.ood:
        return []
    return [("h", 2, "Out of domain: does mixing trade specialisation for generalisation?"),
            ("p", "Perplexity on text no stage trained on (the out-of-domain columns, not in the average). A mixture "
                  "gains when its paired interval against the other model lies below 0, loses when it lies above "
                  "0; the difference in mean loss and its interval follow each answer."),
            ("table", ood_rows(agg))]


def _question_blocks(agg: Aggregate, rows: Sequence[ScoreRow], routing: dict[str, Any]) -> list[Block]:
    """One section per open question this run trained the models of (eval.ablations.QUESTIONS)."""
    blocks: list[Block] = []
    for q in ablations.QUESTIONS:
        if not ablations.present(q, agg):
            continue
        blocks += [("h", 3, q.question), ("p", q.how), ("table", ablations.question_table(q, agg, rows))]
        if q.paper_rows:
            blocks += [("p", f"The paper's {q.paper} (590M models; compare orderings, not magnitudes):"),
                       ("table", ablations.paper_table(q))]
        extra = {"uniform_attention": ablations.attention_entropy(routing, q.reference),
                 "shared_routing": ablations.agreement(routing, q.reference)}.get(q.key)
        blocks.append(("p", "**This run:** " + ablations.sentence(q, agg) + (f" {extra}" if extra else "")))
    if not blocks:
        return []
    intro = ("Each model is compared with the reference named in its table by the paired interval of the difference "
             "in mean per-token loss on every column, decided exactly as the ordering claims are (the claim \"the "
             "model beats the reference on every column\", the same intervals and document minimum): better when "
             "every interval lies below 0; worse when one lies above 0 and none below (the columns named); mixed "
             "when some lie on each side; otherwise not resolved at this scale (the column furthest from better "
             "named, and any where it is better). A claim \"the reference beats the model\" fails exactly on the "
             "columns where the model is better.")
    if agg.table.ood:
        intro += " Whether mixing trades specialisation for generalisation is the out-of-domain section above."
    return [("h", 2, "Open questions (docs/paper.md section 9, paper Tables 4-6)"), ("p", intro), *blocks]


def _run_blocks(run: RunEval, routing: dict[str, Any], images: dict[str, str], command: str, config_hash: str | None,
                agg: Aggregate, resamples: int) -> list[Block]:
    """The sections of one run's report."""
    layout, metrics = run.layout, run.metrics
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
        ("p", "Bits per byte (comparable across tokenizers; over the UTF-8 bytes of the text the scored tokens stand "
              "for, counted token by token):"),
        ("table", table_cells(bpb)),
        ("h", 2, "The paper's Table 1"),
        ("p", f"Source: {CITATION}. Their models are trained on hundreds of billions of tokens; compare "
              f"orderings, not magnitudes."),
        ("table", paper_cells),
        ("h", 2, "Ordering claims"),
        *_claim_blocks(ppl, agg, resamples),
        *_ood_blocks(agg),
        *_question_blocks(agg, run.rows, routing),
        ("h", 2, "Cost (cf. paper Tables 7 and 9)"),
        ("p", "Parameters and forward FLOPs per token from the model config "
              "(bam_pipeline.model.counting); tokens/s of the forward pass measured by this evaluation on the device "
              "above, every model afresh in one process, interleaved (the median of "
              f"{(metrics.get('speed') or {}).get('rounds', '-')} rounds on the same batch)."),
        ("p", "Total training FLOPs: the model's own training FLOPs and those of every model it was built from "
              "(as its manifest's inputs record), each counted once (`bam_pipeline.store.lineage`; FLOPs with the LM "
              "head, an imported model counted 0); BTM counts its members. Budget: how the stage's length was set; "
              "a compute-matched run names the FLOP convention it matched (`budget.moe.flops`: total, with the LM "
              "head, or non-embedding, without it)."),
        ("table", cost_rows(run.rows, *training_costs(layout))),
        *serving_blocks(metrics),
        *downstream_blocks(layout),
        ("h", 2, "Plots"),
    ]
    b += [("img", name, caption) for name, caption in images.items() if not name.startswith("routing_")]
    b.append(("h", 2, "Routing"))
    if routing:
        b += [("p", "Is soft attention routing close to uniform averaging, or does each domain pick its own expert? "
                    "Entropy / ln E near 1 means near-uniform weights; a different top expert per domain means "
                    "domain-specific routing. Averages over layers; heatmaps give every layer."),
              ("table", routing_rows(routing))]
        agreement = agreement_rows(routing)
        if len(agreement) > 1:
            b += [("p", "Do routing decisions agree? The share of tokens whose top expert is the same in consecutive "
                        "layers, and for attention and FFN in one layer (when both route over the same experts), "
                        "averaged over layers, beside the share two independent decisions with the same expert "
                        "frequencies would reach by chance."),
                  ("table", agreement)]
        b += [("img", name, caption) for name, caption in images.items() if name.startswith("routing_")]
    else:
        b.append(("p", "No evaluated model has routers."))
    b.append(("h", 2, "Skipped"))
    skipped = metrics.get("skipped", [])
    b.append(("list", [f"{x['name']}: {x['reason']}" for x in skipped]) if skipped else ("p", "Nothing was skipped."))
    return b


def claims_json(agg: Aggregate) -> list[dict[str, Any]]:
    """The verdicts, machine-readable: status, deciding comparison and every comparison's interval."""
    def iv(i: Interval) -> dict[str, Any]:
        return {"estimate": i.estimate, "low": i.low, "high": i.high, "covers": i.covers, "level": i.level,
                "resamples": i.resamples, "n_seeds": i.n_seeds, "n_docs": i.n_docs,
                "documents": {d.source: {"scored": d.scored, "in_split": d.in_split} for d in i.documents}}
    return [{"key": c.key, "claim": c.text, "in_paper": c.in_paper, "status": c.status, "reason": c.reason,
             "decided_by": c.deciding,
             "interval": None if c.interval is None else iv(c.interval), "seeds_holding": c.seeds_holding,
             "n_seeds": c.n_seeds, "comparisons": {k: iv(v) for k, v in c.intervals.items()}}
            for c in agg.claims()]


def _claim_plot(agg: Aggregate, path: Path) -> Path | None:
    """Every comparison's paired interval, one panel per measurable claim."""
    panels = {c.text if len(c.text) < 48 else c.key: [(k, v.estimate, v.low, v.high) for k, v in c.intervals.items()]
              for c in agg.claims() if c.intervals}
    return interval_panels(panels, path, xlabel="difference in mean loss (nats)", zero_line=True,
                           title=f"Claims: paired {agg.level:.0%} intervals ({agg.covers}); below 0 = claim's direction")


def _write_claims(agg: Aggregate, directory: Path, images: dict[str, str]) -> None:
    write_json(directory / CLAIMS_JSON, {"seeds": list(agg.seeds), "covers": agg.covers, "claims": claims_json(agg)})
    if _claim_plot(agg, directory / "claims.png"):
        images["claims.png"] = "Every claim's comparisons: difference in mean loss with its paired interval"


def _run_plots(run: RunEval, routing: dict[str, Any], directory: Path) -> dict[str, str]:
    """One run's plots in ``directory``, file name -> caption: perplexity per domain, training loss and router
    entropy over training, and the routing heatmaps."""
    metrics, skipped = run.metrics, skipped_models(run.metrics)
    logs = {a.label: read_train_log(a) for a in find_model_artifacts(run.layout) if a.label not in skipped}
    table = run_table(metrics)
    images: dict[str, str] = {}
    if metrics["rows"]:
        perplexity_bars(table, directory / "perplexity.png")
        images["perplexity.png"] = "Perplexity per domain per model"
    if loss_curves(logs, table.names, directory / "training_loss.png"):
        images["training_loss.png"] = "Training loss against tokens, every stage"
    if entropy_curves(logs, table.names, directory / "routing_entropy_training.png"):
        images["routing_entropy_training.png"] = "Router entropy per layer over the mixture phase's training"
    images.update(report_heatmaps(run.layout, routing, directory))
    return images


def build_report(layout: RunLayout, runs: Sequence[RunEval] | None = None, *, command: str,
                 config_hash: str | None = None, train_seed: int = 0, resamples: int = MIN_RESAMPLES,
                 min_documents: int = MIN_DOCUMENTS, identity: dict[str, Any] | None = None) -> Path:
    """Write a report directory atomically; returns its report.md's path. Without ``runs``: the report of
    ``layout``'s run (``layout.report``), from its evaluation with train seed ``train_seed``, under its config's
    hash ``config_hash``. With ``runs`` (one evaluated run per training seed): the report over those seeds
    (``layout.seeds_report``).

    Either is built from the aggregate of its runs (one run's is the aggregate of one): claims.json, the claims'
    plot and the claims with intervals over the seeds and test documents (``resamples`` bootstrap resamples;
    a verdict where every source behind it has ``min_documents`` scored test documents), the out-of-domain
    answers and the open questions, in report.md and a self-contained report.html. One run's report adds what
    its own files hold (bits per byte, the paper's table, cost, downstream tasks, routing, training curves,
    what eval skipped); the report over seeds adds each seed's average, every comparison, the models left out
    and table.json. ``identity``: the record of what the report is made from, published with it
    (``identity.json``)."""
    one_run = runs is None
    if one_run:
        _require_eval(layout)
        runs = [RunEval.read(layout, train_seed)]
    directory = layout.report if one_run else layout.seeds_report
    agg = aggregate(runs, resamples=resamples, min_documents=min_documents)
    routing = _routing(runs[0].layout)
    with publish(directory) as tmp:
        images = _run_plots(runs[0], routing, tmp) if one_run else _seeds_plots(agg, tmp)
        _write_claims(agg, tmp, images)
        if one_run:
            blocks = _run_blocks(runs[0], routing, images, command, config_hash, agg, resamples)
            title = f"BAM report: {layout.run}"
        else:
            _write_table(agg, resamples, tmp)
            blocks = _seeds_blocks(layout, runs, routing, images, command, agg, resamples)
            title = f"BAM report: {layout.run}, {len(runs)} seeds"
        (tmp / REPORT_MD).write_text(to_markdown(blocks))
        (tmp / REPORT_HTML).write_text(to_html(blocks, tmp, title))
        if identity is not None:
            write_json(RunLayout.identity(tmp), identity)
    return directory / REPORT_MD


def report_files(layout: RunLayout) -> list[Path]:
    """The report's files (report.md, report.html, PNGs), e.g. for logging to wandb."""
    out = layout.report
    if not out.is_dir():
        return []
    return [out / REPORT_MD, out / REPORT_HTML, *sorted(out.glob("*.png"))]


def _print_cells(cells: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    for r in cells:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


def _print_claims(directory: Path) -> None:
    verdicts = json.loads((directory / CLAIMS_JSON).read_text())
    print(f"claims (95% paired intervals over {verdicts['covers'] or 'test documents'}):")
    for c in verdicts["claims"]:
        iv = c["interval"]
        where = "" if iv is None else (f"  [{c['decided_by']}: {iv['estimate']:+.4f} "
                                       f"({iv['low']:+.4f}, {iv['high']:+.4f})]")
        why = f" ({c['reason']})" if c.get("reason") else ""
        print(f"{c['status']:>26}: {c['claim']}{why}{where}")


def print_summary(layout: RunLayout) -> None:
    """Print the run's Table 1 analogue (best per column marked *), the claims' verdicts and the report's path."""
    metrics, _ = load_eval(layout)
    _print_cells(table_cells(run_table(metrics), mark_best="*"))
    _print_claims(layout.report)
    print(f"report: {layout.report / REPORT_MD}")


# ---- several training seeds -------------------------------------------------------------------
def interval_cells(agg: Aggregate, *, mark_best: str = "**") -> list[list[str]]:
    """Header + one row per model: every cell as ``estimate [low, high]``; the best estimate per column marked."""
    t = agg.table
    best = {c: t.best(c) for c in t.all_columns}
    out = [["model", *(column_name(c) + (" (OOD)" if c in t.ood else "") for c in t.all_columns)]]
    for lab in t.labels:
        row = [t.name(lab)]
        for c in t.all_columns:
            iv = agg.cells[lab].get(c)
            text = "-" if iv is None else _cell(iv)
            row.append(f"{mark_best}{text}{mark_best}" if iv is not None and best[c] == lab else text)
        out.append(row)
    return out


def _seed_rows(agg: Aggregate) -> list[list[str]]:
    out = [["model", *(f"seed {s}" for s in agg.seeds), "mean [interval]"]]
    for lab in agg.table.labels:
        per = agg.per_seed_average(lab)
        if per is not None:
            out.append([agg.table.name(lab), *(f"{v:.2f}" for v in per), _cell(agg.cells[lab][AVERAGE])])
    return out


def _seeds_plots(agg: Aggregate, directory: Path) -> dict[str, str]:
    """The report over seeds' plot in ``directory``: every cell's estimate and interval, one panel per column."""
    panels = {column_name(c): [(agg.table.name(lab), *_triple(agg.cells[lab][c])) for lab in agg.table.labels
                               if c in agg.cells[lab]] for c in agg.table.all_columns}
    images: dict[str, str] = {}
    if interval_panels(panels, directory / "perplexity_intervals.png", xlabel="perplexity",
                       title=f"Perplexity over {len(agg.seeds)} seeds with {agg.level:.0%} intervals"):
        images["perplexity_intervals.png"] = "Perplexity per column: estimate and interval over seeds and documents"
    return images


def _write_table(agg: Aggregate, resamples: int, directory: Path) -> None:
    """table.json: every cell over the seeds with its interval, and the models left out."""
    write_json(directory / "table.json", {
        "seeds": list(agg.seeds), "covers": agg.covers, "level": agg.level, "resamples": resamples,
        "rows": [{"model": lab, "display": agg.table.name(lab), "column": c, "perplexity": iv.estimate,
                  "low": iv.low, "high": iv.high} for lab in agg.table.labels for c, iv in agg.cells[lab].items()],
        "left_out": agg.left_out})


def _seeds_blocks(base: RunLayout, runs: Sequence[RunEval], routing: dict[str, Any], images: dict[str, str],
                  command: str, agg: Aggregate, resamples: int) -> list[Block]:
    """The sections of the report over seeds."""
    s = runs[0].metrics["settings"]
    return [
        ("h", 1, f"BAM pipeline report: run {base.run} over {len(runs)} training seeds"),
        ("h", 2, "Provenance"),
        ("p", "Command:"), ("code", command),
        ("list", [f"train seed {r.seed}: `{r.layout.run_dir}`" for r in runs]
         + [f"data hash (shared by every seed): `{runs[0].metrics.get('data_hash', '-')}`",
            f"eval: up to {s.get('max_tokens_per_source')} test tokens per source, seq_len "
            f"{s.get('seq_len') or 'model max'}, device {s.get('device')}",
            f"bootstrap: {resamples} resamples of seeds and test documents, paired across models",
            f"generated {time.strftime('%Y-%m-%d %H:%M:%S %z')}"]),
        ("h", 2, "Perplexity per domain over seeds (this run's Table 1)"),
        ("p", f"Each cell: the perplexity of the mean per-token loss over the {len(runs)} seeds (the geometric mean "
              f"of the seeds' perplexities) and its {agg.level:.0%} interval from a hierarchical bootstrap over "
              "seeds and test documents. Average = arithmetic mean of the row's in-domain perplexities, as in "
              "the paper. Best estimate per column in bold."),
        ("table", interval_cells(agg)),
        ("h", 3, "Average perplexity in each seed"),
        ("table", _seed_rows(agg)),
        ("h", 2, "Ordering claims"),
        *_claim_blocks(agg.table, agg, resamples),
        *_ood_blocks(agg),
        *_question_blocks(agg, runs[0].rows, routing),
        ("h", 2, "Plots"),
        *[("img", name, caption) for name, caption in images.items()],
        ("h", 2, "Every comparison"),
        ("list", [f"{c.text}: {name}: {_diff(iv)}" for c in agg.claims() for name, iv in c.intervals.items()]
         or ["no claim was measurable"]),
        ("h", 2, "Left out"),
        ("list", [f"{lab}: {why}" for lab, why in agg.left_out.items()]) if agg.left_out
        else ("p", "Every model was evaluated in every seed."),
    ]


def _triple(iv: Interval) -> tuple[float, float, float]:
    return iv.estimate, iv.low, iv.high


def print_seeds_summary(base: RunLayout) -> None:
    """Print the aggregated table over seeds and every claim's verdict."""
    table = json.loads((base.seeds_report / "table.json").read_text())
    print(f"over train seeds {table['seeds']} ({table['covers']}), perplexity [{table['level']:.0%} interval]:")
    cols = list(dict.fromkeys(r["column"] for r in table["rows"]))
    models = list(dict.fromkeys(r["display"] for r in table["rows"]))
    cell = {(r["display"], r["column"]): f"{r['perplexity']:.2f} [{r['low']:.2f}, {r['high']:.2f}]"
            for r in table["rows"]}
    _print_cells([["model", *(column_name(c) for c in cols)]]
                 + [[m, *(cell.get((m, c), "-") for c in cols)] for m in models])
    _print_claims(base.seeds_report)
    print(f"report: {base.seeds_report / REPORT_MD}")
