"""One coercion and validation path for every config section: the train config (data, optim,
train), ModelConfig and the operators'/mixers' typed `Options` dataclasses.

Values arrive as plain data (YAML, JSON, command-line overrides, Python calls) and are converted
to the field's type hint: strings such as "3e-4" are numbers (YAML 1.1 reads `3e-4` without a
dot as a string), "true"/"false" are booleans, "null"/"none" is None where the hint allows it.
Every float must be finite: NaN or infinity is never a meaningful setting, and an accepted one
only shows up later as a NaN loss or a crash far from its cause.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any

from resstream.errors import UserError

_TYPE_WORDS = {int: "an integer", float: "a finite number", bool: "true or false",
               str: "a string", dict: "a mapping", list: "a list", type(None): "null"}
_FAIL = object()


def coerce(value: Any, hint: Any, where: str) -> Any:
    """Return `value` converted to the type `hint`, or raise a one-line UserError
    `<where>=<value> is invalid; allowed: <what the hint allows>`."""
    converted = _try_coerce(value, hint)
    if converted is _FAIL:
        raise UserError(f"{where}={value!r} is invalid; allowed: {describe(hint)}")
    return converted


def coerce_fields(cls: type, values: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Coerce each value of `values` to the type of the dataclass field of `cls` it names
    (unknown keys are the caller's to reject); messages name `<prefix><key>`."""
    hints = field_hints(cls)
    return {key: coerce(value, hints.get(key, Any), f"{prefix}{key}")
            for key, value in values.items()}


def coerce_instance(instance: Any, prefix: str = "") -> None:
    """Coerce every field of a dataclass instance in place (for objects built directly in
    Python, which skip the from-data path)."""
    hints = field_hints(type(instance))
    for item in dataclasses.fields(instance):
        value = getattr(instance, item.name)
        converted = coerce(value, hints.get(item.name, Any), f"{prefix}{item.name}")
        if converted is not value:
            setattr(instance, item.name, converted)


@functools.cache
def field_hints(cls: type) -> dict[str, Any]:
    """Resolved type hints of a dataclass (cached: get_type_hints evaluates strings)."""
    return typing.get_type_hints(cls)


def require(condition: bool, where: str, value: Any, allowed: str) -> None:
    """One-line validation error: `<where>=<value> is invalid; allowed: <allowed>`."""
    if not condition:
        raise UserError(f"{where}={value!r} is invalid; allowed: {allowed}")


def describe(hint: Any) -> str:
    """Words for what a type hint allows, e.g. `int | None` -> 'an integer or null'."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        return " or ".join(describe(arg) for arg in typing.get_args(hint))
    return _TYPE_WORDS.get(origin or hint, str(hint))


def _try_coerce(value: Any, hint: Any) -> Any:
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        return _try_union(value, typing.get_args(hint))
    if origin is not None:
        hint = origin  # list[int] -> list, dict[str, Any] -> dict
    converter = _CONVERTERS.get(hint)
    if converter is not None:
        return converter(value)
    if isinstance(hint, type):
        return value if isinstance(value, hint) else _FAIL
    return value


def _try_union(value: Any, args: tuple) -> Any:
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
        return None if type(None) in args else _FAIL
    for arg in args:
        if arg is type(None):
            continue
        converted = _try_coerce(value, arg)
        if converted is not _FAIL:
            return converted
    return _FAIL


def _to_bool(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return _FAIL


def _to_float(value: Any) -> Any:
    if isinstance(value, bool):
        return _FAIL
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return _FAIL
    else:
        return _FAIL
    return number if math.isfinite(number) else _FAIL


def _to_int(value: Any) -> Any:
    if isinstance(value, bool):
        return _FAIL
    if isinstance(value, int):
        return value
    number = _to_float(value)
    if number is _FAIL or not number.is_integer():
        return _FAIL
    return int(number)


def _to_str(value: Any) -> Any:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return _FAIL


_CONVERTERS = {
    bool: _to_bool, int: _to_int, float: _to_float, str: _to_str,
    list: lambda value: list(value) if isinstance(value, (list, tuple)) else _FAIL,
    tuple: lambda value: list(value) if isinstance(value, (list, tuple)) else _FAIL,
    dict: lambda value: dict(value) if isinstance(value, dict) else _FAIL,
}
