"""Peri-LN: a norm around every sublayer, on its input (the pre-norm) and on its output.

Paper: "Peri-LN: Revisiting Normalization Layer in the Transformer Architecture", Jeonghoon Kim,
Byeongchan Lee, Cheonbok Park, Yeontaek Oh, Beomjun Kim, Taehwan Yoo, Seongjin Shin, Dongyoon Han,
Jinwoo Shin, Kang Min Yoo (ICML 2025, arXiv 2502.02732). For every sublayer s (attention, MLP,
mixer sub-block):

    x_{s+1} = x_s + Norm_out_s(F_s(Norm_in_s(x_s)))

Norm_in_s is the sublayer's own pre-norm; Norm_out_s is a norm this operator adds per active
sublayer: the decoder's RMSNorm with a learned gain, initialised to `output_init` (default 1, the
norm's ordinary init, as in the open models with output norms the paper's introduction names,
Gemma and OLMo). Only the paper's abstract and introduction could be read here, not its method
section; so the gain init and the optional norm of the embedding (`embedding_norm`, off by
default: x_0 = Norm_emb(embedding) with one more gain, init 1; OLMo-core's Peri-LN ladder has
this switch) are our choices, not read from the paper. The model's final norm is kept.

starts_at_baseline is False: every branch enters the stream normalised (RMS equal to its gain),
not at the small scale of the baseline's freshly initialised sublayers.

`depth_layers`: an inactive block's sublayers use standard addition (no output norm).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from resstream.depth.base import DepthOperator
from resstream.layers import RMSNorm
from resstream.options import require
from resstream.registry import register_depth_operator


@register_depth_operator("peri_ln")
class PeriLN(DepthOperator):
    aggregates = "sum of embedding and normalised sublayer outputs (an output norm per sublayer)"
    mixing = "none"
    paper = ("Kim, Lee, Park, Oh, Kim, Yoo, Shin, Han, Shin, Yoo: Peri-LN: Revisiting "
             "Normalization Layer in the Transformer Architecture (ICML 2025, arXiv 2502.02732)")
    source_note = ("only the abstract and introduction of the paper were readable; the "
                   "output-norm gain init (1) and the embedding norm switch are our choices")
    starts_at_baseline = False  # normalised branches at init, see the module docstring

    @dataclass
    class Options:
        output_init: float = 1.0  # initial gain of every output norm
        embedding_norm: bool = False  # also normalise the embedding (an extra norm)

    @classmethod
    def validate_config(cls, config, options) -> None:
        require(options.output_init > 0, "depth_options.output_init", options.output_init,
                "a number > 0")

    def __init__(self, config, sites, options):
        super().__init__(config, sites, options)
        # one output norm per active sublayer; slot[site.index] is its position in `out_norms`
        self.slot = {s.index: i for i, s in enumerate(s for s in sites if self.is_active(s.layer))}
        self.out_norms = nn.ModuleList(RMSNorm(config.d_model, config.norm_eps) for _ in self.slot)
        with torch.no_grad():
            for norm in self.out_norms:
                norm.weight.fill_(options.output_init)
        self.embed_norm = (RMSNorm(config.d_model, config.norm_eps) if options.embedding_norm
                           else None)

    def init_state(self, x0, ctx):
        return x0 if self.embed_norm is None else self.embed_norm(x0)

    def read(self, state, site, norm, ctx):
        return norm(state)

    def write(self, state, site, out, ctx):
        slot = self.slot.get(site.index)
        return state + (out if slot is None else self.out_norms[slot](out))

    def finalize(self, state, ctx):
        return state

    def forward_macs_per_token(self, seq_len):
        """An RMSNorm (2 d) per active sublayer, and on the embedding when enabled."""
        return (len(self.slot) + (self.embed_norm is not None)) * 2 * self.d_model

    def no_weight_decay(self):
        """The norm gains (1-D, never decayed anyway; decay would pull them toward 0)."""
        return {name for name, _ in self.named_parameters()}
