"""Manifold-constrained Hyper-Connections (DeepSeek-AI, "mHC: Manifold-Constrained
Hyper-Connections", arXiv 2512.24880).

Hyper-Connections (hyper.py) with n residual streams x_l in R^{n x C}, whose mixing
coefficients are computed from ALL streams at once (the flattened n*C vector) and constrained:

    x~      = RMSNorm(vec(x_l))                           in R^{1 x nC}
    H~_pre  = alpha_pre  * (x~ phi_pre)      + b_pre      phi_pre  in R^{nC x n}
    H~_post = alpha_post * (x~ phi_post)     + b_post     phi_post in R^{nC x n}
    H~_res  = alpha_res  * mat(x~ phi_res)   + b_res      phi_res  in R^{nC x n^2}
    H_pre = sigmoid(H~_pre),  H_post = 2 sigmoid(H~_post),  H_res = SinkhornKnopp(H~_res)
    x_{l+1} = H_res x_l + H_post^T F(Norm(H_pre x_l))

H_res[i, j] is the weight of stream j in the new stream i. Sinkhorn-Knopp: M = exp(H~_res),
then `sinkhorn_iters` times (default t_max = 20) normalise the rows, then the columns (the order
of the reference kernel, which folds exp and the first row normalisation into a softmax); it
always runs in float32 (float64 for a float64 model), autocast off, as does all stream
arithmetic. The last step normalises columns, so the columns of H_res sum to 1 exactly and the
rows to 1 up to the iteration's convergence. No epsilon inside Sinkhorn (the kernel adds one).

Paper-stated init: alpha_pre = alpha_post = alpha_res = 0.01 (learnable), n = 4, t_max = 20.
The paper does not state the phi and bias inits; ours (`init`):
- phi = 0 (so the coefficients at init are exactly the biases). The RMSNorm of x~ has no weight
  of its own: as in the paper's fused form it is absorbed into phi.
- "symmetry_breaking" (default; docs/design.md, decision 6): b_pre = +1 for stream k mod n
  (k the sublayer's global 0-based index) and -1 for the others (H_pre = 0.73 / 0.27: each
  sublayer favours one stream, as HC's A_m = e_{k mod n}); b_res = 2 I (identity-favouring; its
  rows and columns have equal sums, so Sinkhorn is exact after one step: diagonal
  e^2 / (e^2 + n - 1) = 0.71 at n = 4); b_post = 0 (H_post = 1). Why not a stronger diagonal:
  Sinkhorn converges slowly on nearly diagonal matrices; with logits c I + N(0, 0.3^2) noise,
  20 iterations leave row sums off by 3e-5 at c = 2 but 1e-2 at c = 4 (measured), i.e. H_res
  would no longer be doubly stochastic.
- "zero": all biases 0 (H_pre = 1/2, H_post = 1, H_res = 1/n). With phi = 0 nothing ever makes
  the identical streams differ: every stream gets the same gradient.
Starts at the baseline (up to eps): the streams start identical (n copies of the embedding); a
doubly stochastic H_res maps identical streams to themselves, H_post = 1 adds F to every stream,
so every stream stays equal to the standard residual x; the sublayer sees
Norm((sum_j H_pre[j]) x) = Norm(x) up to eps, and the final read sums the streams (n x, removed
by the final norm up to eps). This holds for both inits because b_post = 0.

Where H_res cannot matter (inherent, with streams copied from the embedding and summed at the
end): at the first sublayer the streams are identical, and a doubly stochastic H_res maps
identical streams to themselves; at the last sublayer only the sum of the streams is read and
sum_i (H_res x)_i = sum_j (column sum j) x_j = sum_j x_j. Those parameters are kept (uniform
per-sublayer modules; a learned collapse, as in DeepSeek-V4, would make the last one live).

depth_layers: as in hyper.py, an inactive sublayer reads the stream mean and adds its output to
every stream.

Implementation: the stream mixing, the decode-step path and the hand-written backward passes of
hyper.py, with mHC's coefficient table; Sinkhorn-Knopp has its own backward (`SinkhornKnopp`:
its 2 * t_max normalisations of [..., n, n] matrices cost by their count of ops). `impl` as in
hyper.py: "naive" computes the coefficients from the equations above in plain autograd ops
(`ManifoldConnection.naive_coefficients`, `naive_sinkhorn_knopp`); "auto" (default) is fused,
eager and compiled, as for hyper.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from resstream.depth.base import cast, validate_impl
from resstream.depth.hyper import HyperConnections, NormalizedProjection
from resstream.options import require
from resstream.registry import register_depth_operator

INITS = ("symmetry_breaking", "zero")
PRE_BIAS = 1.0  # b_pre: +1 for the favoured stream, -1 for the others
RES_BIAS = 2.0  # b_res = RES_BIAS * I


def sinkhorn_knopp(logits: Tensor, iters: int) -> Tensor:
    """exp(logits) alternately row- and column-normalised `iters` times, [..., n, n]."""
    if torch.is_grad_enabled() and logits.requires_grad:
        return SinkhornKnopp.apply(logits, iters)
    matrix = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
    for _ in range(iters):
        matrix = matrix.div_(matrix.sum(-1, keepdim=True))
        matrix = matrix.div_(matrix.sum(-2, keepdim=True))
    return matrix


def naive_sinkhorn_knopp(logits: Tensor, iters: int) -> Tensor:
    """`sinkhorn_knopp` in plain autograd ops (the naive path)."""
    # the max is a constant shift (the result does not depend on it): no gradient through it
    matrix = torch.exp(logits - logits.detach().amax(dim=(-2, -1), keepdim=True))
    for _ in range(iters):
        matrix = matrix / matrix.sum(-1, keepdim=True)
        matrix = matrix / matrix.sum(-2, keepdim=True)
    return matrix


class SinkhornKnopp(torch.autograd.Function):
    """`sinkhorn_knopp` with a hand-written backward. Its 2 * iters normalisations are tiny
    [..., n, n] ops whose cost is their count: per normalisation M' = M / s, s = sum(M), the
    gradient dM = (dM' - sum(dM' * M')) / s is four ops, where autograd runs two nodes, about
    six kernels and a gradient accumulation. (The max subtracted before exp is a constant here:
    the result does not depend on it.)"""

    @staticmethod
    def forward(ctx, logits, iters):
        matrix = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
        saved = [matrix]
        for _ in range(iters):
            for dim in (-1, -2):
                sums = matrix.sum(dim, keepdim=True)
                matrix = matrix / sums
                saved += [matrix, sums]
        ctx.save_for_backward(*saved)
        return matrix

    @staticmethod
    def backward(ctx, grad):
        exp, *saved = ctx.saved_tensors
        for step in reversed(range(len(saved) // 2)):
            matrix, sums = saved[2 * step], saved[2 * step + 1]
            dim = -1 if step % 2 == 0 else -2
            grad = grad.sub((grad * matrix).sum(dim, keepdim=True)).div_(sums)
        return grad * exp, None


class ManifoldConnection(nn.Module):
    """The mHC coefficients of one sublayer, from the flattened, RMS-normalised n*d streams."""

    def __init__(self, d_model: int, n: int, index: int, init: str, sinkhorn_iters: int,
                 eps: float):
        super().__init__()
        self.n, self.eps, self.sinkhorn_iters = n, eps, sinkhorn_iters
        self.phi = nn.Parameter(torch.zeros(n * d_model, n * n + 2 * n))  # [pre | post | res]
        self.alpha_pre = nn.Parameter(torch.tensor(0.01))
        self.alpha_post = nn.Parameter(torch.tensor(0.01))
        self.alpha_res = nn.Parameter(torch.tensor(0.01))
        b_pre, b_res = torch.zeros(n), torch.zeros(n, n)
        if init == "symmetry_breaking":
            b_pre = torch.full((n,), -PRE_BIAS)
            b_pre[index % n] = PRE_BIAS
            b_res = RES_BIAS * torch.eye(n)
        self.b_pre = nn.Parameter(b_pre)
        self.b_post = nn.Parameter(torch.zeros(n))
        self.b_res = nn.Parameter(b_res)

    def coefficients(self, streams: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(H_pre [..., n], H_res^T [..., n, n] (row j = from stream j), H_post [..., n])."""
        n, dtype = self.n, streams.dtype
        flat = streams.flatten(-2)  # [B, T, n*d]
        size = flat.shape[-1]  # x~ phi = (x sqrt(nd) phi) / hypot(|x|, sqrt(nd eps))
        floor = torch.full((), math.sqrt(size * self.eps), dtype=dtype, device=flat.device)
        proj = NormalizedProjection.apply(flat, cast(self.phi, dtype) * math.sqrt(size), floor)
        # alpha * proj + b for the pre | post | res columns at once
        scale = torch.cat([self.alpha_pre.expand(n), self.alpha_post.expand(n),
                           self.alpha_res.expand(n * n)])
        bias = torch.cat([self.b_pre, self.b_post, self.b_res.flatten()])
        logits = torch.addcmul(cast(bias, dtype), proj, cast(scale, dtype))
        pre, post, res = logits.split_with_sizes([n, n, n * n], dim=-1)
        res = sinkhorn_knopp(res.unflatten(-1, (n, n)), self.sinkhorn_iters)
        return torch.sigmoid(pre), res.mT, 2 * torch.sigmoid(post)

    def naive_coefficients(self, streams: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`coefficients` from the module docstring's equations in plain autograd ops."""
        n, dtype = self.n, streams.dtype
        flat = streams.flatten(-2)
        x = F.rms_norm(flat, flat.shape[-1:], eps=self.eps)  # x~
        pre, post, res = (x @ cast(self.phi, dtype)).split_with_sizes([n, n, n * n], dim=-1)
        h_pre = torch.sigmoid(cast(self.alpha_pre, dtype) * pre + cast(self.b_pre, dtype))
        h_post = 2 * torch.sigmoid(cast(self.alpha_post, dtype) * post + cast(self.b_post, dtype))
        res = cast(self.alpha_res, dtype) * res.unflatten(-1, (n, n)) + cast(self.b_res, dtype)
        return h_pre, naive_sinkhorn_knopp(res, self.sinkhorn_iters).mT, h_post


@register_depth_operator("mhc")
class ManifoldHyperConnections(HyperConnections):
    aggregates = ("n residual streams: sigmoid read, 2*sigmoid write and Sinkhorn doubly "
                  "stochastic stream mix, all from the flattened n*d state")
    paper = "DeepSeek-AI, mHC: Manifold-Constrained Hyper-Connections (arXiv 2512.24880)"
    mixing = "dynamic"
    starts_at_baseline = True  # our init (phi = 0, b_post = 0); up to the norms' eps

    @dataclass
    class Options:
        streams: int = 4  # expansion rate n
        sinkhorn_iters: int = 20  # t_max
        init: str = "symmetry_breaking"  # "symmetry_breaking" | "zero" (biases; phi = 0 always)
        impl: str = "auto"  # "auto" | "fused" | "naive" (hyper.py's module docstring)

    @classmethod
    def option_metadata(cls, options):
        return {}  # always dynamic (HyperConnections' `dynamic` option is not one of ours)

    @classmethod
    def validate_config(cls, config, options) -> None:
        require(options.streams >= 1, "depth_options.streams", options.streams, "an integer >= 1")
        require(options.sinkhorn_iters >= 1, "depth_options.sinkhorn_iters", options.sinkhorn_iters,
                "an integer >= 1")
        require(options.init in INITS, "depth_options.init", options.init, ", ".join(INITS))
        validate_impl(options.impl)

    def new_connection(self, config, index: int) -> nn.Module:
        return ManifoldConnection(config.d_model, self.n, index, self.options.init,
                                  self.options.sinkhorn_iters, config.norm_eps)

    def site_tables(self, dtype: torch.dtype) -> dict[int, nn.Module]:
        # each read computes its coefficients itself
        return {int(key): connection for key, connection in self.connections.items()}

    def coefficients(self, connection, streams: Tensor) -> Tensor:
        """The table [N, n, n+2]: H_pre | H_res^T | H_post (HC's A_m | A_r | B)."""
        pre, res_t, post = connection.coefficients(streams)
        return torch.cat([pre.unsqueeze(-1), res_t, post.unsqueeze(-1)], -1)

    def read_streams(self, connection, streams: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.mix_streams(streams, self.coefficients(connection, streams))

    def naive_coefficients(self, connection, streams: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return connection.naive_coefficients(streams)

    routing_names = ("H_pre", "H_res^T", "H_post")  # stream_mixing's A_m, A_r, B blocks

    def coefficient_macs(self) -> int:
        """Per sublayer: RMS of the flattened n d streams, n d; x~ phi, n d (n^2 + 2n); Sinkhorn,
        2 t_max normalisations of an n x n matrix, 2 n^2 each (sums and divisions: counted,
        as they are not negligible beside n d at small d). Read, mix, write: as HC."""
        n, d = self.n, self.d_model
        return n * d + n * d * (n * n + 2 * n) + 2 * self.options.sinkhorn_iters * 2 * n * n

    def no_weight_decay(self) -> set[str]:
        """All of them: phi (zero-initialised coefficient projection), alpha_pre/post/res
        (0.01) and the biases b_pre, b_post, b_res (b_res = 2 I with the default init) are
        the connection's coefficients (the paper does not state their weight decay)."""
        return {name for name, _ in self.named_parameters()}
