"""stage=generate artifact=<label>: continue prompts with one model of the run, decoding with the KV
cache (:func:`bam_pipeline.model.generation.generate_text`); prints every continuation, the model's KV
cache bytes per token, measured from the cache tensors while decoding, and its decode latency per generated
token at one thread and at all of torch's threads (:mod:`bam_pipeline.eval.serving`, as eval measures every
model's; ``eval.latency_rounds`` rounds, 0: not timed).

Prompts: ``generate.prompt="..."``, or ``generate.prompts_file=<path>``: a ``.jsonl`` file holds one
JSON string or ``{"prompt": "..."}`` object per line; any other file one prompt per line (blank
lines skipped). A prompt is encoded as the tokenizer encodes a document, exactly as the
``transformers`` tokenizer of the model's export encodes it, so ``generate()`` of the export
continues it with the same tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

from bam_pipeline.errors import BamError, ConfigError
from bam_pipeline.eval.names import about
from bam_pipeline.eval.runner import resolve_device
from bam_pipeline.eval.serving import NEW_TOKENS, latency_line, machine_name, measure_decode, thread_counts
from bam_pipeline.model.generation import TextGeneration, generate_text
from bam_pipeline.stages.context import GenerateSpec, RunContext
from bam_pipeline.stages.export import require_artifact
from bam_pipeline.stages.inputs import current_model, open_data
from bam_pipeline.store.artifacts import artifact_containing, load_model
from bam_pipeline.store.files import file_path_problem, write_text
from bam_pipeline.ranks import is_rank_zero


def _prompt_of(line: str, where: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise BamError(f"{where} is not valid JSON ({e.msg}); give one JSON string or {{\"prompt\": ...}} per line"
                       ) from None
    if isinstance(row, dict) and isinstance(row.get("prompt"), str):
        return row["prompt"]
    if isinstance(row, str):
        return row
    raise BamError(f"{where} is neither a JSON string nor an object with a \"prompt\" string")


def read_prompts(spec: GenerateSpec) -> list[str]:
    """The prompts ``generate.prompt`` or ``generate.prompts_file`` gives; a BamError for none, both,
    an unreadable file or an empty prompt."""
    if spec.prompt is not None and spec.prompts_file is not None:
        raise BamError("give generate.prompt or generate.prompts_file, not both")
    if spec.prompt is not None:
        if not spec.prompt.strip():
            raise BamError("invalid generate.prompt='': the prompt is empty; give some text to continue, e.g. "
                           "generate.prompt=\"def add(a, b):\"")
        return [spec.prompt]
    if spec.prompts_file is None:
        raise BamError("stage=generate needs a prompt: generate.prompt=\"...\" or generate.prompts_file=<path> (one "
                       "prompt per line, or .jsonl)")
    path = Path(spec.prompts_file).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BamError(f"invalid generate.prompts_file='{spec.prompts_file}': no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BamError(f"cannot read generate.prompts_file='{spec.prompts_file}' ({e}); give a UTF-8 text or "
                       "JSONL file") from None
    lines = [(i + 1, line) for i, line in enumerate(text.splitlines()) if line.strip()]
    if path.suffix == ".jsonl":
        prompts = [_prompt_of(line, f"{path} line {n}") for n, line in lines]
    else:
        prompts = [line for _, line in lines]
    if not prompts:
        raise BamError(f"generate.prompts_file='{spec.prompts_file}' holds no prompt; write one per line")
    empty = next((i for i, p in enumerate(prompts) if not p.strip()), None)
    if empty is not None:
        raise BamError(f"prompt {empty + 1} of {path} is empty; give every prompt some text to continue")
    return prompts


def _describe(spec: GenerateSpec) -> str:
    how = "greedy" if spec.sampling.greedy else f"temperature {spec.temperature:g}, top-p {spec.top_p:g}, seed {spec.seed}"
    return f"{how}, up to {spec.max_new_tokens} new tokens" + ("" if spec.stop_at_eos else ", past end of document")


def printable(text: str) -> str:
    """``text`` safe for a terminal: control characters other than newline and tab (a model can emit
    escape sequences and backspaces) shown as Python escapes; ``generate.output`` keeps the raw text."""
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


def output_problem(path: Path) -> str | None:
    """Why the continuations cannot go to ``path`` (None: they can)."""
    inside = artifact_containing(path)
    if inside is not None:
        return f"is inside {inside}, a stage's output whose checksums it would break; write it elsewhere"
    return file_path_problem(path)


def run_generate(ctx: RunContext) -> list[TextGeneration] | None:
    """stage=generate: print the continuations of the prompts by ``artifact=``'s model."""
    text = require_artifact(ctx, "generate")
    spec = ctx.generate
    if spec.output and (problem := output_problem(Path(spec.output))):
        raise ConfigError("generate.output", spec.output, problem)  # before the model runs, not after
    prompts = read_prompts(spec)
    prepared = open_data(ctx)
    art = current_model(ctx, text, prepared)
    if not is_rank_zero():
        return None
    model, cfg = load_model(art, device=str(resolve_device(ctx.eval.device)))
    results, cache_bytes = generate_text(model, prepared.tokenizer(), prompts, max_new_tokens=spec.max_new_tokens,
                                         sampling=spec.sampling, eos_id=prepared.eos_id if spec.stop_at_eos else None,
                                         seed=spec.seed, batch_size=spec.batch_size)
    print(f"{art.label} ({about(art).display}): {_describe(spec)}")
    for i, r in enumerate(results):
        end = " [end of document]" if r.stopped_at_eos else ""
        print(f"--- prompt {i + 1} ({len(r.prompt_ids)} tokens) -> {len(r.tokens)} new tokens{end}")
        print(printable(r.prompt + r.text))
    sets = cfg.kv_experts
    kv = "one K/V set per layer" + (" (shared by the attention experts)" if cfg.attn_experts > 1 else "") \
        if sets == 1 else f"one K/V set per attention expert per layer ({sets})"
    print(f"KV cache: {cache_bytes:,.0f} bytes per token (measured from the cache tensors; {cfg.n_layers} layers, "
          f"{kv}, {cfg.n_kv_heads} KV heads x {cfg.head_dim} dims, {str(next(model.parameters()).dtype)[6:]})")
    rounds = ctx.eval.latency_rounds
    cost = measure_decode({art.label: lambda: model}, rounds=rounds, threads=thread_counts())[art.label]
    print(latency_line(cost, rounds=rounds, prompt_tokens=cfg.max_seq_len - NEW_TOKENS,
                       machine=machine_name(model.tok_emb.weight.device)))
    if spec.output:
        rows = [{"prompt": r.prompt, "prompt_ids": r.prompt_ids, "tokens": r.tokens, "text": r.text,
                 "stopped_at_eos": r.stopped_at_eos} for r in results]
        write_text(Path(spec.output), "".join(json.dumps(row) + "\n" for row in rows))
        print(f"continuations -> {spec.output}")
    return results
