"""The interface of a sequence-axis local mixer.

A mixer fills one or more *slots* of a block:
  "block"       its own pre-norm residual sub-block before global attention (ShortSWA, Algorithm 1):
                a module with `.norm` and `forward(x_normed, ctx) -> delta`
  "attn_input"  applied to attention's normalised input (Canon-A)
  "qkv"         applied to the concatenated q, k, v projections before RoPE (Canon-B, ShortConv)
  "mlp_input"   applied to the MLP's normalised input (Canon-C)
  "mlp_hidden"  applied to the concatenated gate/up projections (Canon-D)
In-branch slot modules have the signature `forward(x [B, T, C], ctx, stream=0) -> [B, T, C]`
(`stream` tells apart the q/k/v views of operators such as MUDD and DCA, which need separate
decode histories). Modules that keep decode state define `new_cache_entry(...)`.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch.nn as nn

from resstream.options import NoOptions

SLOTS = ("block", "attn_input", "qkv", "mlp_input", "mlp_hidden")


class LocalMixer:
    """Registry entry for a local mixer. Subclasses register with `@register_local_mixer`."""

    name: ClassVar[str] = "?"
    Options: ClassVar[type] = NoOptions
    paper: ClassVar[str] = ""
    decode_state: ClassVar[str] = ""  # human-readable: what it keeps per layer while decoding

    @classmethod
    def validate_config(cls, config, options: Any) -> None:
        """Raise UserError for invalid option values or combinations."""

    @classmethod
    def build(cls, config, layer: int, options: Any) -> dict[str, nn.Module]:
        raise NotImplementedError

    @classmethod
    def forward_macs_per_token(cls, config, seq_len: int) -> int:
        """Forward multiply-adds (MACs) per token of this mixer in the whole model (all blocks)
        for sequences of `seq_len` tokens: its own projections, convolutions and local attention
        scores (a causal window of w keys: min(w, t) keys at position t, averaged over the
        positions). Pointwise activations and residual additions are free, and its pre-norm
        too (the baseline's norms are not counted either; see resstream.flops). Global
        attention, when a mixer removes it, is accounted for by resstream.flops, not here.

        Every mixer must declare it: a registry-parametrised test fails on this default."""
        raise NotImplementedError(f"local mixer {cls.name!r} does not declare forward_macs_per_token")

    @classmethod
    def no_weight_decay(cls, options: Any, slot: str, module: nn.Module) -> set[str]:
        """Names (relative to `module`, the one built for `slot`) of parameters that take no
        weight decay. Default: none -- a mixer's weights are ordinary matrices or filters and
        are decayed like attention's (1-D parameters such as biases and norm gains are never
        decayed anyway, see ResStreamLM.parameter_groups)."""
        return set()
