"""Static depth-weighting helpers shared by ELC-BERT, Vertical Attention and DenseFormer."""
from __future__ import annotations

import torch
from torch import Tensor

from resstream.depth.base import compute_dtype


def softmax_weights(logits: Tensor, dtype: torch.dtype) -> Tensor:
    """softmax in at least float32 (bf16 logits are too coarse for a simplex), cast to dtype."""
    return torch.softmax(logits.to(compute_dtype(logits.dtype)), -1).to(dtype)


def weighted_sum(weights: Tensor, tensors: list[Tensor]) -> Tensor:
    """sum_j weights[j] * tensors[j], as one stack and one matrix-vector product."""
    weights = weights.to(tensors[0].dtype)
    if len(tensors) == 1:
        return weights[0] * tensors[0]
    return torch.tensordot(weights, torch.stack(tensors), dims=1)
