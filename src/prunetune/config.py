"""Typed configuration from YAML/JSON: unknown keys and wrong types fail before any work.

:func:`from_mapping` builds a dataclass from a plain mapping, recursing into nested
dataclasses and lists of them, and raises :class:`UsageError` naming the offending key,
the value, and what is accepted.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from prunetune.errors import UsageError

T = TypeVar("T")


def load_mapping(path: str | Path) -> dict:
    """Read a YAML or JSON file into a dict (clear error if missing or malformed)."""
    import yaml

    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"Config file {path} does not exist; give a YAML or JSON file.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UsageError(f"Config file {path} is not valid YAML/JSON: {err}") from err
    if not isinstance(data, dict):
        raise UsageError(f"Config file {path} must hold a mapping of keys to values at the top level, not {type(data).__name__}.")
    return data


def _type_name(tp) -> str:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    if origin is dict or tp is dict:
        return "mapping"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp, where: str):
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for option in get_args(tp):
            try:
                return _convert(value, option, where)
            except UsageError as err:
                errors.append(err)
        raise UsageError(f"{where}: {value!r} is not a {_type_name(tp)}.")
    if tp is type(None):
        if value is None:
            return None
        raise UsageError(f"{where}: {value!r} is not null.")
    if origin is typing.Literal:
        if value in get_args(tp):
            return value
        raise UsageError(f"{where}: {value!r} is not accepted; use {_type_name(tp)}.")
    if origin is list:
        if not isinstance(value, list):
            raise UsageError(f"{where}: {value!r} is not a list ({_type_name(tp)}).")
        (item,) = get_args(tp)
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UsageError(f"{where}: {value!r} is not a mapping.")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UsageError(f"{where}: expected a mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}, got {value!r}.")
        return from_mapping(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    raise UsageError(f"{where}: {value!r} is not a {_type_name(tp)}.")


def from_mapping(cls: type[T], data: dict, where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise UsageError."""
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise UsageError(f"{where}: unknown key {unknown[0]!r}. Accepted keys: {', '.join(names)}.")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:
        missing = [f.name for f in dataclasses.fields(cls) if f.init and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING and f.name not in data]
        raise UsageError(f"{where}: missing required key(s) {', '.join(missing)}.") from err


def to_mapping(obj) -> dict:
    return dataclasses.asdict(obj)
