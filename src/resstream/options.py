"""Typed option sub-configs: every operator and mixer declares an `Options` dataclass; the
model config stores plain dicts (JSON-able) and this module validates them into the dataclass."""
from __future__ import annotations

import dataclasses
from typing import Any

# `require` is re-exported: operators import it from here
from resstream.coerce import coerce_fields, coerce_instance, require  # noqa: F401
from resstream.errors import UserError


@dataclasses.dataclass
class NoOptions:
    """For operators and mixers that take no options."""


def parse_options(options_cls: type, values: dict | None, where: str) -> Any:
    """Build `options_cls(**values)`, rejecting unknown keys and wrongly typed values with a
    message that names the field, the value and what is allowed."""
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        valid = ", ".join(sorted(fields)) or "(none)"
        raise UserError(f"{where}: unknown option(s) {', '.join(unknown)}; valid options: {valid}")
    # the same coercion as every other config section: "5e-1" is a number here too
    options = options_cls(**coerce_fields(options_cls, values, f"{where}."))
    coerce_instance(options, f"{where}.")  # defaults too: every float field finite
    return options
