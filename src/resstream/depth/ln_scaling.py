"""LayerNorm Scaling (LNS): the pre-norm output of layer l scaled by 1/sqrt(l).

Paper: "The Curse of Depth in Large Language Models", Wenfang Sun, Xinyuan Song, Pengxiang Li,
Lu Yin, Yefeng Zheng, Shiwei Liu (NeurIPS 2025, arXiv 2502.05795). For every sublayer s of
block l (l = 1 .. L, attention, MLP and mixer sub-block alike):

    x_{s+1} = x_s + F_s(Norm_s(x_s) / sqrt(l))

Indexing: the paper scales "the output of the layer normalization inversely by the square root
of its depth" with the layer index l starting at 1; the released code (lmsdss/LayerNorm-Scaling,
peft_pretraining/modeling_llama.py, NORM_TYPE=LNS) multiplies both norms of decoder layer i
(0-based) by 1 / sqrt(i + 1), i.e. one scale per block shared by its sublayers, which is our
default; `index="sublayer"` numbers the sublayers instead (l = s + 1 over all sublayers).

Init: the paper recommends removing the scaled initialisation of the output projections
(GPT-2 / OLMo style, which our decoder uses: std init_std / sqrt(2 L) for attention's W_O and the
MLP's down projection), because combined with LNS it "diminishes the effectiveness of LNS". So
by default (`scaled_init=False`) `init_sublayers` re-draws the output projections of the active
blocks' sublayers (attention's o_proj, the MLP's down_proj, the ShortSWA sub-block's o_proj
unless it is zero-initialised) from N(0, init_std), the std of every other matrix;
`scaled_init=True` keeps the model's init.

starts_at_baseline is False: blocks after the first read scaled inputs (and by default the
output projections start larger).

`depth_layers`: an inactive block's sublayers read the plain pre-norm (scale 1) and keep the
model's init; the numbering l stays the block's (or sublayer's) position in the whole model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn as nn

from resstream.depth.base import DepthOperator
from resstream.options import require
from resstream.registry import register_depth_operator

INDEXES = ("block", "sublayer")
OUTPUT_PROJECTIONS = ("o_proj", "down_proj")  # the residual-writing matrices with scaled init


@register_depth_operator("ln_scaling")
class LNScaling(DepthOperator):
    aggregates = "sum of embedding and all sublayer outputs; layer l reads its pre-norm / sqrt(l)"
    mixing = "none"
    paper = ("Sun, Song, Li, Yin, Zheng, Liu: The Curse of Depth in Large Language Models "
             "(NeurIPS 2025, arXiv 2502.05795)")
    starts_at_baseline = False  # scaled reads and unscaled output init, see the module docstring

    @dataclass
    class Options:
        index: str = "block"  # block | sublayer: what l counts (from 1)
        scaled_init: bool = False  # keep the model's scaled init of the output projections

    @classmethod
    def validate_config(cls, config, options) -> None:
        require(options.index in INDEXES, "depth_options.index", options.index, ", ".join(INDEXES))

    def __init__(self, config, sites, options):
        super().__init__(config, sites, options)
        # site index -> 1/sqrt(l) for active sites whose scale is not 1
        self.scale = {}
        for site in sites:
            depth = (site.layer if options.index == "block" else site.index) + 1
            if self.is_active(site.layer) and depth > 1:
                self.scale[site.index] = 1.0 / math.sqrt(depth)

    def init_sublayers(self, blocks) -> None:
        """Without `scaled_init`: the active blocks' output projections from N(0, init_std)."""
        if self.options.scaled_init:
            return
        for layer, block in enumerate(blocks):
            if not self.is_active(layer):
                continue
            for sublayer in block.sublayers():
                for name, module in sublayer.named_modules():
                    parts = name.split(".")
                    if parts[-1] not in OUTPUT_PROJECTIONS or not isinstance(module, nn.Linear) \
                            or any(part.endswith("_mixer") for part in parts[:-1]):
                        continue
                    weight = module.weight
                    if not weight.is_meta and not weight.any():  # zero-initialised on purpose
                        continue
                    nn.init.normal_(weight, mean=0.0, std=self.config.init_std)

    def init_state(self, x0, ctx):
        return x0

    def read(self, state, site, norm, ctx):
        scale = self.scale.get(site.index)
        return norm(state) if scale is None else norm(state) * scale

    def write(self, state, site, out, ctx):
        return state + out

    def finalize(self, state, ctx):
        return state

    def forward_macs_per_token(self, seq_len):
        """Norm(x) / sqrt(l): d multiplies per active sublayer with l > 1."""
        return len(self.scale) * self.d_model

    def no_weight_decay(self):
        """No parameters of its own."""
        return set()
