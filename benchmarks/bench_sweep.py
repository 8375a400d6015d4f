"""Sweep benchmark: two tiny branches (``domain=code,math``) under Hydra's basic launcher (one after the other,
in one process) and under ``hydra/launcher=local`` (side by side, a process each), one CPU thread per job in
both. Issue 23's acceptance: the local launcher's wall time at most 0.65x the basic one's (median of
interleaved pairs), and the weights bit-identical between the two.

The tiny experiment's data and a seed are built once (the seed with a reduced budget: only its weights'
existence matters here). Each run then starts from a copy of them, so every sweep trains both branches from
scratch; ``--branch-tokens`` sets the branches' budget (at least 30 s of training each on a 2-core machine with
the default). The pairs alternate which launcher goes first. Wall time: the whole sweep command, start-up
included. The basic launcher runs with ``OMP_NUM_THREADS=1`` (and the other thread variables of
``bam_pipeline.processes.thread_env``); the local one with ``hydra.launcher.threads=1``, which gives each job
process the same.

    python benchmarks/bench_sweep.py [--pairs 3] [--branch-tokens 240000] [--experiment tiny] [--workdir DIR]
                                     [--keep] [--json PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ("code", "math")
TARGET = 0.65  # issue 23: local / basic wall time
MIN_TRAIN_S = 30.0  # issue 23: each branch trains at least this long


def env_for(root: Path, threads: int | None) -> dict[str, str]:
    env = {**os.environ, "BAM_STAGES_DIR": str(root), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "WANDB_MODE": "offline", "PYTHONPATH": str(REPO / "src")}
    if threads is not None:
        sys.path.insert(0, str(REPO / "src"))
        from bam_pipeline.processes import thread_env

        env.update(thread_env(threads))
    return env


def run(cmd: list[str], env: dict[str, str], what: str) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"bench_sweep: {what} failed (exit {p.returncode}):\n{(p.stdout + p.stderr)[-3000:]}")
    return seconds


def base_args(experiment: str, seed_tokens: int) -> list[str]:
    """Every command's: the experiment, no logger, the seed's reduced budget (the seed the branches start from)."""
    return [f"experiment={experiment}", "logger=none", f"budget.seed.tokens={seed_tokens}"]


def sweep_command(launcher: str, experiment: str, branch_tokens: int, seed_tokens: int) -> list[str]:
    cmd = [sys.executable, "-m", "bam_pipeline", "-m", "stage=branch", f"domain={','.join(DOMAINS)}",
           f"budget.branch.tokens={branch_tokens}", *base_args(experiment, seed_tokens)]
    if launcher == "local":
        cmd[4:4] = ["hydra/launcher=local", "hydra.launcher.threads=1"]
    return cmd


def weights_digest(run_dir: Path) -> dict[str, str]:
    return {d: hashlib.sha256((run_dir / "branch" / d / "model.safetensors").read_bytes()).hexdigest()
            for d in DOMAINS}


def train_seconds(run_dir: Path) -> dict[str, float]:
    return {d: json.loads((run_dir / "branch" / d / "manifest.json").read_text())["wall_time"]["train_s"]
            for d in DOMAINS}


def bench(work: Path, pairs: int, branch_tokens: int, experiment: str, seed_tokens: int) -> dict:
    base = work / "base"
    t0 = time.perf_counter()
    for stage in ("data", "seed"):
        run([sys.executable, "-m", "bam_pipeline", f"stage={stage}", *base_args(experiment, seed_tokens)],
            env_for(base, None), f"stage={stage}")
    print(f"bench_sweep: data and seed built in {time.perf_counter() - t0:.1f} s (not in the rows)", flush=True)
    rows = []
    for i in range(pairs):
        row: dict = {"pair": i + 1}
        order = ("basic", "local") if i % 2 == 0 else ("local", "basic")
        for launcher in order:
            root = work / f"{launcher}-{i}"
            shutil.copytree(base, root)
            seconds = run(sweep_command(launcher, experiment, branch_tokens, seed_tokens),
                          env_for(root, 1 if launcher == "basic" else None), f"the {launcher} sweep")
            run_dir = root / experiment
            row[launcher] = {"wall_s": round(seconds, 2), "train_s": train_seconds(run_dir),
                             "weights": weights_digest(run_dir)}
            shutil.rmtree(root)
        row["ratio"] = round(row["local"]["wall_s"] / row["basic"]["wall_s"], 3)
        row["identical"] = row["local"]["weights"] == row["basic"]["weights"]
        print(f"pair {i + 1} ({' then '.join(order)}): basic {row['basic']['wall_s']:.1f} s, local "
              f"{row['local']['wall_s']:.1f} s, ratio {row['ratio']:.3f}, weights "
              f"{'identical' if row['identical'] else 'DIFFER'}", flush=True)
        rows.append(row)
    return summarize(rows, branch_tokens)


def summarize(rows: list[dict], branch_tokens: int) -> dict:
    """The pairs, the median ratio and the verdicts."""
    ratio = statistics.median(r["ratio"] for r in rows)
    least_train = min(s for r in rows for launcher in ("basic", "local") for s in r[launcher]["train_s"].values())
    identical = all(r["identical"] for r in rows) and len({json.dumps(r["basic"]["weights"]) for r in rows}) == 1
    return {"rows": rows, "branch_tokens": branch_tokens, "median_ratio": round(ratio, 3), "target": TARGET,
            "meets_target": ratio <= TARGET, "least_train_s": least_train, "train_long_enough": least_train >= MIN_TRAIN_S,
            "weights_identical": identical}


def table(result: dict) -> str:
    lines = ["| pair | basic (s) | local (s) | local / basic | branch train s (basic; local) | weights |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        trains = "; ".join(", ".join(f"{d} {r[k]['train_s'][d]:.1f}" for d in DOMAINS) for k in ("basic", "local"))
        lines.append(f"| {r['pair']} | {r['basic']['wall_s']:.1f} | {r['local']['wall_s']:.1f} | {r['ratio']:.3f} | "
                     f"{trains} | {'identical' if r['identical'] else 'differ'} |")
    lines.append(f"\nmedian local/basic {result['median_ratio']:.3f} (target <= {TARGET}: "
                 f"{'met' if result['meets_target'] else 'NOT met'}); shortest branch training "
                 f"{result['least_train_s']:.1f} s (at least {MIN_TRAIN_S:.0f} s: "
                 f"{'yes' if result['train_long_enough'] else 'NO, raise --branch-tokens'}); weights "
                 f"{'bit-identical' if result['weights_identical'] else 'DIFFER'} across launchers and pairs")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--branch-tokens", type=int, default=240_000)
    ap.add_argument("--seed-tokens", type=int, default=20_000)
    ap.add_argument("--experiment", default="tiny")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-sweep-", dir=args.workdir))
    try:
        result = bench(work, args.pairs, args.branch_tokens, args.experiment, args.seed_tokens)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if result["weights_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
