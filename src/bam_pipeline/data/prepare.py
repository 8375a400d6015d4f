"""The data stage: every source streamed through dedupe, split assignment and tokenisation into token
shards, in parallel, resumably, and in parts across machines; then the merge that publishes them.

``prepare_data`` works in a build directory beside ``<out_dir>`` named by the data's identity
(:func:`build_dir`), which every part of the work shares:

1. **Set-up, once** (under a lock, whichever command comes first): one bounded pass over the sources plans
   every source's shards and collects the tokenizer's sample (data/shards.py); the tokenizer is trained on
   it, or given (``data.tokenizer.path``), or an imported seed checkpoint's. ``tokenizer.json``, then
   ``plan.json``, are written.
2. **Shards**: this command's shards (all of them, or part ``data.part`` of ``data.parts``) are prepared by
   ``data.num_proc`` worker processes, each shard published atomically, its record (checksums, counts)
   written last under ``shards/``. A killed command, run again, redoes only the shards that were in flight.
3. **Merge** (unless this command prepares one part): every shard's record checked, copies of a text an
   earlier shard keeps dropped (data/splits.py; only the shards holding such copies are rewritten), and
   ``<out_dir>/`` published atomically with ``tokenizer.json``, ``tokens/<source>/<split>/<shard>.arrow`` and
   ``manifest.json`` (config hash, source fingerprint, tokenizer hash, per-source per-split stats, the shards,
   file checksums). The build directory is then removed.

A second call with the same config and unchanged sources verifies the checksums and reuses ``<out_dir>``.
One process, N processes and N parts give the same files and the same data hash.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import sys
import time
from collections import Counter
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from bam_pipeline.data import sources as src
from bam_pipeline.data import storage
from bam_pipeline.data import tokenizer as tk
from bam_pipeline.data.mixtures import stage_mixture
from bam_pipeline.data import shards
from bam_pipeline.data.shards import CappedRead, ShardPlan, ShardTask, build_shard, part_of
from bam_pipeline.data.spec import DataSpec
from bam_pipeline.data.splits import KEY_BYTES, SPLITS, KeptTexts
from bam_pipeline.errors import BamError
from bam_pipeline.processes import die_with_parent
from bam_pipeline.store.artifacts import MANIFEST, publish, write_manifest
from bam_pipeline.store.files import (atomic_path, canonical_hash, changed_keys, sha256_file, verify_checksums,
                                      write_json)
from bam_pipeline.store.locks import StageLock, wait_while_held

# Version of the prepared data's layout. 2: token shards (tokens/<source>/<split>/<shard>.arrow) listed in the
# manifest, each document's text key stored beside its tokens.
FORMAT_VERSION = 2
# Revision of the rules that turn sources into documents. It is recorded in the manifest, outside the config
# hash: data prepared under older rules is prepared again, and where the files come out the same the data's
# hash and everything made from it stay as they were.
# 2: exact duplicates removed across sources, not only within each (data/splits.py); a file's byte-order mark
# is not part of its text. 3: a Hub dataset's rows without an id are numbered within their data file.
REVISION = 3
TOKENIZER_FILE = "tokenizer.json"
PLAN_FILE = "plan.json"
RECORDS_DIR = "shards"
SPILL_DIR = "read"


def bare_command(args: str) -> str:
    """The command line for ``args`` alone; the stages pass their own, which keeps the user's overrides."""
    return f"python -m bam_pipeline {args}"


def _rebuild_hint(command: Callable[[str], str]) -> str:
    return f"run `{command('stage=data data.rebuild=true')}` to prepare it again"


@dataclass
class PreparedData:
    """A finished data directory: what later stages need to build loaders and check tokenizers."""

    dir: Path
    sources: list[str]
    ood: list[str]  # the out-of-domain sources among them (evaluated, never trained on)
    vocab_size: int
    eos_id: int
    tokenizer_hash: str
    config_hash: str
    stats: dict[str, dict[str, dict[str, int]]]
    manifest: dict[str, Any]
    splits: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # source -> split -> shard files
    _streams: dict[tuple[str, str], storage.TokenStream] = field(default_factory=dict, repr=False)

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(str(self.dir / TOKENIZER_FILE))

    def stream(self, source: str, split: str) -> storage.TokenStream:
        """The memory-mapped token stream of one split: its shards in order (opened once)."""
        if source not in self.sources:
            raise BamError(f"source {source!r} is not in the prepared data {self.dir}; it has {', '.join(self.sources)}")
        key = (source, split)
        if key not in self._streams:
            self._streams[key] = storage.TokenStream([self.dir / f for f in self.splits[source][split]])
        return self._streams[key]


# ---- identity ----------------------------------------------------------------------------------
def _identity(spec: DataSpec, seed_tokenizer: tk.SeedTokenizer | None = None) -> tuple[dict[str, Any], str]:
    """(everything that determines the output, hashed as the config hash; the sources' fingerprint hash)."""
    if seed_tokenizer is not None:
        tokenizer = {"from_seed_checkpoint": seed_tokenizer.identity}
    else:
        tokenizer = dataclasses.asdict(spec.tokenizer)
    if seed_tokenizer is None and spec.tokenizer.path:
        tokenizer["file_sha256"] = sha256_file(Path(spec.tokenizer.path).expanduser())
    hashed = {
        "format": FORMAT_VERSION,
        "specs": {n: s.to_dict() for n, s in spec.resolved.items()},
        "max_bytes_per_source": spec.max_bytes_per_source,
        "shard_bytes": spec.shard_bytes,
        "split": dataclasses.asdict(spec.split),
        "tokenizer": tokenizer,
        "seed_mixture": stage_mixture("seed", spec),
    }
    return hashed, canonical_hash({n: s.fingerprint() for n, s in spec.resolved.items()})


# ---- public API ------------------------------------------------------------------------------
def open_prepared(out_dir: Path, *, verify: bool = True, command: Callable[[str], str] = bare_command
                  ) -> PreparedData:
    """The finished data directory at ``out_dir``; BamError if missing, incomplete or corrupt, saying
    how to prepare it with ``command`` (the stage's command line for its arguments)."""
    out_dir = Path(out_dir)
    mpath = out_dir / MANIFEST
    if not mpath.is_file():
        raise BamError(f"no prepared data in {out_dir}; run `{command('stage=data')}` first")
    try:
        m = json.loads(mpath.read_text())
        if m.get("stage") != "data":
            raise ValueError(f"stage is {m.get('stage')!r}, not 'data'")
        prepared = PreparedData(
            dir=out_dir, sources=list(m["sources"]), ood=list(m.get("ood", [])), vocab_size=int(m["vocab_size"]),
            eos_id=int(m["eos_id"]),
            tokenizer_hash=m["tokenizer_hash"], config_hash=m["config_hash"], stats=m["stats"], manifest=m,
            splits=m.get("splits", {}),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise BamError(f"prepared data in {out_dir} is corrupt (manifest.json: {e}); "
                       f"{_rebuild_hint(command)}") from None
    if verify:
        verify_files(prepared, command)
    return prepared


def verify_files(prepared: PreparedData, command: Callable[[str], str] = bare_command) -> None:
    """Every recorded file present with its checksum; BamError naming the first bad one."""
    verify_checksums(prepared.dir, prepared.manifest.get("files", {}), what="prepared data",
                     fix=_rebuild_hint(command), exclude=(MANIFEST,))


def is_current(manifest: dict[str, Any], hashed: dict[str, Any], sources_hash: str) -> bool:
    """Whether prepared data's manifest records the identity ``_identity`` gives now, under today's rules."""
    return (manifest.get("config_hash") == canonical_hash(hashed) and manifest.get("sources_hash") == sources_hash
            and manifest.get("revision", 1) == REVISION)


def changes(manifest: dict[str, Any], hashed: dict[str, Any], sources_hash: str) -> str:
    """What differs between prepared data's manifest and the identity ``_identity`` gives now."""
    old = manifest.get("config", {})
    if old.get("format") != hashed.get("format"):
        return (f"the prepared data's format changed (version {old.get('format')}, now {hashed.get('format')}: streamed "
                "token shards, each document's text key stored)")
    keys = changed_keys(old, hashed)
    parts = [f"data config changed: {', '.join(keys)}"] if keys else []
    if manifest.get("sources_hash") != sources_hash:
        parts.append("a source's contents changed")
    if manifest.get("revision", 1) != REVISION:
        parts.append(f"the data stage's rules changed (revision {manifest.get('revision', 1)}, now {REVISION}: Hub "
                     "rows without an id numbered within their data file)")
    if "tokenizer" in keys and "from_seed_checkpoint" in (old.get("tokenizer") or {}):
        parts.append("it was prepared with an imported seed checkpoint's tokenizer: give this command the same "
                     "seed=hf seed.path=... to use it")
    return "; ".join(parts) or "data config changed"


def open_current(spec: DataSpec, out_dir: Path, *, seed_tokenizer: tk.SeedTokenizer | None = None,
                 verify: bool = True, command: Callable[[str], str] = bare_command) -> PreparedData:
    """The prepared data at ``out_dir`` if it was made from ``spec`` (and the seed checkpoint's
    tokenizer, when given) and today's sources, else BamError naming what changed and the ``command``
    that prepares it again."""
    prepared = open_prepared(out_dir, verify=False, command=command)
    hashed, sources_hash = _identity(spec, seed_tokenizer)
    if not is_current(prepared.manifest, hashed, sources_hash):
        why = changes(prepared.manifest, hashed, sources_hash)
        raise BamError(f"the prepared data in {out_dir} is not this run's ({why}); run `{command('stage=data')}` "
                       "to prepare it for this config")
    if verify:
        verify_files(prepared, command)
    return prepared


def build_dir(out_dir: Path, key: str) -> Path:
    """Where the shards of prepared data with identity ``key`` are built, beside ``out_dir``: every part of
    the work (on any machine sharing the filesystem) finds the same one."""
    out_dir = Path(out_dir)
    return out_dir.with_name(f"{out_dir.name}.build-{key[:16]}")


def _build_key(hashed: dict[str, Any], sources_hash: str) -> str:
    return canonical_hash({"config": canonical_hash(hashed), "sources": sources_hash, "revision": REVISION})


@dataclass
class Setup:
    """What every part reads from the build directory: the shards' plan and the tokenizer."""

    plans: dict[str, list[ShardPlan]]  # source (in the dedupe order) -> its shards
    n_units: dict[str, int]
    spills: dict[str, Path]  # the capped sources' documents, read once
    tokenizer: Tokenizer  # the run form
    encoder: tk.DocumentEncoder
    eos_id: int
    eos_token: str

    @functools.cached_property
    def tokenizer_hash(self) -> str:
        return tk.tokenizer_hash(self.tokenizer)

    def shards(self) -> list[ShardPlan]:
        return [sp for plans in self.plans.values() for sp in plans]


def prepare_data(spec: DataSpec, out_dir: Path, *, seed_tokenizer: tk.SeedTokenizer | None = None,
                 progress: bool = True, command: Callable[[str], str] = bare_command,
                 wait_s: float = 3600.0) -> PreparedData | None:
    """Prepare (or reuse) everything the run's training stages read; see the module docstring.
    ``seed_tokenizer``: tokenise with an imported seed checkpoint's tokenizer instead of training one.
    Returns None when this command prepares one part (``data.part``), which publishes nothing."""
    out_dir = Path(out_dir)
    hashed, sources_hash = _identity(spec, seed_tokenizer)
    config_hash = canonical_hash(hashed)
    if (out_dir / MANIFEST).is_file() and not spec.rebuild:
        old = open_prepared(out_dir, verify=False, command=command)  # a corrupt manifest says how to rebuild
        if is_current(old.manifest, hashed, sources_hash):
            verify_files(old, command)
            if spec.part is not None:
                _say(progress, f"data: {out_dir} is prepared and merged already; part {spec.part} has nothing to do")
                return None
            _say(progress, f"reusing prepared data in {out_dir} (config {config_hash[:12]})")
            return old
        _say(progress, f"{out_dir}: {changes(old.manifest, hashed, sources_hash)} since it was prepared; "
                       "preparing it again (the models made from it stay up to date if its files come out the same)")
    t0 = time.time()
    build = build_dir(out_dir, _build_key(hashed, sources_hash))
    skipped = _skipped_sources(spec, progress)
    names = [n for n in spec.dedupe_order if n not in skipped]
    for name in names:
        spec.resolved[name].check_parts(spec.parts)
    if spec.rebuild and not spec.merging:
        _forget_shards(build, spec)
    setup = _setup(spec, build, names, seed_tokenizer, progress, wait_s)
    if not spec.merging:
        _prepare_shards(spec, build, setup, progress)
    if spec.part is not None:
        _say(progress, f"data: part {spec.part} of {spec.parts} prepared in {build}; once every part is, run "
                       f"`{command(f'stage=data data.parts={spec.parts}')}` to merge them")
        return None
    return _merge(spec, out_dir, build, setup, hashed=hashed, sources_hash=sources_hash, skipped=skipped,
                  command=command, progress=progress, t0=t0)


def _skipped_sources(spec: DataSpec, progress: bool) -> dict[str, str]:
    """The out-of-domain sources this machine cannot have (skipped, with why); any other one fails."""
    skipped: dict[str, str] = {}
    for name, source in spec.resolved.items():
        try:
            source.check_available()
        except src.SourceUnavailable as e:
            if name not in spec.ood:
                raise
            skipped[name] = str(e)
            _say(progress, f"out-of-domain source {name!r} skipped: {e}")
    return skipped


# ---- set-up: the plan and the tokenizer, once ---------------------------------------------------------
def _setup(spec: DataSpec, build: Path, names: list[str], seed_tokenizer: tk.SeedTokenizer | None,
           progress: bool, wait_s: float) -> Setup:
    """The build directory's plan and tokenizer, made by the first command to get here (under a lock)."""
    plan_path = build / PLAN_FILE
    if not plan_path.is_file():
        build.mkdir(parents=True, exist_ok=True)
        lock = StageLock(build / ".setup.lock", "the data stage's plan and tokenizer")
        if lock.try_acquire() is not None:
            wait_while_held(build / ".setup.lock", "the data stage's plan and tokenizer", timeout_s=wait_s)
        else:
            try:
                if not plan_path.is_file():
                    _make_setup(spec, build, names, seed_tokenizer, progress)
            except BaseException:
                lock.release()
                shutil.rmtree(build, ignore_errors=True)  # no shard was prepared: nothing to keep
                raise
            lock.release()
    if not plan_path.is_file():
        raise BamError(f"the data stage's plan {plan_path} was not written (the command making it stopped); run "
                       "`python -m bam_pipeline stage=data` again")
    plan = json.loads(plan_path.read_text())
    missing = [n for n in names if n not in plan["sources"]]
    if missing:
        raise BamError(f"source {missing[0]!r} is readable here but was not when the data stage was planned in "
                       f"{build} (on another machine?); make it readable there, or delete {build} and run "
                       "`python -m bam_pipeline stage=data` again")
    tok = tk.as_run_tokenizer(Tokenizer.from_file(str(build / TOKENIZER_FILE)))
    eos_id = int(plan["eos_id"])
    return Setup(plans={n: [ShardPlan.from_dict(d) for d in plan["sources"][n]["shards"]] for n in names},
                 n_units={n: int(plan["sources"][n]["units"]) for n in names},
                 spills={n: build / v["spill"] for n, v in plan["sources"].items() if v.get("spill")}, tokenizer=tok,
                 encoder=tk.DocumentEncoder(tok.to_str(), eos_id, post_process=bool(plan["post_process"])),
                 eos_id=eos_id, eos_token=plan["eos_token"])


def _make_setup(spec: DataSpec, build: Path, names: list[str], seed_tokenizer: tk.SeedTokenizer | None,
                progress: bool) -> None:
    """Plan every source's shards (a capped source read once, up to its cap, into a spill file; the sources
    read side by side), then make the tokenizer: trained on the sample, given, or the seed checkpoint's."""
    capped = {n: CappedRead(spec.resolved[n], cap, spec.shard_bytes, build / SPILL_DIR / f"{n}{storage.SHARD_SUFFIX}")
              for n in names if (cap := spec.cap(n)) is not None}
    planned = {n: shards.plan_uncapped(spec.resolved[n], spec.shard_bytes) for n in names if n not in capped}
    reads = list(capped.items())
    with tqdm(total=len(reads), desc="reading capped sources", unit=" sources", disable=not progress or not reads,
              leave=False) as bar:
        for i, result in _run_calls([call for _, call in reads], spec.workers):
            planned[reads[i][0]] = result
            bar.update(1)
    plans = {n: planned[n][0] for n in names}
    for name in names:
        if not plans[name]:
            raise BamError(f"source {name!r} ({spec.resolved[name].type}) yielded no documents; check its source "
                           "settings")
    if seed_tokenizer is not None:
        tok, eos, eos_token = seed_tokenizer.tokenizer, seed_tokenizer.eos_id, seed_tokenizer.eos_token
        _say(progress, f"tokenising with the seed checkpoint's tokenizer (eos {eos_token!r} = {eos})")
    else:
        t = spec.tokenizer
        if t.path:
            raw = tk.load_tokenizer(t.path, t.eos_token)
        else:
            shares = stage_mixture("seed", spec)
            documents = ((n, shards.spilled_documents(capped[n].spill), True) if n in capped else
                         (n, (d for d in spec.resolved[n].read_all() if d.text.strip()), False) for n in names)
            sample = shards.tokenizer_sample(documents, {n: p * t.train_bytes for n, p in shares.items()},
                                             spec.split.val, spec.split.test)
            _say(progress, f"training byte-level BPE (vocab {t.vocab_size}) on {t.train_bytes / 1e6:.1f} MB of the "
                           "seed mix")
            raw = tk.train_bpe((text for name in shares for text in sample.get(name, [])), t.vocab_size)
        tok, eos_token = tk.as_run_tokenizer(raw), t.eos_token
        eos = tk.eos_id(tok, eos_token)
    with atomic_path(build / TOKENIZER_FILE) as tmp:
        tok.save(str(tmp))
    write_json(build / PLAN_FILE, {  # written last: the set-up is complete
        "sources": {n: {"units": planned[n][1], "shards": [sp.to_dict() for sp in plans[n]],
                        "spill": str(capped[n].spill.relative_to(build)) if n in capped else None}
                    for n in names},
        "tokenizer_hash": tk.tokenizer_hash(tok), "eos_id": eos, "eos_token": eos_token,
        "post_process": seed_tokenizer is not None,
    })
    _say(progress, "data: " + ", ".join(f"{n} {len(plans[n])} shard(s)" for n in names))


# ---- shards -----------------------------------------------------------------------------------------
def _record_path(build: Path, shard: ShardPlan) -> Path:
    return build / RECORDS_DIR / shard.source / f"{shard.index:05d}.json"


def read_record(build: Path, shard: ShardPlan) -> dict[str, Any] | None:
    """A shard's record (written once its files are published), None when it has none."""
    path = _record_path(build, shard)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def shard_problem(build: Path, shard: ShardPlan, record: dict[str, Any] | None, tokenizer_hash: str,
                  check_files: bool = True) -> str | None:
    """Why a shard is not done (missing, another tokenizer's, a file missing or changed), None when it is."""
    if record is None:
        return "not prepared"
    if ShardPlan.from_dict(record["plan"]) != shard:
        return "prepared under another plan"
    if record.get("tokenizer_hash") != tokenizer_hash:
        return f"prepared with another tokenizer ({str(record.get('tokenizer_hash'))[:12]}, not {tokenizer_hash[:12]})"
    if "kept" not in record:
        return "prepared by an earlier version of the data stage (no kept-keys file)"
    if check_files:
        for split, f in [*record["splits"].items(), ("copies", record["copies"]), ("kept", record["kept"])]:
            path = build / f["file"]
            if not path.is_file():
                return f"its {split} file {f['file']} is missing"
            if sha256_file(path) != f["sha256"]:
                return f"its {split} file {f['file']} is corrupt (checksum mismatch)"
    return None


def _forget_shards(build: Path, spec: DataSpec) -> None:
    """``data.rebuild=true``: this command's shards are prepared again (a one-process run: everything)."""
    if spec.part is None:
        shutil.rmtree(build, ignore_errors=True)
        return
    for path in (build / RECORDS_DIR).glob("*/*.json"):
        if part_of(int(path.stem), spec.parts) == spec.part:
            path.unlink()


def _prepare_shards(spec: DataSpec, build: Path, setup: Setup, progress: bool) -> None:
    """Prepare this command's shards that are not done yet, ``spec.workers`` at a time."""
    mine = [sp for sp in setup.shards() if spec.part is None or part_of(sp.index, spec.parts) == spec.part]
    if spec.part is not None:
        for name, plans in setup.plans.items():
            if not any(part_of(sp.index, spec.parts) == spec.part for sp in plans):
                _say(progress, f"data: source {name!r} has no shard in part {spec.part} of {spec.parts} (it has "
                               f"{len(plans)}); nothing to prepare for it here")
    todo = []
    for sp in mine:
        why = shard_problem(build, sp, read_record(build, sp), setup.tokenizer_hash)
        if why is not None:
            if why != "not prepared":
                _say(progress, f"data: shard {sp.name} is {why}; preparing it again")
                _record_path(build, sp).unlink(missing_ok=True)
            todo.append(sp)
    if len(todo) < len(mine):
        _say(progress, f"data: resuming in {build}: {len(mine) - len(todo)} of {len(mine)} shards already prepared")
    if not todo:
        return
    tasks = [ShardTask(spec.resolved[sp.source], sp, build, spec.split.val, spec.split.test, setup.encoder,
                       setup.tokenizer.get_vocab_size(), setup.tokenizer_hash, setup.n_units[sp.source],
                       setup.spills.get(sp.source))
             for sp in todo]
    workers = min(spec.workers, len(tasks))
    with tqdm(total=len(tasks), desc=f"preparing shards ({workers} process{'es' if workers > 1 else ''})",
              unit=" shards", disable=not progress, leave=False) as bar:
        for _, record in _run_calls([functools.partial(build_shard, t) for t in tasks], workers):
            shard = ShardPlan.from_dict(record["plan"])
            write_json(_record_path(build, shard), record)
            on_shard_published(record)
            bar.update(1)
    _say(progress, f"data: {len(tasks)} shard(s) prepared by {workers} process{'es' if workers > 1 else ''}")


def on_shard_published(record: dict[str, Any]) -> None:
    """Called after each shard's record is written (a seam for tests that stop the stage there)."""


def _run_calls(calls: list[Callable[[], Any]], workers: int) -> Iterator[tuple[int, Any]]:
    """(index, result) of each call as it finishes: in this process, or in up to ``workers`` worker processes
    (each with one tokenizer thread, so that the processes share the cores instead of the threads of one)."""
    workers = min(workers, len(calls))
    if workers <= 1:
        for i, call in enumerate(calls):
            yield i, call()
        return
    with ProcessPoolExecutor(workers, initializer=_worker_init) as pool:
        pending = {pool.submit(_call_in_worker, call): i for i, call in enumerate(calls)}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    i = pending.pop(future)
                    kind, value = future.result()
                    if kind == "error":
                        raise BamError(value)
                    yield i, value
        finally:
            for future in pending:
                future.cancel()


def _worker_init() -> None:
    """A worker process: one tokenizer thread; on Linux, killed with the stage's process (a SIGKILLed stage
    leaves no worker preparing a shard nobody will record)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    die_with_parent()


def _call_in_worker(call: Callable[[], Any]) -> tuple[str, Any]:
    """``call()`` with a BamError returned as its line (exceptions with other constructors do not always
    survive the way back from a worker process)."""
    try:
        return "result", call()
    except BamError as e:
        return "error", str(e)


# ---- merge: cross-shard dedupe and publish ----------------------------------------------------------
def _part_command(command: Callable[[str], str], spec: DataSpec, part: int) -> str:
    return command(f"stage=data data.parts={spec.parts} data.part={part}")


def _merge(spec: DataSpec, out_dir: Path, build: Path, setup: Setup, *, hashed: dict[str, Any], sources_hash: str,
           skipped: dict[str, str], command: Callable[[str], str], progress: bool, t0: float) -> PreparedData:
    records: dict[str, dict[str, Any]] = {}
    bad: dict[int, list[str]] = {}
    for sp in setup.shards():
        record = read_record(build, sp)
        why = shard_problem(build, sp, record, setup.tokenizer_hash, check_files=spec.merging)
        if why is not None:
            bad.setdefault(part_of(sp.index, spec.parts), []).append(f"{sp.name} {why}")
        else:
            records[sp.name] = record
    if bad:
        parts = "; ".join(f"part {p} ({len(v)} shard(s): {', '.join(v[:3])}{', ...' if len(v) > 3 else ''}): run "
                          f"`{_part_command(command, spec, p)}`" for p, v in sorted(bad.items()))
        others = sorted(str(b) for b in build.parent.glob(f"{out_dir.name}.build-*")
                        if b != build and any((b / RECORDS_DIR).glob("*/*.json")))
        other = (f" ({', '.join(others)} holds shards prepared under another data config or other sources: give "
                 "every part and the merge the same data settings)") if others else ""
        raise BamError(f"cannot merge the prepared data in {build}: {sum(len(v) for v in bad.values())} shard(s) "
                       f"not ready: {parts}{other}")
    kept = KeptTexts()
    drops: dict[str, dict[str, np.ndarray]] = {}  # shard -> split -> rows to drop (only where any)
    within: Counter[str] = Counter()
    elsewhere: dict[str, Counter[str]] = {n: Counter() for n in setup.plans}
    for name, plans in setup.plans.items():
        for sp in tqdm(plans, desc=f"deduplicating {name} across shards", unit=" shards",
                       disable=not progress or len(plans) < 2, leave=False):
            rec = records[sp.name]
            flat = np.fromfile(build / rec["kept"]["file"], dtype=f"S{KEY_BYTES}")  # train, val, test
            bounds = np.cumsum([0] + [rec["splits"][s]["documents"] for s in SPLITS])
            if len(flat) != bounds[-1]:
                raise BamError(f"shard {sp.name} in {build} lists {bounds[-1]} documents but keeps {len(flat)} keys: "
                               f"run `{command('stage=data data.rebuild=true')}`")
            holders = kept.claim(name, flat)
            dropped = holders != ""
            held_by = dict(zip(flat[dropped].tolist(), holders[dropped].tolist()))
            copies = np.fromfile(build / rec["copies"]["file"], dtype=f"S{KEY_BYTES}").tolist()
            for holder in [*held_by.values(), *(held_by.get(k, name) for k in copies)]:
                if holder == name:
                    within[name] += 1
                else:
                    elsewhere[name][holder] += 1
            if dropped.any():
                drops[sp.name] = {s: dropped[bounds[i]:bounds[i + 1]] for i, s in enumerate(SPLITS)}
    order = [n for n in spec.resolved if n in setup.plans]  # general, domains, ood
    stats = {n: {s: storage.SplitCounts() for s in SPLITS} for n in order}
    vocab = setup.tokenizer.get_vocab_size()
    with publish(out_dir) as tmp:
        shutil.copyfile(build / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
        for name in order:
            for sp in setup.plans[name]:
                for split in SPLITS:
                    rel = records[sp.name]["splits"][split]["file"]
                    mask = drops.get(sp.name, {}).get(split)
                    if mask is not None and mask.any():
                        counts = storage.filter_shard(build / rel, tmp / rel, mask, vocab)
                    else:
                        _link_or_copy(build / rel, tmp / rel)
                        f = records[sp.name]["splits"][split]
                        counts = storage.SplitCounts(f["documents"], f["bytes"], f["tokens"])
                    stats[name][split].add(counts)
        for name in order:
            try:
                _check_nonempty(spec.resolved[name], {s: c.documents for s, c in stats[name].items()},
                                dict(elsewhere[name]), spec.cap(name))
            except BamError:
                shutil.rmtree(build, ignore_errors=True)  # these shards cannot be published under this config
                raise
        splits = {n: {s: [records[sp.name]["splits"][s]["file"] for sp in setup.plans[n]] for s in SPLITS}
                  for n in order}
        shards = {n: [{"index": sp.index, "units": records[sp.name]["units"], "text_bytes": sp.text_bytes,
                       "last_docs": sp.last_docs, "duplicates_dropped_at_merge": int(
                           sum(m.sum() for m in drops.get(sp.name, {}).values()))} for sp in setup.plans[n]]
                  for n in order}
        write_manifest(
            tmp, stage="data", name="data", config=hashed, settings=spec.to_dict(), sources_hash=sources_hash,
            revision=REVISION, sources=order, ood=[s for s in spec.ood if s in order], skipped_sources=skipped,
            duplicates_removed={n: within[n] for n in order},
            cross_source_duplicates_removed={n: dict(sorted(elsewhere[n].items())) for n in order},
            tokenizer_hash=setup.tokenizer_hash, vocab_size=vocab, eos_id=setup.eos_id, eos_token=setup.eos_token,
            stats={n: {s: dataclasses.asdict(c) for s, c in stats[n].items()} for n in order},
            splits=splits, shards=shards, shard_count=sum(len(v) for v in setup.plans.values()),
            prepared_in_parts=spec.parts, dedupe_index_bytes=kept.nbytes, wall_time_s=round(time.time() - t0, 2),
        )
    shutil.rmtree(build, ignore_errors=True)
    for other in sorted(build.parent.glob(f"{out_dir.name}.build-*")):  # left by a config given up on
        shutil.rmtree(other, ignore_errors=True)
        _say(progress, f"data: removed {other}, shards prepared under another data config")
    return open_prepared(out_dir, verify=False)


def _link_or_copy(src_path: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src_path`` (no copy of the tokens), a copy where the filesystem has none."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src_path, dst)
    except OSError:
        shutil.copyfile(src_path, dst)


def build_state(spec: DataSpec, out_dir: Path, seed_tokenizer: tk.SeedTokenizer | None = None) -> str | None:
    """The shards done and missing (by part) of data being prepared for ``spec`` beside ``out_dir``, in words;
    None when nothing is being prepared for it."""
    hashed, sources_hash = _identity(spec, seed_tokenizer)
    build = build_dir(out_dir, _build_key(hashed, sources_hash))
    if not (build / PLAN_FILE).is_file():
        return "not started" if build.is_dir() else None
    plan = json.loads((build / PLAN_FILE).read_text())
    shards = [ShardPlan.from_dict(d) for v in plan["sources"].values() for d in v["shards"]]
    by_part: dict[int, list[int]] = {}
    for sp in shards:
        done = shard_problem(build, sp, read_record(build, sp), plan["tokenizer_hash"], check_files=False) is None
        by_part.setdefault(part_of(sp.index, spec.parts), [0, 0])[0 if done else 1] += 1
    total_done = sum(v[0] for v in by_part.values())
    line = f"{total_done} of {len(shards)} shards prepared in {build}"
    if spec.parts > 1:
        line += " (" + ", ".join(f"part {p}: {d} done, {m} missing" for p, (d, m) in sorted(by_part.items())) + ")"
    return line


def print_stats_table(prepared: PreparedData, file: TextIO | None = None) -> None:
    """One table: source, split, documents, MB, tokens (and totals)."""
    out = file or sys.stdout
    rows = [
        (name, split, s["documents"], s["bytes"] / 1e6, s["tokens"])
        for name in prepared.sources
        for split in SPLITS
        for s in [prepared.stats[name][split]]
    ]
    rows.append(("total", "", sum(r[2] for r in rows), sum(r[3] for r in rows), sum(r[4] for r in rows)))
    print(f"{'source':<12} {'split':<6} {'documents':>10} {'MB':>9} {'tokens':>12}", file=out)
    for name, split, n, mb, tokens in rows:
        print(f"{name:<12} {split:<6} {n:>10,} {mb:>9.2f} {tokens:>12,}", file=out)
    print(f"exact duplicates removed: {duplicates_summary(prepared.manifest)}", file=out)
    shards = prepared.manifest.get("shard_count", "?")
    print(f"data in {prepared.dir} ({shards} shards, tokenizer {prepared.tokenizer_hash[:12]}, vocab "
          f"{prepared.vocab_size})", file=out)


def duplicates_summary(manifest: dict[str, Any]) -> str:
    """The duplicates a data manifest records as removed, within each source and across sources, in words."""
    parts = [f"{n:,} within {name}" for name, n in manifest.get("duplicates_removed", {}).items() if n]
    parts += [f"{n:,} from {name} also in {other} (kept there)"
              for name, kept in manifest.get("cross_source_duplicates_removed", {}).items() for other, n in kept.items()]
    return "; ".join(parts) or "none"


# ---- steps -----------------------------------------------------------------------------------
def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, flush=True)


def _check_nonempty(source: src.Source, documents: dict[str, int], kept_elsewhere: dict[str, int],
                    cap: int | None) -> None:
    """Every split of a source holds a document after duplicate removal; else a BamError saying why not."""
    total, name = sum(documents.values()), source.name
    elsewhere = ", ".join(f"{n} in {other!r}" for other, n in kept_elsewhere.items())
    if total == 0 and elsewhere:
        raise BamError(f"every document of source {name!r} ({source.type}) is also in an earlier source, which keeps "
                       f"it ({elsewhere}; a text is kept by one source, the domains first, in data.domains order, "
                       f"then data.general, then data.ood); give data.sources.{name}.source data of its own")
    if total == 0:
        raise BamError(f"source {name!r} ({source.type}) yielded no documents; check its source settings")
    removed = f"; {sum(kept_elsewhere.values())} more were removed as duplicates ({elsewhere})" if elsewhere else ""
    for split in SPLITS:
        if not documents[split]:
            raise BamError(
                f"source {name!r}: the {split} split is empty ({total} documents, max_bytes={cap}{removed}); "
                "give the source more data (raise max_bytes) or raise data.split fractions"
            )

