"""Attention Residuals, Full and Block (Kimi Team, "Attention Residuals", arXiv 2603.15031).

Sublayers are indexed l = 1..S (every attention, MLP and mixer sub-block is its own "layer" in
Kimi's counting). Sources are deltas: v_0 = token embedding, v_i = output of sublayer i.

Full AttnRes -- the input of sublayer l replaces the residual by softmax attention over depth:

    alpha_{i->l} = softmax_i( w_l^T RMSNorm_l(v_i) ),   i = 0 .. l-1
    h_l          = sum_i alpha_{i->l} v_i
    v_l          = f_l(Norm(h_l))                         (the sublayer's own pre-norm)

w_l in R^d is a learned pseudo-query that does not depend on the input; RMSNorm_l (learned
weight, one per sublayer) normalises the keys only, the values are the raw sources.

Block AttnRes -- sublayers are grouped into blocks of `block_size` sublayers. b_0 = embedding,
b_n = sum of the deltas of block n, b_n^i = running partial sum inside the current block. The i-th
sublayer of block n attends over [b_0 .. b_{n-1}] (first sublayer of a block) or
[b_0 .. b_{n-1}, b_n^{i-1}] (others), with the same softmax(w_l^T RMSNorm_l(.)) weighting.
We follow the official pseudocode's order: the read is computed over (completed blocks +
partial), and only then, if the global 0-based sublayer index s satisfies s % block_size == 0,
the partial is appended as a completed block and a new partial starts with this sublayer's
output. With the partial initialised to the embedding, s = 0 turns the embedding into b_0
("blocks already include token embedding"), and the first sublayer of every block reads the block
that has just been completed. (The code appends first and then reads over the blocks: the same
set of values. tests/test_attnres.py checks it against the pseudocode's order, literally.) `block_size` counts sublayers (attention + MLP
= 2 per layer, 3 with a ShortSWA mixer); block_size = 1 is exactly Full AttnRes, which is how
`attnres` is implemented. Default block_size = 4 sublayers (the paper's S-sweep: S = 2, 4, 8 give
the same loss; 4 is its 16-layer ablation setting; the 48B model uses 6).

Final read: one more aggregation with its own pseudo-query and key norm over every source
(completed blocks + partial) before the model's final norm and LM head (Megatron-LM PR #6840
and the Kimi-style `block` mode of the Delta-AttnRes code do this; the README pseudocode stops
at the last layer).

The first sublayer reads a single source (the embedding, weight 1), so it has no parameters.

Init: every pseudo-query is zero, every key-norm weight one (paper section 5), so all weights
are uniform: h_l = (1/m) * (standard pre-norm residual) over m sources, and the sublayer's RMSNorm
removes the 1/m factor -- the model starts at the standard residual UP TO THE NORM'S EPS:
RMSNorm(x/m) acts like RMSNorm(x) with eps * m^2. With init_std = 0.02 embeddings (mean square
4e-4) and norm_eps = 1e-5 that is not small for late reads (m up to 2L+1). Measured at init,
12 layers, d = 256, against `standard` on shared weights: max |logit difference| 1.2 (Full;
loss 4.38 vs 3.74) and 0.11 (Block, S = 4) at norm_eps = 1e-5, but <= 2e-5 at norm_eps = 1e-10.
So AttnRes starts at the baseline only for small norm_eps (tests use 1e-10); with the default eps
Full AttnRes starts visibly away from it. The same holds for the final read.

Ablation switches (the paper's section-5 ablations, options of both operators; the paper's
text on them was not available to us, so their exact forms are ours, from its one-line
descriptions; defaults = the method):
- `query="input"`: an input-dependent query q_l = W_l x_l / rms(x_l) instead of the static w_l,
  with x_l the plain running sum of the sources (the standard residual stream at that read),
  rms(x) = sqrt(mean(x^2) + eps), and W_l in R^{d x d}, zero-initialised like w_l (so the model
  still starts at uniform weights).
- `weights="sigmoid"`: a_i = sigmoid(q^T RMSNorm(v_i)), each source weighted independently
  (weights do not sum to 1; at init every a_i = 1/2).
- `heads=H`: per-head depth mixing: the d channels split into H groups of d/H, each with its
  own logits (the query's and normalised keys' dot product over the group's channels) and
  weights; the key RMSNorm still normalises over all d channels.
- `key_norm=False`: logits q^T v_i on the raw sources (no key RMSNorm, no norm weight).
Any switch off its default runs a plain-autograd path (`PlainState`, `_ablation_mix`: stacked
sources, autograd through ordinary ops, in training, prefill and decode alike) instead of the
fused two-phase path and its decode workspace below, which serve only the defaults.
`impl="naive"` takes the plain path for the defaults too (tests hold fused == naive);
`impl="auto"` (the default) takes it under torch.compile, where it traces without graph breaks
and the compiler fuses its ops, and the fused path in eager mode (measured faster there on CPU;
on a GPU, compare them with `resstream bench operators --option attnres.impl=naive`).
`block_attnres` takes either `block_size` (S sublayers per block, default 4) or `n_blocks`
(the paper's N, e.g. 8: S = ceil(sublayers / N)), not both.

depth_layers: an inactive block's sublayers read the running plain sum of every source (exactly
the standard residual stream) and still write their outputs as sources; the final read is active
iff the last block is active. With no active block the model is exactly the standard model.

Implementation (reads are memory-bound, so the point is few passes over [B, T, d] tensors):
- The logit of source i for query l is (w_l * g_l)^T v_i * rsqrt(mean(v_i^2) + eps): the RMS
  factor does not depend on the query and the key norm's weight folds into the query, so every
  source's logits for ALL queries of the model are one GEMM when the source is appended.
- Kimi's two-phase schedule: reads run in phases of whole blocks (>= 4 reads). At a phase start
  the new sources are copied once into a per-forward buffer [B, T, capacity, d] (`settle`) and
  the softmax mix and logsumexp over its filled prefix are computed for all the phase's queries
  at once: one batched matmul over the buffer, read in place (`PhaseMix`, whose backward returns
  the sources' gradients as slices of one product: no re-stacking, no cat in either pass).
  Each read then merges that mix with the sources added during the phase and the running
  partial sum by an exact online-softmax merge.
- Hand-written backward passes (NormalizedScores, PhaseMix, SoftmaxMerge) avoid autograd's
  per-term temporaries. No Python loop over tokens, no per-read copy of the source stack.
Logits, softmax and mixes run in float32 (float64 for a float64 model) with autocast off; the
sources are stored in the stream's dtype (the embedding's, as in `standard`), their copies in
the phase buffer in the compute dtype.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch import Tensor
from torch.autograd.function import once_differentiable

from resstream.depth.base import (DecodeWorkspace, DepthOperator, compute_dtype,
                                  decode_workspace, is_decode_step, use_naive, validate_impl)
from resstream.options import require
from resstream.registry import register_depth_operator
from resstream.routing import depth_attention_result, site_label

CHUNK = 4  # the minimum number of reads per phase
QUERIES = ("static", "input")
WEIGHTINGS = ("softmax", "sigmoid")


@dataclass
class AblationOptions:
    """The paper's ablation switches (section 5); any non-default value runs the plain path."""
    query: str = "static"  # "static" (pseudo-query w_l) | "input" (W_l RMSNorm(x), x = plain sum)
    weights: str = "softmax"  # "softmax" | "sigmoid" (each source weighted independently)
    heads: int = 1  # > 1: per-head depth mixing, the d channels split into `heads` groups
    key_norm: bool = True  # False: logits w^T v_i, without RMSNorm on the keys
    # "fused": the phase schedule with hand-written backward passes (eager CPU speed);
    # "naive": the plain-autograd path, the equations as written; "auto": base.use_naive
    impl: str = "auto"


def validate_ablations(config, options) -> None:
    require(options.query in QUERIES, "depth_options.query", options.query, ", ".join(QUERIES))
    require(options.weights in WEIGHTINGS, "depth_options.weights", options.weights,
            ", ".join(WEIGHTINGS))
    require(options.heads >= 1 and config.d_model % options.heads == 0, "depth_options.heads",
            options.heads, f"a divisor of d_model={config.d_model} (1: one weight per source)")
    validate_impl(options.impl)


def is_ablation(options) -> bool:
    """Whether any ablation switch is off its default (the fused path serves only defaults)."""
    switches = ("query", "weights", "heads", "key_norm")
    return isinstance(options, AblationOptions) and any(
        getattr(options, f) != getattr(AblationOptions, f) for f in switches)


@dataclass
class PlainState:
    """Depth state of the plain-autograd path: the sources (embedding, completed blocks) as a
    list and the running partial sum of the current block."""
    sources: list
    partial: Tensor | None


class NormalizedScores(torch.autograd.Function):
    """scores[..., n] = queries[n] . v * rsqrt(mean(v^2) + eps): the logits w^T RMSNorm(v) of one
    source v [..., d] for every query [n, d] at once (the norm weight is folded into the query).
    Hand-written backward: one GEMM and one fused update instead of autograd's temporaries."""

    @staticmethod
    def forward(ctx, v, queries, eps):
        flat = v.to(queries.dtype).reshape(-1, v.shape[-1])
        dots = flat @ queries.t()  # [N, n]
        mean_square = torch.linalg.vector_norm(flat, dim=-1).square() / flat.shape[-1]
        inv_rms = torch.rsqrt(mean_square + eps)
        ctx.save_for_backward(v, queries, dots, inv_rms)
        return (dots * inv_rms[:, None]).view(v.shape[:-1] + (-1,))

    @staticmethod
    def backward(ctx, grad):
        v, queries, dots, inv_rms = ctx.saved_tensors
        d = v.shape[-1]
        flat = v.to(queries.dtype).reshape(-1, d)
        grad = grad.reshape(dots.shape)
        grad_dots = grad * inv_rms[:, None]
        # d inv_rms / d v = -inv_rms^3 v / d
        grad_sq = -(grad * dots).sum(-1) * inv_rms.pow(3) / d
        grad_v = grad_dots @ queries
        grad_v.addcmul_(flat, grad_sq[:, None])
        grad_queries = grad_dots.t() @ flat
        return grad_v.view(v.shape).to(v.dtype), grad_queries, None


class SoftmaxMerge(torch.autograd.Function):
    """Phase 2 of a read. With logits z_k of K extra sources v_k (given for the `recent` sources;
    for the running `partial` sum computed here as query . v * rsqrt(mean(v^2) + eps)) and
    p = softmax([lse, z_1, ..., z_K]):  h = p_0 * mix + sum_k p_k v_k  -- exactly the softmax over
    the settled sources (summarised by their normalised mix and logsumexp) and the extras.
    Reads are memory-bound: this writes h once in the forward and each gradient once in the
    backward, where autograd would keep a temporary and two products per term."""

    @staticmethod
    def forward(ctx, mix, lse, query, eps, partial, n_recent, *recent):
        values, logits = list(recent[:n_recent]), list(recent[n_recent:])
        dtype, d = mix.dtype, mix.shape[-1]
        dot = inv_rms = None
        if partial is not None:
            flat = partial.to(dtype).reshape(-1, d)
            dot = torch.mv(flat, query).view(lse.shape)
            inv_rms = torch.rsqrt(torch.linalg.vector_norm(flat, dim=-1).square() / d + eps)
            values.append(partial)
            logits.append(dot * inv_rms.view(lse.shape))
        probs = torch.softmax(torch.stack([lse, *logits], -1), dim=-1)
        weights = [p.unsqueeze(-1).contiguous() for p in probs.unbind(-1)]
        out = mix * weights[0]
        for v, w in zip(values, weights[1:]):
            out.addcmul_(v.to(dtype), w)
        ctx.has_partial = partial is not None
        ctx.save_for_backward(mix, query, probs, dot, inv_rms, *values)
        return out

    @staticmethod
    def backward(ctx, grad):
        mix, query, probs, dot, inv_rms, *values = ctx.saved_tensors
        dtype, d = mix.dtype, mix.shape[-1]
        grad = grad.contiguous()
        grad_probs = torch.stack([(grad * v.to(dtype)).sum(-1) for v in [mix, *values]], -1)
        grad_logits = probs * (grad_probs - (probs * grad_probs).sum(-1, keepdim=True))
        weights = [p.unsqueeze(-1).contiguous() for p in probs.unbind(-1)]
        grad_values = [grad * w for w in weights[1:]]
        grad_query = grad_partial = None
        if ctx.has_partial:
            partial, grad_partial = values[-1].to(dtype), grad_values.pop()
            grad_z = grad_logits[..., -1]
            grad_dot = (grad_z * inv_rms.view(grad_z.shape)).unsqueeze(-1)
            # d inv_rms / d v = -inv_rms^3 v / d
            grad_sq = (-grad_z * dot * inv_rms.view(grad_z.shape).pow(3) / d).unsqueeze(-1)
            grad_partial.addcmul_(partial, grad_sq)
            grad_partial.addcmul_(grad_dot, query)
            grad_query = torch.mv(partial.reshape(-1, d).t(), grad_dot.reshape(-1))
            grad_partial = grad_partial.to(values[-1].dtype)
            grad_logits = grad_logits[..., :-1]
        n_recent = len(grad_values)
        grad_values = [g.to(v.dtype) for g, v in zip(grad_values, values)]
        return (grad * weights[0], grad_logits[..., 0], grad_query, None, grad_partial, None,
                *grad_values, *grad_logits[..., 1:1 + n_recent].unbind(-1))


@dataclass
class DepthSources:
    """Depth sources of one forward pass. Each source carries its logits for every query of the
    model (computed once, when it is appended). When a phase starts the sources appended since
    the last one (`recent`) are `settled`: copied once into `buffer` [B, T, capacity, d] (compute
    dtype, a fresh one per forward, slots never overwritten), which the phase mix reads directly."""

    dtype: torch.dtype  # the stream's dtype (the embedding's), in which sources are stored
    device_type: str
    queries: Tensor | None  # [n_queries, d] folded pseudo-queries w * g (compute dtype)
    capacity: int = CHUNK  # expected number of sources (the buffer grows if needed)
    buffer: Tensor | None = None  # [B, T, capacity, d] settled values (compute dtype, no autograd)
    settled: list = field(default_factory=list)  # [(value [B,T,d], logits [B,T,n_q])]
    recent: list = field(default_factory=list)  # [(value [B,T,d], logits [B,T,n_q])]
    phase_columns: range = range(0)  # query columns of the current phase
    phase_mix: tuple = ()  # per phase query: [B, T, d] softmax mix over the settled sources
    phase_lse: tuple = ()  # per phase query: [B, T] logsumexp of their logits


@dataclass
class AttnResState:
    sources: DepthSources
    embedding: Tensor
    partial: Tensor | None  # running sum of the current block (None right after a boundary)
    total: Tensor | None  # plain sum of every sublayer output and the embedding (if kept)


def settle(sources: DepthSources) -> None:
    """Copy the recent sources into the buffer's next slots (each source is copied once)."""
    if not sources.recent:
        return
    count, new = len(sources.settled), len(sources.recent)
    first = sources.recent[0][0]
    dtype = compute_dtype(sources.dtype)
    with torch.no_grad():  # the gradient reaches the sources through PhaseMix's inputs
        if sources.buffer is None or count + new > sources.buffer.shape[-2]:
            # a fresh buffer (earlier phases keep the old one, whose prefix stays valid)
            capacity = max(sources.capacity, 2 * (count + new))
            buffer = first.new_empty(*first.shape[:-1], capacity, first.shape[-1], dtype=dtype)
            if count:
                buffer[..., :count, :].copy_(sources.buffer[..., :count, :])
            sources.buffer = buffer
        for slot, (v, _) in enumerate(sources.recent, start=count):
            sources.buffer[..., slot, :].copy_(v)
    sources.settled.extend(sources.recent)
    sources.recent = []


class PhaseMix(torch.autograd.Function):
    """mix [B, T, n, d] = weights [B, T, n, m] @ the settled sources: one batched matmul over
    `prefix` [B, T, m, d] (the buffer's filled slots, read in place: no re-stacking). The sources
    are the formal inputs `values`; their gradients are slices of one [B, T, m, d] product."""

    @staticmethod
    def forward(ctx, weights, prefix, *values):
        b, t, n, m = weights.shape
        ctx.prefix, ctx.dtypes = prefix, [v.dtype for v in values]  # prefix: never overwritten
        ctx.save_for_backward(weights)
        w = weights.reshape(b * t, n, m)
        return torch.bmm(w, prefix.reshape(b * t, m, -1)).view(b, t, n, -1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (weights,) = ctx.saved_tensors
        b, t, n, m = weights.shape
        prefix = ctx.prefix.reshape(b * t, m, -1)
        grad = grad.reshape(b * t, n, -1)
        grad_weights = torch.bmm(grad, prefix.transpose(1, 2)).view(weights.shape)
        weights_t = weights.reshape(b * t, n, m).transpose(1, 2)
        # one query (the final read): an outer product per token, faster than bmm's inner dim 1
        grad_prefix = weights_t * grad if n == 1 else torch.bmm(weights_t, grad)
        grad_prefix = grad_prefix.view(b, t, m, -1)
        return (grad_weights, None,
                *(grad_prefix[:, :, i].to(dtype) for i, dtype in enumerate(ctx.dtypes)))


def phase_statistics(sources: DepthSources, columns: range) -> tuple[Tensor, Tensor]:
    """Phase 1, batched over the queries of a phase: the softmax mix [B, T, n, d] over all
    settled sources and the logsumexp [B, T, n] of their logits, for query columns `columns`."""
    logits = torch.stack([z[..., columns.start:columns.stop] for _, z in sources.settled], -2)
    lse = torch.logsumexp(logits, dim=-2)  # [B, T, n]
    weights = torch.exp(logits - lse.unsqueeze(-2)).transpose(-1, -2)  # [B, T, n, m]
    prefix = sources.buffer[..., :len(sources.settled), :]
    return PhaseMix.apply(weights, prefix, *(v for v, _ in sources.settled)), lse


class PseudoQueryReads(DepthOperator):
    """What AttnRes-style operators share: one pseudo-query w and key-RMSNorm weight g per
    active read that sees more than one source (sublayer reads of active blocks, plus "final"),
    the block bookkeeping (running partial sum, a boundary before every sublayer whose index is
    a multiple of `block_size`), and the two-phase softmax read over the depth sources.
    Subclasses say what a read returns (Block AttnRes: the mixture; Delta-AttnRes: x + mixture)."""

    mixing = "dynamic"  # input-dependent weights from a static pseudo-query
    partial_is_source = True  # Block AttnRes reads the running partial; Delta-AttnRes does not

    def __init__(self, config, sites, options, block_size: int, query_std: float = 0.0):
        super().__init__(config, sites, options)
        self.block_size = block_size
        # reads are scheduled in phases of whole blocks, at least CHUNK reads long
        self.phase_length = block_size * -(-CHUNK // block_size)
        self.eps = config.norm_eps
        self.final_active = self.is_active(config.n_layers - 1) and self.has_final_read()
        # a read that sees a single source (the embedding, weight 1) has no query parameters
        reads = [(s.index, str(s.index)) for s in sites
                 if self.is_active(s.layer) and self._sees_several_sources(s.index)]
        reads += [(len(sites), "final")] if self.final_active else []
        inactive_sites = sum(1 for s in sites if not self.is_active(s.layer))
        self.n_inactive = inactive_sites + (not self.final_active)
        d = config.d_model
        # pseudo-query w_l and key-RMSNorm weight g_l (one init) per active read
        self.query = nn.ParameterDict({k: nn.Parameter(torch.randn(d) * query_std if query_std
                                                       else torch.zeros(d)) for _, k in reads})
        self.key_norm = nn.ParameterDict({k: nn.Parameter(torch.ones(d)) for _, k in reads})
        self.column = {key: column for column, (_, key) in enumerate(reads)}
        # the query column of the read before each site (and the final read); None: no query
        self.read_columns = [self.column.get(key) for key in
                             [str(s.index) for s in sites] + ["final"]]
        self.phase_columns: dict[int, range] = {}
        for column, (index, _) in enumerate(reads):
            phase = index // self.phase_length
            start = self.phase_columns.get(phase, range(column, column)).start
            self.phase_columns[phase] = range(start, column + 1)

    def has_final_read(self) -> bool:
        """Whether a read with its own pseudo-query runs after the last sublayer."""
        return True

    def _sees_several_sources(self, index: int) -> bool:
        """Whether the read before sublayer `index` has more than the embedding to attend to:
        the partial sum (when it is a source) from index 1 on, else the first completed block."""
        return index >= (1 if self.partial_is_source else self.block_size)

    # ---------------------------------------------------------------- depth sources
    def folded_queries(self, dtype: torch.dtype, scale: float = 1.0) -> Tensor | None:
        """[n_reads, d]: scale * w * g per read column, in `dtype`; (w * g)^T x_hat is
        w^T RMSNorm_g(x). (The ParameterDicts hold the reads in column order.)"""
        if not self.column:
            return None
        queries = torch.stack(list(self.query._parameters.values()))
        norms = torch.stack(list(self.key_norm._parameters.values()))
        return (queries * norms if scale == 1.0 else queries * norms * scale).to(dtype)

    def _new_state(self, x0: Tensor, keep_total: bool) -> AttnResState:
        queries = self.folded_queries(compute_dtype(x0.dtype))
        # capacity: the embedding and every completed block (one more for the partial)
        capacity = len(self.sites) // self.block_size + 2
        sources = DepthSources(x0.dtype, x0.device.type, queries, capacity)
        return AttnResState(sources, x0, x0, x0 if keep_total else None)

    def _append(self, sources: DepthSources, v: Tensor) -> None:
        if sources.queries is not None:
            with torch.autocast(sources.device_type, enabled=False):
                sources.recent.append((v, NormalizedScores.apply(v, sources.queries, self.eps)))

    def _next_site(self, state: AttnResState, index: int) -> None:
        """Bookkeeping before the read at global sublayer `index` (len(sites) = the final read)."""
        if index < len(self.sites) and index % self.block_size == 0:
            # Block boundary: the partial sum is complete. The official pseudocode reads over
            # (blocks + partial) and then appends the partial; appending first and reading over
            # the blocks is the same set of values. At index 0 the partial is the embedding.
            self._close_block(state)
        if index % self.phase_length == 0:
            self._start_phase(state.sources, index // self.phase_length)

    def _close_block(self, state: AttnResState) -> None:
        """The running partial sum becomes a source; the next write starts a new one."""
        self._append(state.sources, state.partial)
        state.partial = None

    def _start_phase(self, sources: DepthSources, phase: int) -> None:
        settle(sources)
        sources.phase_columns = self.phase_columns.get(phase, range(0))
        if len(sources.phase_columns):
            with torch.autocast(sources.device_type, enabled=False):
                mix, lse = phase_statistics(sources, sources.phase_columns)
            sources.phase_mix, sources.phase_lse = mix.unbind(-2), lse.unbind(-1)

    def _attend(self, state: AttnResState, key: str) -> Tensor:
        """softmax_i(w^T RMSNorm(v_i)) v_i over the sources (and the partial sum when
        `partial_is_source`), in the stream's dtype."""
        if self._routing is not None:
            self._record_read(state, key)
        sources = state.sources
        partial = state.partial if self.partial_is_source else None
        column = self.column[key]
        slot = column - sources.phase_columns.start
        mix, lse = sources.phase_mix[slot], sources.phase_lse[slot]
        if partial is None and not sources.recent:
            return mix.to(sources.dtype)
        values = [v for v, _ in sources.recent]
        logits = [z[..., column] for _, z in sources.recent]
        with torch.autocast(sources.device_type, enabled=False):
            h = SoftmaxMerge.apply(mix, lse, sources.queries[column], self.eps, partial,
                                   len(values), *values, *logits)
        return h.to(sources.dtype)

    def _key(self, site) -> str | None:
        """The read's query key; None for an inactive read (and the first, parameter-free one)."""
        return str(site.index) if str(site.index) in self.column else None

    def write(self, state, site, out, ctx):
        out = out.to(state.sources.dtype)
        state.partial = out if state.partial is None else state.partial + out
        if state.total is not None:
            state.total = state.total + out
        return state

    # ---------------------------------------------------------------- routing weights
    def _record_read(self, state: AttnResState, key: str) -> None:
        """The read's softmax weights [B, T, m] over its sources, from the logits the sources
        carry (and the partial sum's, computed here as SoftmaxMerge does): PhaseMix and
        SoftmaxMerge only ever see them split across the two phases."""
        sources, column = state.sources, self.column[key]
        dtype = compute_dtype(sources.dtype)
        logits = [z[..., column].to(dtype) for _, z in sources.settled + sources.recent]
        if self.partial_is_source and state.partial is not None:
            partial = state.partial.to(dtype)
            inv_rms = torch.rsqrt(partial.square().mean(-1) + self.eps)
            logits.append((partial @ sources.queries[column].to(dtype)) * inv_rms)
        labels = [self._source_label(i) for i in range(len(logits))]
        reader = "final" if key == "final" else site_label(self.sites[int(key)])
        self._routing.add_weights(reader, labels, torch.softmax(torch.stack(logits, -1), -1))

    def _source_label(self, i: int) -> str:
        """Source i: the embedding, then sublayer outputs (block_size 1) or block sums "B{i}"
        (sublayers (i-1) S .. i S - 1; the running partial sum is labelled as the block it
        becomes)."""
        if i == 0:
            return "emb"
        return site_label(self.sites[i - 1]) if self.block_size == 1 else f"B{i}"

    def routing_result(self, recorder) -> dict:
        """depth_attention over the reads with a pseudo-query (a read seeing only the embedding
        has weight 1 and no parameters, and is left out)."""
        return depth_attention_result(recorder, normalised=True)

    # ---------------------------------------------------------------- pipeline stages
    def keeps_total(self) -> bool:
        """Whether the state carries the plain running sum `total` (inactive reads use it)."""
        return self.n_inactive > 0

    def stage_state(self, state: AttnResState, layer: int) -> tuple[Tensor, ...]:
        """The sources (the embedding, then the completed blocks) and the running partial.
        Not sent: the sources' logits, the phase buffer and phase statistics (recomputed from
        the sources and the pseudo-queries) and `total`, which is the sum of the sources and
        the partial. Without any pseudo-query nothing is kept as a source: the embedding and
        `total` are sent instead."""
        if state.sources.queries is None:
            return state.embedding, state.total
        sources = state.sources.settled + state.sources.recent
        return (*(value for value, _ in sources), state.partial)

    def from_stage_state(self, tensors: tuple[Tensor, ...], layer: int) -> AttnResState:
        if not self.column:
            embedding, total = tensors
            sources = DepthSources(embedding.dtype, embedding.device.type, None)
            return AttnResState(sources, embedding, None, total)
        *values, partial = tensors
        state = self._new_state(values[0], keep_total=self.keeps_total())
        for value in values:
            self._append(state.sources, value)
        state.partial = partial
        if state.total is not None:
            state.total = sum(values[1:], values[0]) + partial
        n_sites = sum(1 for s in self.sites if s.layer <= layer)
        if n_sites % self.phase_length:  # mid-phase: this phase's statistics over all sources
            self._start_phase(state.sources, n_sites // self.phase_length)
        return state

    # ---------------------------------------------------------------- accounting
    def _sources_after(self, n_sites: int) -> int:
        """Completed blocks (embedding included) plus the partial after n_sites sublayers."""
        return (n_sites - 1) // self.block_size + 2


def attend_stack(query: Tensor, values: Tensor, keys: Tensor) -> Tensor:
    """softmax_i(q . [v_i, c] / |[v_i, c]|) v_i for query [B, 1, d+1], values [B, m, d] and keys
    [B, d+1, m] (the sources with their c column, transposed): 5 ops. Returns [B, 1, d]."""
    logits = torch.bmm(query, keys)  # [B, 1, m]
    logits.div_(torch.linalg.vector_norm(keys, dim=1, keepdim=True))
    return torch.bmm(torch.softmax(logits, dim=-1), values)


class AttnResWorkspace(DecodeWorkspace):
    """Block AttnRes's decode-cache entry (see `DecodeWorkspace` for when it is rebuilt). In a
    one-token step every read and write is static given the block layout: read i sees the
    first m_i sources of the stack (the embedding, the completed blocks, then the running
    partial sum), and write i adds into slot 1 + i // block_size (copies, at a block's start).
    So a step allocates only its reads' outputs and makes no views:
      stack    [B, slots, d + 1] the step's sources in the stream dtype, as in the general path
               (scratch: overwritten by the next step), each followed by c = sqrt(d * eps)
      reads    per read index: q = (sqrt(d) * w * g, 0) as a [B, 1, d + 1] view (None: no
               query), and its m_i sources as values [B, m_i, d] and keys [B, d + 1, m_i]
      targets  per write index: the [B, 1, d] slot it writes and whether it starts a block
    With this q, w^T RMSNorm_g(v) = (w * g)^T v / sqrt(|v|^2 / d + eps) = q^T [v, c] / |[v, c]|:
    a read is 5 ops (`attend_stack`), plus a cast of its sources for a bfloat16 or float16
    stream. The c column costs one value per source and token (`depth_state_values`)."""

    def weights(self, op: "BlockAttnResBase") -> list[Tensor]:
        return [*op.query._parameters.values(), *op.key_norm._parameters.values()]

    def build(self, op: "BlockAttnResBase", like: Tensor) -> None:
        b, d = self.batch_size, like.shape[-1]
        self.dtype, self.compute = like.dtype, compute_dtype(like.dtype)
        self.device_type, self.same_dtype = like.device.type, self.dtype == self.compute
        self.c = (d * op.eps) ** 0.5
        self.stack = like.new_empty(b, op.depth_state_vectors(), d + 1)
        self.stack[..., d] = self.c
        with torch.no_grad():
            folded = op.folded_queries(self.compute, d ** 0.5)
        if folded is not None:
            folded = torch.cat([folded, folded.new_zeros(len(folded), 1)], dim=1)
        self.reads = []
        for index, column in enumerate(op.read_columns):
            sources = self.stack[:, :op.sources_seen(index)]
            query = None if column is None else folded[column].expand(b, 1, d + 1)
            self.reads.append((query, sources[..., :d], sources.mT))
        self.targets = [(self.stack[:, 1 + i // op.block_size, :d].unsqueeze(1),
                         i % op.block_size == 0) for i in range(len(op.sites))]

    def begin(self, x0: Tensor, keep_total: bool) -> "AttnResWorkspace":
        """Start a decode step from the embedding x0 [B, 1, d]; the workspace is its state."""
        self.reads[0][1].copy_(x0)  # slot 0 of the stack
        # the plain sum of every source, which inactive reads return (kept only for them)
        self.total = x0.clone() if keep_total else None
        # reads run in the compute dtype without autocast (see read)
        self.plain = self.same_dtype and not torch.is_autocast_enabled(self.device_type)
        return self

    def read(self, index: int) -> Tensor:
        """softmax_i(w^T RMSNorm_g(v_i)) v_i over the sources read `index` sees, [B, 1, d]."""
        query, values, keys = self.reads[index]
        if query is None:  # the embedding (read 0's only source) or an inactive read
            return values if index == 0 else self.total
        if self.plain:
            return attend_stack(query, values, keys)
        # a bfloat16/float16 stream or a step under autocast: the read in the compute dtype with
        # autocast off, the c column set again in the compute dtype
        with torch.autocast(self.device_type, enabled=False):
            keys = keys.to(self.compute)
            keys[:, -1] = self.c
            return attend_stack(query, keys[:, :-1].mT, keys).to(self.dtype)

    def write(self, index: int, out: Tensor) -> None:
        target, starts_block = self.targets[index]
        if starts_block:
            target.copy_(out)
        else:
            target.add_(out)
        if self.total is not None:  # not in place: an earlier read may have returned it
            self.total = self.total + out


class BlockAttnResBase(PseudoQueryReads):
    """Block AttnRes with `self.block_size` sublayers per block (1 = Full AttnRes).

    Decode steps (one token per sequence, no autograd) take a separate path with 5 ops per read:
    there the cost is per-op overhead, not memory traffic. The sources go into one stack kept
    in the decode cache (the partial sum accumulates in place in the next free slot) and each
    read recomputes its few logits from views of that stack (`AttnResWorkspace`)."""

    paper = "Kimi Team, Attention Residuals (arXiv 2603.15031)"
    starts_at_baseline = True  # zero pseudo-queries; exact up to the norms' eps (see docstring)

    def __init__(self, config, sites, options, block_size: int):
        super().__init__(config, sites, options, block_size)
        self.plain = is_ablation(options) or options.impl == "naive"
        if is_ablation(options):  # the ablation switches' parameters (see the module docstring)
            d = config.d_model
            if options.query == "input":  # W_l, zero: uniform weights at init, as w_l = 0
                self.query = nn.ParameterDict({k: nn.Parameter(torch.zeros(d, d))
                                               for k in self.column})
            if not options.key_norm:
                self.key_norm = nn.ParameterDict()

    def init_state(self, x0, ctx):
        if self.plain or use_naive(self.options.impl):
            return PlainState([], x0)
        if is_decode_step(x0):
            return decode_workspace(self, x0, ctx).begin(x0, keep_total=self.n_inactive > 0)
        return self._new_state(x0, keep_total=self.n_inactive > 0)

    def _read(self, state, index: int, key: str | None) -> Tensor:
        if isinstance(state, PlainState):
            return self._plain_read(state, index, key)
        self._next_site(state, index)
        if index == 0:
            return state.embedding  # the only source
        return state.total if key is None else self._attend(state, key)

    def read(self, state, site, norm, ctx):
        if isinstance(state, AttnResWorkspace):
            return norm(state.read(site.index))
        return norm(self._read(state, site.index, self._key(site)))

    def write(self, state, site, out, ctx):
        if isinstance(state, AttnResWorkspace):
            state.write(site.index, out)
            return state
        if isinstance(state, PlainState):
            state.partial = out if state.partial is None else state.partial + out
            return state
        return super().write(state, site, out, ctx)

    # ---------------------------------------------------------------- plain path (ablations)
    def _plain_read(self, state: PlainState, index: int, key: str | None) -> Tensor:
        """The read with plain autograd ops, as the equations: the same block bookkeeping as
        `_next_site` (the partial becomes a source at every boundary, the embedding at 0)."""
        if index < len(self.sites) and index % self.block_size == 0:
            state.sources.append(state.partial)
            state.partial = None
        values = state.sources + ([] if state.partial is None else [state.partial])
        if key is None:  # the first read (the embedding alone) or an inactive one (plain sum)
            return values[0] if index == 0 else sum(values[1:], values[0])
        return self._ablation_mix(key, values)

    def _ablation_mix(self, key: str, values: list[Tensor]) -> Tensor:
        """sum_i a_i v_i per head, a = softmax_i or sigmoid of q^T K(v_i) over the head's
        channels; q = w_l or W_l RMSNorm(sum_i v_i); K = RMSNorm_l or the identity."""
        dtype, opts, heads = compute_dtype(values[0].dtype), self.options, self.options.heads
        with torch.autocast(values[0].device.type, enabled=False):
            v = torch.stack(values, -2).to(dtype)  # [B, T, m, d]
            keys = v
            if opts.key_norm:
                keys = v * torch.rsqrt(v.square().mean(-1, keepdim=True) + self.eps)
                keys = keys * self.key_norm[key].to(dtype)
            query = self.query[key].to(dtype)
            if opts.query == "input":  # from the plain running sum, the standard residual here
                x = v.sum(-2)
                query = (x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps)) @ query.t()
                query = query.unsqueeze(-2)  # [B, T, 1, d]
            split = v.shape[:-1] + (heads, v.shape[-1] // heads)
            logits = (keys * query).view(split).sum(-1)  # [B, T, m, H]
            weights = logits.softmax(-2) if opts.weights == "softmax" else logits.sigmoid()
            if self._routing is not None:
                self._record_plain(key, weights)
            out = (weights.unsqueeze(-1) * v.view(split)).sum(-3).flatten(-2)
        return out.to(values[0].dtype)

    def _record_plain(self, key: str, weights: Tensor) -> None:
        reader = "final" if key == "final" else site_label(self.sites[int(key)])
        labels = [self._source_label(i) for i in range(weights.shape[-2])]
        heads = [f"h{h}" for h in range(weights.shape[-1])] if weights.shape[-1] > 1 else None
        per_head = weights.transpose(-1, -2) if heads else weights[..., 0]
        self._routing.add_weights(reader, labels, per_head, heads)

    def routing_result(self, recorder) -> dict:
        """As PseudoQueryReads; sigmoid weights (an ablation) do not sum to 1."""
        return depth_attention_result(recorder, normalised=self.options.weights == "softmax")

    def stage_state(self, state, layer: int) -> tuple[Tensor, ...]:
        if isinstance(state, PlainState):
            return (*state.sources, state.partial)
        return super().stage_state(state, layer)

    def from_stage_state(self, tensors: tuple[Tensor, ...], layer: int):
        if self.plain:
            *sources, partial = tensors
            return PlainState(list(sources), partial)
        return super().from_stage_state(tensors, layer)

    def finalize(self, state, ctx):
        if isinstance(state, AttnResWorkspace):
            return state.read(len(self.sites))
        return self._read(state, len(self.sites), "final" if self.final_active else None)

    # ---------------------------------------------------------------- decode path
    def new_cache_entry(self, batch_size: int, max_len: int, device, dtype) -> AttnResWorkspace:
        return AttnResWorkspace(batch_size)

    def sources_seen(self, index: int) -> int:
        """How many sources the read before sublayer `index` (len(sites): the final read) sees:
        the embedding and the completed blocks, plus the partial sum unless a block starts."""
        if index == len(self.sites):
            return self._sources_after(index)
        return 1 + index // self.block_size + (index % self.block_size != 0)

    def depth_state_vectors(self) -> int:
        return self._sources_after(len(self.sites))

    def depth_state_values(self) -> int:
        """The decode stack's values per token: each source with its c column (AttnResWorkspace)."""
        return self.depth_state_vectors() * (self.d_model + 1)

    def pipeline_payload(self, layer: int) -> tuple[str, int]:
        """`stage_state`: the sources and the partial (the plain sum kept for inactive blocks
        is recomputed from them)."""
        n_sites = sum(1 for s in self.sites if s.layer <= layer)
        if not self.column:
            return "embedding + plain sum (no learned read)", 2
        if self.block_size == 1:
            return "embedding + every sublayer output so far (s+1)", self._sources_after(n_sites)
        return ("embedding + completed blocks + partial (floor((s-1)/S)+2)",
                self._sources_after(n_sites))

    def forward_macs_per_token(self, seq_len: int) -> int:
        """Per read with a pseudo-query over m sources: the logits w . RMSNorm(v_i) and the
        softmax mix, 2 m d; the key RMS of each source, d, once per completed source (embedding
        and block sums) and once per read for the running partial it sees. Reads of a single
        source or of an inactive block (the plain sum) are free. (The implementation scores
        each source against every query at once; counted here as the equations.) Ablations:
        query="input" adds d^2 per read (W_l x); key_norm=False saves the key RMS (not
        subtracted here: an upper bound); sigmoid weights and heads cost the same."""
        if not self.column:
            return 0
        d, n_sites = self.d_model, len(self.sites)
        total = d * -(-n_sites // self.block_size)  # completed sources: a boundary every S sublayers
        if self.plain and self.options.query == "input":  # W_l RMSNorm(x) per read
            total += len(self.column) * d * d
        for key in self.column:
            index = n_sites if key == "final" else int(key)
            partial_seen = index == n_sites or index % self.block_size != 0
            total += 2 * self.sources_seen(index) * d + (d if partial_seen else 0)
        return total

    def no_weight_decay(self) -> set[str]:
        """All of them (paper section 5: zero-initialised pseudo-queries, unit key-norm weights):
        the pseudo-queries w_l and key-norm gains g_l (1-D) define the depth mixing weights."""
        return {name for name, _ in self.named_parameters()}


@register_depth_operator("attnres")
class FullAttnRes(BlockAttnResBase):
    aggregates = ("softmax(w_l . RMSNorm(v_i)) over the embedding and every earlier sublayer "
                  "output, replacing the residual")
    granularity = "sublayer"

    @dataclass
    class Options(AblationOptions):
        pass

    @classmethod
    def validate_config(cls, config, options) -> None:
        validate_ablations(config, options)

    def __init__(self, config, sites, options):
        super().__init__(config, sites, options, block_size=1)


@register_depth_operator("block_attnres")
class BlockAttnRes(BlockAttnResBase):
    aggregates = ("softmax(w_l . RMSNorm(b_n)) over the embedding, completed block sums and the "
                  "running partial block sum, replacing the residual")
    granularity = "block"

    @dataclass
    class Options(AblationOptions):
        block_size: int | None = None  # sublayers per block (attention + MLP = 2 per layer); 4
        n_blocks: int | None = None  # or the number of blocks N (the paper's N = 8)

    @classmethod
    def validate_config(cls, config, options) -> None:
        require(options.block_size is None or options.n_blocks is None, "depth_options.n_blocks",
                options.n_blocks, "null when block_size is set (give one of the two)")
        require(options.block_size is None or options.block_size >= 1, "depth_options.block_size",
                options.block_size, "an integer >= 1 (sublayers per block; 1 = Full AttnRes)")
        require(options.n_blocks is None or options.n_blocks >= 1, "depth_options.n_blocks",
                options.n_blocks, "an integer >= 1 (blocks over all sublayers)")
        validate_ablations(config, options)

    def __init__(self, config, sites, options):
        super().__init__(config, sites, options, block_size=self.sublayers_per_block(sites, options))

    @staticmethod
    def sublayers_per_block(sites, options) -> int:
        """`block_size`, or S = ceil(sublayers / n_blocks): at most N blocks, exactly N when N
        divides the sublayers (N >= the sublayers: every sublayer its own block); default 4."""
        if options.n_blocks is not None:
            return -(-len(sites) // options.n_blocks)
        return 4 if options.block_size is None else options.block_size
