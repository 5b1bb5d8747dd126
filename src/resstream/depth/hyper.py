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

Implementation (training is bound by passes over the [B, T, n, d] streams, decoding by the
number of small ops): each sublayer's coefficients form one table C [..., n, n+2] (columns A_m |
A_r | B), C = static + scale * tanh(Z), with Z_j = RMSNorm(H_j) W computed as
(H_j W') / hypot(|H_j|, sqrt(d eps)), W' = sqrt(d) * norm weight * W (`normalized_projection`);
the tables' parameters of all sublayers are stacked once per forward. Training and prefill run
hand-written autograd Functions: `HyperRead` (coefficients, h_in and the mixed streams from one
batched matmul; its backward builds the streams' gradient in one buffer) and `StreamWrite` (one
addcmul). A decode step (`is_decode_step`) keeps the streams as [B, n, d], reads a sublayer
with ten small ops (`decode_read`) and takes the stacked tables from the decode cache
(`HyperWorkspace`), built once instead of at every step.

`impl` (see `use_naive`): "fused" is the path above; "naive" is the equations above in plain
autograd ops (`naive_coefficients`, `naive_read`, `naive_write`), the streams [..., n, d] in
every step, decode included; "auto" (default) is fused, in eager mode and under torch.compile
alike: the fused nodes trace as one graph, and they measured faster both in CPU eager and
compiled (compiled naive / compiled fused: 1.17x for hyper, 1.31x for mhc, CPU, 1 thread) and
in CUDA eager on an H200 (docs/benchmarks.md).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from resstream.depth.base import (DecodeWorkspace, DepthOperator, cast, compute_dtype,
                                  decode_workspace, is_decode_step, use_naive, validate_impl)
from resstream.options import require
from resstream.registry import register_depth_operator
from resstream.routing import site_label, stream_mixing_result

STATIC = ("a_m", "a_r", "b")
DYNAMIC = ("w_m", "w_r", "w_b", "norm_weight", "s_alpha", "s_beta")


NO_CONTEXT = contextlib.nullcontext()


def stream_math(state: "StreamState", x: Tensor):
    """Autocast off for the stream arithmetic; the context is only entered when autocast is on
    (whether it can be is checked once per forward: a decode step counts microseconds)."""
    if state.autocast and torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return NO_CONTEXT


def mix(streams: Tensor, table: Tensor) -> tuple[Tensor, Tensor]:
    """h_in = sum_j C[j, 0] H_j [N, 1, d] and the mixed streams, stream i = sum_j C[j, 1+i] H_j
    [N, n, d], from streams [N, n, d] and a table C [N, n, >= n+1] (A_m | A_r | ...): one
    batched matmul; h_in is copied out so that the sublayer's norm, which saves its input for
    the backward, does not keep the whole [N, n+1, d] product alive."""
    n = streams.shape[1]
    h_in, mixed = torch.bmm(table[..., :n + 1].mT, streams).split_with_sizes([1, n], dim=1)
    return h_in.clone(), mixed


def mix_backward(streams: Tensor, table: Tensor, grad_h: Tensor, grad_mixed: Tensor
                 ) -> tuple[Tensor, Tensor]:
    """Gradients of `mix` for its streams (built in one buffer: no [N, n+1, d] concatenation of
    the output gradients) and for table[..., :n+1]."""
    n = streams.shape[1]
    # (a stride-0 gradient, as from the final sum, would send bmm into a per-token loop)
    grad_h, grad_mixed = grad_h.contiguous(), grad_mixed.contiguous()
    grad_table = torch.cat([torch.bmm(streams, grad_h.mT), torch.bmm(streams, grad_mixed.mT)], -1)
    grad_streams = torch.bmm(table[..., 1:n + 1], grad_mixed).addcmul_(table[..., :1], grad_h)
    return grad_streams, grad_table


class StreamMix(torch.autograd.Function):
    """`mix` with its hand-written backward (static HC, mHC)."""

    @staticmethod
    def forward(ctx, streams, table):
        ctx.save_for_backward(streams, table)
        return mix(streams, table)

    @staticmethod
    def backward(ctx, grad_h, grad_mixed):
        return mix_backward(*ctx.saved_tensors, grad_h, grad_mixed)


class StreamWrite(torch.autograd.Function):
    """Stream i = mixed_i + B_i * out for mixed [N, n, d], B [N, n, 1], out [N, 1, d]: one
    addcmul (a baddbmm copies, then accumulates: twice the passes over [N, n, d]); the backward
    is two batched matrix-vector products."""

    @staticmethod
    def forward(ctx, mixed, write, out):
        ctx.save_for_backward(write, out)
        return torch.addcmul(mixed, write, out)

    @staticmethod
    def backward(ctx, grad):
        write, out = ctx.saved_tensors
        grad = grad.contiguous()
        return grad, torch.bmm(grad, out.mT), torch.bmm(write.mT, grad)


def normalized_projection(x: Tensor, proj: Tensor, floor: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Z = (x proj) / hypot(|x|, floor) over the last dim of x [..., D], i.e. RMSNorm(x) W for
    proj = sqrt(D) W and floor = sqrt(D eps): the 1/rms is applied after the projection, so the
    normalised x is never formed. Returns (Z, x proj, hypot)."""
    dots = torch.matmul(x, proj)
    norm = torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), floor)
    return dots / norm, dots, norm


def normalized_projection_backward(x: Tensor, proj: Tensor, dots: Tensor, norm: Tensor,
                                   grad_z: Tensor, grad_x: Tensor | None = None
                                   ) -> tuple[Tensor, Tensor]:
    """Gradients of `normalized_projection` for x (added in place into grad_x when given: no
    temporary of its size) and for proj."""
    size, width = proj.shape
    grad_dots = grad_z / norm
    # d hypot(|x|, floor) / dx = x / hypot
    grad_norm = (grad_dots * dots).sum(-1, keepdim=True).div_(norm.square()).neg_()
    grad_dots = grad_dots.view(-1, width)
    if grad_x is None:
        grad_x = (grad_dots @ proj.t()).view(x.shape)
    else:
        grad_x.view(-1, size).addmm_(grad_dots, proj.t())
    grad_x.addcmul_(x, grad_norm)
    return grad_x, (grad_dots.t() @ x.reshape(-1, size)).t()  # (the faster orientation)


class NormalizedProjection(torch.autograd.Function):
    """`normalized_projection` with its hand-written backward (mHC)."""

    @staticmethod
    def forward(ctx, x, proj, floor):
        z, dots, norm = normalized_projection(x, proj, floor)
        ctx.save_for_backward(x, proj, dots, norm)
        return z

    @staticmethod
    def backward(ctx, grad_z):
        return *normalized_projection_backward(*ctx.saved_tensors, grad_z), None


def dynamic_table(streams: Tensor, proj: Tensor, static: Tensor, scale: Tensor, floor: Tensor
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """C = static + scale * tanh(Z) [N, n, n+2] for streams [N, n, d], Z_j = RMSNorm(H_j) W
    (`normalized_projection`; proj holds sqrt(d) * norm weight * [W_m | W_r | W_beta]).
    Returns (C, H proj, hypot, tanh(Z))."""
    z, dots, norm = normalized_projection(streams, proj, floor)
    t = z.tanh_()
    return torch.addcmul(static, t, scale), dots, norm, t


class HyperRead(torch.autograd.Function):
    """One dynamic read: (h_in [N, 1, d], mixed streams [N, n, d], write B [N, n, 1]) from the
    streams [N, n, d] and the sublayer's tables. Training is memory-bound on the [N, n, d]
    streams: this keeps only them (and [N, n, n+2] coefficients) for the backward, which builds
    the streams' gradient from its four terms in one buffer (autograd would add them up)."""

    @staticmethod
    def forward(ctx, streams, proj, static, scale, floor):
        table, dots, norm, t = dynamic_table(streams, proj, static, scale, floor)
        h_in, mixed = mix(streams, table)
        ctx.save_for_backward(streams, proj, scale, table, dots, norm, t)
        return h_in, mixed, table[..., streams.shape[1] + 1:]

    @staticmethod
    def backward(ctx, grad_h, grad_mixed, grad_write):
        streams, proj, scale, table, dots, norm, t = ctx.saved_tensors
        grad_streams, grad_table = mix_backward(streams, table, grad_h, grad_mixed)
        grad_table = torch.cat([grad_table, grad_write], -1)
        grad_scale = (grad_table * t).sum((0, 1))
        grad_z = torch.ops.aten.tanh_backward(grad_table * scale, t)
        grad_streams, grad_proj = normalized_projection_backward(streams, proj, dots, norm, grad_z,
                                                                 grad_streams)
        return grad_streams, grad_proj, grad_table.sum(0), grad_scale, None


@dataclass
class StreamState:
    streams: Tensor  # [B, T, n, d] in the stream dtype; [B, n, d] in a decode step
    residual: Tensor | None = None  # mixed streams from the last read (A_r^T H), [N, n, d]
    write: Tensor | None = None  # write weights B of the last read, [N, n, 1] (or [n, 1])
    tables: dict | None = None  # per active sublayer, what its read needs (see site_tables)
    decode: bool = False  # decode-step layout
    naive: bool = False  # the naive path (`impl`): streams [..., n, d] in every step
    autocast: bool = True  # False: autocast was off at init_state (skip its context)


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


def coefficient_tables(connections: list[HyperConnection], dtype: torch.dtype) -> list[tuple]:
    """Per connection (proj [d, n+2] | None, static [n, n+2], scale [n+2] | None, floor): the
    inputs of `dynamic_table`, from the parameters of all sublayers stacked (a few ops per
    forward instead of a dozen per read). static = [A_m | A_r | B], scale = (s_alpha x (n+1),
    s_beta), proj = sqrt(d) * norm weight * [W_m | W_r | W_beta], floor = sqrt(d * eps)."""

    params = [c._parameters for c in connections]  # (getattr on a Module costs ~0.5 µs)

    def stacked(name):
        return cast(torch.stack([p[name] for p in params]), dtype)

    a_m, a_r, b = map(stacked, STATIC)
    static = torch.cat([a_m.unsqueeze(-1), a_r, b.unsqueeze(-1)], -1).unbind()
    if not connections[0].dynamic:
        return [(None, s, None, None) for s in static]
    w_m, w_r, w_b, weight, s_alpha, s_beta = map(stacked, DYNAMIC)
    d, n = w_r.shape[-2:]
    # built as rows [n+2, d] (a cat along d is several times faster than one along n+2)
    proj = torch.cat([w_m.unsqueeze(-2), w_r.mT, w_b.unsqueeze(-2)], -2)
    proj = (proj * (weight * math.sqrt(d)).unsqueeze(-2)).mT
    scale = torch.stack([s_alpha] * (n + 1) + [s_beta], -1)
    floor = torch.full((), math.sqrt(d * connections[0].eps), dtype=dtype, device=a_m.device)
    return [(p, s, c, floor) for p, s, c in zip(proj.unbind(), static, scale.unbind())]


class HyperWorkspace(DecodeWorkspace):
    """The decode-cache entry of hyper (and mHC): the per-sublayer coefficient tables
    (`site_tables`), built from the weights once instead of at every decode step, where
    stacking every sublayer's parameters cost about 350 us (25 ops, mostly Python) on the
    development CPU (see `DecodeWorkspace` for when they are rebuilt)."""

    def weights(self, op: "HyperConnections") -> list[Tensor]:
        return [p for c in op.connections.values() for p in c._parameters.values()]

    def build(self, op: "HyperConnections", like: Tensor) -> None:
        with torch.no_grad():
            self.tables = op.site_tables(compute_dtype(like.dtype))


@register_depth_operator("hyper")
class HyperConnections(DepthOperator):
    # the fused nodes trace as one graph and compile faster than the naive path (base.use_naive)
    naive_when_compiling = False
    aggregates = ("n residual streams: per-sublayer learned read (A_m), write (B) and stream "
                  "mix (A_r)")
    paper = "Zhu et al., Hyper-Connections (ICLR 2025, arXiv 2409.19606)"
    mixing = "dynamic"  # the default (DHC); `option_metadata`: "static" for dynamic=False
    starts_at_baseline = True  # up to the final norm's eps (the streams are summed)

    @dataclass
    class Options:
        streams: int = 4  # expansion rate n
        dynamic: bool = True  # DHC (input-dependent A_m, A_r, B); False = static SHC
        impl: str = "auto"  # "auto" | "fused" | "naive" (module docstring)

    @classmethod
    def validate_config(cls, config, options) -> None:
        require(options.streams >= 1, "depth_options.streams", options.streams, "an integer >= 1")
        validate_impl(options.impl)

    @classmethod
    def option_metadata(cls, options):
        return {"mixing": "dynamic" if options.dynamic else "static"}

    def __init__(self, config, sites, options):
        super().__init__(config, sites, options)
        self.n = options.streams
        self.connections = nn.ModuleDict({
            str(s.index): self.new_connection(config, s.index)
            for s in sites if self.is_active(s.layer)})

    def new_connection(self, config, index: int) -> nn.Module:
        return HyperConnection(config.d_model, self.n, index, self.options.dynamic, config.norm_eps)

    # ---------------------------------------------------------------- per-sublayer math
    def site_tables(self, dtype: torch.dtype) -> dict[int, tuple]:
        """What each active sublayer's read needs (by site index), computed once per forward."""
        if not self.connections:
            return {}
        tables = coefficient_tables(list(self.connections.values()), dtype)
        return dict(zip(map(int, self.connections), tables))

    def coefficients(self, tables, streams: Tensor) -> Tensor:
        """The coefficient table C [N, n, n+2] (A_m | A_r | B; [n, n+2] for static HC)."""
        proj, static, scale, floor = tables
        return static if proj is None else dynamic_table(streams, proj, static, scale, floor)[0]

    def read_streams(self, tables, streams: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(h_in [N, 1, d], mixed streams [N, n, d], write [N, n, 1]) for streams [N, n, d]."""
        proj, static, scale, floor = tables
        if proj is not None:
            return HyperRead.apply(streams, proj, static, scale, floor)
        table = static.expand(streams.shape[0], -1, -1).contiguous()  # (bmm: no stride-0 batch)
        return self.mix_streams(streams, table)

    def mix_streams(self, streams: Tensor, table: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h_in, mixed = StreamMix.apply(streams, table[..., :self.n + 1])
        return h_in, mixed, table[..., self.n + 1:]

    def decode_read(self, tables, streams: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """A decode step's read, streams [B, n, d]: every weighted sum of the streams is a row
        of one matmul (the last row, weighted by B, is not needed)."""
        table = self.coefficients(tables, streams)
        sums = torch.bmm(table.mT, streams) if table.dim() == 3 else torch.matmul(table.mT, streams)
        h_in, mixed, _ = sums.split_with_sizes([1, self.n, 1], dim=-2)
        return h_in, mixed, table[..., self.n + 1:]

    # ---------------------------------------------------------------- naive path
    def naive_coefficients(self, connection, streams: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(A_m [..., n], A_r [..., n, n], B [..., n]) of one sublayer for streams [..., n, d]."""
        c, dtype = connection, streams.dtype
        a_m, a_r, b = cast(c.a_m, dtype), cast(c.a_r, dtype), cast(c.b, dtype)
        if not c.dynamic:
            return a_m, a_r, b
        h_bar = F.rms_norm(streams, streams.shape[-1:], cast(c.norm_weight, dtype), c.eps)
        s_alpha, s_beta = cast(c.s_alpha, dtype), cast(c.s_beta, dtype)
        a_m = s_alpha * torch.tanh(h_bar @ cast(c.w_m, dtype)) + a_m
        a_r = s_alpha * torch.tanh(h_bar @ cast(c.w_r, dtype)) + a_r
        b = s_beta * torch.tanh(h_bar @ cast(c.w_b, dtype)) + b
        return a_m, a_r, b

    def naive_read(self, connection, streams: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(h_in = A_m^T H [..., d], mixed streams A_r^T H [..., n, d], B [..., n], and the
        table A_m | A_r | B [..., n, n+2] for the routing record) for streams [..., n, d]."""
        a_m, a_r, b = self.naive_coefficients(connection, streams)
        h_in = (a_m.unsqueeze(-2) @ streams).squeeze(-2)  # sum_j A_m[j] H_j
        mixed = a_r.mT @ streams  # stream i: sum_j A_r[j, i] H_j
        table = torch.cat([a_m.unsqueeze(-1), a_r, b.unsqueeze(-1)], -1)
        return h_in, mixed, b, table

    @staticmethod
    def naive_write(mixed: Tensor, write: Tensor, out: Tensor) -> Tensor:
        """Stream i = B_i T(.) + (A_r^T H)_i, for mixed [..., n, d], B [..., n], out [..., d]."""
        return write.unsqueeze(-1) * out.unsqueeze(-2) + mixed

    def naive_tables(self) -> dict[int, nn.Module]:
        """What each active sublayer's naive read needs (by site index): its connection."""
        return {int(key): connection for key, connection in self.connections.items()}

    # ---------------------------------------------------------------- hooks
    def init_state(self, x0, ctx):
        autocast = torch.is_autocast_enabled(x0.device.type)
        if use_naive(self.options.impl, self.naive_when_compiling):
            streams = x0.unsqueeze(-2).expand(*x0.shape[:-1], self.n, x0.shape[-1])
            return StreamState(streams, naive=True, autocast=autocast)
        if is_decode_step(x0):  # [B, 1, d]: the streams as [B, n, d]
            tables = decode_workspace(self, x0, ctx).tables
            return StreamState(x0.expand(-1, self.n, -1), tables=tables, decode=True,
                               autocast=autocast)
        streams = x0.unsqueeze(-2).expand(*x0.shape[:-1], self.n, x0.shape[-1])
        return StreamState(streams.contiguous(), autocast=autocast)

    def read(self, state, site, norm, ctx):
        streams = state.streams
        if state.tables is None:  # (also after a pipeline stage boundary: not sent)
            state.tables = (self.naive_tables() if state.naive
                            else self.site_tables(compute_dtype(streams.dtype)))
        tables = state.tables.get(site.index)
        if tables is None:  # inactive: standard residual on every stream
            state.residual, state.write = None, None
            return norm(streams.mean(-2, keepdim=state.decode))
        with stream_math(state, streams):
            work = cast(streams, compute_dtype(streams.dtype))
            if state.naive:
                h_in, state.residual, state.write, table = self.naive_read(tables, work)
                if self._routing is not None:
                    self._routing.add_mean(site_label(site), table)
            elif state.decode:
                h_in, state.residual, state.write = self.decode_read(tables, work)
            else:
                if self._routing is not None:  # (HyperRead keeps its table inside the node)
                    self._routing.add_mean(site_label(site),
                                           self.coefficients(tables, work.flatten(0, -3)))
                h_in, state.residual, state.write = self.read_streams(tables, work.flatten(0, -3))
                h_in = h_in.view(streams.shape[:-2] + h_in.shape[-1:])
        return norm(cast(h_in, streams.dtype))

    def write(self, state, site, out, ctx):
        dtype = state.streams.dtype
        with stream_math(state, out):
            if state.residual is None:
                out = cast(out, dtype)
                state.streams = state.streams + (out if state.decode else out.unsqueeze(-2))
            elif state.naive:
                out = cast(out, state.residual.dtype)
                state.streams = cast(self.naive_write(state.residual, state.write, out), dtype)
            elif state.decode:  # [B, n, d] + B [B, n, 1] * out [B, 1, d]
                out = cast(out, state.residual.dtype)
                state.streams = cast(torch.addcmul(state.residual, state.write, out), dtype)
            else:
                out = cast(out, state.residual.dtype).reshape(-1, 1, out.shape[-1])
                streams = StreamWrite.apply(state.residual, state.write, out)
                state.streams = cast(streams.view(state.streams.shape), dtype)
        state.residual = state.write = None
        return state

    def finalize(self, state, ctx):
        return state.streams.sum(-2, keepdim=state.decode)

    # ---------------------------------------------------------------- routing weights
    routing_names = ("A_m", "A_r", "B")  # the table's three blocks, as the paper names them

    def routing_result(self, recorder) -> dict:
        """stream_mixing: each active sublayer's A_m, A_r, B, averaged over tokens."""
        return stream_mixing_result(recorder, self.n, self.mixing == "dynamic", self.routing_names)

    def new_cache_entry(self, batch_size: int, max_len: int, device, dtype) -> HyperWorkspace:
        return HyperWorkspace(batch_size)

    # ---------------------------------------------------------------- accounting
    def depth_state_vectors(self) -> int:
        return self.n

    def stage_transient(self, layer: int) -> frozenset[str]:
        """The coefficient tables (derived from the weights: each stage builds its own) and
        the last read's scratch (None after a write)."""
        return frozenset({"tables", "residual", "write"})

    def pipeline_payload(self, layer: int) -> tuple[str, int]:
        return "n (streams)", self.n

    def forward_macs_per_token(self, seq_len: int) -> int:
        """Per active sublayer, n streams of width d: the read A_m^T H, n d; the stream mix
        A_r^T H, n^2 d; the write B_i T(.) into every stream, n d. Dynamic HC adds the
        coefficients from every stream: its RMS, d, and H_bar_j [W_m | W_r | W_beta], (n+2) d,
        i.e. n (n+3) d (tanh free). Inactive sublayers (stream mean, add) and the final sum of
        the streams are plain additions (free)."""
        n, d = self.n, self.d_model
        per_site = (n * n + 2 * n) * d + self.coefficient_macs()
        return len(self.connections) * per_site

    def coefficient_macs(self) -> int:
        """MACs per sublayer of computing the (dynamic) coefficients; 0 for static HC."""
        n, d = self.n, self.d_model
        return n * (n + 3) * d if self.options.dynamic else 0

    def no_weight_decay(self) -> set[str]:
        """All of them: A_m (one-hot), A_r (= I), B (= 1), the zero-initialised dynamic weights
        W_m, W_r, W_beta, the scales s_alpha, s_beta and the norm gain are the connection's
        coefficients (the paper's weight-decay exemptions; lucidrains/hyper-connections issue
        #4 advises no decay on the static connection)."""
        return {name for name, _ in self.named_parameters()}
