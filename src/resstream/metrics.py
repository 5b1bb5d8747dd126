"""Evaluation metrics, bits per byte above all.

Bits per byte (bpb) of a text = (sum over predicted tokens of the next-token loss in nats)
/ ln 2 / (number of UTF-8 bytes those tokens spell). It compares models across tokenizers;
with the byte tokenizer every token is one byte, so bpb = mean loss / ln 2.

Evaluation is always on the fixed validation tokens, in fixed non-overlapping windows, never on
random batches: window i feeds tokens [i*T, (i+1)*T) and predicts tokens [i*T+1, (i+1)*T+1), so
every target after the first token is predicted once, with the context of its own window only.
Only whole windows are used: with n tokens there are K = (n - 1) // T windows. A budget of
`max_tokens` keeps k = max_tokens // T of them, spread evenly over the whole validation text
(window indices floor(i * K / k), i = 0..k-1), so a quick evaluation still samples every held-out
document; the choice depends only on n, T and the budget, never on a random draw.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

LN2 = math.log(2.0)


def bits_per_byte(total_nats: float, n_bytes: int) -> float:
    """Sum of next-token losses in nats -> bits per byte of the `n_bytes` bytes predicted."""
    if n_bytes <= 0:
        raise ValueError(f"n_bytes={n_bytes} is invalid; allowed: a positive byte count")
    return float(total_nats) / LN2 / n_bytes


def nats_to_bits(nats: float) -> float:
    return float(nats) / LN2


@dataclass
class EvalResult:
    """Validation loss (mean nats per token), bits per byte and what they were computed on."""

    loss: float
    bpb: float
    tokens: int
    bytes: int
    total_nats: float

    def to_dict(self) -> dict:
        return asdict(self)


def eval_window_starts(n_tokens: int, seq_len: int, max_tokens: int | None = None) -> np.ndarray:
    """Start offsets of the fixed, non-overlapping evaluation windows (see module docstring)."""
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} is invalid; allowed: an integer >= 1")
    total = max(0, (n_tokens - 1) // seq_len)
    kept = total if max_tokens is None else min(total, max(0, int(max_tokens)) // seq_len)
    indices = (np.arange(kept, dtype=np.int64) * total) // max(kept, 1)
    return indices * seq_len


@torch.no_grad()
def evaluate_bpb(model: torch.nn.Module, tokens: np.ndarray, seq_len: int, batch_size: int = 16,
                 max_tokens: int | None = None, token_bytes: np.ndarray | None = None,
                 device: str | torch.device = "cpu", autocast_dtype: torch.dtype | None = None,
                 on_batch: Callable[[int, int], None] | None = None) -> EvalResult:
    """Loss and bits per byte of `model` on `tokens` (a 1-D array of ids, e.g. a memmap).

    `token_bytes[i]` is the byte length of token i (all ones, the default, for the byte
    tokenizer). `autocast_dtype` (e.g. torch.bfloat16) runs the forward under autocast; the
    loss itself is always summed in float32. `on_batch(windows_done, windows_total)` is called
    after every batch (for progress bars).
    """
    starts = eval_window_starts(len(tokens), seq_len, max_tokens)
    if starts.size == 0:
        raise ValueError(f"validation data has {len(tokens)} tokens; allowed: at least "
                         f"seq_len + 1 = {seq_len + 1}")
    was_training = model.training
    model.eval()
    total_nats, total_tokens, total_bytes = 0.0, 0, 0
    device = torch.device(device)
    byte_table = None if token_bytes is None else torch.as_tensor(token_bytes, dtype=torch.int64)
    try:
        for first in range(0, len(starts), batch_size):
            window = np.stack([np.asarray(tokens[s:s + seq_len + 1], dtype=np.int64)
                               for s in starts[first:first + batch_size]])
            batch = torch.from_numpy(window).to(device)
            inputs, targets = batch[:, :-1], batch[:, 1:]
            context = (torch.autocast(device.type, dtype=autocast_dtype)
                       if autocast_dtype is not None else nullcontext())
            with context:
                logits = model(inputs)
            nats = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)),
                                   targets.reshape(-1), reduction="sum")
            total_nats += float(nats)
            total_tokens += targets.numel()
            if byte_table is None:
                total_bytes += targets.numel()
            else:
                total_bytes += int(byte_table[targets.cpu()].sum())
            if on_batch is not None:
                on_batch(min(first + batch_size, len(starts)), len(starts))
    finally:
        model.train(was_training)
    return EvalResult(loss=total_nats / total_tokens, bpb=bits_per_byte(total_nats, total_bytes),
                      tokens=total_tokens, bytes=total_bytes, total_nats=total_nats)
