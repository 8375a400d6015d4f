"""The data settings (the ``data:`` config section) as one typed, validated spec.

Defaults live in ``conf/data/default.yaml``; :func:`read_data_spec` reads the section once and
resolves every source the run uses (``general`` + ``domains``) into a
:class:`~bam_pipeline.data.sources.Source`, so a bad value fails before any data is read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

from bam_pipeline.config.reading import read_section
from bam_pipeline.data.sources import Source, known_sources, resolve_source
from bam_pipeline.errors import BamError, ConfigError
from bam_pipeline.processes import available_cores

BPE_MIN_VOCAB = 259  # 256 byte symbols + the 2 special tokens + at least one merge


@dataclass(frozen=True)
class SplitSpec:
    """Document-level split fractions (by sha1 of the document id; duplicates removed first: data/splits.py)."""

    val: float
    test: float

    def __post_init__(self) -> None:
        for key in ("val", "test"):
            if not 0 < getattr(self, key) < 1:
                raise ConfigError(key, getattr(self, key), "must be a fraction in (0, 1)")
        if self.val + self.test >= 1:
            raise ConfigError("test", self.test, f"val + test must stay below 1 (val={self.val})")


@dataclass(frozen=True)
class TokenizerSpec:
    """A given ``tokenizer.json`` (``path``), or a byte-level BPE trained on the seed mixture."""

    path: Optional[str]
    vocab_size: int
    train_bytes: int
    eos_token: str

    def __post_init__(self) -> None:
        if self.path is not None and not Path(self.path).expanduser().is_file():
            what = "a directory, not a file" if Path(self.path).expanduser().is_dir() else "no such file"
            raise ConfigError("path", self.path, f"{what}; give a tokenizer.json or null to train one")
        if self.path is None and self.vocab_size < BPE_MIN_VOCAB:
            raise ConfigError("vocab_size", self.vocab_size, f"byte-level BPE needs at least {BPE_MIN_VOCAB}")
        if self.train_bytes <= 0:
            raise ConfigError("train_bytes", self.train_bytes, "must be positive")
        if not self.eos_token:
            raise ConfigError("eos_token", self.eos_token, "must name the end-of-document token")


@dataclass(frozen=True)
class MixtureShares:
    """Shares of general text: the seed mixture's, and the branch mixture's (docs/paper.md: 10%)."""

    seed_general: float
    branch_general: float

    def __post_init__(self) -> None:
        for key in ("seed_general", "branch_general"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(key, getattr(self, key), "must be a fraction in [0, 1]")


@dataclass(frozen=True)
class DataSpec:
    """The ``data:`` section as written; :attr:`resolved` gives the source specs of ``general`` + ``domains``."""

    general: str
    domains: tuple[str, ...]
    ood: tuple[str, ...]  # out-of-domain sources: prepared and evaluated, never in a training mixture
    sources: dict[str, Any]  # per-source overrides of conf/domain/<name>.yaml, as written
    max_bytes_per_source: Optional[int]
    split: SplitSpec
    tokenizer: TokenizerSpec
    mixtures: MixtureShares
    rebuild: bool
    # How the data stage works, not what it makes (outside the data's identity: any of them gives the same
    # token shards): worker processes (None: one per core this process may use), and the share of the shards
    # this command prepares (part ``part`` of ``parts``; None with parts > 1: check every part and merge them).
    num_proc: Optional[int]
    parts: int
    part: Optional[int]
    # A shard (one output file per split) closes after about this many bytes of a source's text (part of the
    # data's identity: it names the files).
    shard_bytes: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "domains", tuple(self.domains))
        if self.num_proc is not None and self.num_proc < 1:
            raise ConfigError("num_proc", self.num_proc, "must be a number of worker processes >= 1, or null for one "
                                                         "per core")
        if self.parts < 1:
            raise ConfigError("parts", self.parts, "must be a number of parts >= 1 (1: prepare everything here)")
        if self.part is not None and not 0 <= self.part < self.parts:
            raise ConfigError("part", self.part, f"must be in 0..{self.parts - 1} (data.parts={self.parts}), or null "
                                                 "to merge the parts")
        if self.shard_bytes <= 0:
            raise ConfigError("shard_bytes", self.shard_bytes, "must be a positive number of bytes of text")
        object.__setattr__(self, "ood", tuple(self.ood))
        both = sorted(set(self.ood) & {self.general, *self.domains})
        if both:
            raise ConfigError("ood", list(self.ood), f"{both[0]} is also trained on; an out-of-domain source must not be")
        if not self.domains:
            raise ConfigError("domains", list(self.domains), "list the branch domains, e.g. [code, math, law]")
        if len(set(self.domains)) != len(self.domains):
            raise ConfigError("domains", list(self.domains), "names a domain twice")
        if self.general in self.domains:
            raise ConfigError("general", self.general, "is also a branch domain; the general source must be apart")
        if self.max_bytes_per_source is not None and self.max_bytes_per_source <= 0:
            raise ConfigError("max_bytes_per_source", self.max_bytes_per_source, "must be positive or null")
        typos = sorted(set(self.sources) - set(self.source_names) - set(known_sources(self.sources)))
        if typos:  # an override of no known domain that does not define a source either
            raise ConfigError(f"sources.{typos[0]}", self.sources[typos[0]],
                              f"names no domain (known: {', '.join(known_sources(self.sources))}) and defines "
                              "no source.type")
        assert self.resolved  # every source resolves now, not when it is first read
        self._check_distinct_corpora()

    def _check_distinct_corpora(self) -> None:
        """Two sources reading one corpus would hold the same texts: the later one in the dedupe order would
        lose every document to the other (splits.py), so it is refused here, before anything is read."""
        first: dict[tuple[Any, ...], str] = {}
        for name in self.dedupe_order:
            spec = self.resolved[name]
            other = first.setdefault(spec.corpus(), name)
            if other != name:
                raise BamError(f"data.sources.{other}.source and data.sources.{name}.source read the same corpus "
                               f"({spec.corpus_name()}): every document of {name!r} would be a duplicate of one that "
                               f"{other!r} keeps; point one of them at other data")

    @cached_property
    def resolved(self) -> dict[str, Source]:
        """Every source of the run: its domain config merged with ``sources``."""
        return {n: resolve_source(n, self.sources) for n in self.source_names}

    @property
    def source_names(self) -> list[str]:
        """The general source, the domains, then the out-of-domain sources."""
        return list(dict.fromkeys([self.general, *self.domains, *self.ood]))

    @property
    def dedupe_order(self) -> list[str]:
        """The order in which sources claim texts found in several of them (data/splits.py): the domains (in
        ``domains`` order), then the general source, then the out-of-domain sources. The most specific
        source keeps a text (code found in web text stays code), and a text any stage trains on is never
        scored as out-of-domain."""
        return list(dict.fromkeys([*self.domains, self.general, *self.ood]))

    @property
    def workers(self) -> int:
        """The worker processes the data stage uses: ``num_proc``, else the cores this process may run on."""
        if self.num_proc is not None:
            return self.num_proc
        return len(available_cores())

    @property
    def merging(self) -> bool:
        """Whether this command only checks and merges parts prepared by other commands."""
        return self.parts > 1 and self.part is None

    def cap(self, source: str) -> int | None:
        """Bytes of text read from ``source``: its own ``max_bytes``, else ``max_bytes_per_source``."""
        own = self.resolved[source].max_bytes
        return own if own is not None else self.max_bytes_per_source

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["resolved"] = {n: s.to_dict() for n, s in self.resolved.items()}
        return out


def read_data_spec(node: Any) -> DataSpec:
    """The ``data:`` section (a DictConfig or mapping) as a DataSpec, or one ConfigError line."""
    return read_section(DataSpec, node, "data")
