"""stage=eval: every finished model artifact x every source's test split -> metrics.json and routing.json.

Per (model, domain) row: mean token loss, perplexity, bits per byte, tokens evaluated, total and
active parameters, forward FLOPs per token, inference tokens/s, and the model's display name and
role from its manifest. Router statistics per domain and layer for every model with routers, drawn
as heatmaps. Losses and routing are cached per (artifact hash, data hash, eval settings) in
``RunLayout.eval_cache``; only what changed is re-evaluated. Speed is never cached: every eval
measures every model afresh in this one process, interleaved (each round times every model in
turn on the same batch; the median of :data:`SPEED_ROUNDS` rounds), so load from other processes
and the machine's state hit all models alike, and two models of one architecture measure alike.
Every file is written atomically.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Callable

import torch

from bam_pipeline.data.prepare import open_prepared
from bam_pipeline.data.storage import load_split_sequences
from bam_pipeline.errors import BamError
from bam_pipeline.eval.metrics import bits_per_byte, evaluated_bytes, forward_tokens_per_s, sequence_nll
from bam_pipeline.eval.names import About, about, expert_names
from bam_pipeline.eval.plots import routing_heatmap
from bam_pipeline.eval.routing import ROUTER_KINDS, RoutingStats
from bam_pipeline.eval.spec import EvalSpec
from bam_pipeline.model.counting import count_params, flops_per_token
from bam_pipeline.model.loss import LossChunking
from bam_pipeline.store.artifacts import Artifact, find_model_artifacts, load_model, read_artifact
from bam_pipeline.store.files import canonical_hash, write_json
from bam_pipeline.store.layout import RunLayout

TEST_SPLIT = "test"
CACHE_SCHEMA = 3  # 3: no speed in the cache
SPEED_ROUNDS = 3  # interleaved rounds of the speed measurement
SPEED_REPEATS = 2  # timed forward passes per model and round


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; any other value is used as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def data_hash(prepared: Any) -> str:
    """Identity of the prepared data: its files' hash, config hash and tokenizer hash."""
    return canonical_hash({"files": prepared.manifest.get("hash"), "config": prepared.config_hash,
                           "tokenizer": prepared.tokenizer_hash})


def sources_with_test_split(prepared: Any) -> tuple[list[str], list[dict[str, str]]]:
    """Sources with a non-empty test split, and skip records for the others."""
    ok, skipped = [], []
    for s in prepared.sources:
        st = prepared.stats.get(s, {}).get(TEST_SPLIT)
        if not st or not st.get("tokens"):
            skipped.append({"kind": "source", "name": s, "reason": f"source {s!r} has no {TEST_SPLIT} split"})
        else:
            ok.append(s)
    return ok, skipped


class _Sequences:
    """Test sequences per (source, seq_len), loaded once and shared by every model."""

    def __init__(self, prepared: Any, max_tokens: int | None) -> None:
        self.prepared, self.max_tokens, self.cache = prepared, max_tokens, {}

    def get(self, source: str, seq_len: int) -> torch.Tensor:
        if (source, seq_len) not in self.cache:
            self.cache[(source, seq_len)] = load_split_sequences(
                self.prepared, source, TEST_SPLIT, seq_len, max_tokens=self.max_tokens)
        return self.cache[(source, seq_len)]


def _seq_len(spec: EvalSpec, art: Artifact, max_seq_len: int) -> int:
    seq_len = spec.seq_len or max_seq_len
    if seq_len > max_seq_len:
        raise BamError(f"eval.seq_len={seq_len} exceeds {art.label}'s max_seq_len={max_seq_len}; "
                       f"set eval.seq_len to at most {max_seq_len} or null")
    return seq_len


def evaluate_model(art: Artifact, sources: list[str], seqs: _Sequences, prepared: Any, spec: EvalSpec,
                   device: torch.device, chunking: LossChunking | None = None) -> dict[str, Any]:
    """Rows (one per source), routing stats per source and per-source skip records for one model."""
    model, mcfg = load_model(art, verify=False, device=str(device))
    info = about(art)
    seq_len = _seq_len(spec, art, mcfg.max_seq_len)
    params, flops = count_params(mcfg), flops_per_token(mcfg, seq_len)
    rows, routing, skipped = [], {}, []
    for source in sources:
        try:
            data = seqs.get(source, seq_len)  # (N, seq_len + 1)
        except BamError as e:  # split shorter than one sequence
            print(f"[eval] skip {art.label} on {source}: {e}")
            skipped.append({"kind": "source", "name": f"{art.label} on {source}", "reason": str(e)})
            continue
        stats = RoutingStats()
        res = sequence_nll(model, data, batch_size=spec.batch_size, device=device, on_routing=stats.update,
                           chunking=chunking)
        st = prepared.stats[source][TEST_SPLIT]
        nbytes = evaluated_bytes(st["bytes"], st["tokens"], res.tokens)
        rows.append({
            "model": art.label, "stage": art.stage, "name": art.name, "display": info.display, "role": info.role,
            "artifact_hash": art.hash, "domain": source, "tokens": res.tokens, "bytes": nbytes,
            "loss": res.mean_loss, "perplexity": res.perplexity, "bits_per_byte": bits_per_byte(res.nll, nbytes),
            "params_total": params.total, "params_active": params.active, "flops_per_token": flops.total,
            "seq_len": seq_len, "device": str(device), "tokens_trained": art.manifest.get("tokens"),
        })
        if summary := stats.summary():
            routing[source] = summary
    return {"rows": rows, "routing": routing, "skipped": skipped}


def _experts(info: About, routing: dict[str, Any]) -> dict[str, list[str]]:
    """Expert names per router kind present in ``routing`` (one model's per-domain stats)."""
    out = {}
    for kind in ROUTER_KINDS:
        stats = next((r[kind] for r in routing.values() if kind in r), None)
        if stats is not None:
            out[kind] = expert_names(info, kind, len((stats.get("mean_prob") or stats.get("fraction"))[0]))
    return out


def measure_speeds(arts: list[Artifact], sample: Callable[[int], torch.Tensor], spec: EvalSpec,
                   device: torch.device, chunking: LossChunking | None = None) -> dict[str, dict[str, Any]]:
    """Forward tokens/s of every model on the same batch (``sample(seq_len)``: ``eval.batch_size``
    sequences), interleaved: :data:`SPEED_ROUNDS` rounds, each loading and timing every model in turn
    (loading untimed); per model the median round and every round's figure."""
    rounds: dict[str, list[float]] = {a.label: [] for a in arts}
    for _ in range(SPEED_ROUNDS):
        for art in arts:
            model, mcfg = load_model(art, verify=False, device=str(device))
            batch = sample(_seq_len(spec, art, mcfg.max_seq_len))
            rounds[art.label].append(forward_tokens_per_s(model, batch, device=device, repeats=SPEED_REPEATS,
                                                          chunking=chunking))
            del model
    return {label: {"tokens_per_s": statistics.median(r), "rounds": r} for label, r in rounds.items()}


def run_eval(spec: EvalSpec, layout: RunLayout, *, general: str | None,
             chunking: LossChunking | None = None) -> Path:
    """Evaluate every finished model artifact of the run; returns the path of metrics.json.

    ``general`` names the general source (the report's first column); ``chunking`` is the LM
    loss's chunking rule (training's)."""
    arts = find_model_artifacts(layout)
    if not arts:
        raise BamError(f"no trained model in {layout.run_dir}; run `python -m bam_pipeline stage=seed` first")
    prepared = open_prepared(layout.data)
    sources, skipped = sources_with_test_split(prepared)
    for s in skipped:
        print(f"[eval] skip {s['name']}: {s['reason']}")
    if not sources:
        raise BamError(f"no source of {layout.data} has a {TEST_SPLIT} split; re-run `stage=data` with test "
                       f"splits enabled")
    dhash = data_hash(prepared)
    device = resolve_device(spec.device)
    seqs = _Sequences(prepared, spec.max_tokens_per_source)
    rows, routing, reused, evaluated, used_cache, scored = [], {}, [], [], set(), []
    for art in arts:
        try:
            read_artifact(art.path, tokenizer=prepared.tokenizer_hash)  # scored on these tokens: same tokenizer
            art.verify()
        except BamError as e:
            print(f"[eval] skip {art.label}: {e}")
            skipped.append({"kind": "model", "name": art.label, "reason": str(e)})
            continue
        key = canonical_hash({"schema": CACHE_SCHEMA, "artifact": art.hash, "data": dhash, "settings": spec.cache_key(),
                              "sources": sources, "device": str(device)})  # scores computed on this device
        cache_file = layout.eval_cache / f"{art.stage}-{art.name}-{key[:16]}.json"
        if cache_file.is_file():
            result = json.loads(cache_file.read_text())
            reused.append(art.label)
        else:
            result = evaluate_model(art, sources, seqs, prepared, spec, device, chunking)
            write_json(cache_file, result)
            evaluated.append(art.label)
        used_cache.add(cache_file.name)
        if result["rows"]:
            scored.append(art)
        rows += result["rows"]
        skipped += result["skipped"]
        if result["routing"]:
            info = about(art)
            routing[art.label] = {"display": info.display, "experts": _experts(info, result["routing"]),
                                  "domains": result["routing"]}
    if not rows:
        reasons = "; ".join(f"{x['name']}: {x['reason']}" for x in skipped)
        raise BamError(f"no model of {layout.run_dir} could be evaluated ({reasons})")
    speed_source = next(s for s in sources if any(r["domain"] == s for r in rows))
    speeds = measure_speeds(scored, lambda n: seqs.get(speed_source, n)[: spec.batch_size], spec, device, chunking)
    for r in rows:
        r["tokens_per_s"] = speeds[r["model"]]["tokens_per_s"]
    print(f"[eval] speed of {len(scored)} models measured afresh, interleaved ({SPEED_ROUNDS} rounds, "
          f"{spec.batch_size} sequences of {speed_source})")
    if reused:
        print(f"[eval] reused cached results for: {', '.join(reused)}")
    if evaluated:
        print(f"[eval] evaluated: {', '.join(evaluated)}")
    for stale in layout.eval_cache.glob("*.json"):
        if stale.name not in used_cache:
            stale.unlink()
    write_json(layout.routing, routing)
    for label, entry in routing.items():
        for kind in ROUTER_KINDS:
            routing_heatmap(entry, kind, layout.heatmap(label, kind))
    write_json(layout.metrics, {
        "run": layout.run, "settings": {**spec.cache_key(), "device": str(device)}, "data_hash": dhash,
        "sources": sources, "general_source": general, "rows": rows, "skipped": skipped,
        "reused": reused, "evaluated": evaluated,
        "speed": {"source": speed_source, "rounds": SPEED_ROUNDS, "repeats": SPEED_REPEATS,
                  "batch_size": spec.batch_size, "models": speeds},
    })
    print(f"[eval] {len(rows)} (model, domain) rows -> {layout.metrics}")
    return layout.metrics
