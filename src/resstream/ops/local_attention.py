"""Causal local (sliding-window) attention over one ordered axis.

    out_i = sum_j softmax_j(q_i . k_j * scale + M_ij) v_j,
    M_ij = 0 if 0 <= pos(i) - j < window else -inf          (window keys, the current one included)

Tensors are [B, H, N, D]. Queries may be fewer than keys (Nq <= Nk): they are aligned to the
end of the key axis (query i sits at position Nk - Nq + i), which is what a decode step over a
cache and a depth read of the newest state both need. window=None means full causal.

Backends, all computing the same function:
  reference  dense band mask, materialises Nq x Nk scores (tests, tiny inputs)
  chunked    blocks of `window` positions attend to themselves and the previous block:
             O(N * window) time and memory, forward and backward on any device (pure PyTorch,
             SDPA per block)
  flex       torch.nn.attention.flex_attention with a sliding-window BlockMask, compiled
             (GPUs; CPU inference only: flex has no CPU backward in torch 2.13)
  auto       reference when the score matrix is small, else flex on CUDA, else chunked
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from resstream.errors import UserError

BACKENDS = ("auto", "reference", "chunked", "flex")
_DENSE_LIMIT = 1 << 20  # Nq * Nk below which the dense path is the cheapest


def local_attention_mask(n_queries: int, n_keys: int, window: int | None, device=None) -> Tensor:
    """Boolean [Nq, Nk] mask, True where query i may attend to key j (end-aligned queries)."""
    q_pos = torch.arange(n_keys - n_queries, n_keys, device=device)[:, None]
    k_pos = torch.arange(n_keys, device=device)[None, :]
    distance = q_pos - k_pos
    allowed = distance >= 0
    if window is not None:
        allowed = allowed & (distance < window)
    return allowed


def _check(q: Tensor, k: Tensor, v: Tensor, window: int | None, backend: str) -> None:
    if backend not in BACKENDS:
        raise UserError(f"backend={backend!r} is invalid; allowed: {', '.join(BACKENDS)}")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise UserError(f"window={window!r} is invalid; allowed: an integer >= 1 or None")
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise UserError(f"expected q [B,H,Nq,D], k and v [B,H,Nk,D]; got {tuple(q.shape)}, "
                        f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[2] > k.shape[2]:
        raise UserError(f"more queries ({q.shape[2]}) than keys ({k.shape[2]})")


def _reference(q: Tensor, k: Tensor, v: Tensor, window: int | None, scale: float) -> Tensor:
    mask = local_attention_mask(q.shape[2], k.shape[2], window, q.device)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


@lru_cache(maxsize=64)
def _block_mask(block: int, window: int, device: torch.device) -> Tensor:
    """[2, block, 2*block] masks for (first block, other blocks); key j < block is the previous block."""
    i = torch.arange(block, device=device)[:, None]
    j = torch.arange(2 * block, device=device)[None, :]
    distance = (block + i) - j
    allowed = (distance >= 0) & (distance < window)
    first = allowed & (j >= block)  # block 0 has no previous block
    return torch.stack([first, allowed])


def _chunked(q: Tensor, k: Tensor, v: Tensor, window: int | None, scale: float) -> Tensor:
    n_queries, n = q.shape[2], k.shape[2]
    if n_queries < n:  # end-aligned queries: pad at the front, keep the last rows
        q = F.pad(q, (0, 0, n - n_queries, 0))
    window_eff = n if window is None else min(window, n)
    block = window_eff
    n_blocks = -(-n // block)
    pad = n_blocks * block - n
    b, h, _, d = q.shape
    q_blocks = F.pad(q, (0, 0, 0, pad)).view(b, h, n_blocks, block, d)
    # keys/values with one empty block in front, then windows of two blocks stepping by one block
    k_pad = F.pad(k, (0, 0, block, pad))
    v_pad = F.pad(v, (0, 0, block, pad))
    k_blocks = k_pad.unfold(2, 2 * block, block).transpose(-1, -2)
    v_blocks = v_pad.unfold(2, 2 * block, block).transpose(-1, -2)
    masks = _block_mask(block, window_eff, q.device)
    mask = torch.cat([masks[:1], masks[1:].expand(n_blocks - 1, -1, -1)]) if n_blocks > 1 else masks[:1]
    out = F.scaled_dot_product_attention(q_blocks, k_blocks, v_blocks, attn_mask=mask, scale=scale)
    out = out.reshape(b, h, n_blocks * block, d)[:, :, :n]
    return out[:, :, n - n_queries:]


def _flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@lru_cache(maxsize=32)
def _flex_block_mask(n_queries: int, n_keys: int, window: int | None, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    offset = n_keys - n_queries

    def sliding_window(b, h, q_idx, kv_idx):
        distance = q_idx + offset - kv_idx
        allowed = distance >= 0
        if window is not None:
            allowed = allowed & (distance < window)
        return allowed

    return create_block_mask(sliding_window, B=None, H=None, Q_LEN=n_queries, KV_LEN=n_keys,
                             device=device)


def _flex(q: Tensor, k: Tensor, v: Tensor, window: int | None, scale: float) -> Tensor:
    if not _flex_available():
        raise UserError("backend='flex' needs torch.nn.attention.flex_attention (torch >= 2.5)")
    if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        raise UserError("backend='flex' has no CPU backward in this torch; use backend='chunked' for training on CPU")
    mask = _flex_block_mask(q.shape[2], k.shape[2], window, str(q.device))
    return _compiled_flex()(q, k, v, block_mask=mask, scale=scale)


def local_attention(q: Tensor, k: Tensor, v: Tensor, window: int | None = None,
                    backend: str = "auto", scale: float | None = None) -> Tensor:
    """Causal local attention; see the module docstring for the exact function."""
    _check(q, k, v, window, backend)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if backend == "auto":
        if q.shape[2] * k.shape[2] <= _DENSE_LIMIT or q.shape[2] == 1:
            backend = "reference"
        elif q.is_cuda and _flex_available() and not torch.compiler.is_compiling():
            backend = "flex"
        else:
            backend = "chunked"
    if backend == "reference":
        return _reference(q, k, v, window, scale)
    if backend == "chunked":
        return _chunked(q, k, v, window, scale)
    return _flex(q, k, v, window, scale)
