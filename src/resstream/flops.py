"""Training FLOPs per token of a model configuration, computed from its structure.

    training FLOPs = 3 x forward FLOPs        (forward, plus a backward pass costing twice it)
    forward FLOPs  = 2 x forward multiply-adds (one multiply and one add per MAC)

so a model whose cost is its N non-embedding matrix weights gets 6 N FLOPs per token, the
Kaplan et al. / Chinchilla "6N" rule; attention scores and the depth operator's own reads and
writes are added on top. Everything is per token of a training sequence of `seq_len` tokens.

What is counted (forward MACs per token, before the factor 6):
  attention         q, k, v, o projections of every block: d d_q + 2 d d_kv + d_q d
                    (d_q = n_heads head_dim, d_kv = kv_heads head_dim: grouped KV heads)
  attention_scores  q k^T and the weighted sum of values over the keys a query attends to:
                    2 d_q n_t at position t. Causal global attention sees n_t = t keys, i.e.
                    (T + 1) / 2 on average over t = 1..T; a window of w keys sees min(w, t).
                    (Fused SDPA kernels and FlopCounterMode count the full T x T square; the
                    causal half is what the model needs.)
  mlp               SwiGLU gate, up, down: 3 d d_ff
  lm_head           d V (tied or not; the embedding lookup is a gather and free)
  local_mixer       the mixer's own projections, convolutions and windowed scores, as each
                    mixer declares (`LocalMixer.forward_macs_per_token`)
  depth             the depth operator's own reads and writes, as each operator declares
                    (`DepthOperator.forward_macs_per_token`): 0 for `standard`
Free: the embedding lookup, the baseline's norms, RoPE, activations, softmax and residual
additions (all elementwise, a few percent of a small model and less of a large one). Depth
operators count the norms and vector passes they add, because their cost is made of them.

The exact per-token count can be a fraction (windowed scores); the total is rounded once at the
end, each entry of `flops_breakdown` separately.
"""
from __future__ import annotations

from fractions import Fraction

import torch

from resstream.config import ModelConfig
from resstream.errors import UserError

TRAINING_FACTOR = 3  # forward + backward (the backward computes two products per forward one)
FLOPS_PER_MAC = 2
COMPONENTS = ("attention", "attention_scores", "mlp", "lm_head", "local_mixer", "depth")


def mean_window_keys(seq_len: int, window: int | None) -> Fraction:
    """Keys a causal query attends to, averaged over positions t = 1..T: mean_t min(w, t), or
    (T + 1) / 2 for a full causal window (`window` None)."""
    t, w = seq_len, seq_len if window is None else min(window, seq_len)
    total = w * (w + 1) // 2 + (t - w) * w  # sum_{t=1}^{T} min(w, t)
    return Fraction(total, t)


def has_global_attention(config: ModelConfig) -> bool:
    """False when a local mixer replaces global attention (ShortSWA `replace_attention`)."""
    return not any(c.local_mixer_cls.replaces_attention(c.mixer_opts) for c in config.mixer_configs())


def site_kinds(config: ModelConfig) -> tuple[str, ...]:
    """The sublayer kinds of one block ("mix", "attn", "mlp"), as `model.Block` builds them."""
    has_block = any("block" in c.local_mixer_cls.slots(c, c.mixer_opts) for c in config.mixer_configs())
    return (("mix",) if has_block else ()) + (("attn",) if has_global_attention(config) else ()) + ("mlp",)


def build_depth_operator(config: ModelConfig):
    """The config's depth operator alone (no model), on the meta device where it can be built
    there: its structure (which reads exist, their sources, windows, streams) is what its
    `forward_macs_per_token` counts."""
    from resstream.depth.base import build_sites

    cls = config.depth_operator_cls
    sites = build_sites(config.n_layers, site_kinds(config))
    try:
        with torch.device("meta"):
            return cls(config, sites, config.depth_opts)
    except (NotImplementedError, RuntimeError):
        return cls(config, sites, config.depth_opts)


def forward_macs_breakdown(config: ModelConfig, seq_len: int) -> dict[str, Fraction]:
    """Exact forward multiply-adds per token, per component (see the module docstring)."""
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise UserError(f"seq_len={seq_len!r} is invalid; allowed: an integer >= 1")
    d, L = config.d_model, config.n_layers
    d_q, d_kv = config.n_heads * config.head_dim, config.kv_heads * config.head_dim
    macs = dict.fromkeys(COMPONENTS, Fraction(0))
    if has_global_attention(config):
        macs["attention"] = Fraction(L * (d * d_q + 2 * d * d_kv + d_q * d))
        macs["attention_scores"] = L * 2 * d_q * mean_window_keys(seq_len, None)
    macs["mlp"] = Fraction(L * 3 * d * config.ffn_hidden)
    macs["lm_head"] = Fraction(d * config.vocab_size)
    for mixer_config in config.mixer_configs():  # each mixer with its own options
        macs["local_mixer"] += Fraction(mixer_config.local_mixer_cls.forward_macs_per_token(
            mixer_config, seq_len))
    macs["depth"] = Fraction(build_depth_operator(config).forward_macs_per_token(seq_len))
    return macs


def flops_breakdown(config: ModelConfig, seq_len: int) -> dict[str, int]:
    """Training FLOPs per token (6 x forward MACs) per component: attention, attention_scores,
    mlp, lm_head, local_mixer, depth (each rounded; see the module docstring)."""
    factor = TRAINING_FACTOR * FLOPS_PER_MAC
    return {key: round(factor * value) for key, value in forward_macs_breakdown(config, seq_len).items()}


def forward_flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs per token: 2 x the forward multiply-adds of every component."""
    return round(FLOPS_PER_MAC * sum(forward_macs_breakdown(config, seq_len).values()))


def training_flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token of sequences of `seq_len` tokens: 3 x forward FLOPs = 6 x the
    forward multiply-adds of the attention and MLP matmuls, the causal attention scores, the LM
    head, the local mixer and the depth operator's own reads and writes (module docstring)."""
    factor = TRAINING_FACTOR * FLOPS_PER_MAC
    return round(factor * sum(forward_macs_breakdown(config, seq_len).values()))
