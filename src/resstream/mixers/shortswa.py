"""ShortSWA: short sliding-window attention as its own pre-norm residual sub-block before global
attention -- the block of Algorithm 1 of "Residual Stream Duality in Modern Transformer
Architectures" (Zhang, arXiv 2603.16039):

    S  = H + ShortSWA(Norm(H); w)
    A  = S + Attn(Norm(S))
    H' = A + MLP(Norm(A))

ShortSWA(X; w)_t = W_O concat_h softmax_j(q_t k_j^T / sqrt(d_h) + M_tj) v_j with its own
W_Q, W_K, W_V, W_O, the model's head count by default, RoPE on by default, and the exact window
M_tj = 0 iff 0 <= t - j < w (w keys including the current token; docs/design.md, decisions 1 and 2).
The attention itself is `resstream.ops.local_attention`; the depth-wise read (`depth_swa`)
applies the same function along depth (computing it directly for its single query per read).
Decode state: a rolling buffer of the last w keys/values.
Option `replace_attention` drops global attention from every block ([ShortSWA, MLP]): a
ShortSWA-only stack whose decode state is constant in context length (docs/inference.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from resstream.cache import RollingKVCache
from resstream.layers import RMSNorm, RotaryEmbedding, init_linear, output_std
from resstream.mixers.base import LocalMixer
from resstream.ops import local_attention
from resstream.options import require
from resstream.registry import register_local_mixer


class LocalSelfAttention(nn.Module):
    """Multi-head causal local self-attention with its own projections (the ShortSWA operator).

    Used on the sequence axis by the ShortSWA mixer and on the depth axis by `depth_swa`."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, window: int | None,
                 rope: RotaryEmbedding | None, backend: str, init_std: float, out_std: float,
                 zero_output: bool = False):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.window, self.rope, self.backend = window, rope, backend
        self.q_proj = init_linear(nn.Linear(d_model, n_heads * self.head_dim, bias=False), init_std)
        self.k_proj = init_linear(nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False), init_std)
        self.v_proj = init_linear(nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False), init_std)
        self.o_proj = init_linear(nn.Linear(n_heads * self.head_dim, d_model, bias=False), out_std,
                                  zero=zero_output)

    def _heads(self, x: Tensor, n_heads: int) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, n_heads, self.head_dim).transpose(1, 2)

    def project(self, x: Tensor, positions: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, N, d] -> q [B, H, N, D], k and v [B, H_kv, N, D] (RoPE applied if enabled)."""
        q = self._heads(self.q_proj(x), self.n_heads)
        k = self._heads(self.k_proj(x), self.n_kv_heads)
        v = self._heads(self.v_proj(x), self.n_kv_heads)
        if self.rope is not None:
            cos, sin = self.rope.cos_sin(positions, q.dtype)
            q, k = RotaryEmbedding.apply(q, cos, sin), RotaryEmbedding.apply(k, cos, sin)
        return q, k, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Local attention of end-aligned queries over keys; returns [B, Nq, H * D] (before W_O)."""
        groups = self.n_heads // self.n_kv_heads
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = local_attention(q, k, v, window=self.window, backend=self.backend)
        b, h, n, d = out.shape
        return out.transpose(1, 2).reshape(b, n, h * d)

    def forward(self, x: Tensor, positions: Tensor | None = None,
                cache: RollingKVCache | None = None, offset: int = 0) -> Tensor:
        q, k, v = self.project(x, positions)
        if cache is not None:
            past_k, past_v = cache.past(offset)
            cache.append(k, v, offset)
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        return self.o_proj(self.attend(q, k, v))


class ShortSWABlock(nn.Module):
    """The pre-norm residual sub-block S = H + ShortSWA(Norm(H); w)."""

    def __init__(self, config, options: "ShortSWA.Options", n_sublayers: int):
        super().__init__()
        heads = options.heads or config.n_heads
        kv_heads = options.kv_heads or heads
        self.window = config.local_window
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        rope = RotaryEmbedding(config.d_model // heads, config.rope_theta) if options.rope else None
        self.attention = LocalSelfAttention(
            config.d_model, heads, kv_heads, config.local_window, rope, config.attn_backend,
            config.init_std, output_std(config.init_std, n_sublayers))

    def forward(self, x: Tensor, ctx) -> Tensor:
        return self.attention(x, ctx.positions, ctx.entry(self), ctx.offset)

    def new_cache_entry(self, batch_size: int, max_len: int, device, dtype) -> RollingKVCache:
        att = self.attention
        return RollingKVCache(batch_size, att.n_kv_heads, self.window, att.head_dim, device, dtype)


@register_local_mixer("shortswa")
class ShortSWA(LocalMixer):
    paper = "Zhang, Residual Stream Duality (arXiv 2603.16039), Algorithm 1"
    decode_state = "rolling buffer of the last w keys and values"

    @dataclass
    class Options:
        rope: bool = True  # RoPE on the local attention (off = NoPE)
        heads: int | None = None  # None: the model's n_heads
        kv_heads: int | None = None  # None: same as heads (grouped KV heads otherwise)
        # True: the block is [ShortSWA, MLP] with no global attention (a "ShortSWA-only stack"):
        # decode state is bounded (w positions per layer) and the model may run past max_seq_len
        replace_attention: bool = False

    @classmethod
    def validate_config(cls, config, options) -> None:
        heads = options.heads or config.n_heads
        require(heads >= 1 and config.d_model % heads == 0, "mixer_options.heads", options.heads,
                f"a divisor of d_model={config.d_model}")
        require((config.d_model // heads) % 2 == 0 or not options.rope, "mixer_options.heads",
                options.heads, "a head count giving an even head_dim when rope is on")
        kv = options.kv_heads or heads
        require(kv >= 1 and heads % kv == 0, "mixer_options.kv_heads", options.kv_heads,
                f"a divisor of heads={heads}")

    @classmethod
    def build(cls, config, layer, options):
        return {"block": ShortSWABlock(config, options, 2 * config.n_layers)}

    @classmethod
    def replaces_attention(cls, options) -> bool:
        return options.replace_attention

    @classmethod
    def forward_macs_per_token(cls, config, seq_len):
        """Per block: its own W_Q, W_K, W_V, W_O (d x d_q, 2 x d x d_kv, d_q x d; d_q = d) plus
        the window's scores and mix, 2 d_q min(w, t) averaged over positions t = 1..T."""
        from resstream.flops import mean_window_keys

        options = config.mixer_opts
        heads = options.heads or config.n_heads
        head_dim = config.d_model // heads
        d, d_q, d_kv = config.d_model, heads * head_dim, (options.kv_heads or heads) * head_dim
        per_block = d * d_q + 2 * d * d_kv + d_q * d + 2 * d_q * mean_window_keys(seq_len, config.local_window)
        return config.n_layers * per_block

    @classmethod
    def no_weight_decay(cls, options, slot, module):
        """None: W_Q, W_K, W_V, W_O are ordinary attention matrices (random init), decayed like
        global attention's; the pre-norm gain is 1-D (never decayed)."""
        return set()
