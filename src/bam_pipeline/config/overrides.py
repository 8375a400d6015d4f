"""The command line's overrides as Hydra composes them, in our one-line errors: an unknown option of a config
group (``domain=physics``), an unknown key (``train.batchsize=4``), a key appended with ``+`` or ``++`` that
the config does not have (``+domian=code``: no stage would read it), an override Hydra cannot parse. Each is
found while composing, before any stage runs or any directory is made; the message names the override and
the fix, with the closest known name (difflib) where there is one.

Sections whose entries are the user's (:data:`OPEN_SECTIONS`) take a whole mapping on the command line as it is
written (``'data.sources={code: {source: {type: files, path: x.jsonl}}}'``): :func:`merged_assignments` spells it
``++`` for Hydra, which merges it with the keys it names, and the section's reader checks those. A single key
such a section does not have yet (``data.sources.code.source.path=x``) is added with ``+``, and the message says so."""

from __future__ import annotations

import difflib
import re
import shlex
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from bam_pipeline.config.files import PRIMARY, conf_dir

# Sections whose keys the user names, so that appending one (``+data.sources.code=...``) is how they are
# used; their readers check those keys (data.sources: a known source, model.overrides: a ModelConfig field,
# branch: a domain with a checkpoint, callbacks: a named Lightning callback). A mapping with ``_target_`` (a logger) is open too: its keys are
# the target's keyword arguments. A mapping assigned at or under one of them is merged (merged_assignments).
OPEN_SECTIONS = ("data.sources", "model.overrides", "branch", "callbacks")
_APPENDED_NOTE = "(+ adds a key the config does not have, and no stage reads it)"
_ABSENT = object()


def describe(error: BaseException, args: Sequence[str]) -> Optional[str]:
    """The one-line message for an error Hydra raised while reading or composing the command line ``args``
    (without a leading ``error: ``), or None when it is not one of those."""
    from hydra.errors import (ConfigCompositionException, MissingConfigException, OverrideParseException,
                              SearchPathException)
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    if isinstance(error, OverrideParseException):
        return unparsable(error.override, error.message)
    if isinstance(error, MissingConfigException) and error.options is not None:
        return _missing_option(error, args)
    cause = error.__cause__
    if (isinstance(error, ConfigCompositionException) and str(error).startswith("Could not override")
            and isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and cause.full_key):
        key = str(cause.full_key)
        override = _override_setting(key, args)
        addable = any(_under(key, s) and key != s for s in OPEN_SECTIONS)
        return unknown_key(key, override, cause.parent_node, _groups(), addable=addable)
    if isinstance(error, (ConfigCompositionException, SearchPathException)):
        return _one_line(error)
    return None


def unparsable(override: str, message: str) -> str:
    """An override Hydra's grammar rejects, most often a value the shell passed on without its quotes."""
    lines = [line for line in message.splitlines() if line.strip() and not line.startswith("See https://hydra.cc")]
    if lines and lines[0].startswith("Error parsing override"):
        lines = lines[1:]
    why = lines[0].strip() if lines else ""
    lexer = "LexerNoViableAltException: "
    if why.startswith(lexer):  # the override, then a caret under the first character the lexer refused
        at = len(lines[1].rstrip()) - len(lexer) - 1 if len(lines) > 1 else -1
        why = f"at {override[at]!r}, character {at + 1}" if 0 <= at < len(override) else ""
    key, sep, value = override.partition("=")
    if sep and value[:1] in "[{":  # a list or a dict: quoting it would make it a string
        return (f"cannot parse the override {override!r}{f' ({why})' if why else ''}: close its brackets and quote "
                f"the whole override for the shell, e.g. '{key}=[a,b]'")
    if sep and key.strip() and " " not in key:
        if value[:1] in "\"'" and value[-1:] != value[:1]:
            value = value[1:]  # an opening quote the shell left, without its closing one
        example, what = shlex.quote(f"{key}={hydra_quoted(value)}"), ""
    else:  # no key=value: a piece of a value the shell split at a space
        example, what = """'generate.prompt="def add(n):"'""", "an override is key=value; "
    return (f"cannot parse the override {override!r}{f' ({why})' if why else ''}: {what}quote the whole override "
            f"for the shell and the value for Hydra, e.g. {example}")


def hydra_quoted(value: str) -> str:
    """``value`` as a double-quoted string of Hydra's override grammar (a quote, and backslashes before a quote
    or the closing quote, escaped with a backslash)."""
    escaped = re.sub(r'(\\*)"', lambda m: m.group(1) * 2 + '\\"', value)
    return '"' + re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped) + '"'


# keys the config had and no longer has: what to set instead
RETIRED = {
    "train.accumulate": "it is derived now: set train.global_batch_tokens (tokens per optimizer step over every "
                        "device) and each device accumulates global_batch_tokens / (train.batch_size x seq_len x "
                        "devices) micro-batches",
}


def unknown_key(key: str, override: str, section: Any, groups: Sequence[str] = (), appended: bool = False,
                addable: bool = False) -> str:
    """``key`` is not in ``section`` (its parent node); ``groups`` are the config groups, candidates at the top.
    ``addable``: ``key`` is a new entry of an open section, which ``+`` adds (the fix says so)."""
    if key in RETIRED:
        return f"{override}: {key} is no longer a setting; {RETIRED[key]}"
    parent, _, leaf = key.rpartition(".")
    keys = [str(k) for k in section.keys()] if isinstance(section, DictConfig) else []
    if not parent:
        keys = [k for k in keys if k != "hydra"]
    groups = [g for g in groups if not parent and g not in keys]
    value = override.partition("=")[2]
    rest = override.partition("=")[0].lstrip("+~").split("@")[0][len(key):]  # a.b.c=1 with a.b unknown: .c
    candidates = [*keys, *groups]
    if rest and isinstance(section, DictConfig):  # a.b.c=1 with b unknown: the candidates that have .c
        candidates = [c for c in candidates if OmegaConf.select(section, c + rest, default=_ABSENT) is not _ABSENT]
    close = closest(leaf, candidates)
    note = f" {_APPENDED_NOTE}" if appended else ""
    add = f"use +{override} to add it (a key the config does not have yet needs +)" if addable else ""
    if close:
        fixes = " or ".join(f"{parent + '.' if parent else ''}{c}{'' if c in groups else rest}={value}"
                            for c in close)
        return f"unknown key '{key}' in {override}: did you mean {fixes}?{note}{f' Or {add}' if add else ''}"
    where = f"{parent} has" if parent else "the config's top level has"
    known = ", ".join(keys) or "no keys"
    also = f"; config groups: {', '.join(groups)}" if groups else ""
    return f"unknown key '{key}' in {override}: {where} {known}{also}; {add or 'drop or correct the override'}{note}"


def merged_assignments(args: Sequence[str]) -> list[str]:
    """The command line ``args`` with each mapping assigned at or under an open section (``data.sources={code:
    {...}}``, ``model.overrides={n_layers: 4}``; a sweep over mappings too) spelt ``++``, argument for argument.
    Hydra then merges the mapping into the section, adding the keys it names (the section's reader checks them),
    where a plain assignment is refused for every key the section does not have yet. Every other argument is
    left as it is (a config group's option, ``branch=hf``, is a name, not a mapping)."""
    return [_merged(arg) for arg in args]


def _merged(arg: str) -> str:
    key = arg.partition("=")[0]
    if not any(_under(key, s) for s in OPEN_SECTIONS):
        return arg  # a flag, an add (+, ++), a deletion (~) or another key
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep
    from hydra.errors import OverrideParseException

    try:
        [override] = OverridesParser.create().parse_overrides([arg])
    except OverrideParseException:
        return arg  # Hydra says what is wrong with it
    value = override.value()
    values = value.list if isinstance(value, ChoiceSweep) else [value]
    return "++" + arg if values and all(isinstance(v, dict) for v in values) else arg


def check_appended_keys(config: DictConfig) -> Optional[str]:
    """The message for the first key appended on the command line (``+key=value``, ``++key=value``) that the
    config composed without the appended keys does not have (outside :data:`OPEN_SECTIONS`), else None.
    ``config`` is the composed config with its ``hydra`` node (a callback's); Hydra must be initialized."""
    from hydra import compose
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    choices = set(config.hydra.runtime.choices)
    appended = [o for o in parsed if (o.is_add() or o.is_force_add()) and o.key_or_group not in choices
                and not any(_under(o.key_or_group, s) for s in OPEN_SECTIONS)]
    if not appended:
        return None
    kept = [o.input_line for o in parsed if all(o is not a for a in appended)]
    searchpath = [o for o in config.hydra.overrides.hydra if o.split("=", 1)[0].lstrip("+~") == "hydra.searchpath"]
    reference = compose(config.hydra.job.config_name or PRIMARY, overrides=[*kept, *searchpath])
    for o in appended:
        key = o.key_or_group
        if OmegaConf.select(reference, key, default=_ABSENT) is not _ABSENT:
            continue  # ++ on a key the config has: an ordinary override
        parts = key.split(".")
        ancestors = [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]
        known = next((a for a in ancestors if OmegaConf.select(reference, a, default=_ABSENT) is not _ABSENT), "")
        node = OmegaConf.select(reference, known) if known else reference
        if any(isinstance(n, DictConfig) and "_target_" in n for n in _nodes(reference, known)):
            continue  # keyword arguments of an instantiated class (a logger): its class checks them
        missing = ".".join(parts[:len(known.split(".")) + 1]) if known else parts[0]
        return unknown_key(missing, o.input_line, node, _groups(), appended=True)
    return None


def closest(name: str, candidates: Sequence[str]) -> list[str]:
    """The candidates nearest to a misspelt ``name`` (difflib's ratio at least 0.6; ties all kept)."""
    scored = [(difflib.SequenceMatcher(None, name, c).ratio(), c) for c in candidates]
    best = max((r for r, _ in scored), default=0.0)
    return [c for r, c in scored if r >= 0.6 and r == best]


def _under(key: str, section: str) -> bool:
    return key == section or key.startswith(section + ".")


def _nodes(cfg: DictConfig, dotted: str) -> list[Any]:
    """The nodes from ``cfg`` down to ``dotted`` (an existing key; "" for the root alone)."""
    parts = dotted.split(".") if dotted else []
    return [cfg, *(OmegaConf.select(cfg, ".".join(parts[:i + 1])) for i in range(len(parts)))]


def _missing_option(error: Any, args: Sequence[str]) -> str:
    """An option of a config group that no search directory has (Hydra lists the ones there are)."""
    group, _, name = str(error.missing_cfg_file).rpartition("/")
    options = [str(o) for o in error.options]
    override = _override_setting(group, args, group=True)
    first = str(error).splitlines()[0]  # "In '<the config whose defaults list picks it>': Could not find ..."
    parent = first.split("'")[1] if first.startswith("In '") else ""
    where = override or (f"config '{parent}'" if parent else "the config")
    close = closest(name, options)
    listed = ", ".join(options) or "none"
    if close:
        fix = f"did you mean {' or '.join(f'{group}={c}' for c in close)}? (options: {listed})"
    else:
        fix = f"use one of: {listed} (or add {group}/{name}.yaml to a config directory)"
    return f"unknown {group} '{name}' in {where}: {fix}"


def _override_setting(key: str, args: Sequence[str], group: bool = False) -> str:
    """The command-line override that sets ``key`` (or a key under it), as the user wrote it; else ``key``."""
    for arg in reversed(args):  # the last one is the one Hydra keeps
        if arg.startswith("-"):
            continue
        name = arg.partition("=")[0].lstrip("+~").split("@")[0]
        if name == key or (not group and name.startswith(key + ".")):
            return arg
    return "" if group else key


def _groups() -> list[str]:
    """The config groups at the top level (``model``, ``domain``, ...) of the running app's search path, or of
    the shipped configs once Hydra has let go of it (an error on the way out)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    def top(loader: Any) -> list[str]:
        return sorted(g for g in loader.list_groups("") if g != "hydra")

    try:
        if GlobalHydra.instance().is_initialized():
            return top(GlobalHydra.instance().config_loader())
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return top(GlobalHydra.instance().config_loader())
    except Exception:  # only suggestions: an error message must not fail in turn
        return []


def _one_line(error: BaseException) -> str:
    """Hydra's own message on one line, without the search path it appends."""
    lines = []
    for line in str(error).splitlines():
        if line.strip() in ("Config search path:", "Search path:"):
            break
        if line.strip():
            lines.append(line.strip())
    cause = error.__cause__
    if cause is not None and str(cause).strip():
        lines.append(f"({str(cause).strip().splitlines()[0]})")
    return " ".join(lines)
