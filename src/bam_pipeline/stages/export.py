"""stage=export artifact=<label>: one model artifact of the run as a Hugging Face model directory,
``stages/<run>/export/<stage>/<name>/`` (:mod:`bam_pipeline.interop.hf_export` writes it), published
atomically, with a model card holding its provenance and its rows of the eval table; then, with
``export.push_to_hub=<repo id>``, uploaded.

The tokenizer exported is the run's prepared ``data/tokenizer.json``: the one every artifact was
made with (for an imported Hugging Face model with only a SentencePiece ``tokenizer.model``, the
``tokenizer.json`` transformers converted it to when the data was prepared).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from bam_pipeline.data.prepare import TOKENIZER_FILE, PreparedData
from bam_pipeline.errors import BamError
from bam_pipeline.eval.downstream_table import result_cell
from bam_pipeline.eval.names import about
from bam_pipeline.interop.hf_export import ExportResult, ExportTokenizer, ModelCard, choose_format, push_to_hub
from bam_pipeline.interop.hf_export import write_export
from bam_pipeline.stages.context import RunContext
from bam_pipeline.stages.inputs import current_model, open_data
from bam_pipeline.store.artifacts import Artifact, load_state, publish, read_model_config, remove_dead_temporaries
from bam_pipeline.store.locks import StageLock
from bam_pipeline.ranks import is_rank_zero


def require_artifact(ctx: RunContext, stage: str) -> str:
    """The ``artifact=`` label a stage needs; a BamError saying how to name one."""
    if not ctx.artifact:
        raise BamError(f"stage={stage} needs artifact=<label>, e.g. artifact=moe/bam (`python -m bam_pipeline "
                       "stage=status` lists this run's models)")
    return ctx.artifact


def eval_rows(ctx: RunContext, art: Artifact) -> tuple[list[dict[str, Any]], str]:
    """The model's rows of the run's eval table (``eval/metrics.json``) for the card, and a note
    when there are none for this build of it."""
    if not ctx.layout.metrics.is_file():
        return [], f"The run has no eval results yet (`{ctx.cmd('stage=eval')}`)."
    rows = [r for r in json.loads(ctx.layout.metrics.read_text())["rows"] if r["model"] == art.label]
    mine = [r for r in rows if r.get("artifact_hash") == art.hash]
    if rows and not mine:
        return [], "The run's eval results are of an earlier build of this model; re-run stage=eval and export again."
    if not rows:
        return [], f"The run's eval has not scored this model (built after it ran); `{ctx.cmd('stage=eval')}` scores it."
    return [{"test source": r["domain"], "perplexity": r["perplexity"], "bits per byte": r["bits_per_byte"],
             "loss (nats/token)": r["loss"], "test tokens": r["tokens"]} for r in mine], ""


def downstream_lines(ctx: RunContext, art: Artifact) -> list[str]:
    """The model's downstream results (``downstream/results.json``) of this build, one line per task."""
    path = ctx.layout.downstream_results
    if not path.is_file():
        return []
    results = json.loads(path.read_text())
    return [f"- downstream ({results.get('suite')}) `{r['task']}`: {_card_result(r)} ({r['items']} items)"
            for r in results.get("rows", []) if r["model"] == art.label and r.get("artifact_hash") == art.hash]


def _card_result(row: dict[str, Any]) -> str:
    """acc ± its standard error and acc_norm, named; a task without accuracy (exact_match, pass@1) by
    its own first metric."""
    if row.get("acc") is None:
        return result_cell(row)
    se = "" if row.get("acc_stderr") is None else f" ± {row['acc_stderr']:.4f}"
    norm = "" if row.get("acc_norm") is None else f", acc_norm {row['acc_norm']:.4f}"
    return f"acc {row['acc']:.4f}{se}{norm}"


def model_card(ctx: RunContext, art: Artifact, prepared: PreparedData) -> ModelCard:
    """Title, provenance (run, config hashes, inputs, training) and eval rows of ``art``."""
    info = about(art)
    m = art.manifest
    rows, note = eval_rows(ctx, art)
    inputs = [f"`{key}` (hash `{ref.get('hash')}`)" for key, ref in m.get("inputs", {}).items()]
    trained = m.get("tokens") or 0
    lines = [
        f"- run: `{ctx.run}` (`{ctx.layout.run_dir}`), exported by `python -m bam_pipeline "
        f"{' '.join(sys.argv[1:])}` on {time.strftime('%Y-%m-%d %H:%M:%S %z')}",
        f"- config hash of that command: `{ctx.config_hash}`",
        f"- artifact `{art.label}` ({info.display}, role {info.role}): hash `{art.hash}`, its stage's config "
        f"hash `{m.get('config_hash')}`, made {m.get('created', '?')}",
        f"- inputs: {', '.join(inputs) if inputs else 'none (trained from scratch or imported)'}",
        f"- trained on {trained:,} tokens in its own stage" if trained else "- no training in its own stage",
        f"- tokenizer: the run's (`{prepared.tokenizer_hash}`), end of document `{prepared.manifest.get('eos_token')}`"
        f" = {prepared.eos_id}",
    ]
    if m.get("source"):
        lines.append(f"- imported from `{m['source'].get('given')}`"
                     + (f" at `{m['source']['revision']}`" if m["source"].get("revision") else ""))
    versions = m.get("versions", {})
    if versions:
        lines.append("- made with " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    if note:
        lines += ["", note]
    downstream = downstream_lines(ctx, art)
    if downstream:
        lines += ["", "Downstream tasks (lm-evaluation-harness, this run's offline suite or the paper's tasks):", "",
                  *downstream]
    if rows:
        lines += ["", "Eval rows below: test-split perplexity per source of the run (`eval/metrics.json`)."]
    return ModelCard(f"{info.display} ({art.label}), bam-pipeline run {ctx.run}", "\n".join(lines), rows)


def export_artifact(ctx: RunContext, art: Artifact, prepared: PreparedData) -> ExportResult:
    """Write the export of ``art`` into its place (atomically; an existing one only with overwrite)."""
    out = ctx.layout.export(art.stage, art.name)
    spec = ctx.export
    with StageLock(ctx.layout.lock("export", art.label), f"the export of {art.label}"):
        for p in remove_dead_temporaries(out):
            print(f"export/{art.label}: removed {p}, left by a run that was killed while exporting")
        if out.exists() and not spec.overwrite:
            raise BamError(f"export directory {out} exists; add export.overwrite=true to replace it (atomically), "
                           "or move it away first")
        cfg = read_model_config(art)
        choose_format(cfg, spec.format)  # a format the model cannot take is refused before any work
        cfg, state = load_state(art)  # checksums verified
        tokenizer = ExportTokenizer(prepared.dir / TOKENIZER_FILE, eos_token=str(prepared.manifest["eos_token"]))
        card = model_card(ctx, art, prepared)
        with publish(out) as tmp:
            result = write_export(tmp, cfg, state, tokenizer=tokenizer, card=card, format=spec.format,
                                  max_shard_bytes=spec.max_shard_bytes)
    return ExportResult(out, result.format, result.architecture, result.files)


def run_export(ctx: RunContext) -> ExportResult | None:
    """stage=export: the export of ``artifact=``; uploaded with ``export.push_to_hub``."""
    text = require_artifact(ctx, "export")
    prepared = open_data(ctx)
    art = current_model(ctx, text, prepared)
    if not is_rank_zero():
        return None
    result = export_artifact(ctx, art, prepared)
    remote = ", trust_remote_code=True" if result.format == "custom" else ""
    kind = "custom code in the directory" if result.format == "custom" else "a stock transformers class"
    print(f"export/{art.label}: {result.architecture} ({kind}), {len(result.files)} files -> {result.path}")
    print(f"  load it: transformers.AutoModelForCausalLM.from_pretrained({str(result.path)!r}{remote})")
    if ctx.export.push_to_hub:
        url = push_to_hub(result.path, ctx.export.push_to_hub, private=ctx.export.private)
        print(f"export/{art.label}: pushed to {ctx.export.push_to_hub} ({url})")
    return result
