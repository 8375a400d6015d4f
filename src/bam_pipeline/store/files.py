"""Files of the store: content hashes, one atomic writer, JSON and JSON-lines.

Every file the pipeline writes outside a published artifact directory goes through
:func:`atomic_path`: written beside its final name and renamed into place, so a reader sees the old
or the new content, never half.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from bam_pipeline.errors import BamError


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def canonical_hash(obj: Any) -> str:
    """sha256 of the canonical JSON form of ``obj`` (sorted keys): stable across machines."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def changed_keys(old: dict[str, Any], new: dict[str, Any], *, ignore: tuple[str, ...] = ()) -> list[str]:
    """The top-level keys whose values differ (by canonical hash) between two configs, sorted."""
    return sorted(k for k in set(old) | set(new)
                  if k not in ignore and canonical_hash(old.get(k)) != canonical_hash(new.get(k)))


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write; renamed onto ``path`` on success, removed on error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def file_path_problem(path: Path) -> str | None:
    """Why ``path`` cannot be written as a file by :func:`write_text` (None: it can): it is a directory, or a
    folder on its way is a file. Asked before the work whose result goes there, not after it."""
    path = Path(path)
    if path.is_dir():
        return f"is a directory; name a file in it, e.g. {path / 'continuations.jsonl'}"
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        return f"cannot be made: {blocker} is a file, not a directory"
    return None


def write_text(path: Path, text: str) -> None:
    """Replace ``path``'s content atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, obj: Any, *, sort_keys: bool = False) -> None:
    """Write ``obj`` as indented JSON atomically (key order kept unless ``sort_keys``)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=str) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file (empty when it does not exist); a line cut short by a kill is skipped."""
    if not Path(path).is_file():
        return []
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def checksums(directory: Path, *, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file below ``directory`` (relative POSIX path -> digest), sorted."""
    directory = Path(directory)
    return {rel: sha256_file(directory / rel) for rel in relative_files(directory) if rel not in exclude}


def verify_checksums(directory: Path, files: dict[str, str], *, what: str, fix: str,
                     exclude: tuple[str, ...] = ()) -> None:
    """Every file of ``files`` present below ``directory`` with its digest, and every other file below it (but
    ``exclude``, the manifest) listed in ``files``: a file the list leaves out would be read unchecked. Else a
    BamError naming the first bad file, ``what`` it belongs to and the ``fix``."""
    directory = Path(directory)
    unlisted = [rel for rel in relative_files(directory) if rel not in files and rel not in exclude]
    if unlisted:
        raise BamError(f"{what} in {directory} holds {unlisted[0]}, which its manifest's file list does not name "
                       f"(its checksum cannot be checked: the manifest or the directory was changed); {fix}")
    for rel, digest in files.items():
        f = directory / rel
        if not f.is_file():
            raise BamError(f"{what} in {directory} is missing {rel}; {fix}")
        if sha256_file(f) != digest:
            raise BamError(f"checksum mismatch for {f} ({what}: file changed or corrupt); {fix}")


def relative_files(directory: Path) -> list[str]:
    """Every file below ``directory`` as a relative POSIX path, sorted."""
    directory = Path(directory)
    return [p.relative_to(directory).as_posix() for p in sorted(directory.rglob("*")) if p.is_file()]
