"""Peak resident memory of a Hugging Face checkpoint import, against the size of the imported
weights plus the interpreter's baseline (target: at most 1.5x).

Builds a random ~100M-parameter ``LlamaForCausalLM`` with transformers, saves it with
``save_pretrained`` (bfloat16 and float32, one file and shards), then imports each save in a fresh
process with :func:`bam_pipeline.interop.import_hf_model`, in the training dtype of the row.

safetensors memory-maps its files and the pages it touches count in RSS until the file is closed.
The measured peak is therefore RSS *minus the file-backed pages*: ``RssAnon + RssShmem`` from
``/proc/self/status``, sampled every millisecond by a thread during the import. The baseline is the
same quantity after ``import torch, bam_pipeline.interop`` and before the import. The table also
shows the kernel's peak RSS with the mapped pages (``VmHWM``) for reference; it includes the
shared libraries' pages and the whole mapped checkpoint.

    python benchmarks/bench_import.py [--dir DIR] [--keep]

Linux only (reads /proc). Needs transformers (to build the checkpoint), not for the import itself.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")

# hidden 640, 12 layers, 10 heads / 5 KV heads, SwiGLU 1728, 32k vocabulary, untied: 96.2M parameters
LLAMA_100M = dict(vocab_size=32000, hidden_size=640, intermediate_size=1728, num_hidden_layers=12,
                  num_attention_heads=10, num_key_value_heads=5, max_position_embeddings=2048,
                  tie_word_embeddings=False)
# (checkpoint dtype, shard size or None, import dtype)
ROWS = [
    ("bfloat16", None, "bfloat16"),
    ("bfloat16", "50MB", "bfloat16"),
    ("bfloat16", None, "float32"),
    ("float32", None, "float32"),
    ("float32", "100MB", "bfloat16"),
]
TARGET = 1.5


def _status_kb(*fields: str) -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in fields:
            out[key] = int(rest.split()[0])
    return out


def sampled(load: Callable[[], T]) -> tuple[T, dict[str, float]]:
    """``load()`` in this (fresh) process with a thread sampling its anonymous and shared memory every
    millisecond: its result, and the seconds it took, the baseline before it, the peak and the kernel's
    high-water mark (sizes in MB)."""

    def anon() -> int:
        s = _status_kb("RssAnon", "RssShmem")
        return s["RssAnon"] + s["RssShmem"]

    baseline = anon()
    peak = [baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], anon())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    result = load()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    peak[0] = max(peak[0], anon())
    kb = 1024
    return result, {"seconds": seconds, "baseline_mb": baseline / kb, "peak_mb": peak[0] / kb,
                    "hwm_mb": _status_kb("VmHWM")["VmHWM"] / kb}


def measure(path: str, dtype_name: str) -> dict[str, float]:
    """In this (fresh) process: baseline, then import with a sampler thread; sizes in MB."""
    import torch

    from bam_pipeline.interop import import_hf_model

    imported, memory = sampled(lambda: import_hf_model(path, dtype=getattr(torch, dtype_name)))
    weights = sum(t.numel() * t.element_size() for t in imported.state_dict.values())
    return {"params": sum(t.numel() for t in imported.state_dict.values()), "weights_mb": weights / 1024**2,
            **memory, "files": len(imported.files) - 1}


def build(root: Path) -> dict[tuple[str, str | None], Path]:
    """The random Llama saved once per (dtype, shard size) of ROWS."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_100M)).eval()
    paths = {}
    for dtype, shard, _ in ROWS:
        key = (dtype, shard)
        if key not in paths:
            paths[key] = root / f"llama100m-{dtype}-{shard or 'single'}"
            model.to(getattr(torch, dtype)).save_pretrained(paths[key], **({"max_shard_size": shard} if shard else {}))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, help="where to save the checkpoints (default: a temporary directory)")
    parser.add_argument("--measure", nargs=2, metavar=("PATH", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or Path(tmp)
        paths = build(root)
        print(f"bench_import: random LlamaForCausalLM {LLAMA_100M['hidden_size']}d x {LLAMA_100M['num_hidden_layers']} "
              "layers; peak = max sampled RssAnon+RssShmem (RSS minus mapped file pages) during the import;\n"
              f"ratio = peak / (weights in the import dtype + baseline); target <= {TARGET}. VmHWM: peak RSS with "
              "mapped pages and shared libraries.\n")
        head = ("checkpoint", "files", "import as", "params", "weights MB", "baseline MB", "peak MB", "ratio",
                "VmHWM MB", "s")
        print(" | ".join(head))
        print(" | ".join("---" for _ in head))
        worst = 0.0
        for dtype, shard, import_dtype in ROWS:
            out = subprocess.run([sys.executable, __file__, "--measure", str(paths[(dtype, shard)]), import_dtype],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.splitlines()[-1])
            ratio = r["peak_mb"] / (r["weights_mb"] + r["baseline_mb"])
            worst = max(worst, ratio)
            print(" | ".join([
                f"{dtype} {'shards of ' + shard if shard else 'single file'}", str(r["files"]), import_dtype,
                f"{r['params'] / 1e6:.1f}M", f"{r['weights_mb']:.0f}", f"{r['baseline_mb']:.0f}", f"{r['peak_mb']:.0f}",
                f"{ratio:.2f}", f"{r['hwm_mb']:.0f}", f"{r['seconds']:.2f}",
            ]))
        print(f"\nworst ratio {worst:.2f} ({'within' if worst <= TARGET else 'ABOVE'} the {TARGET}x target)")


if __name__ == "__main__":
    main()
