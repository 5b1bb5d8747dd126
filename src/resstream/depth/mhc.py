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

Parameterisations of H_res (`parameterisation`; the rest of mHC is unchanged: the same x~, phi
columns for pre and post, alphas, sigmoid read and 2 sigmoid write):
- "sinkhorn" (default): the paper's, above.
- "lite" (mHC-lite, Yang et al., arXiv 2601.05732): H_res = sum_k a_k P_k over all n! permutation matrices P_k (Birkhoff-von
  Neumann), a = softmax(alpha_res * x~ phi_res + b_res), phi_res in R^{nC x n!}, b_res in R^{n!}:
  exactly doubly stochastic, no iterations. n! columns: we allow n <= 6.
- "kron" (KromHC: Zhou, Gu, Iacovides, Mandic, "KromHC: Manifold-Constrained Hyper-Connections
  with Kronecker-Product Residual Matrices", arXiv 2601.21579): n = i_1 ... i_K (we take the
  prime factors of n in ascending order: 2 x 2 for n = 4), H_res = U_1 (x) ... (x) U_K
  (Kronecker product, U_1 the most significant index), each U_k = sum_r a_{k,r} P_r over the
  i_k! permutations of size i_k with a_k = softmax(alpha_res * x~ phi_res^k + b_res^k); one
  alpha_res shared by the factors; exactly doubly stochastic. We allow prime factors <= 5.
Sources: both papers' abstracts and the KromHC paper's summary of mHC-lite; the equations and
the res-bias init from KromHC's released code (github.com/wz1119/KromHC, whose `mhc_lite.py` is
also its mHC-lite baseline); the mHC-lite paper's method text was not found. That code
initialises the res logits to 0 for the identity permutation and -8 for every other one
(`RES_OFF`), which is our "symmetry_breaking" init for both (the identity weighted
1 / (1 + 23 e^-8) = 0.992 at n = 4 for lite, 1 / (1 + e^-8) = 0.9997 per 2 x 2 factor for
kron); "zero" gives all res logits 0, i.e. H_res = 1/n
as with Sinkhorn. The code's pre/post bias init is not ours (b_pre as above, b_post = 0, so that
every parameterisation starts at the baseline up to eps); `sinkhorn_iters` is unused by them.

Implementation: the stream mixing, the decode-step path and the hand-written backward passes of
hyper.py, with mHC's coefficient table; Sinkhorn-Knopp has its own backward (`SinkhornKnopp`:
its 2 * t_max normalisations of [..., n, n] matrices cost by their count of ops). `impl` as in
hyper.py: "naive" computes the coefficients from the equations above in plain autograd ops
(`ManifoldConnection.naive_coefficients`, `naive_sinkhorn_knopp`); "auto" (default) is fused,
eager and compiled, as for hyper. "lite" and "kron" build H_res from the softmax weights
with plain autograd ops (`permutation_mix`) on both paths (nothing there for a hand-written
node to save: no iterations); the fused path keeps its projection and stream-mixing nodes.
"""
from __future__ import annotations

import itertools
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
PARAMETERISATIONS = ("sinkhorn", "lite", "kron")
PRE_BIAS = 1.0  # b_pre: +1 for the favoured stream, -1 for the others
RES_BIAS = 2.0  # b_res = RES_BIAS * I (sinkhorn)
RES_OFF = -8.0  # lite / kron: res logit of every permutation but the identity (KromHC's code)
MAX_PERMUTED = 6  # lite: n <= 6 (n! columns of phi); kron: prime factors <= 5


def prime_factors(n: int) -> list[int]:
    """The prime factors of n in ascending order ([] for n = 1): KromHC's factor sizes i_k."""
    factors, p = [], 2
    while n > 1:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    return factors


def permutation_matrices(n: int) -> Tensor:
    """All n! permutation matrices [n!, n, n], the identity first (itertools order):
    P_k[i, sigma_k(i)] = 1."""
    return torch.eye(n)[torch.tensor(list(itertools.permutations(range(n))))]


def permutation_mix(logits: Tensor, permutations: list[Tensor]) -> Tensor:
    """H_res [..., n, n] from res logits [..., sum_k i_k!]: per factor k, the convex
    combination softmax(logits_k) . P^(k) of its permutation matrices [i_k!, i_k, i_k], then
    their Kronecker product, factor 0 the most significant index (one factor: mHC-lite)."""
    result, start = None, 0
    for perms in permutations:
        count, size = perms.shape[0], perms.shape[-1]
        weights = torch.softmax(logits[..., start:start + count], dim=-1)
        start += count
        factor = (weights @ cast(perms, logits.dtype).flatten(1)).unflatten(-1, (size, size))
        if result is None:
            result = factor
        else:  # (R (x) U)[a p + b, c q + d] = R[a, c] U[b, d]
            rows, cols = result.shape[-2] * size, result.shape[-1] * size
            result = (result[..., :, None, :, None] * factor[..., None, :, None, :]
                      ).reshape(*factor.shape[:-2], rows, cols)
    if result is None:  # n = 1 (kron: no factors)
        return logits.new_ones(*logits.shape[:-1], 1, 1)
    return result


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
                 eps: float, parameterisation: str = "sinkhorn"):
        super().__init__()
        self.n, self.eps, self.sinkhorn_iters = n, eps, sinkhorn_iters
        self.parameterisation = parameterisation
        # the permutation matrices of each Kronecker factor (one factor of size n for lite)
        sizes = {"sinkhorn": [], "lite": [n], "kron": prime_factors(n)}[parameterisation]
        for k, size in enumerate(sizes):  # (buffers: they follow the model's device)
            self.register_buffer(f"permutations_{k}", permutation_matrices(size), persistent=False)
        self.factors = len(sizes)
        # res logits: n^2 (sinkhorn), n! (lite), sum_k i_k! (kron)
        self.res_size = (n * n if parameterisation == "sinkhorn"
                         else sum(math.factorial(size) for size in sizes))
        self.phi = nn.Parameter(torch.zeros(n * d_model, self.res_size + 2 * n))  # [pre|post|res]
        self.alpha_pre = nn.Parameter(torch.tensor(0.01))
        self.alpha_post = nn.Parameter(torch.tensor(0.01))
        self.alpha_res = nn.Parameter(torch.tensor(0.01))
        b_pre = torch.zeros(n)
        b_res = torch.zeros(n, n) if parameterisation == "sinkhorn" else torch.zeros(self.res_size)
        if init == "symmetry_breaking":
            b_pre = torch.full((n,), -PRE_BIAS)
            b_pre[index % n] = PRE_BIAS
            if parameterisation == "sinkhorn":
                b_res = RES_BIAS * torch.eye(n)
            else:  # 0 for each factor's identity permutation (its first), RES_OFF elsewhere
                b_res = torch.full((self.res_size,), RES_OFF)
                starts = torch.tensor([0] + [p.shape[0] for p in self.permutations[:-1]])
                b_res[starts.cumsum(0)[:len(self.permutations)]] = 0.0
        self.b_pre = nn.Parameter(b_pre)
        self.b_post = nn.Parameter(torch.zeros(n))
        self.b_res = nn.Parameter(b_res)

    def residual_matrix(self, logits: Tensor, naive: bool) -> Tensor:
        """H_res [..., n, n] from the res logits alpha_res * x~ phi_res + b_res [..., res_size]."""
        if self.parameterisation == "sinkhorn":
            project = naive_sinkhorn_knopp if naive else sinkhorn_knopp
            return project(logits.unflatten(-1, (self.n, self.n)), self.sinkhorn_iters)
        return permutation_mix(logits, self.permutations)

    @property
    def permutations(self) -> list[Tensor]:
        """Per Kronecker factor, its permutation matrices [i_k!, i_k, i_k]."""
        return [self._buffers[f"permutations_{k}"] for k in range(self.factors)]

    def coefficients(self, streams: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(H_pre [..., n], H_res^T [..., n, n] (row j = from stream j), H_post [..., n])."""
        n, dtype = self.n, streams.dtype
        flat = streams.flatten(-2)  # [B, T, n*d]
        size = flat.shape[-1]  # x~ phi = (x sqrt(nd) phi) / hypot(|x|, sqrt(nd eps))
        floor = torch.full((), math.sqrt(size * self.eps), dtype=dtype, device=flat.device)
        proj = NormalizedProjection.apply(flat, cast(self.phi, dtype) * math.sqrt(size), floor)
        # alpha * proj + b for the pre | post | res columns at once
        scale = torch.cat([self.alpha_pre.expand(n), self.alpha_post.expand(n),
                           self.alpha_res.expand(self.res_size)])
        bias = torch.cat([self.b_pre, self.b_post, self.b_res.flatten()])
        logits = torch.addcmul(cast(bias, dtype), proj, cast(scale, dtype))
        pre, post, res = logits.split_with_sizes([n, n, self.res_size], dim=-1)
        res = self.residual_matrix(res, naive=False)
        return torch.sigmoid(pre), res.mT, 2 * torch.sigmoid(post)

    def naive_coefficients(self, streams: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`coefficients` from the module docstring's equations in plain autograd ops."""
        n, dtype = self.n, streams.dtype
        flat = streams.flatten(-2)
        x = F.rms_norm(flat, flat.shape[-1:], eps=self.eps)  # x~
        pre, post, res = (x @ cast(self.phi, dtype)).split_with_sizes(
            [n, n, self.res_size], dim=-1)
        h_pre = torch.sigmoid(cast(self.alpha_pre, dtype) * pre + cast(self.b_pre, dtype))
        h_post = 2 * torch.sigmoid(cast(self.alpha_post, dtype) * post + cast(self.b_post, dtype))
        res = cast(self.alpha_res, dtype) * res + cast(self.b_res.flatten(), dtype)
        return h_pre, self.residual_matrix(res, naive=True).mT, h_post


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
        parameterisation: str = "sinkhorn"  # H_res: "sinkhorn" | "lite" | "kron" (docstring)

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
        require(options.parameterisation in PARAMETERISATIONS, "depth_options.parameterisation",
                options.parameterisation, ", ".join(PARAMETERISATIONS))
        if options.parameterisation == "lite":
            require(options.streams <= MAX_PERMUTED, "depth_options.streams", options.streams,
                    f"an integer in [1, {MAX_PERMUTED}] with parameterisation 'lite' (n! columns)")
        if options.parameterisation == "kron":
            require(max(prime_factors(options.streams), default=1) < MAX_PERMUTED,
                    "depth_options.streams", options.streams,
                    "an integer >= 1 whose prime factors are at most 5 with parameterisation 'kron'")

    def new_connection(self, config, index: int) -> nn.Module:
        return ManifoldConnection(config.d_model, self.n, index, self.options.init,
                                  self.options.sinkhorn_iters, config.norm_eps,
                                  self.options.parameterisation)

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
        """Per sublayer: RMS of the flattened n d streams, n d; x~ phi, n d (R + 2n) with R res
        columns; H_res from its R logits. Sinkhorn (R = n^2): 2 t_max normalisations of an
        n x n matrix, 2 n^2 each (sums and divisions: counted, as they are not negligible
        beside n d at small d). lite (R = n!): the weighted sum of n! matrices n x n, n! n^2.
        kron (R = sum_k i_k!): per factor i_k! i_k^2, and each Kronecker step to a matrix of
        side s, s^2. Read, mix, write: as HC."""
        n, d = self.n, self.d_model
        connection = next(iter(self.connections.values()), None)
        if connection is None:
            return 0
        if self.options.parameterisation == "sinkhorn":
            res = 2 * self.options.sinkhorn_iters * 2 * n * n
        else:
            sides = [p.shape[-1] for p in connection.permutations]
            res = sum(math.factorial(i) * i * i for i in sides)
            side = sides[0] if sides else 1
            for i in sides[1:]:
                side *= i
                res += side * side
        return n * d + n * d * (connection.res_size + 2 * n) + res

    def no_weight_decay(self) -> set[str]:
        """All of them: phi (zero-initialised coefficient projection), alpha_pre/post/res
        (0.01) and the biases b_pre, b_post, b_res (b_res = 2 I with the default init; the
        permutation logits 0 / RES_OFF for lite and kron) are the connection's coefficients
        (the papers do not state their weight decay)."""
        return {name for name, _ in self.named_parameters()}
