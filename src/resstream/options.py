"""Typed option sub-configs: every operator and mixer declares an `Options` dataclass; the
model config stores plain dicts (JSON-able) and this module validates them into the dataclass."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any

from resstream.errors import UserError


@dataclasses.dataclass
class NoOptions:
    """For operators and mixers that take no options."""


def _type_ok(value: Any, annotation: Any) -> bool:
    if annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Union or str(origin) == "types.UnionType":
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def parse_options(options_cls: type, values: dict | None, where: str) -> Any:
    """Build `options_cls(**values)`, rejecting unknown keys and wrongly typed values with a
    message that names the field, the value and what is allowed."""
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        valid = ", ".join(sorted(fields)) or "(none)"
        raise UserError(f"{where}: unknown option(s) {', '.join(unknown)}; valid options: {valid}")
    hints = typing.get_type_hints(options_cls)
    for key, value in values.items():
        if not _type_ok(value, hints.get(key, Any)):
            raise UserError(f"{where}.{key}={value!r} has the wrong type; expected {hints[key]}")
    return options_cls(**values)


def require(condition: bool, where: str, value: Any, allowed: str) -> None:
    """One-line validation error: `<where>=<value> is invalid; allowed: <allowed>`."""
    if not condition:
        raise UserError(f"{where}={value!r} is invalid; allowed: {allowed}")
