"""Hyper-Connections (Zhu, Huang, Chen, Chen, Xu, Zhou, Zhang, Li, Zhou; "Hyper-Connections",
ICLR 2025, arXiv 2409.19606), static (SHC) and dynamic (DHC).

The residual becomes n streams H in R^{n x d} per token (`streams`, paper default n = 4),
initialised as n copies of the embedding and summed before the final norm and LM head. Every
sublayer T (attention, MLP, mixer sub-block) is wrapped by the (n+1) x (n+1) matrix
HC = [[0, B], [A_m, A_r]] with B in R^{1 x n} (write), A_m in R^{n x 1} (read), A_r in R^{n x n}:

    h_in = A_m^T H                       the sublayer input (then its own pre-norm)
    H'   = B^T T(Norm(h_in)) + A_r^T H   i.e. stream i: B_i * T(.) + sum_j A_r[j, i] H_j

Dynamic HC (`dynamic=True`, default) makes the three matrices functions of the streams, each
stream j producing its own row from its own normalised vector H_bar_j = RMSNorm(H_j):

    A_m(H)[j]    = s_alpha * tanh(H_bar_j . W_m)     + A_m[j]        W_m in R^d
    A_r(H)[j, :] = s_alpha * tanh(H_bar_j W_r)       + A_r[j, :]     W_r in R^{d x n}
    B(H)[j]      = s_beta  * tanh(H_bar_j . W_beta)  + B[j]          W_beta in R^d

Init (paper eq. 14 / App. J): W_m = W_r = W_beta = 0, B = 1, A_m = e_{k mod n} with k the
sublayer's global 0-based index (we count every sublayer as a "layer", as the paper wraps
attention and FFN separately), A_r = I, s_alpha = s_beta = 0.01. Every stream then stays equal to
the standard residual, so the model starts at the standard model; the final sum is n times the
standard stream, which the final RMSNorm removes up to its eps (exact for small norm_eps).
Static HC has only A_m, A_r, B.

Our choices: the per-stream norm of the dynamic part is an RMSNorm with a learned weight and the
model's norm_eps (the paper's code uses LayerNorm; the `hyper-connections` package uses an
eps-free RMSNorm with weight 1 + gamma, which is what tests/test_hyper.py maps onto ours). Left
out: the paper's sqrt(n) rescaling of output-projection init (the sublayers belong to the model)
and weight-decay exemptions (an optimizer concern).

depth_layers: an inactive sublayer is the standard residual applied to every stream: it reads
the stream mean and adds its output to every stream (fixed A_m = 1/n, A_r = I, B = 1). With
identical streams (as at init) that is exactly standard addition, so any subset starts at the
standard model.

All stream arithmetic runs in float32 (float64 for a float64 model) with autocast off; the
streams are kept in the embedding's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from resstream.depth.attnres import NormalizedScores, compute_dtype
from resstream.depth.base import DepthOperator
from resstream.options import require
from resstream.registry import register_depth_operator


def width_connection(streams: Tensor, read: Tensor, mix: Tensor) -> tuple[Tensor, Tensor]:
    """h_in = sum_j read[j] H_j and the mixed residual, stream i = sum_j mix[j, i] H_j, as one
    batched matmul over tokens. streams [B, T, n, d]; read [n] or [B, T, n]; mix [n, n] or
    [B, T, n, n] (row j = from stream j). Returns h_in [B, T, d] and the residual [B, T, n, d]."""
    *lead, n, d = streams.shape
    weights = torch.cat([read.unsqueeze(-1), mix], dim=-1).transpose(-1, -2)  # [..., n+1, n]
    weights = weights.expand(*lead, n + 1, n).reshape(-1, n + 1, n)
    out = torch.bmm(weights, streams.reshape(-1, n, d))  # [B*T, n+1, d]
    h_in, residual = out.split([1, n], dim=1)
    return h_in.view(*lead, d), residual.view(*lead, n, d)


def depth_connection(residual: Tensor, write: Tensor, out: Tensor) -> Tensor:
    """Stream i = residual_i + write[i] * out, one fused batched op. residual [B, T, n, d];
    write [n] or [B, T, n]; out [B, T, d]."""
    *lead, n, d = residual.shape
    write = write.expand(*lead, n).reshape(-1, n, 1)
    streams = torch.baddbmm(residual.reshape(-1, n, d), write, out.reshape(-1, 1, d))
    return streams.view(*lead, n, d)


@dataclass
class StreamState:
    streams: Tensor  # [B, T, n, d] in the stream dtype
    residual: Tensor | None = None  # mixed streams from the last read (A_r^T H)
    write: Tensor | None = None  # write weights B of the last read, [..., n]


class HyperConnection(nn.Module):
    """The hyper-connection of one sublayer (paper names: a_m = A_m, a_r = A_r, b = B)."""

    def __init__(self, d_model: int, n: int, index: int, dynamic: bool, eps: float):
        super().__init__()
        self.eps = eps
        a_m = torch.zeros(n)
        a_m[index % n] = 1.0  # e_{k mod n}: also breaks the symmetry of the identical streams
        self.a_m = nn.Parameter(a_m)
        self.a_r = nn.Parameter(torch.eye(n))
        self.b = nn.Parameter(torch.ones(n))
        self.dynamic = dynamic
        if dynamic:
            self.norm_weight = nn.Parameter(torch.ones(d_model))
            self.w_m = nn.Parameter(torch.zeros(d_model))
            self.w_r = nn.Parameter(torch.zeros(d_model, n))
            self.w_b = nn.Parameter(torch.zeros(d_model))
            self.s_alpha = nn.Parameter(torch.tensor(0.01))
            self.s_beta = nn.Parameter(torch.tensor(0.01))

    def coefficients(self, streams: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(A_m [..., n], A_r [..., n, n], B [..., n]) for streams [B, T, n, d]."""
        dtype = streams.dtype
        a_m, a_r, b = self.a_m.to(dtype), self.a_r.to(dtype), self.b.to(dtype)
        if not self.dynamic:
            return a_m, a_r, b
        # tanh(RMSNorm(H_j) W): the norm weight folds into W, the 1/rms is applied after W
        proj = torch.cat([self.w_m[:, None], self.w_r, self.w_b[:, None]], dim=1)
        proj = (self.norm_weight[:, None] * proj).to(dtype)
        t = torch.tanh(NormalizedScores.apply(streams, proj.t(), self.eps))
        s_alpha, s_beta = self.s_alpha.to(dtype), self.s_beta.to(dtype)
        return a_m + s_alpha * t[..., 0], a_r + s_alpha * t[..., 1:-1], b + s_beta * t[..., -1]


@register_depth_operator("hyper")
class HyperConnections(DepthOperator):
    aggregates = ("n residual streams: per-sublayer learned read (A_m), write (B) and stream "
                  "mix (A_r)")
    paper = "Zhu et al., Hyper-Connections (ICLR 2025, arXiv 2409.19606)"
    starts_at_baseline = True  # up to the final norm's eps (the streams are summed)

    @dataclass
    class Options:
        streams: int = 4  # expansion rate n
        dynamic: bool = True  # DHC (input-dependent A_m, A_r, B); False = static SHC

    @classmethod
    def validate_config(cls, config, options) -> None:
        require(options.streams >= 1, "depth_options.streams", options.streams, "an integer >= 1")

    @property
    def mixing(self) -> str:  # type: ignore[override]
        return "dynamic" if self.options.dynamic else "static"

    def __init__(self, config, sites, options):
        super().__init__(config, sites, options)
        self.n = options.streams
        self.connections = nn.ModuleDict({
            str(s.index): self.new_connection(config, s.index)
            for s in sites if self.is_active(s.layer)})

    def new_connection(self, config, index: int) -> nn.Module:
        return HyperConnection(config.d_model, self.n, index, self.options.dynamic, config.norm_eps)

    # ---------------------------------------------------------------- hooks
    def init_state(self, x0, ctx):
        streams = x0.unsqueeze(-2).expand(*x0.shape[:-1], self.n, x0.shape[-1])
        return StreamState(streams.contiguous())

    def read(self, state, site, norm, ctx):
        key = str(site.index)
        streams = state.streams
        if key not in self.connections:  # inactive: standard residual on every stream
            state.residual, state.write = None, None
            return norm(streams.mean(-2))
        with torch.autocast(streams.device.type, enabled=False):
            work = streams.to(compute_dtype(streams.dtype))
            read, mix, write = self.connections[key].coefficients(work)
            h_in, state.residual = width_connection(work, read, mix)
            state.write = write
        return norm(h_in.to(streams.dtype))

    def write(self, state, site, out, ctx):
        dtype = state.streams.dtype
        with torch.autocast(out.device.type, enabled=False):
            if state.residual is None:
                state.streams = state.streams + out.to(dtype).unsqueeze(-2)
            else:
                out = out.to(state.residual.dtype)
                state.streams = depth_connection(state.residual, state.write, out).to(dtype)
        state.residual = state.write = None
        return state

    def finalize(self, state, ctx):
        return state.streams.sum(-2)

    # ---------------------------------------------------------------- accounting
    def depth_state_vectors(self) -> int:
        return self.n

    def pipeline_payload(self, layer: int) -> tuple[str, int]:
        return "n (streams)", self.n
