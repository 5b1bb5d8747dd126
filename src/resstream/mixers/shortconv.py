"""ShortConv: a short depthwise causal convolution over tokens on attention's q, k, v branches,
the "ShortConvolution" of Mamba / Mamba-2 (`d_conv=4`), GLA / Gated DeltaNet (`conv_size=4`) and
the flash-linear-attention library; Allen-Zhu calls this placement "Canon-b" ("Physics of
Language Models: Part 4.1, Architecture Design and the Magic of Canon Layers", Z. Allen-Zhu,
arXiv 2512.17351): the original Conv1D, with SiLU and without a residual.

Per channel c of the concatenated projections [q; k; v] (width d_q + 2 d_kv), before RoPE:

    y_t = phi( sum_{i=0}^{k-1} w_i ⊙ x_{t-i} + b ),      x_{t-i} = 0 for t - i < 0

with k = 4 taps (`kernel`), phi = SiLU (`activation="silu"`, as in fla) or the identity
(`activation="none"`), bias off by default (fla's default). There is no residual, so attention
sees phi(conv(qkv)) instead of qkv.

Our choices where the sources are silent or differ:
  * init (`init`): "uniform" (default) is PyTorch's Conv1d default U(-1/sqrt(k), 1/sqrt(k)), what
    fla's ShortConvolution (an nn.Conv1d) starts from, drawn so that a seed gives the same taps
    as nn.Conv1d.reset_parameters; "identity" sets w_0 = 1 and the other taps
    to 0, so with activation "none" the model starts exactly at the baseline.
  * the taps are stored lag-ordered: `weight[i]` multiplies x_{t-i} (the formula above), and are
    flipped into F.conv1d's cross-correlation layout at call time.

Decode state: the last k-1 inputs of each conv (`ConvHistory`), (k-1) x C values per sequence
per slot module; a chunk of any length is convolved after prepending that history, so cached
decoding with T = 1 steps, chunks shorter than k-1 or long chunks equals the full forward.

`CausalDepthwiseConv` is shared with the Canon mixer (mixers/canon.py), which adds the residual.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from resstream.mixers.base import LocalMixer
from resstream.options import require
from resstream.registry import register_local_mixer

ACTIVATIONS = ("silu", "none")
CONV_INITS = ("uniform", "identity", "small", "zero")


class ConvHistory:
    """Decode state of one conv: the last k-1 inputs, [streams, B, k-1, C] (zeros before the
    first token, which is the conv's zero padding)."""

    def __init__(self, streams: int, batch_size: int, kernel: int, channels: int, device, dtype):
        self.history = torch.zeros(streams, batch_size, kernel - 1, channels, device=device, dtype=dtype)

    def tensors(self) -> list[Tensor]:
        return [self.history]


class CausalDepthwiseConv(nn.Module):
    """y_t = phi(sum_{i<k} w_i ⊙ x_{t-i} + b) [+ x_t if residual], per channel, over tokens.

    `streams` separate decode histories are kept (3 for the attention-input slot, whose q, k, v
    views may differ when a depth operator gives attention separate inputs). `multiplier` M > 1
    gives every input channel c its own M output channels c*M .. c*M + M-1 (a depthwise conv
    with channel multiplier, as DDL's EC expander needs); the history still holds the inputs."""

    def __init__(self, channels: int, kernel: int = 4, bias: bool = False, activation: str = "silu",
                 residual: bool = False, streams: int = 1, init: str = "uniform", init_std: float = 0.02,
                 multiplier: int = 1):
        super().__init__()
        if residual and multiplier != 1:
            raise ValueError("a residual conv needs multiplier=1 (output width = input width)")
        self.channels, self.kernel, self.streams = channels, kernel, streams
        self.activation, self.residual, self.multiplier = activation, residual, multiplier
        out_channels = channels * multiplier
        self.weight = nn.Parameter(torch.empty(kernel, out_channels))  # weight[i] multiplies x_{t-i}
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.reset_parameters(init, init_std)

    def reset_parameters(self, init: str, init_std: float) -> None:
        with torch.no_grad():
            if init == "uniform":
                self._torch_conv1d_init()
            elif init == "identity":  # y_t = x_t before the activation
                self.weight.zero_()
                self.weight[0].fill_(1.0)
            elif init == "small":
                self.weight.normal_(0.0, init_std)
            elif init == "zero":
                self.weight.zero_()
            else:
                raise ValueError(f"init={init!r} is invalid; allowed: {', '.join(CONV_INITS)}")

    def _torch_conv1d_init(self) -> None:
        """nn.Conv1d.reset_parameters: kaiming_uniform_(a=sqrt(5)) = U(+-1/sqrt(fan_in)) with
        fan_in = k for a depthwise conv, bias U(+-1/sqrt(k)). Drawn in Conv1d's [C*M, 1, k]
        layout and then reordered, so one seed gives the taps an nn.Conv1d of the same shape
        would get (the released Canon / fla code starts from exactly that)."""
        torch_layout = self.weight.new_empty(self.weight.shape[1], 1, self.kernel)
        nn.init.kaiming_uniform_(torch_layout, a=math.sqrt(5))
        self.weight.copy_(torch_layout[:, 0].flip(-1).t())  # oldest-first -> lag-ordered
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.kernel)
            nn.init.uniform_(self.bias, -bound, bound)

    def _conv_weight(self) -> Tensor:
        """[C*M, 1, k] in F.conv1d's layout: cross-correlation, so the oldest tap comes first."""
        return self.weight.flip(0).t().unsqueeze(1)

    def forward(self, x: Tensor, ctx=None, stream: int = 0) -> Tensor:
        """x [B, T, C] -> [B, T, C*M]; with a cache, continues from the stored history."""
        entry = None if ctx is None else ctx.entry(self)
        keep = self.kernel - 1
        if entry is None:
            padded = F.pad(x.transpose(1, 2), (keep, 0))
        else:
            sequence = torch.cat([entry.history[stream].to(x.dtype), x], dim=1)
            entry.history[stream].copy_(sequence[:, sequence.shape[1] - keep:].detach())
            padded = sequence.transpose(1, 2)
        y = F.conv1d(padded, self._conv_weight().to(x.dtype), self.bias, groups=self.channels)
        y = y.transpose(1, 2)
        if self.activation == "silu":
            y = F.silu(y)
        return x + y if self.residual else y

    def new_cache_entry(self, batch_size: int, max_len: int, device, dtype) -> ConvHistory:
        return ConvHistory(self.streams, batch_size, self.kernel, self.channels, device, dtype)

    def extra_repr(self) -> str:
        multiplier = f", multiplier={self.multiplier}" if self.multiplier != 1 else ""
        return (f"channels={self.channels}, kernel={self.kernel}, activation={self.activation}, "
                f"residual={self.residual}, bias={self.bias is not None}, streams={self.streams}"
                f"{multiplier}")


def conv_no_weight_decay(options, module: nn.Module) -> set[str]:
    """The taps of a CausalDepthwiseConv started at a fixed point (init "identity" or "zero")
    act like a gate on a branch that starts at the baseline: no weight decay for them."""
    return {"weight"} if options.init in ("identity", "zero") else set()


def qkv_width(config) -> int:
    """Width of the concatenated q, k, v projections: d_q + 2 d_kv."""
    return (config.n_heads + 2 * config.kv_heads) * config.head_dim


def validate_conv_options(options, allowed_inits: tuple[str, ...] = CONV_INITS) -> None:
    require(isinstance(options.kernel, int) and 1 <= options.kernel <= 64, "mixer_options.kernel",
            options.kernel, "an integer in 1..64 (4 is the usual choice)")
    require(options.activation in ACTIVATIONS, "mixer_options.activation", options.activation,
            ", ".join(ACTIVATIONS))
    require(options.init in allowed_inits, "mixer_options.init", options.init, ", ".join(allowed_inits))


@register_local_mixer("shortconv")
class ShortConv(LocalMixer):
    paper = ("ShortConvolution of Mamba-2 / GLA / fla; Canon-b in Allen-Zhu, Physics of LMs 4.1 "
             "(arXiv 2512.17351)")
    decode_state = "last k-1 inputs of the qkv conv: (k-1) x (d_q + 2 d_kv) per layer"

    @dataclass
    class Options:
        kernel: int = 4  # taps k: the conv sees x_t .. x_{t-k+1}
        activation: str = "silu"  # "silu" (fla default) or "none"
        bias: bool = False
        init: str = "uniform"  # "uniform" (PyTorch Conv1d default) or "identity" (w_0 = 1)

    @classmethod
    def validate_config(cls, config, options) -> None:
        validate_conv_options(options, ("uniform", "identity"))

    @classmethod
    def build(cls, config, layer, options):
        conv = CausalDepthwiseConv(qkv_width(config), options.kernel, options.bias, options.activation,
                                   residual=False, init=options.init, init_std=config.init_std)
        return {"qkv": conv}

    @classmethod
    def forward_macs_per_token(cls, config, seq_len):
        """k taps per channel of the q, k, v projections: k (d_q + 2 d_kv) per block (SiLU free)."""
        return config.n_layers * config.mixer_opts.kernel * qkv_width(config)

    @classmethod
    def no_weight_decay(cls, options, slot, module):
        """The taps are decayed like any conv weight with the default random init ("uniform"), as
        fla / Mamba-2 training does (their optimisers decay every >= 2-D weight); with
        init="identity" (w_0 = 1) decay would pull the conv, which has no residual, from the
        identity toward zero, so the taps are then exempt. The bias is 1-D (never decayed)."""
        return conv_no_weight_decay(options, module)
