"""Decode state for incremental (cached) inference.

One `ModelCache` per model and batch. Every module that keeps state across tokens defines
`new_cache_entry(batch_size, max_len, device, dtype)`; `ResStreamLM.new_cache` asks each such
module for its entry and stores it under the module's qualified name (`module.cache_key`).
Depth-axis operators keep no token history (their depth state lives inside one forward),
except the few that mix over tokens (DDL's TC compressor and EC expander). An entry may also
be a decode workspace that holds no token history (depth_swa keeps its fused projection weights
and per-step scratch there, AttnRes its source stack and folded pseudo-queries, HC its
coefficient tables); such entries report no `tensors()` (see
`resstream.depth.base.DecodeWorkspace`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class ForwardContext:
    """What every sublayer may need besides its input: absolute positions of the tokens of this
    call and the cache (None for a plain full forward). No padding mask: every token of every
    row is real (see resstream.generation for prompts of different lengths)."""

    positions: Tensor
    cache: "ModelCache | None" = None

    @property
    def offset(self) -> int:
        return 0 if self.cache is None else self.cache.length

    def entry(self, module: torch.nn.Module) -> Any:
        if self.cache is None:
            return None
        return self.cache.entries[module.cache_key]


@dataclass
class ModelCache:
    entries: dict[str, Any]
    batch_size: int
    max_len: int
    length: int = 0  # tokens already processed (the offset of the next call)
    meta: dict = field(default_factory=dict)

    def tensors(self) -> list[Tensor]:
        found: list[Tensor] = []
        for entry in self.entries.values():
            found.extend(entry.tensors() if hasattr(entry, "tensors") else [])
        return found

    def new_sequence(self) -> None:
        """A multi-token forward (a prefill) used the cache: entries that derive tensors from the
        weights (decode workspaces) check the weights again at the next decode step."""
        for entry in self.entries.values():
            if hasattr(entry, "new_sequence"):
                entry.new_sequence()

    def nbytes(self) -> int:
        """Bytes held by every cache tensor (measured, not estimated)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


class KVCache:
    """Preallocated key/value cache of a global attention layer, [B, H_kv, max_len, D]."""

    def __init__(self, batch_size: int, kv_heads: int, max_len: int, head_dim: int, device, dtype):
        shape = (batch_size, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def update(self, k: Tensor, v: Tensor, start: int) -> tuple[Tensor, Tensor]:
        end = start + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"cache overflow: position {end} > max_len={self.k.shape[2]}; "
                             "allowed: create the cache with a larger max_len")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def tensors(self) -> list[Tensor]:
        return [self.k, self.v]


class RollingKVCache:
    """Keys and values of the last `window` positions: position p lives in slot p mod window,
    so memory is constant in the context length."""

    def __init__(self, batch_size: int, heads: int, window: int, head_dim: int, device, dtype):
        shape = (batch_size, heads, window, head_dim)
        self.window = window
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def past(self, length: int) -> tuple[Tensor, Tensor]:
        """Keys/values of positions max(0, length - window) .. length - 1, in position order."""
        n = min(length, self.window)
        slots = torch.arange(length - n, length, device=self.k.device) % self.window
        return self.k.index_select(2, slots), self.v.index_select(2, slots)

    def append(self, k: Tensor, v: Tensor, start: int) -> None:
        n_new = k.shape[2]
        keep = min(n_new, self.window)
        slots = torch.arange(start + n_new - keep, start + n_new, device=self.k.device) % self.window
        self.k.index_copy_(2, slots, k[:, :, n_new - keep:])
        self.v.index_copy_(2, slots, v[:, :, n_new - keep:])

    def tensors(self) -> list[Tensor]:
        return [self.k, self.v]
