"""Flags declared once: the `shoal` command line and `--config FILE` come from the config
dataclasses' fields (`peer/config.py`, `peer/protocol_config.py`).

Each field made with `setting(...)` carries its help text, flag name, kind and parser.
`add_section` turns a section into an argparse group; `load_toml` reads a TOML file whose
keys are the long flag names with `_` for `-`, at top level or in a table named after
their group (`[run]`, `[protocol]`, ...); `settle` merges defaults ← file ← flags given
on the command line (argparse's own defaults are suppressed, so that a flag the user did
not type never overrides the file) and builds the sections.
"""

from __future__ import annotations

import argparse
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, Field, field, fields
from pathlib import Path
from typing import Any


def setting(
    default: Any = None,
    help: str = "",
    *,
    flag: str | None = None,
    kind: type | None = None,
    choices: tuple[str, ...] | None = None,
    parse: Any = None,
    metavar: str | None = None,
    factory: Any = None,
) -> Any:
    """A config field with what its flag needs: `help` (its documentation), the flag name
    (default: the field's name less a `_s` suffix, `-` for `_`), the value's `kind` (for
    None defaults), `choices`, and `parse` for values given as text."""
    metadata = {
        "help": help,
        "flag": flag,
        "kind": kind,
        "choices": choices,
        "parse": parse,
        "metavar": metavar,
    }
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def stage_list(flag: str, none_ok: bool = False):
    """A parser for FLAG's comma-separated stage numbers ("none": no stage, with `none_ok`)."""

    def parse(value: str) -> tuple[int, ...]:
        if none_ok and value == "none":
            return ()
        try:
            return tuple(int(part) for part in value.split(","))
        except ValueError:
            example = "1,3,5 or none" if none_ok else "1,3,5"
            raise ValueError(
                f"{flag} wants stage numbers separated by commas, e.g. {example}; got {value!r}"
            ) from None

    return parse


def flag_name(f: Field) -> str:
    """The command-line flag of config field `f`."""
    return f.metadata.get("flag") or "--" + f.name.removesuffix("_s").replace("_", "-")


def key_name(f: Field) -> str:
    """The `--config` file key of config field `f`: its flag with `_` for `-`."""
    return flag_name(f).removeprefix("--").replace("-", "_")


def flag_fields(section: type) -> list[Field]:
    """The fields of `section` that have a flag (made with `setting`)."""
    return [f for f in fields(section) if "help" in f.metadata]


def _default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    return None  # a default_factory (e.g. a random peer id): made when the section is built


def _kind(f: Field) -> type:
    default = _default(f)
    return f.metadata.get("kind") or (type(default) if default is not None else str)


def _parse_text(f: Field, text: str) -> Any:
    parse = f.metadata.get("parse")
    if parse is not None:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return _kind(f)(text)


def add_section(
    parser: argparse.ArgumentParser,
    group_name: str,
    section: type,
    skip: Iterable[str] = (),
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """One argparse group of `section`'s flags (dest = the field's key), defaults suppressed."""
    group = parser.add_argument_group(group_name, (section.__doc__ or "").strip().splitlines()[0])
    for f in flag_fields(section):
        if f.name in skip:
            continue
        default = (defaults or {}).get(f.name, _default(f))
        shown = (
            "" if default in (None, False) or callable(default) else f" (default: {_show(default)})"
        )
        help_text = f.metadata["help"].replace("%", "%%") + shown
        kwargs: dict[str, Any] = {
            "dest": key_name(f),
            "help": help_text,
            "default": argparse.SUPPRESS,
        }
        if _kind(f) is bool:  # --resume / --no-resume: a flag can undo the file's `true`
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = lambda text, f=f: _parse_text(f, text)
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
            else:
                kwargs["metavar"] = _metavar(f)
        group.add_argument(flag_name(f), **kwargs)


def _metavar(f: Field) -> str:
    """The value's placeholder in --help; the unit where the flag name lost it (`_s`)."""
    if f.metadata.get("metavar"):
        return f.metadata["metavar"]
    for suffix, unit in (("_s", "SECONDS"), ("_bytes", "BYTES"), ("_ms", "MS")):
        if f.name.endswith(suffix):
            return unit
    kind = _kind(f)
    if kind is int:
        return "N"
    if kind is float:
        return "X"
    return key_name(f).upper()


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return str(value)


def load_toml(
    path: str | Path, groups: Mapping[str, type], extra: Mapping[str, Iterable[str]] = ()
) -> dict[str, Any]:
    """The settings of a `--config` file as {key: value}, checked against `groups` (group
    name → section) and `extra` (group name → keys of settings that are not in a section)."""
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except OSError as exc:
        raise ValueError(f"--config {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"--config {path}: not valid TOML: {exc}") from None
    known = {
        name: {key_name(f): f for f in flag_fields(section)} for name, section in groups.items()
    }
    for name, keys in dict(extra).items():
        known.setdefault(name, {}).update({key: None for key in keys})
    owner = {key: name for name, keys in known.items() for key in keys}
    values: dict[str, Any] = {}
    for key, value in document.items():
        if isinstance(value, dict):
            if key not in known:
                raise ValueError(
                    f"--config {path}: unknown table [{key}]; the groups are {sorted(known)}"
                )
            for inner, inner_value in value.items():
                if inner not in known[key]:
                    where = f" (it belongs in [{owner[inner]}])" if inner in owner else ""
                    raise ValueError(f"--config {path}: [{key}] has no setting {inner!r}{where}")
                values[inner] = _checked(path, known[key][inner], inner, inner_value)
        elif key in owner:
            values[key] = _checked(path, known[owner[key]][key], key, value)
        else:
            raise ValueError(f"--config {path}: unknown setting {key!r}")
    return values


def _checked(path: str | Path, f: Field | None, key: str, value: Any) -> Any:
    """A file value as its field holds it (text parsed as the flag would be)."""
    if f is None:
        return value
    kind = _kind(f)
    if isinstance(value, str) and kind is not str:
        try:
            return _parse_text(f, value)
        except (argparse.ArgumentTypeError, ValueError) as exc:
            raise ValueError(f"--config {path}: {key}: {exc}") from None
    if isinstance(value, list) and f.metadata.get("parse") is not None:
        return tuple(value)
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ValueError(f"--config {path}: {key} must be {kind.__name__}, got {value!r}")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ValueError(
            f"--config {path}: {key} must be one of {', '.join(choices)}, got {value!r}"
        )
    return value


def build_section(section: type, values: Mapping[str, Any], **fixed: Any) -> Any:
    """`section` with the settings found in `values` (by key), then `fixed` (by field)."""
    kwargs = {f.name: values[key_name(f)] for f in flag_fields(section) if key_name(f) in values}
    return section(**{**kwargs, **fixed})


def settle(
    args: argparse.Namespace, groups: Mapping[str, type], extra: Mapping[str, Iterable[str]] = ()
) -> dict[str, Any]:
    """The settings of this command: the `--config` file's, overridden by the flags given."""
    given = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    from_file = load_toml(args.config, groups, extra) if getattr(args, "config", None) else {}
    return {**from_file, **given}
