"""Building blocks shared by the decoder, the depth operators and the local mixers."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class RMSNorm(nn.Module):
    """RMSNorm computed in at least float32 (as HF Llama does: normalise in float32, cast back,
    then scale in the input's dtype), learned scale initialised to 1. The normalisation is
    torch's `F.rms_norm` (one fused kernel where torch has one)."""

    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x32 = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # at least fp32
        out = F.rms_norm(x32, x32.shape[-1:], eps=self.eps).to(dtype)
        return out if self.weight is None else self.weight * out


def rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class RotaryEmbedding(nn.Module):
    """RoPE in the Llama (rotate-half) layout; cos/sin are computed in float32 from positions."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions [T] or [B, T] -> cos, sin broadcastable to [B, H, T, D]. Angles are computed
        in float32 (as HF Llama does), or in float64 for float64 models."""
        if dtype == torch.float64:
            exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=positions.device)
            freqs = positions.double()[..., None] / (self.theta ** (exponent / self.head_dim))
        else:
            freqs = positions.float()[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        if positions.dim() == 2:  # [B, T, D] -> [B, 1, T, D]
            return cos[:, None], sin[:, None]
        return cos, sin

    @staticmethod
    def apply(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        return x * cos + rotate_half(x) * sin


def init_linear(layer: nn.Linear, std: float, zero: bool = False) -> nn.Linear:
    """Normal(0, std) weights (zeros when `zero`), zero bias."""
    if zero:
        nn.init.zeros_(layer.weight)
    else:
        nn.init.normal_(layer.weight, mean=0.0, std=std)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def output_std(init_std: float, n_sublayers: int) -> float:
    """GPT-2 style scaled init for projections that write into the residual stream."""
    return init_std / math.sqrt(max(1, n_sublayers))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); the optional `hidden_mixer` acts on the concatenated
    gate/up projections (Canon-D slot) and `input_mixer` on the normalised input (Canon-C)."""

    def __init__(self, d_model: int, hidden: int, init_std: float, out_std: float):
        super().__init__()
        self.gate_proj = init_linear(nn.Linear(d_model, hidden, bias=False), init_std)
        self.up_proj = init_linear(nn.Linear(d_model, hidden, bias=False), init_std)
        self.down_proj = init_linear(nn.Linear(hidden, d_model, bias=False), out_std)
        self.input_mixer: nn.Module | None = None
        self.hidden_mixer: nn.Module | None = None

    def forward(self, x: Tensor, ctx) -> Tensor:
        if self.input_mixer is not None:
            x = self.input_mixer(x, ctx)
        gate, up = self.gate_proj(x), self.up_proj(x)
        if self.hidden_mixer is not None:
            gate, up = self.hidden_mixer(torch.cat([gate, up], dim=-1), ctx).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
