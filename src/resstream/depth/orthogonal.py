"""Orthogonal Residual Update: each sublayer adds only the part of its output orthogonal to the
stream it read.

Paper: "Revisiting Residual Connections: Orthogonal Updates for Stable and Efficient Deep
Networks", Giyeong Oh, Woohyun Cho, Siyeol Kim, Suhwan Choi, Youngjae Yu (NeurIPS 2025, arXiv
2505.11881). For every sublayer s (attention, MLP, mixer sub-block), per token:

    f   = F_s(Norm_s(x_s))
    x_{s+1} = x_s + f - (<x_s, f> / (<x_s, x_s> + eps)) x_s

The projection is onto the stream x_s itself (not its normalised value), per token over the d
channels (the released code's "channel" method for transformers, BootsofLagrangian/ortho-residual
src/ortho_residual/llama/residual.py), with eps added to the squared norm: eps = 1e-6, the
released code's default (`eps`). The dot products run in float32 (float64 for a float64 model).

starts_at_baseline is False: the component of every update along the stream is removed from the
first step on.

`depth_layers`: an inactive block's sublayers use standard addition (the whole output).
"""
from __future__ import annotations

from dataclasses import dataclass

from resstream.depth.base import DepthOperator, cast, compute_dtype
from resstream.options import require
from resstream.registry import register_depth_operator


@register_depth_operator("orthogonal")
class Orthogonal(DepthOperator):
    aggregates = "sum of embedding and the sublayer outputs' components orthogonal to the stream"
    mixing = "dynamic"
    paper = ("Oh, Cho, Kim, Choi, Yu: Revisiting Residual Connections: Orthogonal Updates for "
             "Stable and Efficient Deep Networks (NeurIPS 2025, arXiv 2505.11881)")
    starts_at_baseline = False  # the parallel component is removed, see the module docstring

    @dataclass
    class Options:
        eps: float = 1e-6  # added to <x, x>

    @classmethod
    def validate_config(cls, config, options) -> None:
        require(options.eps > 0, "depth_options.eps", options.eps, "a number > 0")

    def init_state(self, x0, ctx):
        return x0

    def read(self, state, site, norm, ctx):
        return norm(state)

    def write(self, state, site, out, ctx):
        if not self.is_active(site.layer):
            return state + out
        dtype = compute_dtype(state.dtype)
        x, f = cast(state, dtype), cast(out, dtype)
        squared_norm = (x * x).sum(-1, keepdim=True) + self.options.eps
        coefficient = (x * f).sum(-1, keepdim=True) / squared_norm
        return state + (f - coefficient * x).to(out.dtype)

    def finalize(self, state, ctx):
        return state

    def forward_macs_per_token(self, seq_len):
        """Per active sublayer: <x, f> d, <x, x> d, the projection c x d (the subtraction and
        the addition are free)."""
        return sum(self.is_active(site.layer) for site in self.sites) * 3 * self.d_model

    def no_weight_decay(self):
        """No parameters of its own."""
        return set()
