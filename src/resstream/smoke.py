"""Smoke mode: every documented command at a tiny budget, for the tests that run the README's
and docs' shell blocks exactly as written.

Setting ``RESSTREAM_SMOKE=1`` in the environment makes the long-running commands (training,
studies, benchmarks, generation) cap their budgets to a few steps, repeats and tokens; every
command that caps something says so in one line on stderr. Results made in smoke mode are not
measurements: the run metadata records the mode.
"""
from __future__ import annotations

import os
import sys

SMOKE_ENV = "RESSTREAM_SMOKE"


def smoke_mode() -> bool:
    """True when ``RESSTREAM_SMOKE`` is set to anything but '', '0' or 'false'."""
    return os.environ.get(SMOKE_ENV, "").strip().lower() not in ("", "0", "false")


def smoke_cap(value, limit, what: str):
    """`value` capped at `limit` in smoke mode (None counts as unbounded), else `value`;
    announces the cap once on stderr."""
    if not smoke_mode() or (value is not None and value <= limit):
        return value
    if what not in _ANNOUNCED:
        _ANNOUNCED.add(what)
        print(f"smoke mode ({SMOKE_ENV}): {what} capped at {limit}", file=sys.stderr)
    return limit


_ANNOUNCED: set[str] = set()  # caps already announced by this process


def smoke_args(args, what: str, **values) -> None:
    """In smoke mode, set the given attributes of a parsed-arguments namespace (e.g. a
    benchmark's `quick=True`) and announce it once on stderr; else leave `args` alone."""
    if not smoke_mode():
        return
    for name, value in values.items():
        setattr(args, name, value)
    settings = ", ".join(f"--{name.replace('_', '-')}" if value is True else f"{name}={value}"
                         for name, value in values.items())
    print(f"smoke mode ({SMOKE_ENV}): {what} runs with {settings}", file=sys.stderr)
