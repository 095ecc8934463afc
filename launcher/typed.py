"""Plain data (parsed YAML) onto annotated dataclasses, strictly: the job schema's and an entry's ``args``.

Hand-written (about 100 lines) rather than taken from OmegaConf/dacite because neither reports the file, key
path and valid keys together, which is the part users see. Field metadata ``min``/``above`` (see
:func:`launcher.config.at_least`) are checked too.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union


class ConfigError(ValueError):
    """A job file or override is invalid; the message names file, key and fix."""


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; build dataclasses; raise ConfigError otherwise."""

    def fail(extra: str = "") -> ConfigError:
        if value is None:  # name=' ' or name=~ on the command line: YAML's null, not a string
            return ConfigError(
                f"{source}: {where}: expected {_describe(tp)}, got null (YAML reads an empty value, ~ and "
                f"null as null){extra}\nHINT: quote the value to make it a string (key='\"~\"'), or give "
                "another value")
        return ConfigError(
            f"{source}: {where}: expected {_describe(tp)}, got {value!r} ({type(value).__name__}){extra}"
        )

    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise fail()
        return build(tp, value, where, source)
    if origin in (Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _convert(value, arm, where, source)
            except ConfigError:
                continue
        raise fail()
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise fail()
    if tp is type(None):
        if value is None:
            return None
        raise fail()
    if origin is list:
        if not isinstance(value, list):
            raise fail()
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{where}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise fail()
        _, vt = typing.get_args(tp)
        return {str(k): _convert(v, vt, f"{where}.{k}", source) for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, (str, float)):
        # PyYAML follows YAML 1.1, which reads ``1e-3`` (no dot) as a string; users mean a number.
        try:
            number = float(value)
        except ValueError:
            raise fail() from None
        if not math.isfinite(number):
            raise fail(" (a finite number)\nHINT: .nan and .inf are not settings")
        return number
    if tp in (int, float, str, bool):
        if isinstance(value, bool) and tp is not bool:
            raise fail()
        if isinstance(value, tp):
            return value
        raise fail()
    raise TypeError(f"unsupported annotation {tp!r} at {where}")  # a bug in this module, not user input


def build(cls: type, data: dict[str, Any], where: str, source: str) -> Any:
    """``cls(**data)`` with every value checked against its annotation; :class:`ConfigError` naming
    ``source``, the key path under ``where`` and the fix otherwise."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    prefix = f"{where}." if where else ""
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(
            f"{source}: unknown key '{prefix}{unknown[0]}' in {cls.__name__}\n"
            f"HINT: valid keys of {where or 'the job'} are: {', '.join(fields)}"
        )
    missing = [
        n
        for n, f in fields.items()
        if n not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(
            f"{source}: missing required key {prefix}{missing[0]} ({_describe(hints[missing[0]])})\n"
            f"HINT: add `{missing[0]}: ...` to {where or 'the top level of the job file'}"
        )
    kwargs = {k: _convert(v, hints[k], f"{prefix}{k}", source) for k, v in data.items()}
    for k, v in kwargs.items():
        _check_range(fields[k], v, f"{prefix}{k}", source)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _check_range(f: dataclasses.Field[Any], value: Any, where: str, source: str) -> None:
    low, strict = (f.metadata["above"], True) if "above" in f.metadata else (f.metadata.get("min"), False)
    if low is None or value is None or isinstance(value, bool):
        return
    if value < low or (strict and value == low):
        bound = f"above {low:g}" if strict else f"at least {low:g}"
        raise ConfigError(f"{source}: {where}: must be {bound}, got {value!r}\n"
                          f"HINT: set {where}= a value {bound} (its docstring says what it means)")
