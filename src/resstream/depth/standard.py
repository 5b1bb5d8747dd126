"""Standard pre-norm residual addition: the baseline every other operator is measured against.

    x_{s+1} = x_s + f_s(Norm(x_s))          for every sublayer s (attention, MLP, mixer)

Unrolled, the input to sublayer s is x_0 + sum_{i<s} f_i: an all-ones weighting of the
embedding and every earlier sublayer output.
"""
from __future__ import annotations

from resstream.depth.base import DepthOperator
from resstream.registry import register_depth_operator


@register_depth_operator("standard")
class Standard(DepthOperator):
    aggregates = "sum of embedding and all sublayer outputs (fixed all-ones weights)"
    mixing = "none"
    paper = "pre-norm residual (He et al. 2016; Xiong et al. 2020)"

    def init_state(self, x0, ctx):
        return x0

    def read(self, state, site, norm, ctx):
        return norm(state)

    def write(self, state, site, out, ctx):
        return state + out

    def finalize(self, state, ctx):
        return state

    def forward_macs_per_token(self, seq_len):
        """0: residual additions are free (the convention every operator counts by)."""
        return 0

    def no_weight_decay(self):
        """No parameters of its own."""
        return set()
