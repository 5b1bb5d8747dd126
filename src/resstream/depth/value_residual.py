"""Value residual (ResFormer): every attention layer after the first mixes its values with the
first attention layer's values.

Paper: "Value Residual Learning" (ResFormer), Zhanchao Zhou, Tianyi Wu, Zhiyun Jiang, Fares
Obeid, Zhenzhong Lan (ACL 2025, arXiv 2410.17897). With V_n = H_{n-1} W_V^n the values of
attention layer n (n = 1..L) and A_n its attention matrix:

    U_1 = A_1 V_1
    U_n = A_n (lambda_1 V_n + lambda_2 V_1)          n >= 2

The hidden-state residual is the standard one. ResFormer fixes lambda_1 = lambda_2 = 0.5
(`lambda1`, `lambda2`); `learnable=True` makes them a learned pair per layer initialised to
those values (the paper's learnable variant). The paper's full text was not at hand when this
was written: the equation and the 0.5 / 0.5 default are our reading of its method, kept as
options so that they can be checked and changed.

Where it acts: on the value vectors global attention computes (after the projection and any
qkv mixer, before the heads split), through the operator interface's `attention_values` hook
(the decoder calls it at every attention site; see DepthOperator.attention_values). The KV
cache therefore holds the mixed values, and a decode step needs V_1 of its own tokens only,
which the first attention layer computes in the same forward: nothing is kept across tokens.
V_1 crosses a pipeline-stage boundary while a later attention layer still reads it.

starts_at_baseline is False: at init every layer after the first attends over the half-half mix.
Without global attention (ShortSWA replacing it) the operator is the standard residual.
`depth_layers`: attention layers of inactive blocks use their own values; V_1 is the first
attention layer's values whether or not its block is active.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from resstream.depth.base import DepthOperator
from resstream.registry import register_depth_operator


@dataclass
class ValueResidualState:
    stream: Tensor  # the standard residual stream
    first_values: Tensor | None = None  # V_1 of this forward's tokens, once computed


@register_depth_operator("value_residual")
class ValueResidual(DepthOperator):
    aggregates = "standard sum; attention values lambda_1 V_n + lambda_2 V_1 (the first layer's)"
    mixing = "static"
    paper = ("Zhou, Wu, Jiang, Obeid, Lan: Value Residual Learning (ResFormer, ACL 2025, "
             "arXiv 2410.17897)")
    starts_at_baseline = False  # half-half value mix at init, see the module docstring
    transforms_values = True

    @dataclass
    class Options:
        lambda1: float = 0.5  # weight of the layer's own values V_n
        lambda2: float = 0.5  # weight of the first layer's values V_1
        learnable: bool = False  # learn (lambda1, lambda2) per layer, from these values

    def __init__(self, config, sites, options):
        super().__init__(config, sites, options)
        attention = [s for s in sites if s.kind == "attn"]
        self.first = attention[0].index if attention else None
        # attention sites that mix in V_1; slot[site.index] is its row in `lambdas`
        mixing = [s for s in attention[1:] if self.is_active(s.layer)]
        self.slot = {s.index: i for i, s in enumerate(mixing)}
        self.last_reader_layer = mixing[-1].layer if mixing else -1
        if options.learnable:  # one (lambda1, lambda2) row per mixing layer
            self.lambdas = nn.Parameter(
                torch.tensor([options.lambda1, options.lambda2]).repeat(len(mixing), 1))
        self.kv_width = config.kv_heads * config.head_dim

    # ---------------------------------------------------------------- hooks
    def init_state(self, x0, ctx):
        return ValueResidualState(x0)

    def read(self, state, site, norm, ctx):
        return norm(state.stream)

    def attention_values(self, state, site, v, ctx):
        if site.index == self.first:
            # a copy when v is a slice of a fused q|k|v tensor (a qkv mixer): the state then
            # holds V_1 alone, not the whole fused storage
            state.first_values = v.contiguous()
            return v
        slot = self.slot.get(site.index)
        if slot is None:  # an inactive block's attention
            return v
        if self.options.learnable:
            lambda1, lambda2 = self.lambdas[slot].to(v.dtype)
        else:  # plain numbers: nothing to keep in a checkpoint
            lambda1, lambda2 = self.options.lambda1, self.options.lambda2
        return lambda1 * v + lambda2 * state.first_values

    def write(self, state, site, out, ctx):
        state.stream = state.stream + out
        return state

    def finalize(self, state, ctx):
        return state.stream

    # ---------------------------------------------------------------- accounting
    def depth_state_vectors(self) -> int:
        """The stream and V_1 (kv_heads * head_dim wide, counted as a whole d-vector here;
        depth_state_values counts it exactly)."""
        return 2 if self.slot else 1

    def depth_state_values(self) -> int:
        return self.d_model + (self.kv_width if self.slot else 0)

    def _sends_first_values(self, layer: int) -> bool:
        """Whether V_1 exists after block `layer` and a later attention layer reads it."""
        made = self.first is not None and self.sites[self.first].layer <= layer
        return made and layer < self.last_reader_layer

    def stage_transient(self, layer: int) -> frozenset[str]:
        """V_1 stays behind once no later attention layer reads it."""
        return frozenset() if self._sends_first_values(layer) else frozenset({"first_values"})

    def pipeline_payload(self, layer: int) -> tuple[str, float]:
        if not self._sends_first_values(layer):
            return "1", 1
        extra = self.kv_width / self.d_model
        return "1 + kv_heads * head_dim / d (the stream and V_1)", 1 + extra

    def forward_macs_per_token(self, seq_len: int) -> int:
        """lambda_1 V_n + lambda_2 V_1 at every mixing attention layer: 2 kv_width MACs each."""
        return len(self.slot) * 2 * self.kv_width

    def no_weight_decay(self) -> set[str]:
        """lambdas (learnable): mixing coefficients initialised to a constant."""
        return {name for name, _ in self.named_parameters()}
