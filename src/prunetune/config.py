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
    """Read a YAML or JSON file into a dict.

    Raises:
        UsageError: a missing file, malformed YAML/JSON, a top level that is not a mapping,
            or a value that contains itself (a YAML anchor used inside its own value).
    """
    import json

    import yaml

    path = Path(path).expanduser()
    if path.is_dir():
        raise UsageError(f"Config file {path} is a folder; give a YAML or JSON file.")
    if not path.is_file():
        raise UsageError(f"Config file {path} does not exist; give a YAML or JSON file.")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, UnicodeDecodeError) as err:  # json.JSONDecodeError is a ValueError
        raise UsageError(f"Config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {err}") from err
    except RecursionError as err:
        raise UsageError(f"Config file {path} is nested too deeply to read; a config is a few levels of keys.") from err
    if not isinstance(data, dict):
        raise UsageError(f"Config file {path} must hold a mapping of keys to values at the top level, not "
                         f"{type(data).__name__} ({str(data)[:60]!r}).")
    check_acyclic(data, str(path))
    return data


def check_acyclic(data, where: str = "config") -> None:
    """Raise :class:`UsageError` if ``data`` contains itself.

    ``yaml.safe_load("a: &x [*x]")`` builds a list that holds itself; converting or hashing
    it would recurse until RecursionError. Shared (non-cyclic) aliases are fine.
    """
    # Iterative depth-first walk; `on_path` holds the containers between the root and here.
    on_path: set[int] = set()
    stack: list[tuple[Any, str, bool]] = [(data, "", False)]
    while stack:
        value, key, leaving = stack.pop()
        if leaving:
            on_path.discard(id(value))
            continue
        if not isinstance(value, (dict, list)):
            continue
        if id(value) in on_path:
            raise UsageError(f"{where}: {key or 'the top level'} refers to itself (a YAML anchor used inside its own "
                             "value, such as `a: &x [*x]`); write the value out instead of the alias.")
        on_path.add(id(value))
        stack.append((value, key, True))
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for child_key, child in items:
            label = f"{key}[{child_key}]" if isinstance(value, list) else (f"{key}.{child_key}" if key else str(child_key))
            stack.append((child, label, False))


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
        return _build(tp, value, where)
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
    """Build dataclass ``cls`` from ``data``; unknown keys, wrong types and cycles raise UsageError."""
    if not isinstance(data, dict):
        raise UsageError(f"{where}: expected a mapping with keys {', '.join(f.name for f in dataclasses.fields(cls))}, "
                         f"got {type(data).__name__} {str(data)[:60]!r}.")
    check_acyclic(data, where)
    return _build(cls, data, where)


def _build(cls: type[T], data: dict, where: str) -> T:
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
