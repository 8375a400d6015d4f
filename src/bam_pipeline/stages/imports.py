"""Importing a Hugging Face model directory as a stage's artifact, with no training: the seed under
``seed=hf`` and the domain experts ``branch=hf`` names (the BTX use case: mixing experts someone
else fine-tuned). The source is a model directory or a GGUF file. An import's identity is its source
(path or hub id, the commit it resolved to), its files' sizes and modification times, the dtype, the
context it runs at and, for the seed, ``seed.eos_token`` where it is set; its manifest records every file's
sha256, the architecture, the checkpoint's format (and a GGUF file's quantisation types), its config's
bookkeeping fields, and the seed's end-of-document token. An expert must have the seed's architecture and
the run's tokenizer.
"""

from __future__ import annotations

from typing import Any

import torch

from bam_pipeline.errors import BamError, ConfigError
from bam_pipeline.interop.hf_import import ImportedHFModel, import_hf_model
from bam_pipeline.model.config import ModelConfig
from bam_pipeline.stages.context import HFModelRef, RunContext
from bam_pipeline.stages.hf_model_dirs import fingerprint, hf_model_tokenizer, resolve, short_name, source_record
from bam_pipeline.stages.inputs import Plan, building, fresh_artifact
from bam_pipeline.store.artifacts import Artifact, publish, read_artifact, save_model, write_manifest
from bam_pipeline.store.files import sha256_file


def checkpoint_record(imported: ImportedHFModel) -> dict[str, Any]:
    """What the manifest says about the checkpoint itself: its format, a GGUF file's quantisation types
    (tensors per ggml type), and the config's bookkeeping fields (accepted, not used by the model)."""
    record: dict[str, Any] = {"format": imported.format, "bookkeeping": imported.bookkeeping}
    if imported.quantization is not None:
        record["quantization"] = imported.quantization
    return record


def _types(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {t}" for t, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def plan_import(ctx: RunContext, stage: str, name: str, ref: HFModelRef, dtype: str | None,
                inputs: dict[str, Artifact], about: dict[str, Any], eos_token: str | None = None) -> Plan:
    """The plan of importing ``ref`` as artifact ``<stage>/<name>``; ``eos_token``: the seed's
    ``seed.eos_token``, part of the identity only where it is set (its manifest records the token)."""
    src = resolve(ref)
    config = {"import": {"source": ref.path, "revision": src.revision, "files": fingerprint(src), "dtype": dtype,
                         "max_seq_len": ctx.model.seq_len, **({"eos_token": eos_token} if eos_token else {})},
              "inputs": {k: a.hash for k, a in inputs.items()}}
    return Plan(stage, name, ctx.layout.artifact(stage, name), config, inputs, about)


def run_import(ctx: RunContext, plan: Plan, ref: HFModelRef, dtype: str | None, *, tokenizer: str,
               like: ModelConfig | None = None, end_of_document: dict[str, Any] | None = None) -> Artifact:
    """Import ``ref`` as ``plan``'s artifact (skipped when fresh). ``tokenizer``: the run's tokenizer hash,
    which the imported model's tokenizer must have; ``like``: the architecture it must have (an expert's: the
    seed's); ``end_of_document``: the seed's end-of-document ``{"id", "token"}``, recorded for loading it
    before any data is prepared."""
    done = fresh_artifact(plan, ctx.pipeline.on_stale)
    if done is not None:
        return done
    with building(ctx, plan):
        src = resolve(ref)
        theirs = hf_model_tokenizer(ref).hash
        if theirs != tokenizer:
            raise BamError(f"{ref.path} has another tokenizer ({theirs[:12]}) than the run ({tokenizer[:12]}); "
                           "an imported expert must share the seed's tokenizer")
        try:
            imported = import_hf_model(src.path, dtype=getattr(torch, dtype) if dtype else None,
                                       max_seq_len=ctx.model.seq_len, name=short_name(ref))
        except ConfigError as e:  # the import's dtype: seed.dtype, for the seed and every imported expert
            raise e.under("seed") from None
        if like is not None and imported.config.replace(name=like.name) != like:
            raise BamError(f"{ref.path} has another architecture than the seed ({imported.config.to_dict()} vs "
                           f"{like.to_dict()}); import experts fine-tuned from the seed checkpoint")
        with publish(plan.out) as tmp:
            save_model(tmp, imported.config, imported.state_dict)
            write_manifest(tmp, stage=plan.stage, name=plan.name, run=ctx.run, config=plan.config,
                           inputs=plan.inputs, tokenizer_hash=tokenizer, metrics={}, tokens=0, flops=0.0,
                           source=source_record(ref, src), architecture=imported.architecture,
                           checkpoint_files={p.name: sha256_file(p) for p in imported.files},
                           checkpoint=checkpoint_record(imported), about=plan.about,
                           **({"end_of_document": end_of_document} if end_of_document else {}))
    quantized = f" (GGUF: {_types(imported.quantization)}, dequantised by transformers)" if imported.quantization else ""
    print(f"{plan.label}: imported {imported.architecture}{quantized} from {ref.path}"
          f"{f' at {src.revision}' if src.revision else ''} -> {plan.out}")
    return read_artifact(plan.out)
