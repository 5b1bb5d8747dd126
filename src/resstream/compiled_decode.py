"""Compiled cached decoding: one `torch.compile` of the model's one-token step per model,
which does not recompile as the context grows.

A cached decode step differs from the next only in the cache's length (a Python int), so a
plain `torch.compile(model)` specialises on it and recompiles at the second token (then
dynamo makes the length symbolic). Here the step is compiled with `dynamic=True` from the
start: the length is symbolic, so one graph serves every step of every sequence with the same
batch size and cache size (a cache of another size compiles once more; tests/test_compile.py
counts the compilations). `fullgraph=True`: every
operator and mixer decodes as one graph (tests/test_compile.py), so a break is an error, not a
silent slowdown. Under compilation the depth operators take their general path, not their
eager decode workspaces (resstream.depth.base.is_decode_step).

This is the dynamic-shape form: attention reads the first `length` cache positions, a shape
that grows. A static-shape step (attention over the whole preallocated cache under a position
mask, which CUDA graphs could replay) is not written yet.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch

_COMPILED: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def compiled_decode_step(model: torch.nn.Module, backend: str = "inductor") -> Callable:
    """`model` compiled for cached one-token steps (kept per model and backend, outside the
    module so that its state_dict is unchanged)."""
    per_model = _COMPILED.setdefault(model, {})
    if backend not in per_model:
        per_model[backend] = torch.compile(model, backend=backend, dynamic=True, fullgraph=True)
    return per_model[backend]
