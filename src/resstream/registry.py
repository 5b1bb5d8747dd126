"""Name registries for depth-axis residual operators and sequence-axis local mixers.

Operators and mixers register themselves with a decorator in their own module; the packages
`resstream.depth` and `resstream.mixers` import every module they contain, so dropping a new
file into one of those folders is enough to make it available by name.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, TypeVar

from resstream.errors import UserError

T = TypeVar("T")


class Registry:
    def __init__(self, kind: str, package: str):
        self.kind = kind
        self.package = package
        self._entries: dict[str, type] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(cls: T) -> T:
            if name in self._entries and self._entries[name] is not cls:
                raise RuntimeError(f"{self.kind} {name!r} registered twice")
            cls.name = name  # type: ignore[attr-defined]
            self._entries[name] = cls
            return cls

        return decorator

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        package = importlib.import_module(self.package)
        for module in pkgutil.iter_modules(package.__path__):
            if not module.name.startswith("_"):
                importlib.import_module(f"{self.package}.{module.name}")

    def get(self, name: str) -> type:
        self._load()
        if name not in self._entries:
            raise UserError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)


DEPTH_OPERATORS = Registry("depth operator", "resstream.depth")
LOCAL_MIXERS = Registry("local mixer", "resstream.mixers")
register_depth_operator = DEPTH_OPERATORS.register
register_local_mixer = LOCAL_MIXERS.register


def list_depth_operators() -> list[str]:
    """Names of every registered depth-axis residual operator."""
    return DEPTH_OPERATORS.names()


def list_local_mixers() -> list[str]:
    """Names of every registered sequence-axis local mixer."""
    return LOCAL_MIXERS.names()
