"""ReZero: every residual branch is scaled by a learnable scalar initialised to zero.

Paper: "ReZero is All You Need: Fast Convergence at Large Depth", Thomas Bachlechner, Bodhisattwa
Prasad Majumder, Huanru Henry Mao, Garrison W. Cottrell, Julian McAuley (UAI 2021, arXiv
2003.04887). Equation, for every sublayer s (attention, MLP, mixer sub-block):

    x_{s+1} = x_s + alpha_s F_s(x_s)          alpha_s a scalar, initialised to 0

The paper removes the LayerNorm (ReZero replaces it); its transformer's sublayers read x_s itself.
Our decoder's sublayers own their pre-norm, so by default (`norm=True`) a sublayer reads
Norm(x_s), i.e. x_{s+1} = x_s + alpha_s F_s(Norm(x_s)); `norm=False` reproduces the paper: the
read passes x_s without the norm (the sublayers' pre-norm weights are then unused, and the
operator declares reads_through_norm False).

At init every alpha is 0, so the stream is the embedding alone and the model's output is
head(Norm(embedding)): the identity across depth, not the standard model (starts_at_baseline is
False). Every sublayer weight gets a zero gradient at the first step (only the alphas move),
which is the paper's point: the network starts as the identity and grows its branches.

`depth_layers`: an inactive block's sublayers use standard addition (alpha fixed at 1) and keep
the pre-norm, whatever `norm` says.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from resstream.depth.base import DepthOperator
from resstream.registry import register_depth_operator


@register_depth_operator("rezero")
class ReZero(DepthOperator):
    aggregates = "sum of embedding and sublayer outputs, each scaled by a learned scalar (init 0)"
    mixing = "static"
    paper = ("Bachlechner, Majumder, Mao, Cottrell, McAuley: ReZero is All You Need "
             "(UAI 2021, arXiv 2003.04887)")
    starts_at_baseline = False  # the identity across depth at init, see the module docstring

    @dataclass
    class Options:
        norm: bool = True  # keep the sublayer's pre-norm (False: the paper, no norm)

    @classmethod
    def option_metadata(cls, options):
        return {"reads_through_norm": options.norm}

    def __init__(self, config, sites, options):
        super().__init__(config, sites, options)
        # one scalar per active sublayer; slot[site.index] is its position in `alpha`
        self.slot = {s.index: i for i, s in enumerate(s for s in sites if self.is_active(s.layer))}
        self.alpha = nn.Parameter(torch.zeros(len(self.slot)))

    def init_state(self, x0, ctx):
        return x0

    def read(self, state, site, norm, ctx):
        if self.options.norm or site.index not in self.slot:
            return norm(state)
        return state

    def write(self, state, site, out, ctx):
        slot = self.slot.get(site.index)
        if slot is None:
            return state + out
        return state + self.alpha[slot] * out  # a 0-dim scalar keeps out's dtype

    def finalize(self, state, ctx):
        return state

    def forward_macs_per_token(self, seq_len):
        """alpha_s F_s: d multiplies per active sublayer (the addition is free)."""
        return len(self.slot) * self.d_model

    def no_weight_decay(self):
        """alpha: zero-initialised gates (decay would hold them at the identity start)."""
        return {"alpha"}
