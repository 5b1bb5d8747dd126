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
decode histories). Modules that keep decode state define `new_cache_entry(...)`. A slot name
outside SLOTS is an error (`build_mixers`), never dropped.

A model may stack several mixers (`local_mixer: [shortswa, canon]`): each is built from its own
`config.mixer_config(name)`, as if it were alone; modules of two mixers in one in-branch slot
run in the listed order (`MixerChain`); at most one mixer may fill "block", and none may fill
an attention slot ("attn_input", "qkv") when another removes global attention (`check_stack`).
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn as nn

from resstream.errors import UserError
from resstream.options import NoOptions

SLOTS = ("block", "attn_input", "qkv", "mlp_input", "mlp_hidden")
ATTENTION_SLOTS = ("attn_input", "qkv")


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
        """The modules of block `layer` by slot (names from SLOTS)."""
        raise NotImplementedError

    @classmethod
    def slots(cls, config, options: Any) -> tuple[str, ...]:
        """The slots `build` fills with these options (default: built once on the meta device)."""
        with torch.device("meta"):
            return tuple(cls.build(config, 0, options))

    @classmethod
    def replaces_attention(cls, options: Any) -> bool:
        """Whether blocks with this mixer have no global attention (default False)."""
        return False

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


class MixerChain(nn.ModuleList):
    """The modules of several stacked mixers in one in-branch slot, applied in order."""

    def forward(self, x, ctx, stream: int = 0):
        for module in self:
            x = module(x, ctx, stream=stream)
        return x


def check_stack(configs: list) -> None:
    """Raise UserError when stacked mixers (each with its `mixer_config`) cannot share a block:
    two sub-blocks ("block"), or an attention slot where another mixer removes attention."""
    fills: dict[str, list[str]] = {}
    for config in configs:
        for slot in config.local_mixer_cls.slots(config, config.mixer_opts):
            fills.setdefault(slot, []).append(config.local_mixer)
    names = [config.local_mixer for config in configs]
    if len(fills.get("block", [])) > 1:
        raise UserError(f"local_mixer={names} is invalid: {' and '.join(fills['block'])} each add a "
                        "sub-block before attention (slot 'block'); allowed: at most one of them")
    removers = [c.local_mixer for c in configs if c.local_mixer_cls.replaces_attention(c.mixer_opts)]
    inside = sorted({name for slot in ATTENTION_SLOTS for name in fills.get(slot, [])})
    if removers and inside:
        raise UserError(f"local_mixer={names} is invalid: {', '.join(removers)} removes global "
                        f"attention, where {', '.join(inside)} acts; allowed: not both")


def build_mixers(config, layer: int) -> list[tuple[str, str, nn.Module]]:
    """(mixer name, slot, module) of every local mixer of block `layer`, in the mixers' order;
    raises ValueError for a slot name the decoder does not know."""
    parts = []
    for mixer_config in config.mixer_configs():
        name = mixer_config.local_mixer
        built = mixer_config.local_mixer_cls.build(mixer_config, layer, mixer_config.mixer_opts)
        for slot, module in built.items():
            if slot not in SLOTS:
                raise ValueError(f"local mixer {name!r} fills slot {slot!r}, which the decoder does "
                                 f"not know; allowed: {', '.join(SLOTS)}")
            parts.append((name, slot, module))
    return parts
