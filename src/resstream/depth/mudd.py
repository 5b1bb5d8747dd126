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
  unused. `False`: attention's norm normalises all three views. So with separate_norms the
  operator declares reads_through_norm False: its K and V reads pass through its own norms,
  not the sublayer's (every other read, Q included, passes through the sublayer's norm).
- `hidden_multiple=64`: the DA hidden width K_i = C (i+1) is rounded as the code does,
  (K_i // 64 + 1) * 64 -- a full extra step even when K_i is already a multiple; 0 = no rounding.
- `expand_last=True`: the last DA's hidden width is 4x (before rounding).
- `form="prepost"`: the released *training* configuration (JAX, MUDDLlama2Medium in
  jax/MaxText/exp.py: mudd_prenorm and mudd_postnorm on; layers/models.py). The DAs read
  normalised copies of the outputs and the streams are residual updates of the current output:

      S_j = PreNorm_j(X_j)                    learned RMSNorm per source, weight 1 at init
      X^c = X_i + sum_j A_i[c, j] S_j         c in {Q, K, V}
      X^R = X_i + PostNorm_i(sum_j A_i[R, j] S_j)      learned RMSNorm, weight 1e-3 at init
      a_i = 0 at init (not e_i)               every DA is 0 and every stream X_i: the baseline

  A_i is still computed from X_i itself. Parameters `pre_norms[str(j)]` (j = 0: the embedding),
  `post_norms[str(i)]` (the DA after block i). Default "paper": the equations above.
Left out: the code's per-layer FFN width ramp (`dynamic_mlp_dim`: hidden width
round(F (i/(L-1) + 0.5) / 128) 128 for block i): a change of the trunk's sublayers, not of the
residual operator, confounded with MUDD in the paper's headline numbers.

Ablations of the paper, as options (both start at the baseline, as the default does):
- `multiway=False`: one dense connection per DA (DDFormer, the single-way dynamic dense
  connection of the paper's ablation): every DA produces only R (C = 1), and each block reads
  X^R for attention's query, key and value as in a standard block (no separate norms then).
- `dynamic=False`: static dense connections, A_i = a_i (no W_1, W_2): one learned weight per
  stream and source, the same for every token; the operator's mixing is then "static".

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
  (the idea of DenseFormer's in-place accumulators), and the C streams of a DA come out of one
  batched matmul A [B, T, C, i+1] @ buffer[:, :, :i+1]: nothing is re-stacked per block, so
  copies and saved activations grow as O(L), not O(L^2). Training fast path: the DAs are one
  hand-written autograd function each (_Aggregate), chained so that their backward passes add
  into one source-gradient buffer in place (no fresh [B, T, i+1, d] gradient per DA to
  allocate and sum). Streams that equal X_i (block 1, inactive blocks) are passed as one
  tensor, so attention sees an ordinary input. Q, K, V stay one [B, T, 3, d] tensor until
  attention: the mixer's delta is added once and the three norms run as one
  (torch.nn.functional.rms_norm, then the per-stream weights), fewer kernels per block.
- `impl`: "fused" is the buffer and _Aggregate above; "naive" keeps the sources in a list and
  computes each DA as A @ stack(X_0..X_i) in plain autograd ops (`DynamicAggregate.naive`);
  both paths serve every option (the pre/post norms and residual additions are plain ops
  around the aggregate; a static DA hands _Aggregate its prior expanded over B, T);
  "auto" (default) is fused in eager mode (CPU: it was written for it; CUDA: to be measured)
  and naive under torch.compile, where _Aggregate's storage aliasing (`set_`) would break the
  graph and inductor fuses the stack and matmul itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from resstream.depth.base import (DepthOperator, QKVViews, add_to_stream_and_views, use_naive,
                                  validate_impl)
from resstream.layers import RMSNorm
from resstream.options import require
from resstream.registry import register_depth_operator
from resstream.routing import depth_attention_result

STREAMS = 4  # Q, K, V, R
FORMS = ("paper", "prepost")
POST_NORM_INIT = 1e-3  # the JAX code's scale_init of the R stream's post-norm


def da_hidden_width(n_sources: int, n_streams: int, last: bool, multiple: int,
                    expand_last: bool) -> int:
    """The released code's DA hidden width: C (i+1), x4 for the last DA, then (K // m + 1) m."""
    width = n_sources * n_streams
    if last and expand_last:
        width *= 4
    return (width // multiple + 1) * multiple if multiple else width


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """weight * x * rsqrt(mean(x^2) + eps) over the last dim, the weight [d] or broadcast over
    x's leading dims ([3, d]: the Q, K, V norms as one); half dtypes normalise in float32 and
    round before the weight, as the RMSNorm module does."""
    shape = x.shape[-1:]
    if x.dtype in (torch.float16, torch.bfloat16):
        out = F.rms_norm(x.float(), shape, eps=eps).to(x.dtype)
    elif weight is not None and weight.shape == shape and weight.dtype == x.dtype:
        return F.rms_norm(x, shape, weight, eps)
    else:
        out = F.rms_norm(x, shape, eps=eps)
    return out if weight is None else weight * out


class SourceStack:
    """X_0, X_1, ... of one forward in one [B, T, capacity, d] buffer. A DA reads the filled
    prefix directly: no re-stacking of all earlier outputs at every block (O(L) copies and saved
    activations instead of O(L^2)). A fresh buffer per forward; never reused across forwards.
    The DAs' backward passes accumulate the sources' gradient in one buffer of the same shape,
    handed from DA to DA through autograd as the gradient of `carrier` (see _Aggregate)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.buffer: Tensor | None = None
        self.count = 0
        self.last: Tensor | None = None  # the newest source, as a plain tensor
        self.pending: list[Tensor] = []  # sources appended since the last DA (its new inputs)
        self.carrier: Tensor | None = None  # the last DA's carrier output (None before the first)

    def append(self, x: Tensor) -> None:
        if self.buffer is None:
            b, t, d = x.shape
            self.buffer = x.new_empty(b, t, self.capacity, d)
        with torch.no_grad():  # the gradient reaches x through the DA that first reads it
            self.buffer[:, :, self.count].copy_(x)
        self.count += 1
        self.last = x
        self.pending.append(x)

    def prefix(self, n: int) -> Tensor:
        return self.buffer[:, :, :n]

    def alias(self) -> Tensor:
        """The whole buffer as a new tensor on its storage, with its own version counter (later
        slot writes through `buffer` do not invalidate it)."""
        alias = self.buffer.new_empty(0)
        return alias.set_(self.buffer.untyped_storage(), self.buffer.storage_offset(),
                          self.buffer.shape, self.buffer.stride())


class _Aggregate(torch.autograd.Function):
    """streams [B, T, C, d] = weights [B, T, C, n] @ sources X_0..X_{n-1} [B, T, n, d], returned
    as (X^R [B, T, d],) for C = 1 or (X^{Q,K,V} [B, T, 3, d], X^R [B, T, d]) for C = 4 (views of
    one product: no split, and no cat of their gradients in the backward).

    Autograd's matmul would return a fresh [B, T, n, d] source gradient per DA, which the
    chain of prefixes then adds up: O(L^2) freshly allocated traffic in the backward. Here the
    DAs form a chain through `carrier` (a [B, T, capacity, d] alias of the source buffer): the
    last DA's backward allocates one source-gradient buffer, each DA adds its weights^T @ grad
    into the first n slots in place and passes the buffer on as the carrier's gradient, and the
    sources it reads first (`new_sources`, its formal inputs) take their finished slots. The
    carrier edge makes every later DA's backward run before this one's, so those slots are
    complete. Saves only the weights (the buffer's prefix is never overwritten)."""

    @staticmethod
    def forward(ctx, weights: Tensor, carrier: Tensor | None, sources: SourceStack, n: int,
                *new_sources: Tensor):
        ctx.set_materialize_grads(False)
        # the buffer only, not the stack: the stack refers to outputs of this graph (a cycle)
        ctx.buffer, ctx.n, ctx.n_new = sources.buffer, n, len(new_sources)
        ctx.save_for_backward(weights)
        streams = torch.matmul(weights, sources.prefix(n))
        if streams.shape[2] == 1:
            return streams[:, :, 0], sources.alias()
        return streams[:, :, :-1], streams[:, :, -1], sources.alias()

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Tensor | None):
        (weights,) = ctx.saved_tensors
        buffer, n = ctx.buffer, ctx.n
        prefix = buffer[:, :, :n]
        *grad_streams, grad_carrier = grads
        grad_streams = [None if g is None else g.to(prefix.dtype) for g in grad_streams]
        if len(grad_streams) == 2:  # (views [B, T, 3, d], residual [B, T, d])
            grad_views, grad_residual = grad_streams
            per_stream = [None if grad_views is None else grad_views[:, :, c] for c in range(3)]
            per_stream.append(grad_residual)
            blocks = [grad_views, None if grad_residual is None else grad_residual[:, :, None]]
        else:
            per_stream = grad_streams
            blocks = [None if grad_streams[0] is None else grad_streams[0][:, :, None]]
        fresh = grad_carrier is None  # the first DA of this backward pass: a new buffer
        if fresh:
            grad_carrier = torch.empty_like(buffer)
            grad_carrier[:, :, n:].zero_()
        grad_prefix = grad_carrier[:, :, :n]
        grad_weights = None
        if any(g is not None for g in per_stream):
            # grad @ prefix^T per block of streams ([B, T, c, n], small), zeros where unused
            grad_weights = torch.cat([
                weights.new_zeros(*weights.shape[:2], size, n) if g is None
                else torch.matmul(g, prefix.transpose(-1, -2)).to(weights.dtype)
                for g, size in zip(blocks, (3, 1) if len(blocks) == 2 else (1,))], 2)
            # weights^T @ grad as C in-place multiply-adds into the buffer: a bmm here (1024
            # tiny gemms) writes a fresh [B, T, n, d] tensor, slow to allocate and add on CPU
            weights = weights.to(prefix.dtype)
            for c, g in enumerate(per_stream):
                if g is None:
                    continue
                if fresh:  # the first term overwrites (no zero fill of the new buffer)
                    torch.mul(weights[:, :, c, :, None], g[:, :, None, :], out=grad_prefix)
                    fresh = False
                else:
                    grad_prefix.addcmul_(weights[:, :, c, :, None], g[:, :, None, :])
        if fresh:
            grad_prefix.zero_()
        grad_new = [grad_carrier[:, :, j] for j in range(n - ctx.n_new, n)]
        grad_previous = grad_carrier if ctx.needs_input_grad[1] else None
        return (grad_weights, grad_previous, None, None, *grad_new)


class DynamicAggregate(nn.Module):
    """One DA: C streams, each a per-token weighted sum of the n sources, with weights
    A = GELU(RMSNorm_noscale(X_i) W_1) W_2 + a (`dynamic`), or the static prior a alone.
    The prior starts at e_i (1 on the current output X_i) or, for the pre/post-norm form, at 0."""

    def __init__(self, d_model: int, n_sources: int, n_streams: int, hidden: int, eps: float,
                 dynamic: bool = True, prior_on_current: bool = True):
        super().__init__()
        self.n_sources, self.n_streams, self.eps = n_sources, n_streams, eps
        self.w1 = self.w2 = None
        if dynamic:
            self.w1 = nn.Linear(d_model, hidden, bias=False)
            self.w2 = nn.Linear(hidden, n_streams * n_sources, bias=False)
            nn.init.normal_(self.w1.weight, std=1.0 / math.sqrt(d_model))
            nn.init.zeros_(self.w2.weight)
        prior = torch.zeros(n_streams, n_sources)
        if prior_on_current:
            prior[:, -1] = 1.0  # a_i = e_i: every stream starts as the current output
        self.prior = nn.Parameter(prior)

    def weights(self, current: Tensor) -> Tensor:
        """A [B, T, C, n] from the current output X_i [B, T, d]."""
        b, t, _ = current.shape
        prior = self.prior.to(current.dtype)
        if self.w1 is None:  # static: the same weights for every token
            return prior.expand(b, t, self.n_streams, self.n_sources)
        dynamic = self.w2(F.gelu(self.w1(rms_norm(current, None, self.eps))))
        return dynamic.view(b, t, self.n_streams, self.n_sources) + prior

    def forward(self, sources: SourceStack, current: Tensor) -> tuple[Tensor, ...]:
        """The stack's filled prefix [B, T, i+1, d] and the current output X_i (the weights'
        input) -> (X^R [B, T, d],) for C = 1, (X^{Q,K,V} [B, T, 3, d], X^R [B, T, d]) for C = 4."""
        assert sources.count == self.n_sources
        *streams, sources.carrier = _Aggregate.apply(self.weights(current), sources.carrier,
                                                     sources, self.n_sources, *sources.pending)
        sources.pending = []
        return tuple(streams)

    def naive(self, sources: list[Tensor], current: Tensor) -> tuple[Tensor, ...]:
        """`forward` in plain autograd ops, from the sources as a list."""
        streams = self.weights(current) @ torch.stack(sources, 2)  # X^c = sum_j A[c, j] X_j
        if self.n_streams == 1:
            return (streams[:, :, 0],)
        return streams[:, :, :-1], streams[:, :, -1]


@dataclass
class MUDDState:
    sources: SourceStack | list[Tensor]  # the DAs' sources, X_0..X_i (PreNorm_j(X_j) for "prepost")
    views: Tensor | None = None  # X^Q, X^K, X^V [B, T, 3, d]; None when all equal X^R
    stream: Tensor | None = None  # X^R plus this block's sublayer outputs
    naive: bool = False  # the naive path (`impl`)
    current: Tensor | None = None  # "prepost": X_i of the last DA (its sources are normalised)


@register_depth_operator("mudd")
class MUDD(DepthOperator):
    aggregates = ("four per-token (dynamic) weighted sums Q, K, V, R over the embedding and all "
                  "earlier block outputs (cumulative states)")
    mixing = "dynamic"  # the default dynamic=True; see option_metadata
    paper = ("Xiao, Meng, Li, Yuan: MUDDFormer, Multiway Dynamic Dense connections "
             "(ICML 2025, arXiv 2502.12170)")
    reads_through_norm = False  # the default separate_norms=True; see option_metadata
    starts_at_baseline = True
    granularity = "block"

    @dataclass
    class Options:
        separate_norms: bool = True  # sepln: own RMSNorms for the K and V inputs (Q: attention's)
        hidden_multiple: int = 64  # DA hidden width rounding as the code: (K // m + 1) m; 0 = none
        expand_last: bool = True  # last DA hidden width x4 (before rounding)
        multiway: bool = True  # False: one dense connection per DA (R only; the paper's DDFormer)
        dynamic: bool = True  # False: static dense weights A_i = a_i (no W_1, W_2)
        form: str = "paper"  # "paper" | "prepost" (the JAX training config's pre/post norms)
        impl: str = "auto"  # "auto" | "fused" | "naive" (module docstring)

    @classmethod
    def option_metadata(cls, options):
        # see the module docstring: K and V reads bypass the sublayer norm only with separate
        # norms and Q, K, V views (multiway)
        return {"reads_through_norm": not (options.separate_norms and options.multiway),
                "mixing": "dynamic" if options.dynamic else "static"}

    @classmethod
    def validate_config(cls, config, options) -> None:
        require(options.hidden_multiple >= 0, "depth_options.hidden_multiple",
                options.hidden_multiple, "an integer >= 0 (0: no rounding)")
        require(options.form in FORMS, "depth_options.form", options.form, ", ".join(FORMS))
        validate_impl(options.impl)

    def __init__(self, config, sites, options):
        super().__init__(config, sites, options)
        d, last, eps = config.d_model, self.n_layers - 1, config.norm_eps
        has_attention = any(site.kind == "attn" for site in sites)
        self.prepost = options.form == "prepost"
        self.das = nn.ModuleDict()
        for i in range(self.n_layers):  # the DA after 0-based block i feeds block i+1 (or the output)
            if self.is_active(min(i + 1, last)):
                streams = STREAMS if has_attention and options.multiway and i < last else 1
                hidden = da_hidden_width(i + 2, streams, i == last, options.hidden_multiple,
                                         options.expand_last)
                self.das[str(i)] = DynamicAggregate(d, i + 2, streams, hidden, eps, options.dynamic,
                                                    prior_on_current=not self.prepost)
        self.kv_norms = nn.ModuleDict()
        if options.separate_norms and has_attention:
            for i in range(1, self.n_layers):
                if str(i - 1) in self.das and self.das[str(i - 1)].n_streams == STREAMS:
                    self.kv_norms[str(i)] = nn.ModuleList(RMSNorm(d, eps) for _ in range(2))
        self.last_da = max((int(i) for i in self.das), default=-1)
        # "prepost": PreNorm_j of every source a DA reads (j = 0: the embedding), weight 1 at
        # init; PostNorm_i of each DA's R stream, weight 1e-3 at init (the code's values)
        self.pre_norms = nn.ModuleDict()
        self.post_norms = nn.ModuleDict()
        if self.prepost:
            for j in range(self.last_da + 2):
                self.pre_norms[str(j)] = RMSNorm(d, eps)
            for key in self.das:
                self.post_norms[key] = RMSNorm(d, eps)
                nn.init.constant_(self.post_norms[key].weight, POST_NORM_INIT)
        # the same modules by python int block index: a str() of the index in the forward
        # can break a torch.compile graph (dynamo may make the int symbolic)
        self.da_after = {int(key): da for key, da in self.das.items()}
        self.kv_norms_of = {int(key): norms for key, norms in self.kv_norms.items()}
        self.pre_norm_of = {int(key): norm for key, norm in self.pre_norms.items()}
        self.post_norm_of = {int(key): norm for key, norm in self.post_norms.items()}

    # ---------------------------------------------------------------- hooks
    def init_state(self, x0, ctx):
        naive = use_naive(self.options.impl)
        sources = [] if naive else SourceStack(self.n_layers + 1)
        if self.das:
            sources.append(self._source(x0, 0))
        return MUDDState(sources=sources, stream=x0, naive=naive)

    def _source(self, x: Tensor, index: int) -> Tensor:
        """What the DAs read of output X_index: X_index itself, or PreNorm_index(X_index)."""
        return self.pre_norm_of[index](x) if self.prepost else x

    def read(self, state, site, norm, ctx):
        if site.kind == "attn" and state.views is not None:
            normed = self._normalise_views(state.views, norm, site.layer)
            return QKVViews(*normed.unbind(2))  # unbind: one backward op, not three zero-fills
        return norm(state.stream)

    def _normalise_views(self, views: Tensor, norm: nn.Module, layer: int) -> Tensor:
        """Norm of the Q, K, V streams [B, T, 3, d] in one pass: attention's norm for Q and,
        with separate_norms, this block's own K and V norms (same arithmetic as RMSNorm)."""
        if layer not in self.kv_norms_of:  # one norm for all three, broadcast over the streams
            return rms_norm(views, norm.weight, norm.eps) if type(norm) is RMSNorm else norm(views)
        k_norm, v_norm = self.kv_norms_of[layer]
        if isinstance(norm, RMSNorm) and norm.weight is not None and norm.eps == k_norm.eps:
            weight = torch.stack([norm.weight, k_norm.weight, v_norm.weight])  # [3, d]
            return rms_norm(views, weight, norm.eps)
        q, k, v = views.unbind(2)
        return torch.stack([norm(q), k_norm(k), v_norm(v)], 2)

    def write(self, state, site, out, ctx):
        add_to_stream_and_views(state, site, out)
        if site.last:
            self._after_block(state, site.layer)
        return state

    def _after_block(self, state: MUDDState, layer: int) -> None:
        if self.last_da >= layer:  # a DA from here on reads this output
            state.sources.append(self._source(state.stream, layer + 1))
        self._aggregate(state, layer)

    def _aggregate(self, state: MUDDState, layer: int) -> None:
        """The DA after block `layer` (if any): the next block's streams from the sources and
        the current output X_i (`state.stream`)."""
        aggregate = self.da_after.get(layer)
        if aggregate is None:  # the next block reads the plain residual X_i for every stream
            state.views = None
            return
        current = state.stream
        if self.prepost:
            state.current = current
        if self._routing is not None:
            self._record_aggregate(aggregate, current, layer)
        if state.naive:
            streams = aggregate.naive(state.sources, current)
        else:
            streams = aggregate(state.sources, current)
        residual = streams[-1]
        if self.prepost:  # X^c = X_i + DA_c for Q, K, V; X^R = X_i + PostNorm(DA_R)
            residual = current + self.post_norm_of[layer](residual)
        if aggregate.n_streams == 1:  # the last DA (or single-way, or no attention): R only
            state.stream, state.views = residual, None
            return
        views = streams[0]
        state.views = current[:, :, None] + views if self.prepost else views
        state.stream = residual

    def finalize(self, state, ctx):
        return state.stream

    # ---------------------------------------------------------------- routing weights
    def _record_aggregate(self, aggregate: DynamicAggregate, current: Tensor, layer: int) -> None:
        """The DA's per-token weights A [B, T, C, i+2] (computed again: _Aggregate keeps them
        inside its node), one way per stream: Q, K, V, R (or R alone)."""
        ways = ["Q", "K", "V", "R"] if aggregate.n_streams == STREAMS else ["R"]
        reader = f"L{layer + 1}" if layer + 1 < self.n_layers else "final"
        labels = ["emb"] + [f"L{j}" for j in range(aggregate.n_sources - 1)]
        self._routing.add_weights(reader, labels, aggregate.weights(current), ways)

    def routing_result(self, recorder) -> dict:
        """depth_attention: block l's DA weights over X_0 (emb) and the block outputs, averaged
        over tokens and over the ways the DA produces (Q, K, V, R; R only for the last DA,
        "final"); per way in per_head. Unnormalised (rows need not sum to 1)."""
        return depth_attention_result(recorder, normalised=False, static=not self.options.dynamic)

    # ---------------------------------------------------------------- accounting
    def _ways(self) -> int:
        return max((da.n_streams for da in self.das.values()), default=1)

    def depth_state_vectors(self) -> int:
        # all block outputs up to the last DA, plus the streams in flight ("prepost": the
        # sources are normalised copies, and X_i itself is kept for the residual: one more)
        if self.last_da < 0:
            return 1
        return self.last_da + 2 + self._ways() + (1 if self.prepost else 0)

    # ---------------------------------------------------------------- pipeline stages
    def stage_state(self, state: MUDDState, layer: int) -> tuple[Tensor, ...]:
        """The sources X_0..X_{l+1} while a DA reads them (the DA after block l included: the
        next stage recomputes it from them instead of receiving its four streams), else the
        stream; "prepost" also sends X_{l+1} itself (the sources are PreNorm_j(X_j)). Sources
        an earlier DA has read are sent as one [B, T, n, d] slice of the last DA's carrier
        (the source buffer, whose gradient reaches them through the DA chain)."""
        sources = state.sources
        if self.last_da < layer:
            return (state.stream,)
        current = (state.current,) if self.prepost else ()
        if state.naive:  # every source is an ordinary tensor of the graph
            return (*sources, *current)
        read = sources.count - len(sources.pending)
        carried = (sources.carrier[:, :, :read],) if read else ()
        return (*carried, *sources.pending, *current)

    def from_stage_state(self, tensors: tuple[Tensor, ...], layer: int) -> MUDDState:
        naive = use_naive(self.options.impl)
        sources = [] if naive else SourceStack(self.n_layers + 1)
        if self.last_da < layer:
            return MUDDState(sources=sources, stream=tensors[0], naive=naive)
        if self.prepost:
            *tensors, current = tensors
        for tensor in tensors:
            for x in tensor.unbind(2) if tensor.dim() == 4 else (tensor,):
                sources.append(x)
        state = MUDDState(sources=sources, naive=naive)
        state.stream = current if self.prepost else (sources[-1] if naive else sources.last)
        self._aggregate(state, layer)
        return state

    def pipeline_payload(self, layer: int) -> tuple[str, int]:
        if self.last_da >= layer:
            if self.prepost:
                return ("l+2 normalised block outputs and X_{l+1} (the DA after block l is "
                        "recomputed from them)", layer + 3)
            return "l+2 block outputs (the DA after block l is recomputed from them)", layer + 2
        return "1 (no DA follows)", 1

    def forward_macs_per_token(self, seq_len: int) -> int:
        """Per DA after block i over n = i+2 sources with C streams and hidden width K: the
        scale-free RMSNorm of X_i 2d, W_1 d K, W_2 K C n (static: none of these), the C
        weighted sums C n d. Blocks fed Q, K, V views normalise two more inputs, 2 x 2d
        (attention's norm covers the third). "prepost": one PreNorm per source and one
        PostNorm per DA, 2d each (the additions of X_i are free)."""
        d, total = self.d_model, 0
        for aggregate in self.das.values():
            if aggregate.w1 is not None:
                hidden, width = aggregate.w1.out_features, aggregate.w2.out_features
                total += 2 * d + d * hidden + hidden * width
            total += aggregate.n_streams * aggregate.n_sources * d
        views = sum(1 for aggregate in self.das.values() if aggregate.n_streams == STREAMS)
        norms = len(self.pre_norms) + len(self.post_norms)
        return total + views * 2 * 2 * d + norms * 2 * d

    def no_weight_decay(self) -> set[str]:
        """All of them: each DA's static prior a_i (init e_i) and its weight generator W_1, W_2
        (W_2 = 0: the dynamic part of the mixing coefficients) compute mixing coefficients; the
        K/V, pre- and post-norm gains are 1-D."""
        return {name for name, _ in self.named_parameters()}
