"""Typed-dataclass loading for run configs: strict keys, checked types, ``key.sub=value`` overrides.

``from_dict(Cls, data)`` builds ``Cls`` from plain data (parsed YAML). An unknown key is an error naming it, its
path and the valid keys; a wrong type is an error naming the path, the expected type and the value received.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A config that does not fit its schema; the message names the path (e.g. ``stages[1].grpo.lr``)."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} fits none of {_type_name(tp)}")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, path)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        return [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        _, val_tp = typing.get_args(tp) or (str, Any)
        return {str(k): _convert(val_tp, v, f"{path}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-5 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported field type {_type_name(tp)}")


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ``ConfigError``."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        where = f"{path}: " if path else ""
        raise ConfigError(f"{where}unknown key {unknown[0]!r} in {cls.__name__}; valid keys: {sorted(fields)}")
    kwargs = {k: _convert(hints[k], v, f"{path}.{k}" if path else k) for k, v in data.items()}
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{path or cls.__name__}: missing required key {missing[0]!r}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise  # already names its place (a nested block's error, or a message naming its stage)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from e


def to_dict(obj: Any) -> Any:
    """Plain data (for YAML/JSON) from nested dataclasses."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to raw config data (values parsed as YAML scalars).

    List elements are addressed by index (``stages.1.grpo.lr=1e-5``) or, for lists of mappings with a ``name``,
    by that name (``stages.grpo.grpo.lr=1e-5``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        dotted, raw = item.split("=", 1)
        try:
            value = _parse_scalar(raw)
        except yaml.YAMLError as e:
            problem = str(e).splitlines()[0]
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem})") from e
        keys = dotted.split(".")
        node: Any = data
        for i, key in enumerate(keys):
            last = i == len(keys) - 1
            where = ".".join(keys[: i + 1])
            if isinstance(node, list):
                idx = _list_index(node, key, where)
                if last:
                    node[idx] = value
                else:
                    node = node[idx]
            elif isinstance(node, dict):
                if last:
                    node[key] = value
                elif key not in node and keys[i + 1].lstrip("-").isdigit():
                    raise ConfigError(f"override {item!r}: {where} is not in the config file, so there is no list to "
                                      f"index; set the whole list ({where}=[...])")  # fmt: skip
                else:
                    node = node.setdefault(key, {})
            else:
                parent = ".".join(keys[:i])
                raise ConfigError(f"override {item!r}: {parent} is {type(node).__name__} {node!r}, not a mapping or "
                                  f"list, so it has no key {key!r}")  # fmt: skip
    return data


class YamlLoader(yaml.SafeLoader):
    """``yaml.safe_load`` with YAML 1.2's floats: ``1e-6`` and ``2E5`` are numbers (YAML 1.1, PyYAML's default, needs
    a dot and reads them as strings, so ``lr: 1e-6`` would fail a float field and pass an untyped one as text).
    Config files and ``--set`` values are read with it, so the two read every value alike."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _parse_scalar(raw: str) -> Any:
    """A ``--set`` value, read as the same value in a config file would be (:class:`YamlLoader`)."""
    if raw == "":
        return ""
    return yaml.load(raw, Loader=YamlLoader)


def _list_index(node: list, key: str, where: str) -> int:
    if key.lstrip("-").isdigit():
        idx = int(key)
        if not -len(node) <= idx < len(node):
            raise ConfigError(f"override {where}: index {idx} out of range (list has {len(node)} items)")
        return idx
    names = [v.get("name") for v in node if isinstance(v, dict)]
    if key in names:
        return names.index(key)
    raise ConfigError(f"override {where}: no list item named {key!r}; names are {names}")
