"""DeepNorm (DeepNet): Post-LN with an up-weighted residual and down-scaled sublayer init.

Paper: "DeepNet: Scaling Transformers to 1,000 Layers", Hongyu Wang, Shuming Ma, Li Dong, Shaohan
Huang, Dongdong Zhang, Furu Wei (arXiv 2203.00555; IEEE TPAMI 2024). For every sublayer s:

    x_{s+1} = Norm(alpha x_s + F_s(x_s))

with constants set by the number of layers (blocks) N; for a decoder-only model:

    alpha = (2N)^(1/4)        beta = (8N)^(-1/4)

Sources: the paper's own text was not readable here. The constants are the released code's
(microsoft/torchscale, decoder without an encoder: alpha = (2 N)^(1/4), init divided by
(8 N)^(1/4)) and agree with the paper's decoder-only row as implementations quote it; the
xavier init below is the paper's pseudocode as third-party implementations reproduce it.

beta is an init: the weights of the feed-forward network, the value projection and the attention
output projection are initialised with gain beta, the query and key projections with gain 1.
Defaults and options:
- `init="xavier"` (default, the paper's pseudocode: it re-initialises them with xavier_normal_, gain beta for the FFN / value / output weights and gain 1 for query / key);
  `init="scale"` (the released code, microsoft/torchscale: the model's own init of the FFN,
  value and output weights divided by (8N)^(1/4), query / key untouched); `init="none"` keeps
  the model's init. Our SwiGLU has three FFN matrices (gate, up, down): all three take beta.
  Every attention-like sublayer counts (global attention and the ShortSWA sub-block).
- `alpha`, `beta`: null (the paper's formulas above) or a number overriding them.
The init is applied by `init_sublayers`, which the model calls once after building its blocks
(a checkpoint loaded afterwards replaces it, as it replaces any init), and only in active blocks.

Where the norms come from, the final norm, `embedding_norm` and `depth_layers`: as Post-LN
(post_ln.py): the norm in sublayer s's slot is the post-norm of sublayer s - 1, the model's
final norm that of the last sublayer, so the model has the baseline's parameters; Norm is the
decoder's RMSNorm where the paper uses LayerNorm. An inactive block's sublayers use pre-norm
standard addition and keep the model's init.

starts_at_baseline is False: a Post-LN model (normalised residual, alpha) with rescaled weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from resstream.depth.post_ln import PostLN
from resstream.options import require
from resstream.registry import register_depth_operator

INITS = ("xavier", "scale", "none")
# the role of each projection of a sublayer, by its module name (model.Attention, SwiGLU,
# mixers.shortswa.LocalSelfAttention): "qk" takes gain 1, "beta" takes gain beta
ROLES = {"q_proj": "qk", "k_proj": "qk", "v_proj": "beta", "o_proj": "beta",
         "gate_proj": "beta", "up_proj": "beta", "down_proj": "beta"}


def deepnet_alpha(n_layers: int) -> float:
    """The paper's alpha for a decoder-only model of `n_layers` blocks: (2N)^(1/4)."""
    return (2.0 * n_layers) ** 0.25


def deepnet_beta(n_layers: int) -> float:
    """The paper's beta for a decoder-only model of `n_layers` blocks: (8N)^(-1/4)."""
    return (8.0 * n_layers) ** -0.25


def sublayer_projections(sublayer: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(role, linear) for the projections of one sublayer that DeepNet's init names, skipping
    the modules of local mixers placed inside it (Canon / ShortConv slots)."""
    found = []
    for name, module in sublayer.named_modules():
        parts = name.split(".")
        if any(part.endswith("_mixer") for part in parts[:-1]):
            continue
        role = ROLES.get(parts[-1])
        if role is not None and isinstance(module, nn.Linear):
            found.append((role, module))
    return found


@register_depth_operator("deepnorm")
class DeepNorm(PostLN):
    aggregates = "alpha-weighted stream plus sublayer output, renormalised after every addition"
    mixing = "none"
    paper = ("Wang, Ma, Dong, Huang, Zhang, Wei: DeepNet: Scaling Transformers to 1,000 Layers "
             "(arXiv 2203.00555)")
    starts_at_baseline = False  # Post-LN with alpha and a rescaled init, see the module docstring

    @dataclass
    class Options:
        alpha: float | None = None  # None: (2N)^(1/4)
        beta: float | None = None  # None: (8N)^(-1/4)
        init: str = "xavier"  # xavier (paper) | scale (torchscale) | none
        embedding_norm: bool = True  # the first sublayer's norm normalises the embedding

    @classmethod
    def validate_config(cls, config, options) -> None:
        require(options.alpha is None or options.alpha > 0, "depth_options.alpha", options.alpha,
                "null (the paper's (2N)^(1/4)) or a number > 0")
        require(options.beta is None or options.beta > 0, "depth_options.beta", options.beta,
                "null (the paper's (8N)^(-1/4)) or a number > 0")
        require(options.init in INITS, "depth_options.init", options.init, ", ".join(INITS))

    def __init__(self, config, sites, options):
        super().__init__(config, sites, options)
        self.alpha = deepnet_alpha(config.n_layers) if options.alpha is None else options.alpha
        self.beta = deepnet_beta(config.n_layers) if options.beta is None else options.beta

    def residual_scale(self) -> float:
        return self.alpha

    def init_sublayers(self, blocks) -> None:
        """DeepNet's init of the active blocks' sublayers (`init`, see the module docstring)."""
        if self.options.init == "none":
            return
        for layer, block in enumerate(blocks):
            if not self.is_active(layer):
                continue
            for sublayer in block.sublayers():
                for role, linear in sublayer_projections(sublayer):
                    if self.options.init == "xavier":
                        gain = 1.0 if role == "qk" else self.beta
                        nn.init.xavier_normal_(linear.weight, gain=gain)
                    elif role == "beta":
                        linear.weight.mul_(self.beta)

    def forward_macs_per_token(self, seq_len):
        """alpha x_s: d multiplies per active sublayer (the norms are the baseline's, moved)."""
        if self.alpha == 1.0:
            return 0
        return sum(self.is_active(site.layer) for site in self.sites) * self.d_model
