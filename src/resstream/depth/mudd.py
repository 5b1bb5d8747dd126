"""MUDDFormer: MUltiway Dynamic Dense connections (four dynamic dense streams Q, K, V, R).

Paper: "MUDDFormer: Breaking Residual Bottlenecks in Transformers via Multiway Dynamic Dense
Connections", Da Xiao, Qingye Meng, Shengping Li, Xingyuan Yuan (ICML 2025, arXiv 2502.12170);
code Caiyun-AI/MUDDFormer (pytorch/muddformer/modeling_muddformer.py).

Block outputs X_0 = embedding, X_i = output of block i (1-based; cumulative state, skips
included). Block i+1 takes four inputs X^Q, X^K, X^V, X^R:

    X_A' = MHA(Norm(X^Q), Norm(X^K), Norm(X^V)) + X^R
    X_i  = X_A' + FFN(Norm(X_A'))

After block i a depth-wise aggregate (DA) builds the next block's inputs from X_0..X_i, with
per-token weights computed from the current output only:

    A_i     = GELU(RMSNorm_noscale(X_i) W_1) W_2 + a_i      in R^{C x (i+1)}, C = 4 (Q, K, V, R)
    X^c     = sum_{j=0}^{i} A_i[c, j] X_j                    c in {Q, K, V, R}
    unnormalised weights (no softmax); block 1 reads X_0 for all four; the last DA only
    produces R (C = 1), which is the model output fed to the final norm.

Init (the paper's, "critical"): W_1 ~ N(0, 1/d), W_2 = 0, a_i = e_i (1 on the current output
X_i, 0 elsewhere): every stream is X_i and the model is exactly the standard one at step 0.
(The released PyTorch inference code draws a_i from randn; it only ever loads checkpoints.)

The released code's choices, as options:
- `separate_norms=True` ("sepln"): the Q, K, V inputs get separate RMSNorms. We use attention's
  own pre-norm for Q and two operator-owned RMSNorms (`kv_norms[str(block)]`, weight 1 at init)
  for K and V -- the same parameterisation as three new norms, without leaving attention's norm
  unused. `False`: attention's norm normalises all three views.
- `hidden_multiple=64`: the DA hidden width K_i = C (i+1) is rounded as the code does,
  (K_i // 64 + 1) * 64 -- a full extra step even when K_i is already a multiple; 0 = no rounding.
- `expand_last=True`: the last DA's hidden width is 4x (before rounding).
Left out: the JAX-only refinements (mudd_prenorm / mudd_postnorm, zero static prior) and the
code's per-layer FFN width ramp (a capacity change confounded with MUDD, not a residual operator).

Other choices:
- The DA's scale-free RMSNorm uses config.norm_eps (code: 1e-6); weights A are computed in the
  activations' dtype, as in the code.
- A mixer sub-block (ShortSWA, "mix", before attention) reads Norm(X^R) and its delta m is
  added to all four streams, so S = H + ShortSWA(Norm(H)) (Algorithm 1) holds per stream.
- Without global attention (ShortSWA `replace_attention`: blocks [mix, mlp]) there are no Q, K,
  V inputs to feed: every DA produces only R (the single-way dynamic dense connection).
- `depth_layers`: an inactive block reads the plain residual, X_i for all four streams (no DA
  in front of it); the last DA (the output) exists iff the last block is active. Parameters:
  `das[str(i)]` = the DA after 0-based block i.
- Implementation: X_0..X_L are written once each into one preallocated [B, T, L+1, d] buffer
  (a small custom autograd function, the idea of DenseFormer's in-place accumulators), and the
  C streams of a DA come out of one batched matmul A [B, T, C, i+1] @ buffer[:, :, :i+1]:
  nothing is re-stacked per block, so copies and saved activations grow as O(L), not O(L^2).
  Streams that equal X_i (block 1, inactive blocks) are passed as one tensor, so attention sees
  an ordinary input. Q, K, V stay one [B, T, 3, d] tensor until attention: the mixer's delta is
  added once and the three norms run as one (per-stream weights), fewer kernels per block.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from resstream.depth.base import DepthOperator, QKVViews
from resstream.layers import RMSNorm
from resstream.options import require
from resstream.registry import register_depth_operator

STREAMS = 4  # Q, K, V, R


def da_hidden_width(n_sources: int, n_streams: int, last: bool, multiple: int,
                    expand_last: bool) -> int:
    """The released code's DA hidden width: C (i+1), x4 for the last DA, then (K // m + 1) m."""
    width = n_sources * n_streams
    if last and expand_last:
        width *= 4
    return (width // multiple + 1) * multiple if multiple else width


class _WriteSlot(torch.autograd.Function):
    """Write x into slot `index` of a preallocated [B, T, N, d] buffer and return the filled
    prefix [B, T, index+1, d], a tensor on the buffer's storage with its own version counter:
    later writes go to later slots, so the prefixes earlier DAs saved for backward stay valid.
    Backward splits the prefix gradient into the previous prefix's and x's."""

    @staticmethod
    def forward(ctx, previous: Tensor | None, x: Tensor, sources: "SourceStack", index: int):
        buffer = sources.buffer
        buffer[:, :, index].copy_(x)
        ctx.index = index
        b, t, _, d = buffer.shape
        prefix = buffer.new_empty(0)
        prefix.set_(buffer.untyped_storage(), buffer.storage_offset(), (b, t, index + 1, d),
                    buffer.stride())
        return prefix

    @staticmethod
    def backward(ctx, grad: Tensor):
        index = ctx.index
        previous_grad = grad[:, :, :index] if index > 0 else None
        return previous_grad, grad[:, :, index], None, None


class SourceStack:
    """X_0, X_1, ... of one forward in one [B, T, capacity, d] buffer. A DA reads the filled
    prefix directly: no re-stacking of all earlier outputs at every block (O(L) copies and saved
    activations instead of O(L^2)). A fresh buffer per forward; never reused across forwards."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.buffer: Tensor | None = None
        self.prefix: Tensor | None = None
        self.count = 0
        self.last: Tensor | None = None  # the newest source, as a plain tensor

    def append(self, x: Tensor) -> None:
        if self.buffer is None:
            b, t, d = x.shape
            self.buffer = x.new_empty(b, t, self.capacity, d)
        self.prefix = _WriteSlot.apply(self.prefix, x, self, self.count)
        self.count += 1
        self.last = x


class DynamicAggregate(nn.Module):
    """One DA: C streams, each a per-token weighted sum of the n sources."""

    def __init__(self, d_model: int, n_sources: int, n_streams: int, hidden: int, eps: float):
        super().__init__()
        self.n_sources, self.n_streams = n_sources, n_streams
        self.norm = RMSNorm(d_model, eps, affine=False)
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, n_streams * n_sources, bias=False)
        nn.init.normal_(self.w1.weight, std=1.0 / math.sqrt(d_model))
        nn.init.zeros_(self.w2.weight)
        prior = torch.zeros(n_streams, n_sources)
        prior[:, -1] = 1.0  # a_i = e_i: every stream starts as the current output
        self.prior = nn.Parameter(prior)

    def weights(self, current: Tensor) -> Tensor:
        """A [B, T, C, n] from the current output X_i [B, T, d]."""
        dynamic = self.w2(F.gelu(self.w1(self.norm(current))))
        b, t, _ = current.shape
        return dynamic.view(b, t, self.n_streams, self.n_sources) + self.prior.to(current.dtype)

    def forward(self, sources: SourceStack) -> Tensor:
        """X_0..X_i (the stack's filled prefix [B, T, i+1, d]) -> streams [B, T, C, d]."""
        assert sources.count == self.n_sources
        return torch.matmul(self.weights(sources.last), sources.prefix)


@dataclass
class MUDDState:
    sources: SourceStack  # X_0, ..., X_i
    views: Tensor | None = None  # X^Q, X^K, X^V [B, T, 3, d]; None when all equal X^R
    stream: Tensor | None = None  # X^R plus this block's sublayer outputs


@register_depth_operator("mudd")
class MUDD(DepthOperator):
    aggregates = ("four per-token (dynamic) weighted sums Q, K, V, R over the embedding and all "
                  "earlier block outputs (cumulative states)")
    mixing = "dynamic"
    paper = ("Xiao, Meng, Li, Yuan: MUDDFormer, Multiway Dynamic Dense connections "
             "(ICML 2025, arXiv 2502.12170)")
    starts_at_baseline = True
    granularity = "block"

    @dataclass
    class Options:
        separate_norms: bool = True  # sepln: own RMSNorms for the K and V inputs (Q: attention's)
        hidden_multiple: int = 64  # DA hidden width rounding as the code: (K // m + 1) m; 0 = none
        expand_last: bool = True  # last DA hidden width x4 (before rounding)

    @classmethod
    def validate_config(cls, config, options) -> None:
        require(options.hidden_multiple >= 0, "depth_options.hidden_multiple",
                options.hidden_multiple, "an integer >= 0 (0: no rounding)")

    def __init__(self, config, sites, options):
        super().__init__(config, sites, options)
        d, last = config.d_model, self.n_layers - 1
        has_attention = any(site.kind == "attn" for site in sites)
        self.das = nn.ModuleDict()
        for i in range(self.n_layers):  # the DA after 0-based block i feeds block i+1 (or the output)
            if self.is_active(min(i + 1, last)):
                streams = STREAMS if has_attention and i < last else 1
                hidden = da_hidden_width(i + 2, streams, i == last, options.hidden_multiple,
                                         options.expand_last)
                self.das[str(i)] = DynamicAggregate(d, i + 2, streams, hidden, config.norm_eps)
        self.kv_norms = nn.ModuleDict()
        if options.separate_norms and has_attention:
            for i in range(1, self.n_layers):
                if str(i - 1) in self.das:
                    self.kv_norms[str(i)] = nn.ModuleList(RMSNorm(d, config.norm_eps) for _ in range(2))
        self.unit_norm = RMSNorm(d, config.norm_eps, affine=False)
        self.last_da = max((int(i) for i in self.das), default=-1)

    # ---------------------------------------------------------------- hooks
    def init_state(self, x0, ctx):
        sources = SourceStack(self.n_layers + 1)
        if self.das:
            sources.append(x0)
        return MUDDState(sources=sources, stream=x0)

    def read(self, state, site, norm, ctx):
        if site.kind == "attn" and state.views is not None:
            normed = self._normalise_views(state.views, norm, site.layer)
            return QKVViews(*normed.unbind(2))  # unbind: one backward op, not three zero-fills
        return norm(state.stream)

    def _normalise_views(self, views: Tensor, norm: nn.Module, layer: int) -> Tensor:
        """Norm of the Q, K, V streams [B, T, 3, d] in one pass: attention's norm for Q and,
        with separate_norms, this block's own K and V norms (same arithmetic as RMSNorm)."""
        if str(layer) not in self.kv_norms:
            return norm(views)  # one norm for all three, broadcast over the stream axis
        k_norm, v_norm = self.kv_norms[str(layer)]
        if isinstance(norm, RMSNorm) and norm.weight is not None and norm.eps == k_norm.eps:
            weight = torch.stack([norm.weight, k_norm.weight, v_norm.weight])  # [3, d]
            return weight * self.unit_norm(views)
        q, k, v = views.unbind(2)
        return torch.stack([norm(q), k_norm(k), v_norm(v)], 2)

    def write(self, state, site, out, ctx):
        state.stream = state.stream + out
        if site.kind == "mix" and state.views is not None:  # S = H + ShortSWA(Norm(H)) per stream
            state.views = state.views + out[:, :, None]
        if site.kind == "attn":
            state.views = None
        if site.last:
            self._after_block(state, site.layer)
        return state

    def _after_block(self, state: MUDDState, layer: int) -> None:
        if self.last_da >= layer:  # a DA from here on reads this output
            state.sources.append(state.stream)
        aggregate = self.das[str(layer)] if str(layer) in self.das else None
        if aggregate is None:  # the next block reads the plain residual X_i for every stream
            state.views = None
            return
        streams = aggregate(state.sources)  # [B, T, C, d]
        if aggregate.n_streams == 1:  # the last DA (or no attention): R only
            state.stream, state.views = streams.squeeze(2), None
            return
        views, residual = streams.split([3, 1], dim=2)  # split: its backward is one cat
        state.stream, state.views = residual.squeeze(2), views

    def finalize(self, state, ctx):
        return state.stream

    # ---------------------------------------------------------------- accounting
    def depth_state_vectors(self) -> int:
        # all block outputs up to the last DA, plus the four streams in flight
        return (self.last_da + 2 + STREAMS) if self.last_da >= 0 else 1

    def pipeline_payload(self, layer: int) -> tuple[str, int]:
        if any(int(i) > layer for i in self.das):
            return "l+2 block outputs (the DA weights come from X_{l+1}, recomputable)", layer + 2
        return "1 (no DA follows)", 1
