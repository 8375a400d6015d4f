"""Data benchmark: peak memory and tokens/s of ``stage=data`` on synthetic corpora of 0.25, 1 and 4 GB of
text, with ``data.num_proc=1``, ``data.num_proc=2`` and the single-process stage before them (commit 1a86aaf).

Each corpus is four sources (general, code, math, law), a quarter of the text each, as folders of JSONL files
(``{"text": ...}``, about 64 MB of text a file). A document is 200-8000 bytes of lines drawn by a seeded
generator from one embedded corpus (general: Shakespeare, code: the stdlib, math: sympy docstrings, law:
licences), so dedupe keeps nearly every document and each corpus is the same for a seed. The stage runs
the tiny experiment's data settings on it (a 4096-token BPE trained on 2 MB), uncapped, no out-of-domain
source, ``data.rebuild=true``, in a fresh process:

- ``num_proc=1``, ``num_proc=2``: this checkout's code, ``TOKENIZERS_PARALLELISM=false`` (one tokenizer
  thread per process);
- ``1a86aaf``: the code before the streamed data stage, extracted from git (``git archive``) and run with
  ``TOKENIZERS_PARALLELISM`` unset, as it ran (its ``encode_batch`` uses every core). It holds the corpus in
  memory: a size this machine cannot hold is skipped with the reason (and without git, all of its rows).

Peak memory: the summed resident memory (RSS) of the stage's process and all its descendants, sampled every
0.2 s (shared pages count once per process that maps them). Tokens/s: the manifest's tokens (every source
and split) over the stage process's wall time (start-up and tokenizer training included). Corpus generation
is timed apart and is in no row.

    python benchmarks/bench_data.py [--sizes 0.25,1,4] [--variants num_proc=1,num_proc=2,1a86aaf] [--no-reference]
                                     [--workdir DIR] [--keep] [--json PATH]

Everything is written under a temporary directory (in ``--workdir``, default the system's), removed at the
end, on failure and on Ctrl-C unless ``--keep``. Linux (``os.sched_getaffinity``); the reference rows need ``git``.
"""

from __future__ import annotations

import argparse
import bisect
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("general", "code", "math", "law")
DOC_BYTES = (200, 8000)  # a document's text, in UTF-8 bytes (uniform between these)
FILE_BYTES = 64_000_000  # text bytes per JSONL file (a file closes after about this much)
CHUNK_BYTES = 4_000_000  # text bytes generated at a time
SAMPLE_S = 0.2  # the memory sampler's interval
REFERENCE = "1a86aaf"  # the single-process data stage, before the streamed one
# The reference holds the corpus in memory (its texts as str, an Arrow copy, dedupe hashes): from 0.002 to 0.05 GB
# its peak grew by 3.7 bytes per byte of text (609 -> 785 MB). A size needing 10x its text (growth above 0.05 GB
# unmeasured, and an out-of-memory kill on a shared machine ends other work too) beyond the memory available is
# skipped.
REFERENCE_RSS_PER_BYTE = 10
GB = 1e9
MB = 1e6
VARIANTS = ("num_proc=1", "num_proc=2", REFERENCE)
# Targets of issue 22's acceptance: the largest corpus's peak over the smallest's (num_proc=1 and 2), and
# num_proc=2's tokens/s over num_proc=1's
PEAK_TARGET = 1.25
SPEEDUP_TARGET = 1.6


# ---- the corpus ------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinePool:
    """Lines to draw documents from: JSON-escaped (ready to write) and their UTF-8 sizes."""

    escaped: list[str]
    nbytes: np.ndarray  # int64, one per line

    @classmethod
    def of(cls, lines: list[str]) -> LinePool:
        return cls([json.dumps(line, ensure_ascii=False)[1:-1] for line in lines],
                   np.fromiter((len(line.encode()) for line in lines), dtype=np.int64, count=len(lines)))


def line_pool(name: str) -> LinePool:
    """The lines of the embedded corpus ``name`` (read through bam_pipeline.data.sources), trailing blanks cut."""
    from bam_pipeline.data.sources import resolve_source

    lines = [line.rstrip() for doc in resolve_source(name).read_all() for line in doc.text.splitlines()]
    return LinePool.of([line for line in lines if line])


def documents(pool: LinePool, rng: np.random.Generator, text_bytes: int) -> Iterator[tuple[str, int, int]]:
    """(JSONL records, their text bytes, their count) of random documents until ``text_bytes`` of text: each
    document lines at random indices of ``pool`` joined with newlines, up to the line that brings it to a
    length drawn uniformly from DOC_BYTES (so at least that long)."""
    mean_line = float(pool.nbytes.mean()) + 1
    escaped, left = pool.escaped, text_bytes
    while left > 0:
        chunk = min(left, CHUNK_BYTES)
        idx = rng.integers(0, len(escaped), size=int((chunk + DOC_BYTES[1]) / mean_line * 1.2) + 16)
        ends = np.cumsum(pool.nbytes[idx] + 1).tolist()  # text bytes after each line, its newline counted
        lengths = rng.integers(DOC_BYTES[0], DOC_BYTES[1] + 1, size=int(chunk / DOC_BYTES[0]) + 1).tolist()
        records, start, before, done = [], 0, 0, 0  # before: ends[start - 1]
        for length in lengths:
            stop = bisect.bisect_left(ends, before + length + 1) + 1  # the text is length bytes at line stop - 1
            if stop > len(ends) or done >= chunk:
                break
            records.append('{"text": "' + "\\n".join([escaped[i] for i in idx[start:stop].tolist()]) + '"}\n')
            done += ends[stop - 1] - before - 1  # no newline after a document's last line
            start, before = stop, ends[stop - 1]
        left -= done
        yield "".join(records), done, len(records)


@dataclass(frozen=True)
class Corpus:
    root: Path  # <root>/<source>/part-NNNNN.jsonl
    text_bytes: int
    documents: int
    files: int
    seconds: float


def write_corpus(root: Path, text_bytes: int, pools: dict[str, LinePool], seed: int = 0) -> Corpus:
    """Write a corpus of ``text_bytes`` of text, a quarter per source of ``pools``, as folders of JSONL files."""
    start = time.perf_counter()
    total = docs = files = 0
    for k, (name, pool) in enumerate(pools.items()):
        folder = root / name
        folder.mkdir(parents=True)
        rng = np.random.default_rng([seed, k])
        out, in_file, part = None, 0, 0
        try:
            for text, written, n in documents(pool, rng, text_bytes // len(pools)):
                if out is None or in_file >= FILE_BYTES:
                    if out is not None:
                        out.close()
                    out, in_file = (folder / f"part-{part:05d}.jsonl").open("w", encoding="utf-8"), 0
                    part += 1
                    files += 1
                out.write(text)
                in_file += written
                total += written
                docs += n
        finally:
            if out is not None:
                out.close()
    return Corpus(root, total, docs, files, time.perf_counter() - start)


# ---- measuring a process tree -------------------------------------------------------------------
def tree_rss(pid: int) -> int:
    """The summed RSS in bytes of process ``pid`` and all its descendants (those that exit meanwhile count 0)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


class PeakTreeRSS:
    """Samples :func:`tree_rss` of ``pid`` every ``interval`` seconds on a thread until :meth:`stop`, which
    returns the largest sample (bytes); ``samples`` counts them."""

    def __init__(self, pid: int, interval: float = SAMPLE_S) -> None:
        self.pid, self.interval = pid, interval
        self.peak = self.samples = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, tree_rss(self.pid))
            self.samples += 1
            if self._done.wait(self.interval):
                return

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return self.peak


# ---- running the stage ----------------------------------------------------------------------------
@dataclass
class Row:
    size_gb: float
    variant: str
    wall_s: Optional[float] = None
    tokens: Optional[int] = None
    peak_rss_mb: Optional[float] = None
    samples: int = 0
    skipped: str = ""  # why the row was not measured
    tokens_per_s_vs_num_proc_1: Optional[float] = None
    peak_vs_smallest: Optional[float] = None

    @property
    def tokens_per_s(self) -> Optional[float]:
        return self.tokens / self.wall_s if self.tokens is not None and self.wall_s else None


def stage_command(corpus: Path, run: str, variant: str) -> list[str]:
    """``python -m bam_pipeline stage=data`` over the corpus's four folders, uncapped, with no out-of-domain
    source, rebuilt; ``data.num_proc`` for this checkout's variants."""
    if any(c in str(corpus) for c in "'\\"):
        raise SystemExit(f"bench_data: the work directory {corpus} holds a quote or backslash, which a Hydra "
                         "override cannot carry here; pass --workdir without them")
    sources = [f"+data.sources.{name}={{source:{{type:files,path:'{corpus / name}'}},max_bytes:null}}"
               for name in SOURCES]
    num_proc = [f"data.{variant}"] if variant != REFERENCE else []
    return [sys.executable, "-m", "bam_pipeline", "stage=data", "experiment=tiny", f"run={run}", "data.rebuild=true",
            "data.max_bytes_per_source=null", "data.ood=[]", *sources, *num_proc]


def stage_env(work: Path, src: Path, variant: str) -> dict[str, str]:
    """Offline hubs, the stages root and temporary files in the work directory, ``src`` on the path; one
    tokenizer thread per process except for the reference, which runs as it did (the variable unset)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", BAM_STAGES_DIR=str(work / "stages"),
               TMPDIR=str(work / "tmp"), HF_DATASETS_CACHE=str(work / "hf-datasets"), PYTHONPATH=str(src))
    if variant == REFERENCE:
        env.pop("TOKENIZERS_PARALLELISM", None)
    else:
        env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def manifest_tokens(manifest: Path) -> int:
    """Every source's and split's tokens in a data manifest."""
    stats = json.loads(manifest.read_text())["stats"]
    return sum(split["tokens"] for by_split in stats.values() for split in by_split.values())


def _kill_tree(proc: subprocess.Popen) -> None:
    """End the stage process we started and its descendants (Ctrl-C or a failure while it runs)."""
    try:
        root = psutil.Process(proc.pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def run_stage(work: Path, corpus: Path, src: Path, size_gb: float, variant: str) -> Row:
    """Run ``stage=data`` on the corpus in a fresh process; wall time, peak tree RSS and tokens. Its output goes
    to a log file in the work directory (its last lines shown if it fails); its run directory is removed."""
    run = f"bench-{size_gb:g}gb-{variant.replace('=', '')}"
    (work / "tmp").mkdir(parents=True, exist_ok=True)
    log = work / f"{run}.log"
    with log.open("w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(stage_command(corpus, run, variant), cwd=work, env=stage_env(work, src, variant),
                                stdout=out, stderr=subprocess.STDOUT)
        sampler = PeakTreeRSS(proc.pid)
        try:
            code = proc.wait()
        finally:
            peak = sampler.stop()
            if proc.poll() is None:
                _kill_tree(proc)
        wall = time.perf_counter() - start
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise SystemExit(f"bench_data: stage=data ({variant}, {size_gb:g} GB) exited with {code}; the last lines of "
                         f"its output:\n{tail}")
    tokens = manifest_tokens(work / "stages" / run / "data" / "manifest.json")
    shutil.rmtree(work / "stages" / run)
    shutil.rmtree(work / "tmp")
    return Row(size_gb, variant, round(wall, 2), tokens, round(peak / MB, 1), sampler.samples)


def extract_reference(dest: Path) -> tuple[Optional[Path], str]:
    """(the package source of commit REFERENCE, extracted under ``dest``, or None; why not)."""
    try:
        tar = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", REFERENCE, "src"],
                             capture_output=True, check=True).stdout
    except FileNotFoundError:
        return None, "git is not installed"
    except subprocess.CalledProcessError as e:
        return None, f"{REPO} is not a git checkout holding commit {REFERENCE} ({e.stderr.decode().strip()})"
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(dest, filter="data")
    return dest / "src", ""


def reference_room(text_bytes: int) -> str:
    """Why the reference cannot run on a corpus of ``text_bytes`` here ('' when it can)."""
    need, have = REFERENCE_RSS_PER_BYTE * text_bytes, psutil.virtual_memory().available
    if need <= have:
        return ""
    return (f"it holds the corpus in memory (~{REFERENCE_RSS_PER_BYTE}x its text: {need / GB:.0f} GB) and "
            f"{have / GB:.0f} GB are available")


# ---- the table ----------------------------------------------------------------------------------
def compare(rows: list[Row]) -> None:
    """Fill each row's tokens/s over num_proc=1's at its size and its peak over its variant's smallest size."""
    speed = {r.size_gb: r.tokens_per_s for r in rows if r.variant == "num_proc=1" and r.tokens_per_s}
    smallest: dict[str, float] = {}
    for r in sorted((r for r in rows if r.peak_rss_mb), key=lambda r: r.size_gb):
        smallest.setdefault(r.variant, r.peak_rss_mb)
        r.peak_vs_smallest = round(r.peak_rss_mb / smallest[r.variant], 3)
        if r.size_gb in speed:
            r.tokens_per_s_vs_num_proc_1 = round(r.tokens_per_s / speed[r.size_gb], 3)


def table(rows: list[Row]) -> str:
    smallest = min((r.size_gb for r in rows), default=0)
    head = ("size GB", "variant", "wall s", "tokens", "tokens/s", "peak RSS MB", "tokens/s vs num_proc=1",
            f"peak vs {smallest:g} GB")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        if r.skipped:
            lines.append(" | ".join([f"{r.size_gb:g}", r.variant, f"skipped: {r.skipped}", *[""] * 5]))
            continue
        lines.append(" | ".join([
            f"{r.size_gb:g}", r.variant, f"{r.wall_s:.1f}", f"{r.tokens:,}", f"{r.tokens_per_s:,.0f}",
            f"{r.peak_rss_mb:,.0f}", f"{r.tokens_per_s_vs_num_proc_1:.2f}" if r.tokens_per_s_vs_num_proc_1 else "",
            f"{r.peak_vs_smallest:.2f}" if r.peak_vs_smallest else "",
        ]))
    return "\n".join(lines)


def verdicts(rows: list[Row]) -> list[str]:
    """The acceptance targets, each with its measured value."""
    out = []
    sizes = sorted({r.size_gb for r in rows if r.peak_rss_mb})
    for variant in ("num_proc=1", "num_proc=2"):
        by_size = {r.size_gb: r for r in rows if r.variant == variant and r.peak_rss_mb}
        if len(sizes) > 1 and sizes[0] in by_size and sizes[-1] in by_size:
            ratio = by_size[sizes[-1]].peak_rss_mb / by_size[sizes[0]].peak_rss_mb
            out.append(f"{variant}: peak at {sizes[-1]:g} GB / at {sizes[0]:g} GB = {ratio:.2f} "
                       f"({'within' if ratio <= PEAK_TARGET else 'ABOVE'} the {PEAK_TARGET}x target)")
    for r in rows:
        if r.variant == "num_proc=2" and r.tokens_per_s_vs_num_proc_1:
            ok = r.tokens_per_s_vs_num_proc_1 >= SPEEDUP_TARGET
            out.append(f"{r.size_gb:g} GB: num_proc=2 / num_proc=1 tokens/s = {r.tokens_per_s_vs_num_proc_1:.2f} "
                       f"({'meets' if ok else 'BELOW'} the {SPEEDUP_TARGET}x target)")
    return out


# ---- main -----------------------------------------------------------------------------------------
def _sizes(text: str) -> list[float]:
    try:
        sizes = [float(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of GB, e.g. 0.25,1,4") from None
    if not sizes or any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError(f"{text!r}: every size must be a positive number of GB")
    return sorted(sizes)


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the clean-ups, as Ctrl-C does


def main(argv: Optional[list[str]] = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=_sizes, default=[0.25, 1.0, 4.0], help="corpus sizes in GB of text "
                        "(10^9 bytes; default 0.25,1,4)")
    parser.add_argument("--no-reference", action="store_true", help=f"skip the rows of the code at {REFERENCE}")
    parser.add_argument("--workdir", type=Path, help="where to make the temporary directory (default: the system's)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (corpora, logs)")
    parser.add_argument("--json", type=Path, help="also write the rows here as JSON")
    parser.add_argument("--seed", type=int, default=0, help="the corpus generator's seed")
    parser.add_argument("--variants", type=lambda t: [v.strip() for v in t.split(",") if v.strip()],
                        default=list(VARIANTS), help=f"the rows to run, of {', '.join(VARIANTS)} (default: all)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; use some of {', '.join(VARIANTS)}")
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-data-", dir=args.workdir)).resolve()
    rows: list[Row] = []
    try:
        start = time.perf_counter()
        pools = {name: line_pool(name) for name in SOURCES}
        print(f"bench_data: line pools of {', '.join(f'{n} {len(p.escaped):,}' for n, p in pools.items())} lines "
              f"read in {time.perf_counter() - start:.1f} s; work directory {work}", flush=True)
        variants = [v for v in VARIANTS if v in args.variants]
        reference_src, why_not = ((None, "--no-reference") if args.no_reference or REFERENCE not in variants
                                  else extract_reference(work / "ref"))
        if reference_src is None and REFERENCE in variants:
            variants.remove(REFERENCE)
            print(f"bench_data: no rows for {REFERENCE} ({why_not})", flush=True)
        for size in args.sizes:
            corpus = write_corpus(work / "corpus", int(size * GB), pools, args.seed)
            print(f"{size:g} GB: wrote {corpus.text_bytes / MB:,.0f} MB of text, {corpus.documents:,} documents in "
                  f"{corpus.files} files in {corpus.seconds:.1f} s ({corpus.text_bytes / MB / corpus.seconds:.0f} "
                  "MB/s; not in the rows)", flush=True)
            for variant in variants:
                room = reference_room(corpus.text_bytes) if variant == REFERENCE else ""
                if room:
                    rows.append(Row(size, variant, skipped=room))
                    print(f"{size:g} GB {variant}: skipped: {room}", flush=True)
                    continue
                row = run_stage(work, corpus.root, REPO / "src" if variant != REFERENCE else reference_src, size,
                                variant)
                rows.append(row)
                print(f"{size:g} GB {variant}: {row.wall_s:.1f} s, {row.tokens:,} tokens, {row.tokens_per_s:,.0f} "
                      f"tokens/s, peak {row.peak_rss_mb:,.0f} MB ({row.samples} samples)", flush=True)
            if not args.keep:
                shutil.rmtree(corpus.root)
    finally:
        if args.keep:
            print(f"bench_data: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    compare(rows)
    cpus = len(os.sched_getaffinity(0))
    print(f"\nstage=data on synthetic corpora (4 sources, JSONL, documents of {DOC_BYTES[0]}-{DOC_BYTES[1]} bytes of "
          f"embedded-corpus lines, seed {args.seed}); {cpus} CPUs, {psutil.virtual_memory().total / GB:.0f} GB "
          "memory.\npeak RSS: summed over the stage's process tree, sampled every "
          f"{SAMPLE_S} s; tokens/s: all tokens over the stage process's wall time.\n")
    print(table(rows))
    print("\nnum_proc=1, num_proc=2: this checkout, TOKENIZERS_PARALLELISM=false (one tokenizer thread a process)."
          + (f" {REFERENCE}: the single-process data stage before the streamed one, TOKENIZERS_PARALLELISM unset (its "
             f"encode_batch uses all {cpus} CPUs)." if any(r.variant == REFERENCE for r in rows) else ""))
    for line in verdicts(rows):
        print(line)
    if args.json:
        args.json.write_text(json.dumps({"rows": [{**asdict(r), "tokens_per_s": r.tokens_per_s} for r in rows],
                                         "cpus": cpus, "seed": args.seed}, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate)
    try:
        main()
    except KeyboardInterrupt:
        print("bench_data: interrupted", file=sys.stderr)
        sys.exit(130)
