"""Float64 reference pieces written from the equations (not from resstream's modules), used by
tests to check the real implementation. Weights are read from a model's state_dict by name."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def rmsnorm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    out = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    return out if weight is None else out * weight


def rope(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """x [..., T, D] rotated pairwise (i, i + D/2) by angle pos * theta^(-2i/D)."""
    d = x.shape[-1]
    half = d // 2
    freq = theta ** (-torch.arange(half, dtype=torch.float64, device=x.device) * 2 / d)
    angle = positions.double()[:, None] * freq[None, :]
    cos, sin = torch.cos(angle), torch.sin(angle)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def band_attention(q: Tensor, k: Tensor, v: Tensor, window: int | None) -> Tensor:
    """q, k, v [H, T, D] (same head count); causal, 0 <= i - j < window, explicit loops over i."""
    heads, t, d = q.shape
    out = torch.zeros_like(q)
    for i in range(t):
        lo = 0 if window is None else max(0, i - window + 1)
        scores = torch.einsum("hd,hjd->hj", q[:, i], k[:, lo:i + 1]) / math.sqrt(d)
        out[:, i] = torch.einsum("hj,hjd->hd", torch.softmax(scores, dim=-1), v[:, lo:i + 1])
    return out


def multihead(x_q: Tensor, x_k: Tensor, x_v: Tensor, w: dict, prefix: str, heads: int,
              kv_heads: int, window: int | None, theta: float | None) -> Tensor:
    """One sequence [T, d]: projections, optional RoPE, band attention, output projection."""
    t, d = x_q.shape
    hd = w[f"{prefix}.q_proj.weight"].shape[0] // heads
    q = (x_q @ w[f"{prefix}.q_proj.weight"].T).view(t, heads, hd).transpose(0, 1)
    k = (x_k @ w[f"{prefix}.k_proj.weight"].T).view(t, kv_heads, hd).transpose(0, 1)
    v = (x_v @ w[f"{prefix}.v_proj.weight"].T).view(t, kv_heads, hd).transpose(0, 1)
    if theta is not None:
        pos = torch.arange(t, device=x_q.device)
        q, k = rope(q, pos, theta), rope(k, pos, theta)
    k = k.repeat_interleave(heads // kv_heads, dim=0)
    v = v.repeat_interleave(heads // kv_heads, dim=0)
    out = band_attention(q, k, v, window).transpose(0, 1).reshape(t, heads * hd)
    return out @ w[f"{prefix}.o_proj.weight"].T


def swiglu(x: Tensor, w: dict, prefix: str) -> Tensor:
    gate = x @ w[f"{prefix}.gate_proj.weight"].T
    up = x @ w[f"{prefix}.up_proj.weight"].T
    return (gate * torch.sigmoid(gate) * up) @ w[f"{prefix}.down_proj.weight"].T


def sublayer(kind: str, layer: int, x: Tensor, w: dict, config) -> Tensor:
    """f(x) for an already-normalised input x [T, d] of sublayer `kind` of block `layer`."""
    p = f"blocks.{layer}"
    if kind == "attn":
        return multihead(x, x, x, w, f"{p}.attn", config.n_heads, config.kv_heads, None, config.rope_theta)
    if kind == "mlp":
        return swiglu(x, w, f"{p}.mlp")
    if kind == "mix":  # ShortSWA with the model's heads, RoPE per mixer options
        opts = config.mixer_options
        heads = opts.get("heads") or config.n_heads
        kv = opts.get("kv_heads") or heads
        theta = config.rope_theta if opts.get("rope", True) else None
        return multihead(x, x, x, w, f"{p}.mix.attention", heads, kv, config.local_window, theta)
    raise ValueError(kind)


def site_kinds(config) -> list[str]:
    return (["mix"] if config.local_mixer == "shortswa" else []) + ["attn", "mlp"]


def norm_weight(w: dict, layer: int, kind: str) -> Tensor:
    prefix = f"blocks.{layer}.mix" if kind == "mix" else f"blocks.{layer}.{kind}"
    return w[f"{prefix}.norm.weight"]


def head(h: Tensor, w: dict, config) -> Tensor:
    return rmsnorm(h, w["norm.weight"], config.norm_eps) @ w["lm_head.weight"].T


def standard_logits(model, ids: Tensor) -> Tensor:
    """Pre-norm residual decoder, one sequence at a time, float64."""
    w = {k: v.double() for k, v in model.state_dict().items()}
    config = model.config
    outputs = []
    for row in ids:
        h = w["embed.weight"][row]
        for layer in range(config.n_layers):
            for kind in site_kinds(config):
                x = rmsnorm(h, norm_weight(w, layer, kind), config.norm_eps)
                h = h + sublayer(kind, layer, x, w, config)
        outputs.append(head(h, w, config))
    return torch.stack(outputs)
