"""LayerScale (CaiT): every residual branch is scaled per channel by a learnable vector
initialised to a small epsilon.

Paper: "Going deeper with Image Transformers", Hugo Touvron, Matthieu Cord, Alexandre Sablayrolles,
Gabriel Synnaeve, Herve Jegou (ICCV 2021, arXiv 2103.17239), section 2. Equation, for every
sublayer s (attention, MLP, mixer sub-block):

    x_{s+1} = x_s + diag(lambda_s) F_s(Norm(x_s))     lambda_s in R^d, every entry init epsilon

The paper's rule for epsilon by depth (number of blocks L): 0.1 for L <= 18, 1e-5 for L <= 24,
1e-6 beyond (`init=None`, the default); `init` set to a number overrides it.

At init every branch is scaled by epsilon, so the model is close to the identity across depth
(the embedding plus epsilon-small sublayer outputs), not the standard model: starts_at_baseline
is False. (Unlike ReZero the sublayer weights get gradients from the first step, scaled by
epsilon.)

`depth_layers`: an inactive block's sublayers use standard addition (no lambda).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from resstream.depth.base import DepthOperator
from resstream.options import require
from resstream.registry import register_depth_operator


def cait_epsilon(n_layers: int) -> float:
    """The paper's initial lambda for a network of `n_layers` blocks."""
    if n_layers <= 18:
        return 0.1
    if n_layers <= 24:
        return 1e-5
    return 1e-6


@register_depth_operator("layerscale")
class LayerScale(DepthOperator):
    aggregates = "sum of embedding and sublayer outputs, each scaled per channel (init epsilon)"
    mixing = "static"
    paper = ("Touvron, Cord, Sablayrolles, Synnaeve, Jegou: Going deeper with Image Transformers "
             "(CaiT, ICCV 2021, arXiv 2103.17239)")
    starts_at_baseline = False  # branches scaled by epsilon at init, see the module docstring

    @dataclass
    class Options:
        init: float | None = None  # initial lambda; None: the paper's rule by depth

    @classmethod
    def validate_config(cls, config, options) -> None:
        require(options.init is None or options.init > 0, "depth_options.init", options.init,
                "null (the paper's rule: 0.1 / 1e-5 / 1e-6 by depth) or a number > 0")

    def __init__(self, config, sites, options):
        super().__init__(config, sites, options)
        epsilon = cait_epsilon(config.n_layers) if options.init is None else options.init
        # one vector per active sublayer; slot[site.index] is its row in `scale`
        self.slot = {s.index: i for i, s in enumerate(s for s in sites if self.is_active(s.layer))}
        self.scale = nn.Parameter(torch.full((len(self.slot), config.d_model), epsilon))

    def init_state(self, x0, ctx):
        return x0

    def read(self, state, site, norm, ctx):
        return norm(state)

    def write(self, state, site, out, ctx):
        slot = self.slot.get(site.index)
        if slot is None:
            return state + out
        return state + self.scale[slot].to(out.dtype) * out

    def finalize(self, state, ctx):
        return state

    def forward_macs_per_token(self, seq_len):
        """diag(lambda_s) F_s: d multiplies per active sublayer (the addition is free)."""
        return len(self.slot) * self.d_model

    def no_weight_decay(self):
        """scale: constant-initialised per-channel gates (decay would pull them to 0)."""
        return {"scale"}
