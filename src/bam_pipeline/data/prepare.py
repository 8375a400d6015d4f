"""The data stage: read every source, dedupe (within and across sources), split, train or load the tokenizer,
tokenise, store, record.

``prepare_data`` writes ``<out_dir>/`` atomically (a temporary sibling renamed into place) with
``tokenizer.json``, ``tokens/<source>/<split>/`` (Arrow) and ``manifest.json`` (config hash, source
fingerprint, tokenizer hash, per-source per-split stats, file checksums). A second call with the
same config and unchanged sources verifies the checksums and reuses the directory.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

from tokenizers import Tokenizer
from tqdm.auto import tqdm

from bam_pipeline.data import sources as src
from bam_pipeline.data import storage
from bam_pipeline.data import tokenizer as tk
from bam_pipeline.data.mixtures import stage_mixture
from bam_pipeline.data.spec import DataSpec
from bam_pipeline.data.splits import SPLITS, SourceSplits, dedupe_and_split
from bam_pipeline.errors import BamError
from bam_pipeline.store.artifacts import MANIFEST, publish, write_manifest
from bam_pipeline.store.files import canonical_hash, changed_keys, sha256_file, verify_checksums

FORMAT_VERSION = 1
# Revision of the rules that turn sources into documents. It is recorded in the manifest, outside the config
# hash: data prepared under older rules is prepared again, and where the files come out the same (sources
# with no text in common, no byte-order marks) the data's hash and everything made from it stay as they were.
# 2: exact duplicates removed across sources, not only within each (data/splits.py); a file's byte-order mark
# is not part of its text.
REVISION = 2
TOKENIZER_FILE = "tokenizer.json"


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
    _streams: dict[tuple[str, str], storage.TokenStream] = field(default_factory=dict, repr=False)

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(str(self.dir / TOKENIZER_FILE))

    def stream(self, source: str, split: str) -> storage.TokenStream:
        """The memory-mapped token stream of one split (opened once)."""
        if source not in self.sources:
            raise BamError(f"source {source!r} is not in the prepared data {self.dir}; it has {', '.join(self.sources)}")
        key = (source, split)
        if key not in self._streams:
            self._streams[key] = storage.TokenStream(self.dir, source, split)
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
    keys = changed_keys(old, hashed)
    parts = [f"data config changed: {', '.join(keys)}"] if keys else []
    if manifest.get("sources_hash") != sources_hash:
        parts.append("a source's contents changed")
    if manifest.get("revision", 1) != REVISION:
        parts.append(f"the data stage's rules changed (revision {manifest.get('revision', 1)}, now {REVISION}: exact "
                     "duplicates removed across sources too, byte-order marks dropped)")
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


def prepare_data(spec: DataSpec, out_dir: Path, *, seed_tokenizer: tk.SeedTokenizer | None = None,
                 progress: bool = True) -> PreparedData:
    """Prepare (or reuse) everything the run's training stages read; see the module docstring.
    ``seed_tokenizer``: tokenise with an imported seed checkpoint's tokenizer instead of training one."""
    out_dir = Path(out_dir)
    hashed, sources_hash = _identity(spec, seed_tokenizer)
    config_hash = canonical_hash(hashed)
    if (out_dir / MANIFEST).is_file() and not spec.rebuild:
        old = open_prepared(out_dir, verify=False)  # a corrupt manifest says how to rebuild
        if is_current(old.manifest, hashed, sources_hash):
            verify_files(old)
            _say(progress, f"reusing prepared data in {out_dir} (config {config_hash[:12]})")
            return old
        _say(progress, f"{out_dir}: {changes(old.manifest, hashed, sources_hash)} since it was prepared; "
                       "preparing it again (the models made from it stay up to date if its files come out the same)")
    t0 = time.time()
    skipped: dict[str, str] = {}
    for name, source in spec.resolved.items():
        try:
            source.check_available()
        except src.SourceUnavailable as e:
            if name not in spec.ood:
                raise
            skipped[name] = str(e)
            _say(progress, f"out-of-domain source {name!r} skipped: {e}")
    reading = ((name, tqdm(src.iter_documents(spec.resolved[name], spec.cap(name)), desc=f"reading {name}",
                           unit=" docs", disable=not progress))
               for name in spec.dedupe_order if name not in skipped)
    deduped: dict[str, SourceSplits] = {}
    for result in dedupe_and_split(reading, spec.split.val, spec.split.test):
        _check_nonempty(spec.resolved[result.source], result, spec.cap(result.source))
        deduped[result.source] = result
    docs = {name: deduped[name].splits for name in spec.resolved if name in deduped}  # general, domains, ood
    if seed_tokenizer is not None:
        tok, eos, eos_token, encode = (seed_tokenizer.tokenizer, seed_tokenizer.eos_id, seed_tokenizer.eos_token,
                                       seed_tokenizer.encode)
        _say(progress, f"tokenising with the seed checkpoint's tokenizer (eos {eos_token!r} = {eos})")
    else:
        tok = tk.as_run_tokenizer(_tokenizer(spec, docs, progress))
        eos_token = spec.tokenizer.eos_token
        eos = tk.eos_id(tok, eos_token)

        def encode(texts: list[str]) -> list[list[int]]:
            return [e.ids + [eos] for e in tok.encode_batch(texts)]

    vocab = tok.get_vocab_size()

    stats: dict[str, dict[str, dict[str, int]]] = {}
    with publish(out_dir) as tmp, _datasets_progress(progress):
        tok.save(str(tmp / TOKENIZER_FILE))
        for name, by_split in docs.items():
            stats[name] = {}
            for split in SPLITS:
                d = by_split[split]
                tokens = storage.write_split(
                    tmp, name, split, [x.id for x in d], [x.text for x in d], encode, vocab, progress
                )
                stats[name][split] = {
                    "documents": len(d), "bytes": sum(len(x.text.encode()) for x in d), "tokens": tokens,
                }
        write_manifest(
            tmp, stage="data", name="data", config=hashed, settings=spec.to_dict(), sources_hash=sources_hash,
            revision=REVISION, sources=list(docs), ood=[s for s in spec.ood if s in docs], skipped_sources=skipped,
            duplicates_removed={n: r.duplicates for n, r in deduped.items()},
            cross_source_duplicates_removed={n: r.kept_elsewhere for n, r in deduped.items()},
            tokenizer_hash=tk.tokenizer_hash(tok),
            vocab_size=vocab, eos_id=eos, eos_token=eos_token, stats=stats,
            wall_time_s=round(time.time() - t0, 2),
        )
    return open_prepared(out_dir, verify=False)


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
    print(f"data in {prepared.dir} (tokenizer {prepared.tokenizer_hash[:12]}, vocab {prepared.vocab_size})", file=out)


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


def _check_nonempty(source: src.Source, result: SourceSplits, cap: int | None) -> None:
    """Every split of a source holds a document after duplicate removal; else a BamError saying why not."""
    total, name = result.documents, source.name
    elsewhere = ", ".join(f"{n} in {other!r}" for other, n in result.kept_elsewhere.items())
    if total == 0 and elsewhere:
        raise BamError(f"every document of source {name!r} ({source.type}) is also in an earlier source, which keeps "
                       f"it ({elsewhere}; a text is kept by one source, the domains first, in data.domains order, "
                       f"then data.general, then data.ood); give data.sources.{name}.source data of its own")
    if total == 0:
        raise BamError(f"source {name!r} ({source.type}) yielded no documents; check its source settings")
    removed = f"; {result.cross_source_duplicates} more were removed as duplicates ({elsewhere})" if elsewhere else ""
    for split in SPLITS:
        if not result.splits[split]:
            raise BamError(
                f"source {name!r}: the {split} split is empty ({total} documents, max_bytes={cap}{removed}); "
                "give the source more data (raise max_bytes) or raise data.split fractions"
            )


def _tokenizer(spec: DataSpec, docs: dict[str, dict[str, list[src.Document]]], progress: bool) -> Tokenizer:
    """Load the given tokenizer.json, or train BPE on the seed mixture of the train splits."""
    t = spec.tokenizer
    if t.path:
        return tk.load_tokenizer(t.path, t.eos_token)
    budget = t.train_bytes
    mix = stage_mixture("seed", spec)

    def sample() -> Iterator[str]:
        for name, p in mix.items():
            left = p * budget
            for doc in docs[name]["train"]:
                if left <= 0:
                    break
                text = doc.text[: int(left)]
                left -= len(text.encode())
                yield text

    _say(progress, f"training byte-level BPE (vocab {t.vocab_size}) on {budget / 1e6:.1f} MB of the seed mix")
    return tk.train_bpe(sample(), t.vocab_size)


@contextmanager
def _datasets_progress(enabled: bool) -> Iterator[None]:
    import datasets

    was = datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if was else datasets.disable_progress_bars)()
