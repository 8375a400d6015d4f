"""Reading one config section into its typed spec, once, at the config boundary.

:func:`read_section` lets OmegaConf check and convert every value against the spec's dataclass
(types, unknown keys, missing keys), then the dataclass checks its own values (``__post_init__``
raises :class:`~bam_pipeline.errors.ConfigError`). Every problem ends in one ConfigError whose
message names the full key, e.g. ``invalid train.batch_size=0: must be positive``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar, get_args, get_origin, get_type_hints

from omegaconf import DictConfig, ListConfig, OmegaConf, SCMode
from omegaconf.errors import OmegaConfBaseException

from bam_pipeline.errors import ConfigError

T = TypeVar("T")


def plain(node: Any) -> Any:
    """A config node as plain Python data, interpolations resolved (dicts, lists and scalars pass through)."""
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def _value_at(data: Any, dotted: str) -> Any:
    for part in dotted.split(".") if dotted else []:
        if isinstance(data, Mapping) and part in data:
            data = data[part]
        elif isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
        else:
            return None
    return data


def _dataclass_hints(cls: type) -> dict[str, Any]:
    """Field name -> resolved type annotation, in declaration order."""
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _typed(cls: type) -> DictConfig:
    """The structured config of ``cls`` with its defaults, writable (frozen dataclasses are read-only)."""
    base = OmegaConf.structured(cls)
    OmegaConf.set_readonly(base, False)
    return base


def read_section(cls: type[T], node: Any, section: str, **fixed: Any) -> T:
    """The spec ``cls`` of config section ``section`` (``node``: a DictConfig or a mapping).

    ``fixed`` gives fields that do not come from the section (e.g. a variant's ``name``). Nested
    dataclass fields are read the same way, so their errors name their full key too.
    """
    data = plain(node)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(section, data, f"must be a mapping of {cls.__name__} settings")
    hints = _dataclass_hints(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise ConfigError(f"{section}.{unknown[0]}", data[unknown[0]], f"unknown setting (known: {', '.join(hints)})")
    try:
        merged = OmegaConf.merge(_typed(cls), {k: v for k, v in data.items() if not _is_spec(hints[k])}, fixed)
        values = OmegaConf.to_container(merged, resolve=True, structured_config_mode=SCMode.DICT)
    except OmegaConfBaseException as e:
        key = str(getattr(e, "full_key", "") or "")
        raise ConfigError(f"{section}.{key}" if key else section, _value_at(data, key), _problem(e)) from None
    kwargs = {}
    for name, hint in hints.items():
        if _is_spec(hint):
            raw = data[name] if name in data else _default(cls, name)
            optional = type(None) in get_args(hint)
            kwargs[name] = None if raw is None and optional else read_section(_spec_type(hint), raw, f"{section}.{name}")
        elif OmegaConf.is_missing(merged, name):
            raise ConfigError(f"{section}.{name}", None, "is required")
        else:
            value = values[name]
            kwargs[name] = tuple(value) if get_origin(hint) is tuple and isinstance(value, list) else value
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise e.under(section) from None


_TYPE_WORDS = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false", "String": "a string"}


def _problem(e: OmegaConfBaseException) -> str:
    """OmegaConf's complaint in a few words: ``must be an integer``, ``must be a list``."""
    msg = str(getattr(e, "msg", e)).splitlines()[0]
    if " could not be converted to " in msg:  # "Value 'abc' of type 'str' could not be converted to Integer"
        target = msg.rsplit(" could not be converted to ", 1)[1].strip()
        return f"must be {_TYPE_WORDS.get(target, target)}"
    if msg.startswith("Incompatible value 'None'"):
        return "must be set (not null)"
    if "is not a ListConfig" in msg:
        return "must be a list"
    if "is not a DictConfig" in msg or "Cannot assign" in msg and "DictConfig" in msg:
        return "must be a mapping"
    return msg


def _spec_type(hint: Any) -> type:
    """The dataclass of a field typed ``Spec`` or ``Spec | None``."""
    if dataclasses.is_dataclass(hint):
        return hint
    return next(a for a in get_args(hint) if dataclasses.is_dataclass(a))


def _is_spec(hint: Any) -> bool:
    """A field holding a nested spec: ``Spec`` or ``Spec | None`` (not a list or dict of them)."""
    if dataclasses.is_dataclass(hint):
        return True
    args = get_args(hint)
    return type(None) in args and any(dataclasses.is_dataclass(a) for a in args)


def _default(cls: type, name: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default is not dataclasses.MISSING:
        return dataclasses.asdict(f.default) if dataclasses.is_dataclass(f.default) else f.default
    if f.default_factory is not dataclasses.MISSING:
        made = f.default_factory()
        return dataclasses.asdict(made) if dataclasses.is_dataclass(made) else made
    return {}
