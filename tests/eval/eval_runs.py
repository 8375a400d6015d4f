"""Hand-made run contents for the eval tests: model artifacts written directly, and synthetic eval outputs
(metrics.json, documents.json) of runs whose true loss differences are known."""

import json
import math
from pathlib import Path

import numpy as np

from bam_pipeline.eval.aggregate import RunEval
from bam_pipeline.eval.scores import ScoreRow
from bam_pipeline.store.artifacts import publish, save_model, write_manifest
from bam_pipeline.store.layout import RunLayout

SOURCES = ("general", "code", "law")
ROLES = {"seed": "seed", "branch/code": "expert", "branch/law": "expert", "moe/bam": "mixture", "moe/btx": "mixture",
         "moe/dense": "dense"}


EMPTY_ROW = {"stage": "", "name": "", "display": "", "role": "", "artifact_hash": "", "tokens": 0, "bytes": 0.0,
             "loss": 0.0, "perplexity": 0.0, "bits_per_byte": 0.0, "params_total": 0, "params_active": 0,
             "flops_per_token": 0.0, "seq_len": 0, "device": "cpu", "tokens_trained": None}


def score_row(model: str, domain: str, **fields) -> ScoreRow:
    """A score row of ``model`` on ``domain`` with ``fields``, every other field empty (no display name, no role)."""
    return ScoreRow(model=model, domain=domain, **{**EMPTY_ROW, **fields})


def fake_eval_run(tmp_path, name, seed, *, shift, n_docs=60, models=tuple(ROLES), data_hash="d0", tokens_seed=0,
                  roles=None, scored=None, skipped=()):
    """A run directory with metrics.json and documents.json whose per-token losses have known effects:
    every model's loss on a source is a document's difficulty plus the model's offset ``shift[model][source]``
    plus small per-(model, document) noise and a per-seed effect. ``scored[source]``: only that many of the
    source's test documents scored, the others with 0 tokens (as eval writes the documents past
    eval.max_tokens_per_source); ``skipped``: models eval skipped (could not load)."""
    rng = np.random.default_rng(100 + seed)
    tokens = np.random.default_rng(tokens_seed).integers(20, 300, size=(len(SOURCES), n_docs))
    for i, src in enumerate(SOURCES):
        tokens[i, (scored or {}).get(src, n_docs):] = 0
    difficulty = np.random.default_rng(tokens_seed + 1).normal(3.0, 0.5, size=(len(SOURCES), n_docs))
    seed_effect = rng.normal(0, 0.01)
    rows, docs = [], {}
    for m in models:
        docs[m] = {}
        for i, src in enumerate(SOURCES):
            per_token = difficulty[i] + shift.get(m, {}).get(src, 0.0) + seed_effect + rng.normal(0, 0.02, n_docs)
            nll = per_token * tokens[i]
            docs[m][src] = {"nll": nll.tolist(), "tokens": tokens[i].tolist()}
            loss = nll.sum() / tokens[i].sum()
            rows.append(score_row(m, src, perplexity=math.exp(loss), loss=loss, role=(roles or ROLES).get(m, "mixture"),
                                  display=m, params_total=1000, params_active=500).to_dict())
    layout = RunLayout(tmp_path / name)
    layout.eval.mkdir(parents=True)
    layout.metrics.write_text(json.dumps({"run": name, "sources": list(SOURCES), "ood_sources": [],
                                          "general_source": "general", "rows": rows, "data_hash": data_hash,
                                          "settings": {},
                                          "skipped": [{"kind": "model", "name": m, "reason": "checksum mismatch"}
                                                      for m in skipped]}))
    layout.documents.write_text(json.dumps({"models": docs}))
    return RunEval(seed, layout, json.loads(layout.metrics.read_text()), json.loads(layout.documents.read_text()))


def save_artifact(run: Path, stage: str, name: str, model_cfg, state, prepared, log_rows=(), about=None) -> None:
    with publish(run / stage / name) as tmp:
        save_model(tmp, model_cfg, state)
        if log_rows:
            (tmp / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log_rows))
        extra = {"about": about} if about else {}
        write_manifest(tmp, stage=stage, name=name, run=run.name, config={}, inputs={}, metrics={},
                       tokens=sum(1000 for _ in log_rows), flops=0, tokenizer_hash=prepared.tokenizer_hash, **extra)
