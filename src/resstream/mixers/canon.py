"""Canon layers: residual short causal convolutions over tokens at up to four places per block.

Paper: "Physics of Language Models: Part 4.1, Architecture Design and the Magic of Canon Layers",
Zeyuan Allen-Zhu, arXiv 2512.17351 (NeurIPS 2025). Per channel, with k = 4 taps,

    canon(h)_t = sum_{i=0}^{k-1} w_i ⊙ h_{t-i}          (h_{t-i} = 0 before the first token)
    h <- h + canon(h)

residual on, no activation, no bias (the paper's recommended Transformer defaults). Placements,
chosen by the `placements` string ("ABCD" = all, "AC" = A and C, ...):

    A  attention's normalised input (width d), inside the attention branch ("attn_input" slot)
    B  the concatenated q, k, v projections before RoPE (width d_q + 2 d_kv)  ("qkv" slot)
    C  the MLP's normalised input (width d)                                  ("mlp_input" slot)
    D  the concatenated SwiGLU gate/up projections before the activation
       (width 2 d_ff)                                                        ("mlp_hidden" slot)

Our choices where the paper is silent or its code differs:
  * init (`init`): "uniform" (default) is the released code's: PyTorch's Conv1d default,
    U(+-1/sqrt(k)) for the taps (fan_in = k for a depthwise conv) and, with `bias`, for the bias,
    drawn so a seed gives the taps nn.Conv1d.reset_parameters would (PhysicsLM4's
    TransformerBlock.init_weights calls reset_parameters on every Canon conv; the paper's text
    that we could read does not state an init). "small" draws every tap from N(0, init_std)
    (bias 0): the layer starts close to the identity, so the model starts near the baseline;
    this was our default before, and the design-space study ran with it. "zero" starts
    exactly at the baseline (the taps still get gradients through the residual). The released
    code refuses bias=True (it asserts); ours allows it.
  * B is applied before RoPE (our attention has no QK-norm, so "after QK-norm" is moot).
  * when a depth operator gives attention separate q, k, v inputs (MUDD, DCA), Canon-A is
    applied to each view with one set of weights and a separate decode history per view.
  * `activation` ("none" default, "silu") and `residual` (True default) are options, so the
    Canon-b variant (ShortConv on q, k, v with SiLU, no residual) is also reachable here.

Decode state: the last k-1 inputs of each Canon layer (see mixers/shortconv.py); Canon-A keeps
three histories (one per q/k/v view).
"""
from __future__ import annotations

from dataclasses import dataclass

from resstream.mixers.base import LocalMixer
from resstream.mixers.shortconv import (CausalDepthwiseConv, conv_no_weight_decay, qkv_width,
                                        validate_conv_options)
from resstream.options import require
from resstream.registry import register_local_mixer

PLACEMENT_SLOTS = {"A": "attn_input", "B": "qkv", "C": "mlp_input", "D": "mlp_hidden"}


def placement_width(config, letter: str) -> int:
    if letter == "B":
        return qkv_width(config)
    if letter == "D":
        return 2 * config.ffn_hidden
    return config.d_model


@register_local_mixer("canon")
class Canon(LocalMixer):
    paper = "Allen-Zhu, Physics of Language Models Part 4.1: Canon layers (arXiv 2512.17351)"
    decode_state = ("last k-1 inputs per placement: (k-1) x (3d [A, one per q/k/v view] + "
                    "(d_q+2d_kv) [B] + d [C] + 2 d_ff [D]) per layer")

    @dataclass
    class Options:
        placements: str = "ABCD"  # any set of A, B, C, D (e.g. "AC")
        kernel: int = 4
        activation: str = "none"  # "none" (paper default for Transformers) or "silu"
        residual: bool = True
        bias: bool = False
        init: str = "uniform"  # "uniform" (released code), "small" or "zero" (module docstring)

    @classmethod
    def validate_config(cls, config, options) -> None:
        letters = options.placements
        require(isinstance(letters, str) and len(letters) >= 1 and set(letters) <= set("ABCD")
                and len(set(letters)) == len(letters), "mixer_options.placements", letters,
                "a non-empty set of the letters A, B, C, D without repeats, e.g. ABCD or AC")
        validate_conv_options(options, ("uniform", "small", "zero"))

    @classmethod
    def build(cls, config, layer, options):
        slots = {}
        for letter in sorted(options.placements):
            streams = 3 if letter == "A" else 1
            slots[PLACEMENT_SLOTS[letter]] = CausalDepthwiseConv(
                placement_width(config, letter), options.kernel, options.bias, options.activation,
                residual=options.residual, streams=streams, init=options.init,
                init_std=config.init_std)
        return slots

    @classmethod
    def forward_macs_per_token(cls, config, seq_len):
        """k taps per channel of each placement's width (A, C: d; B: d_q + 2 d_kv; D: 2 d_ff),
        per block; the residual add and activation are free. Canon-A on an operator that gives
        attention separate q, k, v inputs (dca, mudd) runs on each view, counted once here
        (k d MACs, negligible beside the projections)."""
        options = config.mixer_opts
        width = sum(placement_width(config, letter) for letter in options.placements)
        return config.n_layers * options.kernel * width

    @classmethod
    def no_weight_decay(cls, options, slot, module):
        """As ShortConv: the taps are decayed with a random init ("uniform", "small"; the
        released Lingua recipes decay every weight), exempt with init="zero", where they start
        at a fixed point like a zero-initialised gate. The bias is 1-D (never decayed)."""
        return conv_no_weight_decay(options, module)
