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
