"""stage=eval: every finished model artifact x every source's test split -> metrics.json and routing.json.

Per (model, domain) row: mean token loss, perplexity, bits per byte, tokens evaluated, total and
active parameters, forward FLOPs per token, inference tokens/s, and the model's display name and
role from its manifest. Router statistics per domain and layer for every model with routers, drawn
as heatmaps. Losses and routing are cached per (artifact hash, data hash, eval settings) in
``RunLayout.eval_cache``; only what changed is re-evaluated. Speed is never cached: every eval
measures every model afresh in this one process, interleaved (each round times every model in
turn on the same batch; the median of :data:`SPEED_ROUNDS` rounds), so load from other processes
and the machine's state hit all models alike, and two models of one architecture measure alike.
A probe row runs at its model's speed; BTM's tokens/s is that of running its members one after
another on each token (``1 / sum(1 / tokens_per_s)``; the mixing of their distributions is not
timed). Right after the speeds, every model's serving cost (decode latency per generated token and KV
cache bytes, :mod:`bam_pipeline.eval.serving`) is measured the same way, afresh and interleaved, into
metrics.json's ``serving``. Every file is written atomically.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import torch

from bam_pipeline.data.prepare import open_prepared
from bam_pipeline.data.storage import EvalSequences, load_eval_sequences, load_split_sequences
from bam_pipeline.errors import BamError
from bam_pipeline.eval.btm import ensemble_flops_per_token, ensemble_log_probs, estimate_log_prior
from bam_pipeline.eval.heatmaps import write_routing
from bam_pipeline.data.tokenizer import token_byte_lengths
from bam_pipeline.eval.metrics import (bits_per_byte, evaluated_bytes, forward_tokens_per_s, scored_text_bytes,
                                       sequence_nll, token_nll)
from bam_pipeline.eval.names import About, about, expert_names
from bam_pipeline.eval.routing import ROUTED_BLOCKS, RoutingStats
from bam_pipeline.eval.scores import ModelScores, ScoreRow, Timing
from bam_pipeline.eval.serving import ServingCosts, serving_costs, threads_phrase
from bam_pipeline.eval.spec import EvalSpec
from bam_pipeline.model.counting import count_params, flops_per_token
from bam_pipeline.model.loss import LossChunking
from bam_pipeline.ranks import Ranks
from bam_pipeline.store.artifacts import (Artifact, find_model_artifacts, load_model, load_state, nonfinite_fix,
                                         outdated_models, read_artifact, read_model_config)
from bam_pipeline.store.files import canonical_hash, write_json
from bam_pipeline.store.layout import RunLayout

TEST_SPLIT = "test"
CACHE_SCHEMA = 7  # 6: no speed in the cache; 7: bits per byte over the scored tokens' own bytes
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
    """Test sequences (with their documents) per (source, seq_len), loaded once and shared by every model, and
    the bytes of text their scored tokens stand for."""

    def __init__(self, prepared: Any, max_tokens: int | None) -> None:
        self.prepared, self.max_tokens, self.cache = prepared, max_tokens, {}

    def get(self, source: str, seq_len: int) -> EvalSequences:
        if (source, seq_len) not in self.cache:
            self.cache[(source, seq_len)] = load_eval_sequences(
                self.prepared, source, TEST_SPLIT, seq_len, max_tokens=self.max_tokens)
        return self.cache[(source, seq_len)]

    @cached_property
    def byte_lengths(self) -> Any:
        """(V,) bytes of text per token id of the run's tokenizer, None where it is not byte-level."""
        return token_byte_lengths(self.prepared.tokenizer())

    def text_bytes(self, source: str, seq_len: int, tokens_scored: int) -> float:
        """The bytes of text behind the scored tokens of ``get(source, seq_len)``: counted from the tokens for a
        byte-level tokenizer (every tokenizer a run trains), else estimated from the split's bytes per token."""
        if self.byte_lengths is not None:
            return float(scored_text_bytes(self.get(source, seq_len).tokens, self.byte_lengths))
        st = self.prepared.stats[source][TEST_SPLIT]
        return evaluated_bytes(st["bytes"], st["tokens"], tokens_scored)


UNIFORM_ATTENTION = "uniform_attn"  # the probe: a mixture with its soft attention weights forced uniform


def uniform_attention(model: torch.nn.Module) -> int:
    """Force every soft attention router to uniform weights (zero router weights: softmax of equal
    logits), so the attention experts are averaged with weight 1/E; returns how many routers changed."""
    changed = 0
    for block in model.layers:
        if block.router is not None:
            raise BamError("eval.uniform_attention: this mixture's attention and FFN share one router per layer "
                           "(joint routing); uniform attention weights would change its FFN routing too; name a "
                           "mixture with its own soft attention routers (e.g. moe/bam)")
        router = block.attn.router
        if router is not None:
            if router.cfg.kind != "soft":
                raise BamError(f"eval.uniform_attention applies to soft attention routing, not {router.cfg.kind}")
            router.weight.data.zero_()
            changed += 1
    return changed


def probe_label(label: str, probe: str) -> str:
    return f"{label}+{probe}"


def probed_label(label: str) -> str:
    """The model a row's label scores: the label itself, or the model a probe label changed."""
    return label.split("+", 1)[0]


def _seq_len(spec: EvalSpec, art: Artifact, max_seq_len: int) -> int:
    seq_len = spec.seq_len or max_seq_len
    if seq_len > max_seq_len:
        raise BamError(f"eval.seq_len={seq_len} exceeds {art.label}'s max_seq_len={max_seq_len}; "
                       f"set eval.seq_len to at most {max_seq_len} or null")
    return seq_len


def evaluate_model(art: Artifact, sources: list[str], seqs: _Sequences, prepared: Any, spec: EvalSpec,
                   device: torch.device, *, probe: str | None = None, chunking: LossChunking | None = None,
                   run_on: torch.device | None = None) -> ModelScores:
    """Rows (one per source), routing stats per source and per-source skip records for one model;
    with ``probe`` (UNIFORM_ATTENTION), of the model changed by that probe, as its own row. ``device``: the
    eval's device as its rows record it; ``run_on``: the one this process computes on (a rank's own GPU)."""
    run_on = run_on or device
    model, mcfg = load_model(art, verify=False, device=str(run_on))
    info = about(art)
    label = art.label
    if probe == UNIFORM_ATTENTION:
        if not uniform_attention(model):
            raise BamError(f"eval.uniform_attention names {art.label}, which has no attention router; name a "
                           "mixture with soft attention routing (e.g. moe/bam)")
        label = probe_label(art.label, probe)
        info = About(f"{info.display}, uniform attention weights", "probe", experts=info.experts)
    seq_len = _seq_len(spec, art, mcfg.max_seq_len)
    params, flops = count_params(mcfg), flops_per_token(mcfg, seq_len)
    rows, routing, skipped, documents = [], {}, [], {}
    for source in sources:
        try:
            test = seqs.get(source, seq_len)
            data = test.tokens  # (N, seq_len + 1)
        except BamError as e:  # split shorter than one sequence
            print(f"[eval] skip {label} on {source}: {e}")
            skipped.append({"kind": "source", "name": f"{label} on {source}", "reason": str(e)})
            continue
        stats = RoutingStats()
        res = sequence_nll(model, data, batch_size=spec.batch_size, device=run_on, documents=test.documents,
                           n_docs=len(test.doc_ids), on_routing=stats.update, chunking=chunking)
        documents[source] = {"nll": res.doc_nll.tolist(), "tokens": res.doc_tokens.astype(int).tolist()}
        nbytes = seqs.text_bytes(source, seq_len, res.tokens)
        rows.append(ScoreRow(
            model=label, stage=art.stage, name=art.name, display=info.display, role=info.role,
            artifact_hash=art.hash, domain=source, tokens=res.tokens, bytes=nbytes,
            loss=res.mean_loss, perplexity=res.perplexity, bits_per_byte=bits_per_byte(res.nll, nbytes),
            params_total=params.total, params_active=params.active, flops_per_token=flops.total,
            seq_len=seq_len, device=str(device), tokens_trained=art.manifest.get("tokens"),
        ))
        if summary := stats.summary():
            routing[source] = summary
    return ModelScores(rows, routing, skipped, documents)


BTM_LABEL = "btm"


@torch.inference_mode()
def _log_probs(model: torch.nn.Module, seqs: torch.Tensor, batch_size: int, device: torch.device,
               chunking: LossChunking | None = None) -> torch.Tensor:
    """(N, T) float64 log-probability the model gives each observed next token of ``seqs`` (N, T+1)."""
    parts = [-token_nll(model, seqs[i : i + batch_size].to(device), chunking=chunking)[0].double().cpu()
             for i in range(0, seqs.shape[0], batch_size)]
    return torch.cat(parts)


def evaluate_btm(experts: list[Artifact], sources: list[str], seqs: _Sequences, prepared: Any, spec: EvalSpec,
                 device: torch.device, chunking: LossChunking | None = None, run_on: torch.device | None = None
                 ) -> ModelScores:
    """BTM (Branch-Train-Merge): the seed and the domain experts kept apart; each token's distribution is
    their mixture weighted by the posterior over them given the document so far (reset at document
    boundaries, :mod:`bam_pipeline.eval.btm`), the prior estimated per source on its validation split.
    Rows, per-document losses and skip records, like :func:`evaluate_model` (``device``, ``run_on`` too)."""
    run_on = run_on or device
    loaded = [load_model(a, verify=False, device=str(run_on)) for a in experts]
    cfgs = [cfg for _, cfg in loaded]
    seq_len = spec.seq_len or min(c.max_seq_len for c in cfgs)
    flops = ensemble_flops_per_token(cfgs, seq_len)
    params = sum(count_params(c).total for c in cfgs)
    display = f"BTM (seed + {len(experts) - 1} experts, ensembled)"
    rows, documents, skipped = [], {}, []
    for source in sources:
        try:
            test = seqs.get(source, seq_len)
            val = load_split_sequences(prepared, source, "val", seq_len,
                                       max_tokens=spec.btm_prior_sequences * (seq_len + 1))
        except BamError as e:
            skipped.append({"kind": "source", "name": f"{BTM_LABEL} on {source}", "reason": str(e)})
            continue
        prior = estimate_log_prior(torch.stack([_log_probs(m, val, spec.batch_size, run_on, chunking)
                                                for m, _ in loaded]),
                                   val[:, 1:], eos_id=prepared.eos_id)  # (N,) log prior over the models
        expert_lp = torch.stack([_log_probs(m, test.tokens, spec.batch_size, run_on, chunking)
                                 for m, _ in loaded])  # (M, N, T)
        ens = ensemble_log_probs(expert_lp, test.tokens[:, 1:], prior, eos_id=prepared.eos_id)
        per_token = -ens.log_probs  # (N, T) nats
        docs, n_docs = test.documents[:, 1:].reshape(-1), len(test.doc_ids)
        documents[source] = {
            "nll": torch.bincount(docs, weights=per_token.reshape(-1), minlength=n_docs).tolist(),
            "tokens": torch.bincount(docs, minlength=n_docs).tolist(),
        }
        nll, tokens = float(per_token.sum()), per_token.numel()
        nbytes = seqs.text_bytes(source, seq_len, tokens)
        rows.append(ScoreRow(
            model=BTM_LABEL, stage=BTM_LABEL, name=BTM_LABEL, display=display, role="ensemble",
            artifact_hash=canonical_hash([a.hash for a in experts]), domain=source, tokens=tokens,
            bytes=nbytes, loss=nll / tokens, perplexity=math.exp(nll / tokens),
            bits_per_byte=bits_per_byte(nll, nbytes), params_total=params, params_active=params,
            flops_per_token=flops, seq_len=seq_len, device=str(device), tokens_trained=None,
            btm_models=[a.label for a in experts], btm_prior=prior.exp().tolist(),
        ))
    return ModelScores(rows, {}, skipped, documents)


def _experts(info: About, routing: dict[str, Any]) -> dict[str, list[str]]:
    """Expert names per routed block present in ``routing`` (one model's per-domain stats)."""
    out = {}
    for block in ROUTED_BLOCKS:
        stats = next((r[block] for r in routing.values() if block in r), None)
        if stats is not None:
            out[block] = expert_names(info, block, len((stats.get("mean_prob") or stats.get("fraction"))[0]))
    return out


def routing_entry(art: Artifact, routing: dict[str, Any]) -> dict[str, Any]:
    """A model's entry of routing.json: its display name, its experts' names per routed block and its
    router statistics per domain (``routing``)."""
    info = about(art)
    return {"display": info.display, "experts": _experts(info, routing), "domains": routing}


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


def _row_speed(row: ScoreRow, speeds: dict[str, dict[str, Any]]) -> float:
    """A row's tokens/s from the fresh measurements (module docstring: probes and BTM)."""
    if row.role == "ensemble":
        return 1.0 / sum(1.0 / speeds[m]["tokens_per_s"] for m in row.btm_models)
    return speeds[probed_label(row.model)]["tokens_per_s"]


@dataclass(frozen=True)
class ModelSelection:
    """The models eval scores and the skip records of those it leaves out (another tokenizer's, built
    from inputs the run has rebuilt since), decided from manifests alone: no weights are read."""

    models: list[Artifact]
    skipped: list[dict[str, Any]]
    causes: dict[str, str]  # label -> why each was left out (the skip record's reason less its command hint)

    def identity(self) -> dict[str, Any]:
        """Labels -> artifact hashes of the models scored, labels -> why of those left out."""
        return {"models": {a.label: a.hash for a in self.models}, "skipped": dict(self.causes)}


def skip_record(art: Artifact, reason: str) -> dict[str, Any]:
    """A model left out of eval, with its role: the claims over every expert (or mixture) it belongs to are
    incomplete without it."""
    return {"kind": "model", "name": art.label, "role": about(art).role, "reason": reason}


def select_models(layout: RunLayout, prepared: Any,
                  rebuild: Callable[[str], str] = lambda label: "rebuild it") -> ModelSelection:
    """Every finished model artifact of the run that eval would score: made with the run's tokenizer and
    not outdated (:func:`~bam_pipeline.store.artifacts.outdated_models`; ``rebuild(label)`` says how to
    bring one up to date). A BamError when the run has no model at all."""
    arts = find_model_artifacts(layout)
    if not arts:
        raise BamError(f"no trained model in {layout.run_dir}; run `python -m bam_pipeline stage=seed` first")
    outdated = outdated_models(layout, prepared.manifest["hash"], arts)
    models, skipped, causes = [], [], {}
    for art in arts:
        try:
            read_artifact(art.path, tokenizer=prepared.tokenizer_hash)  # scored on these tokens: same tokenizer
        except BamError as e:
            causes[art.label] = str(e)
            skipped.append(skip_record(art, str(e)))
            continue
        if art.label in outdated:
            causes[art.label] = f"outdated ({outdated[art.label]})"
            skipped.append(skip_record(art, f"{causes[art.label]}; {rebuild(art.label)}"))
            continue
        models.append(art)
    return ModelSelection(models, skipped, causes)


def require_finite_losses(label: str, scores: ModelScores, fix: str, cache_file: Path | None = None) -> None:
    """A BamError naming ``label`` and the source when a row of its ``scores`` (:func:`evaluate_model`) has a loss
    that is not finite (its weights are finite, checked when loaded: the forward pass overflows); cached
    ``scores`` (an older version wrote them) are removed from the cache. ``fix``: how to replace the model."""
    bad = next((r for r in scores.rows if not math.isfinite(r.loss)), None)
    if bad is None:
        return
    if cache_file is not None:
        cache_file.unlink(missing_ok=True)
    raise BamError(f"{label} gives a test loss of {bad.loss} on {bad.domain} though its weights are finite: its "
                   f"forward pass overflows; none of its results is cached or written; {fix}")


@dataclass(frozen=True)
class Entry:
    """One entry of metrics.json to score: a model, a probe of one (``probe``), or BTM (``members``): its label,
    its name in the eval cache and what identifies its scores; what it reads is artifacts named by label, so an
    entry travels to the rank that scores it."""

    label: str
    stage: str
    name: str
    identity: Any
    fix: str  # how to replace the model when its loss is not finite
    model: str | None = None  # the artifact a model or probe entry scores
    probe: str | None = None
    members: tuple[str, ...] = ()  # BTM's artifacts, seed first


@dataclass(frozen=True)
class Scored:
    """The scores of one entry of metrics.json: a model, a probe of one, or BTM."""

    label: str
    scores: ModelScores
    cache_file: str  # the name of its entry in the eval cache
    reused: bool  # read from the cache, not computed


@dataclass(frozen=True)
class ScoreCache:
    """Eval's cache (``RunLayout.eval_cache``): each entry's scores under the hash of its identity, the data
    (:func:`data_hash`), the settings, the sources scored and the device."""

    directory: Path
    data: str
    spec: EvalSpec
    sources: list[str]
    device: torch.device

    def file(self, entry: Entry) -> Path:
        key = canonical_hash({"schema": CACHE_SCHEMA, "artifact": entry.identity, "data": self.data,
                              "settings": self.spec.cache_key(), "sources": self.sources,
                              "device": str(self.device)})  # scores computed on this device
        return self.directory / f"{entry.stage}-{entry.name}-{key[:16]}.json"

    def cached(self, entry: Entry) -> ModelScores | None:
        """An entry's scores when its identity, the data and the settings are unchanged; refused (its ``fix``)
        when a loss is not finite, and then removed from the cache."""
        cache_file = self.file(entry)
        if not cache_file.is_file():
            return None
        try:
            scores = ModelScores.from_dict(json.loads(cache_file.read_text()))
        except BamError:
            cache_file.unlink()
            raise
        require_finite_losses(entry.label, scores, entry.fix, cache_file)
        return scores

    def store(self, entry: Entry, scores: ModelScores) -> ModelScores:
        """Cache freshly computed scores; refused (never cached) when a loss is not finite."""
        require_finite_losses(entry.label, scores, entry.fix)
        write_json(self.file(entry), scores.to_dict())
        return scores

    def prune(self, keep: set[str]) -> None:
        """Remove every entry but those named in ``keep``."""
        for stale in self.directory.glob("*.json"):
            if stale.name not in keep:
                stale.unlink()


def model_entries(arts: list[Artifact], spec: EvalSpec) -> list[Entry]:
    """Per model: its entry, then that of its uniform attention probe where ``eval.uniform_attention`` names it."""
    out = []
    for art in arts:
        out.append(Entry(art.label, art.stage, art.name, art.hash, nonfinite_fix(art), model=art.label))
        if art.label in spec.uniform_attention:
            out.append(Entry(probe_label(art.label, UNIFORM_ATTENTION), art.stage, f"{art.name}+{UNIFORM_ATTENTION}",
                             {"artifact": art.hash, "probe": UNIFORM_ATTENTION}, nonfinite_fix(art),
                             model=art.label, probe=UNIFORM_ATTENTION))
    return out


def missing_probes(spec: EvalSpec, arts: list[Artifact]) -> list[dict[str, Any]]:
    """Skip records of the probes ``eval.uniform_attention`` asks of models the run has not (or could not load)."""
    missing = sorted(set(spec.uniform_attention) - {a.label for a in arts})
    return [{"kind": "model", "name": probe_label(m, UNIFORM_ATTENTION), "role": "probe",
             "reason": f"eval.uniform_attention names {m}, which this run has not trained (or could not load)"}
            for m in missing]


def btm_entries(arts: list[Artifact], spec: EvalSpec) -> list[Entry]:
    """BTM's entry when ``eval.btm`` and the run has the seed and at least one branch expert; none otherwise."""
    singles = [a for a in arts if a.stage in ("seed", "branch")]
    if not (spec.btm and len(singles) >= 2 and singles[0].stage == "seed"):
        return []
    members = ", ".join(a.label for a in singles)
    return [Entry(BTM_LABEL, BTM_LABEL, BTM_LABEL, [a.hash for a in singles],
                  f"leave BTM out (eval.btm=false) or replace the member that overflows ({members})",
                  members=tuple(a.label for a in singles))]


def entry_cost(entry: Entry, params: dict[str, int]) -> float:
    """What scoring an entry costs, relative to the others (the same tokens for all): the active parameters
    of the models it runs (``params``: artifact label -> active parameters)."""
    return float(sum(params[m] for m in entry.members) if entry.members else params[entry.model or ""])


def eval_sources(prepared: Any, data_dir: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """The sources eval scores (those with a test split) and the skip records of the others, out-of-domain
    sources the data stage could not fetch included; a BamError when no source of ``data_dir`` has a test split."""
    sources, skipped = sources_with_test_split(prepared)
    for s in skipped:
        print(f"[eval] skip {s['name']}: {s['reason']}")
    if not sources:
        raise BamError(f"no source of {data_dir} has a {TEST_SPLIT} split; re-run `stage=data` with test "
                       f"splits enabled")
    unavailable = [{"kind": "source", "name": name, "reason": f"out-of-domain source unavailable: {why}"}
                   for name, why in prepared.manifest.get("skipped_sources", {}).items()]
    return sources, skipped + unavailable


def check_budgets(spec: EvalSpec, models: list[Artifact]) -> None:
    """Refuse an ``eval.max_tokens_per_source`` below one sequence of any model, before any model is scored
    (a model whose config cannot be read is left out later, with its reason)."""
    if spec.max_tokens_per_source is None:
        return
    for art in models:
        try:
            max_seq_len = read_model_config(art).max_seq_len
        except BamError:
            continue
        spec.check_budget(_seq_len(spec, art, max_seq_len))


def _announced(record: dict[str, Any]) -> dict[str, Any]:
    print(f"[eval] skip {record['name']}: {record['reason']}")
    return record


def verified_models(selection: ModelSelection) -> tuple[list[Artifact], list[dict[str, Any]]]:
    """The selected models whose weights match their checksums, and the skip records of the selection and of
    those that do not; a model whose weights are not finite is refused by name before any model is scored."""
    skipped = [_announced(record) for record in selection.skipped]
    good = []
    for art in selection.models:
        try:
            art.verify()
        except BamError as e:
            skipped.append(_announced(skip_record(art, str(e))))
            continue
        good.append(art)
    for art in good:
        load_state(art, verify=False)
    return good, skipped


def timed_rows(rows: list[ScoreRow], arts: list[Artifact], sources: list[str], seqs: _Sequences, spec: EvalSpec,
               device: torch.device, chunking: LossChunking | None) -> tuple[list[ScoreRow], dict[str, Any]]:
    """The rows with their timing, and metrics.json's ``speed`` section: every model with a row measured
    afresh (:func:`measure_speeds`) on ``eval.batch_size`` sequences of the first source with a row; the wall
    time of a training stage's split from its manifest (``job.py``; None for a probe row and for BTM)."""
    measured = [a for a in arts if any(r.model == a.label for r in rows)]
    speed_source = next(s for s in sources if any(r.domain == s for r in rows))
    speeds = measure_speeds(measured, lambda n: seqs.get(speed_source, n).tokens[: spec.batch_size], spec, device,
                            chunking)
    walls = {a.label: a.manifest.get("wall_time") for a in arts}
    timed = [r.timed(Timing(_row_speed(r, speeds), walls.get(r.model))) for r in rows]
    print(f"[eval] speed of {len(measured)} models measured afresh, interleaved ({SPEED_ROUNDS} rounds, "
          f"{spec.batch_size} sequences of {speed_source})")
    return timed, {"source": speed_source, "rounds": SPEED_ROUNDS, "repeats": SPEED_REPEATS,
                   "batch_size": spec.batch_size, "models": speeds}


def measured_serving(arts: list[Artifact], speed: dict[str, Any], spec: EvalSpec, device: torch.device
                     ) -> ServingCosts:
    """The serving cost (:mod:`bam_pipeline.eval.serving`) of the models whose speed :func:`timed_rows` measured,
    measured right after it in ``eval.latency_rounds`` interleaved rounds."""
    start = time.perf_counter()
    costs = serving_costs([a for a in arts if a.label in speed["models"]], device=device, rounds=spec.latency_rounds)
    timed = f"eval.latency_rounds={costs.rounds}" + (
        f" at {' and '.join(threads_phrase(t) for t in costs.threads)}" if costs.rounds else ": not timed")
    print(f"[eval] decode latency and KV cache of {len(costs.rows)} models measured afresh, interleaved ({timed}; "
          f"{time.perf_counter() - start:.1f} s)")
    return costs


@dataclass(frozen=True)
class EvalPlan:
    """What rank 0 decided before any scoring: the sources, the entries (in metrics.json's order), which of
    them the cache holds and the skip records so far. Every rank scores its share of the others."""

    sources: list[str]
    entries: list[Entry]
    cached: list[bool]
    skipped: list[dict[str, Any]]
    params: dict[str, int]  # artifact label -> active parameters (the entries' costs)

    @property
    def work(self) -> list[Entry]:
        return [e for e, c in zip(self.entries, self.cached) if not c]


def score_entry(entry: Entry, arts: dict[str, Artifact], sources: list[str], seqs: _Sequences, prepared: Any,
                spec: EvalSpec, device: torch.device, run_on: torch.device, chunking: LossChunking | None
                ) -> ModelScores:
    """One entry's scores, computed on ``run_on``."""
    if entry.members:
        return evaluate_btm([arts[m] for m in entry.members], sources, seqs, prepared, spec, device, chunking,
                            run_on=run_on)
    return evaluate_model(arts[entry.model or ""], sources, seqs, prepared, spec, device, probe=entry.probe,
                          chunking=chunking, run_on=run_on)


def run_eval(spec: EvalSpec, layout: RunLayout, *, general: str | None,
             chunking: LossChunking | None = None,
             rebuild: Callable[[str], str] = lambda label: "rebuild it",
             selection: ModelSelection | None = None, ranks: Ranks | None = None) -> Path | None:
    """Evaluate every finished model artifact of the run; returns the path of metrics.json (None on a rank
    other than 0).

    ``general`` names the general source (the report's first column); ``chunking`` is the LM
    loss's chunking rule (training's). ``selection``: the models to score and those left out
    (:func:`select_models`, with ``rebuild`` naming how to rebuild an outdated one, when not given).
    A model whose weights fail their checksums is left out too. ``ranks``: the processes that share the
    scoring (every rank calls this; rank 0 decides what is scored, each rank scores its share, rank 0
    gathers, measures every model's speed and writes every file but the cache entries each rank computes)."""
    ranks = ranks or Ranks()
    prepared = open_prepared(layout.data, verify=ranks.is_zero)
    device = resolve_device(spec.device)
    cache = None
    plan = None
    arts: dict[str, Artifact] = {}
    if ranks.is_zero:
        if selection is None:
            selection = select_models(layout, prepared, rebuild)
        sources, source_skips = eval_sources(prepared, layout.data)
        check_budgets(spec, selection.models)
        good, model_skips = verified_models(selection)
        cache = ScoreCache(layout.eval_cache, data_hash(prepared), spec, sources, device)
        entries = model_entries(good, spec) + btm_entries(good, spec)
        cached = [cache.cached(e) for e in entries]
        plan = EvalPlan(sources, entries, [c is not None for c in cached],
                        [*source_skips, *model_skips, *missing_probes(spec, good)],
                        {a.label: count_params(read_model_config(a)).active for a in good})
        arts = {a.label: a for a in good}
    plan = ranks.broadcast(plan, "rank 0 to choose the models to score")
    if not ranks.is_zero:  # the artifacts rank 0 chose, by label
        arts = {a.label: a for a in find_model_artifacts(layout)}
    seqs = _Sequences(prepared, spec.max_tokens_per_source)
    run_on = ranks.device(device)
    work = plan.work

    def compute(entry: Entry) -> ModelScores:
        scores = score_entry(entry, arts, plan.sources, seqs, prepared, spec, device, run_on, chunking)
        if cache is not None:
            return cache.store(entry, scores)
        require_finite_losses(entry.label, scores, entry.fix)  # another rank's: rank 0 caches it
        return scores

    shared = ranks.run_shares(work, [entry_cost(e, plan.params) for e in work], compute,
                              "the other ranks' eval scores")
    if not ranks.is_zero:
        return None
    assert cache is not None
    for entry, owner, scores in zip(work, shared.owners, shared.results):
        if owner != ranks.rank:
            cache.store(entry, scores)
    computed = {e.label: r for e, r in zip(work, shared.results)}
    scored = [Scored(e.label, c if c is not None else computed[e.label], cache.file(e).name, reused=c is not None)
              for e, c in zip(plan.entries, cached)]
    per_model = {e.model: s for e, s in zip(plan.entries, scored) if e.model is not None and e.probe is None}
    skipped = [*plan.skipped, *(x for s in scored for x in s.scores.skipped)]
    rows = [r for s in scored for r in s.scores.rows]
    if not rows:
        reasons = "; ".join(f"{x['name']}: {x['reason']}" for x in skipped)
        raise BamError(f"no model of {layout.run_dir} could be evaluated ({reasons})")
    measured = [arts[label] for label in per_model]
    rows, speed = timed_rows(rows, measured, plan.sources, seqs, spec, device, chunking)
    serving = measured_serving(measured, speed, spec, device)  # rank 0, every model, right after the speeds
    reused = [s.label for s in scored if s.reused]
    evaluated = [s.label for s in scored if not s.reused]
    if reused:
        print(f"[eval] reused cached results for: {', '.join(reused)}")
    if evaluated:
        print(f"[eval] evaluated: {', '.join(evaluated)}")
    if ranks.world > 1:
        print(f"[eval] scored on {ranks.world} ranks: " + "; ".join(
            f"rank {r}: {', '.join(labels)}" for r, labels in shared.by_rank([e.label for e in work]).items()))
    cache.prune({s.cache_file for s in scored})
    write_json(layout.documents, {
        "sources": {src: prepared.stream(src, TEST_SPLIT).doc_ids() for src in plan.sources},
        "models": {s.label: s.scores.documents for s in scored}})
    write_routing(layout, {label: routing_entry(arts[label], s.scores.routing)
                           for label, s in per_model.items() if s.scores.routing})
    write_json(layout.metrics, {
        "run": layout.run, "settings": {**spec.cache_key(), "device": str(device)}, "data_hash": cache.data,
        "sources": plan.sources, "ood_sources": [x for x in plan.sources if x in prepared.ood],
        "general_source": general, "rows": [r.to_dict() for r in rows], "skipped": skipped,
        "reused": reused, "evaluated": evaluated, "speed": speed, "serving": serving.to_dict(),
        "ranks": {"world": ranks.world, "scored": {str(r): [] for r in range(ranks.world)}
                  | shared.by_rank([e.label for e in work])},
    })
    print(f"[eval] {len(rows)} (model, domain) rows -> {layout.metrics}")
    return layout.metrics
