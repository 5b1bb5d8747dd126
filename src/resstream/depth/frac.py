"""Frac-Connections (Zhu, Huang, Zhou, Huang, Zeng, Wu, Min, Zhou; "Frac-Connections: Fractional
Extension of Hyper-Connections", arXiv 2503.14125), static (SFC) and dynamic (DFC).

Hyper-Connections (hyper.py) with an expansion rate n <= 1: instead of n copies of the d-vector,
the one residual stream h in R^d is split into m = 1/n fractions (`fractions`),

    H = Reshape(h, (m, d/m)) = (h_1; ...; h_m),  h_i = h[(i-1) d/m : i d/m]

so the depth state stays one d-vector per token (HC keeps n). Each sublayer T gets a connection
matrix FC = [[0, B], [Gamma, A]] in R^{(m+1) x 2m}: Gamma in R^{m x m} reads the fractions into
the sublayer's input, A in R^{m x m} mixes them for the residual, B in R^m weights the output
fraction that each fraction receives:

    h_in = Reshape(Gamma^T H, d)                 input fraction i = sum_j Gamma[j, i] H_j
    H'   = B o Reshape(T(Norm(h_in)), (m, d/m)) + A^T H
                                                 fraction i: B_i T(.)_i + sum_j A[j, i] H_j

and the model reads Reshape(H, d) (the fractions concatenated) into the final norm and head.
Dynamic FC (`dynamic=True`, default) makes the three matrices functions of the fractions, as DHC
does for HC's streams, fraction j producing row j from its own normalised vector
H_bar_j = RMSNorm(H_j) in R^{d/m}:

    Gamma(H)[j, :] = s_alpha * tanh(H_bar_j W_gamma) + Gamma[j, :]   W_gamma in R^{d/m x m}
    A(H)[j, :]     = s_alpha * tanh(H_bar_j W_alpha) + A[j, :]       W_alpha in R^{d/m x m}
    B(H)[j]        = s_beta  * tanh(H_bar_j . W_beta) + B[j]         W_beta in R^{d/m}

What we could read and what we chose: the paper's abstract and introduction (arXiv HTML) and a
third-party summary of its method section (the reshape, FC in R^{(m+1) x 2m} with rows
(0 .. 0 | beta_1 .. beta_m) and (gamma_{j,i} | alpha_{k,j}), and H_k = B^T T(Gamma^T H) + A^T H);
the method section's own text, its dynamic equations and its init were NOT found. So:
- B applied per fraction (B in R^{1 x m} weights the m output fractions; not a full m x m write,
  which the `hyper-connections` package's num_fracs generalisation uses) and the dynamic form
  above are HC's (hyper.py) carried over to fractions, not read from this paper;
- init: Gamma = I_m, A = I_m, B = 1, W_gamma = W_alpha = W_beta = 0, s_alpha = s_beta = 0.01
  (HC's scales). With Gamma = I the sublayer reads exactly h and every fraction receives its
  own part of T(.): the standard pre-norm residual, exactly (no final-norm eps, as nothing is
  summed), which is how HC initialises to be "equivalent to Pre-Norm". starts_at_baseline is
  True and tested (tests/test_frac.py). The released `hyper-connections` package's
  num_fracs init (every input fraction read from fraction 0) does not start there;
- default m = 4 (summaries of the paper report its DFC x4 runs); the per-fraction norm is an
  RMSNorm with a learned weight and the model's norm_eps (HC's choice in hyper.py).

depth_layers: an inactive sublayer is the standard residual (Gamma = A = I, B = 1 fixed).

Plain autograd throughout (no fused path: the state is one d-vector, as for `standard`); the
fraction arithmetic runs in float32 (float64 for a float64 model) with autocast off, the
stream kept in the embedding's dtype. Weight decay: none on any of its parameters (below).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from resstream.depth.base import DepthOperator, cast, compute_dtype
from resstream.options import require
from resstream.registry import register_depth_operator


class FracConnection(nn.Module):
    """The Frac-Connection of one sublayer (paper names: gamma = Gamma, a = A, b = B)."""

    def __init__(self, width: int, m: int, dynamic: bool, eps: float):
        super().__init__()
        self.eps, self.dynamic = eps, dynamic
        self.gamma = nn.Parameter(torch.eye(m))
        self.a = nn.Parameter(torch.eye(m))
        self.b = nn.Parameter(torch.ones(m))
        if dynamic:  # width = d / m
            self.norm_weight = nn.Parameter(torch.ones(width))
            self.w_gamma = nn.Parameter(torch.zeros(width, m))
            self.w_alpha = nn.Parameter(torch.zeros(width, m))
            self.w_beta = nn.Parameter(torch.zeros(width))
            self.s_alpha = nn.Parameter(torch.tensor(0.01))
            self.s_beta = nn.Parameter(torch.tensor(0.01))

    def coefficients(self, fractions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(Gamma [..., m, m], A [..., m, m], B [..., m]) for fractions [..., m, d/m] (static:
        the parameters themselves)."""
        dtype = fractions.dtype
        gamma, a, b = cast(self.gamma, dtype), cast(self.a, dtype), cast(self.b, dtype)
        if not self.dynamic:
            return gamma, a, b
        h_bar = F.rms_norm(fractions, fractions.shape[-1:], cast(self.norm_weight, dtype), self.eps)
        s_alpha, s_beta = cast(self.s_alpha, dtype), cast(self.s_beta, dtype)
        gamma = s_alpha * torch.tanh(h_bar @ cast(self.w_gamma, dtype)) + gamma
        a = s_alpha * torch.tanh(h_bar @ cast(self.w_alpha, dtype)) + a
        b = s_beta * torch.tanh(h_bar @ cast(self.w_beta, dtype)) + b
        return gamma, a, b


@dataclass
class FracState:
    stream: Tensor  # [B, T, d] (the m fractions, concatenated), in the embedding's dtype
    residual: Tensor | None = None  # A^T H of the last read, [B, T, m, d/m] in compute dtype
    write: Tensor | None = None  # B of the last read, [B, T, m] (or [m] for static FC)


@register_depth_operator("frac")
class FracConnections(DepthOperator):
    aggregates = ("one stream split into m fractions: per-sublayer learned read (Gamma), "
                  "write (B) and fraction mix (A)")
    paper = ("Zhu et al., Frac-Connections: Fractional Extension of Hyper-Connections "
             "(arXiv 2503.14125)")
    source_note = ("method text not found: the fraction equations follow a summary of the paper "
                   "and HC's dynamic form; the init (Gamma = A = I, B = 1) is ours")
    mixing = "dynamic"  # the default (DFC); `option_metadata`: "static" for dynamic=False
    starts_at_baseline = True  # exactly: Gamma = A = I, B = 1 at init

    @dataclass
    class Options:
        fractions: int = 4  # m (the expansion rate n = 1/m)
        dynamic: bool = True  # DFC (input-dependent Gamma, A, B); False = static SFC

    @classmethod
    def validate_config(cls, config, options) -> None:
        require(isinstance(options.fractions, int) and options.fractions >= 1
                and config.d_model % options.fractions == 0, "depth_options.fractions",
                options.fractions, f"an integer >= 1 dividing d_model={config.d_model}")

    @classmethod
    def option_metadata(cls, options):
        return {"mixing": "dynamic" if options.dynamic else "static"}

    def __init__(self, config, sites, options):
        super().__init__(config, sites, options)
        self.m = options.fractions
        self.connections = nn.ModuleDict({
            str(s.index): FracConnection(config.d_model // self.m, self.m, options.dynamic,
                                         config.norm_eps)
            for s in sites if self.is_active(s.layer)})

    def fractions(self, stream: Tensor) -> Tensor:
        """H = Reshape(h, (m, d/m)) in the compute dtype."""
        return cast(stream, compute_dtype(stream.dtype)).unflatten(-1, (self.m, -1))

    def stream_math(self, x: Tensor):
        if torch.is_autocast_enabled(x.device.type):
            return torch.autocast(x.device.type, enabled=False)
        return contextlib.nullcontext()

    # ---------------------------------------------------------------- hooks
    def init_state(self, x0, ctx):
        return FracState(x0)

    def read(self, state, site, norm, ctx):
        key = str(site.index)
        connection = self.connections[key] if key in self.connections else None
        state.residual = state.write = None
        if connection is None:  # inactive: the standard residual
            return norm(state.stream)
        with self.stream_math(state.stream):
            fractions = self.fractions(state.stream)
            gamma, a, state.write = connection.coefficients(fractions)
            h_in = (gamma.mT @ fractions).flatten(-2)  # input fraction i: sum_j Gamma[j, i] H_j
            state.residual = a.mT @ fractions  # fraction i: sum_j A[j, i] H_j
        return norm(cast(h_in, state.stream.dtype))

    def write(self, state, site, out, ctx):
        dtype = state.stream.dtype
        if state.residual is None:
            state.stream = state.stream + cast(out, dtype)
            return state
        with self.stream_math(out):
            out = cast(out, state.residual.dtype).unflatten(-1, (self.m, -1))
            fractions = state.write.unsqueeze(-1) * out + state.residual  # B_i T(.)_i + (A^T H)_i
            state.stream = cast(fractions.flatten(-2), dtype)
        state.residual = state.write = None
        return state

    def finalize(self, state, ctx):
        return state.stream  # Reshape(H, d): the fractions concatenated

    # ---------------------------------------------------------------- accounting
    def stage_transient(self, layer: int) -> frozenset[str]:
        """The last read's scratch (None after a write)."""
        return frozenset({"residual", "write"})

    def pipeline_payload(self, layer: int) -> tuple[str, int]:
        return "1 (the m fractions of one d-vector)", 1

    def forward_macs_per_token(self, seq_len: int) -> int:
        """Per active sublayer, m fractions of width d/m: the read Gamma^T H, m^2 d/m = m d; the
        fraction mix A^T H, m d; the write B_i T(.)_i, d. Dynamic FC adds the coefficients from
        every fraction: its RMS, d/m, and H_bar_j [W_gamma | W_alpha | W_beta], (2m+1) d/m,
        i.e. (2m+2) d over the m fractions (tanh free; HC's convention in hyper.py)."""
        m, d = self.m, self.d_model
        per_site = (2 * m + 1) * d + ((2 * m + 2) * d if self.options.dynamic else 0)
        return len(self.connections) * per_site

    def no_weight_decay(self) -> set[str]:
        """All of them: Gamma and A (= I), B (= 1), the zero-initialised dynamic weights, the
        scales s_alpha, s_beta and the norm gain are the connection's coefficients (as for HC,
        hyper.py)."""
        return {name for name, _ in self.named_parameters()}
