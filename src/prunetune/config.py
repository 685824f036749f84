"""Typed configuration from YAML/JSON: unknown keys and wrong types fail before any work.

:func:`from_mapping` builds a dataclass from a plain mapping, recursing into nested
dataclasses and lists of them, and raises :class:`UsageError` naming the offending key,
the value, and what is accepted. :func:`coerce` is its conversion of one value, which
``prunetune recover`` argument files use too.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from prunetune.errors import UsageError

T = TypeVar("T")


MAX_EXPANDED_VALUES = 100_000  # a config holds hundreds of values; YAML aliases can make billions of a few lines


def load_mapping(path: str | Path) -> dict:
    """Read a YAML or JSON file into a dict.

    Raises:
        UsageError: a missing file, malformed YAML/JSON, a key given twice in one mapping, a top
            level that is not a mapping, aliases that expand to more than
            :data:`MAX_EXPANDED_VALUES` values (a "billion laughs" file), or a value that contains
            itself (a YAML anchor used inside its own value).
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
        data = json.loads(text, object_pairs_hook=_unique_keys) if path.suffix == ".json" else _load_yaml(text, path)
    except UsageError:  # a key given twice, aliases that expand too far: already said for people
        raise
    except (yaml.YAMLError, ValueError, UnicodeDecodeError) as err:  # json.JSONDecodeError is a ValueError
        raise UsageError(f"Config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {err}") from err
    except RecursionError as err:
        raise UsageError(f"Config file {path} is nested too deeply to read; a config is a few levels of keys.") from err
    if not isinstance(data, dict):
        raise UsageError(f"Config file {path} must hold a mapping of keys to values at the top level, not "
                         f"{type(data).__name__} ({str(data)[:60]!r}).")
    check_acyclic(data, str(path))
    return data


def _unique_keys(pairs: list) -> dict:
    """A JSON object's pairs as a dict; a key given twice is refused (json keeps the last silently)."""
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"the key {key!r} is given twice in one object; give each key once")
        seen.add(key)
    return dict(pairs)


def _load_yaml(text: str, path: Path):
    """``yaml.safe_load`` that refuses a key given twice and aliases that expand too far, before building anything."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen: dict = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden
                        continue
                    key = self.construct_object(key_node, deep=True)
                    try:
                        first = seen.setdefault(key, key_node.start_mark.line + 1)
                    except TypeError:  # an unhashable key: SafeLoader reports it
                        continue
                    if first != key_node.start_mark.line + 1:
                        raise UsageError(f"Config file {path}: the key {key!r} is given twice in one mapping, at lines "
                                         f"{first} and {key_node.start_mark.line + 1}; YAML would keep the second "
                                         "silently. Give each key once.")
            return super().construct_mapping(node, deep)

    loader = Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        values = _expanded_values(node, {}, set())
        if values > MAX_EXPANDED_VALUES:
            raise UsageError(f"Config file {path}: its YAML aliases (*name) expand to more than "
                             f"{MAX_EXPANDED_VALUES:,} values (a config holds hundreds); refusing to read it. "
                             "Write the values out, or use fewer nested aliases.")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_values(node, sizes: dict, on_path: set) -> int:
    """How many values ``node`` holds once every alias in it is copied out (an alias is the node it names)."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in on_path:  # a value that contains itself: check_acyclic names it
        return 1
    on_path.add(id(node))
    children = node.value if isinstance(node.value, list) else []
    total = 1
    for child in children:
        for part in (child if isinstance(child, tuple) else (child,)):  # mappings hold (key, value) pairs
            total += _expanded_values(part, sizes, on_path)
            if total > MAX_EXPANDED_VALUES:
                break
    on_path.discard(id(node))
    sizes[id(node)] = total
    return total


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


def type_name(tp) -> str:
    """How messages name a type: ``integer``, ``number or null``, ``list of string``, ``one of 'a', 'b'``."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list of {type_name(get_args(tp)[0])}" if get_args(tp) else "list"
    if origin is dict or tp is dict:
        return "mapping"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    names = {type(None): "null", bool: "true or false", int: "integer", float: "number", str: "string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def coerce(value: Any, tp, where: str, *, others_pass: bool = False):
    """``value`` as type ``tp``, or a :class:`UsageError` naming ``where``, the value and the type expected.

    The one conversion of config values, for pipeline files and ``prunetune recover`` argument
    files alike: bool, int, float, str, None, unions, Literal, lists, mappings, nested dataclasses
    and Any. YAML reads ``1e-4`` as a string: floats accept numeric strings. A bool is never an
    int.

    Args:
        others_pass: other types (HfArgumentParser's enums, say) pass unchanged, for the dataclass
            that declares them to check; False: refused.
    """
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        for option in get_args(tp):
            try:
                return coerce(value, option, where, others_pass=others_pass)
            except UsageError:
                continue
        raise UsageError(f"{where}: {value!r} is not accepted; expected: {type_name(tp)}.")
    if origin is typing.Literal:
        if value in get_args(tp):
            return value
    elif origin is list or tp is list:
        if isinstance(value, list):
            (item,) = get_args(tp) or (Any,)
            return [coerce(v, item, f"{where}[{i}]", others_pass=others_pass) for i, v in enumerate(value)]
    elif origin is dict or tp is dict:
        if isinstance(value, dict):
            return dict(value)
    elif dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UsageError(f"{where}: expected a mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}, "
                             f"got {value!r}.")
        return _build(tp, value, where)
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
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
    elif tp is Any or others_pass:
        return value
    raise UsageError(f"{where}: {value!r} is not accepted; expected: {type_name(tp)}.")


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
    kwargs = {k: coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:
        missing = [f.name for f in dataclasses.fields(cls) if f.init and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING and f.name not in data]
        raise UsageError(f"{where}: missing required key(s) {', '.join(missing)}.") from err
