"""DeepCrossAttention (DCA) and Generalized Residual Networks (GRN v1, v2, v3).

Paper: "DeepCrossAttention: Supercharging Transformer Residual Connections", Mike Heddes, Adel
Javanmard, Kyriakos Axiotis, Gang Fu, MohammadHossein Bateni, Vahab Mirrokni (ICML 2025,
arXiv 2502.06785). No official code; the equations below (docs/design.md, decision 7) rest on
extractions of the paper cross-checked with the unofficial lucidrains/deep-cross-attention port.

Stack before block t (0-based t; f_i = delta of block i-1, i.e. its output minus its input):

    G_t = [x_0, f_1, ..., f_t]              x_0 = embedding; the standard residual is G_t 1
    GRN-v1:  g = sum_i b_i G_i               b in R^{n}       (scalar per entry)
    GRN-v2:  g = sum_i b_i (.) G_i           b in R^{n x d}   (per entry and dimension)
    GRN-v3:  g = sum_i (b_i + ReLU(w^T G_i) 1_d) (.) G_i      b in R^{n x d}, w in R^d
    init b = 1, w = 0: every read equals G_t 1, so the model starts exactly as the standard one.

`grn="v1" | "v2" | "v3"`: one GRN per block produces the block input g; the block keeps its
internal residuals and appends f = (block output) - g.

`grn="dca"` (default): three independent GRN-v3 reads produce attention's query, key and value
inputs, passed as `QKVViews` and normalised each by the attention's own pre-norm:

    a   = Attn(Norm(g^Q), Norm(g^K), Norm(g^V))
    u   = g^Q + a                             attention's skip is the Q stream
    out = u + FFN(Norm(u))                     the FFN keeps its ordinary skip
    f   = out - g^Q = a + FFN(Norm(u))         appended to the stack

Why the Q stream is the skip: the attention output at position t answers the query of token t,
so it updates the stream the query was read from (as in a standard block, where skip and query
input coincide); K and V are what *other* tokens read of token t. This is also the wiring of
the only public implementation; the paper text we could reach does not settle it.

A mixer sub-block (ShortSWA, "mix", before attention) reads Norm of the skip stream (g^Q; g for
v1-v3) and its delta m is added to every view, so S = H + ShortSWA(Norm(H)) (Algorithm 1) holds
per view; m is part of the block delta f.

A final GRN (v3 for "dca", else the chosen version) over [x_0, f_1, ..., f_L] feeds the output norm.

k-DCA (`k`, None = full stack): only the embedding-plus-old-outputs sum and the last k deltas
are separate entries,

    G_t = [x_0 + sum_{i <= t-k} f_i,  f_{t-k+1}, ..., f_t]     (at most k+1 entries)

which preserves the ResNet identity G_t 1 = standard residual (our reading of "intermediate
outputs are combined by plain ResNet addition"; docs/design.md, decision 7). Note: the
lucidrains port keeps the first k and last k entries and *drops* the middle ones, which breaks
that identity.

Other choices:
- `gate_norm=False` (default, the paper's formula as extracted): the ReLU gate reads G_i as is;
  `gate_norm=True` RMS-normalises G_i inside the gate only (the lucidrains port's choice).
- Without global attention (ShortSWA `replace_attention`: blocks [mix, mlp]) there are no Q, K,
  V inputs: "dca" then reads one GRN-v3 stream per block (the same as grn="v3").
- `depth_layers`: an inactive block reads the plain residual G_t 1 for every view (no
  parameters); the final GRN exists iff the last block is active (else the output is G_L 1).
- Parameters: `grns[str(t)]` for block t, `final_grn`; b has shape [streams, n, d] (v1: [1, n]),
  w [streams, d].
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from resstream.depth.base import DepthOperator, QKVViews, add_to_stream_and_views
from resstream.layers import RMSNorm
from resstream.options import require
from resstream.registry import register_depth_operator
from resstream.routing import depth_attention_result

GRN_VERSIONS = ("v1", "v2", "v3", "dca")


class GRN(nn.Module):
    """`streams` independent GRN reads of one stack G [B, T, n, d] -> [B, T, streams, d]."""

    def __init__(self, version: str, n_entries: int, d_model: int, streams: int,
                 gate_norm: RMSNorm | None):
        super().__init__()
        self.version = version
        shape = (streams, n_entries) if version == "v1" else (streams, n_entries, d_model)
        self.b = nn.Parameter(torch.ones(shape))
        self.w = nn.Parameter(torch.zeros(streams, d_model)) if version == "v3" else None
        self.gate_norm = gate_norm

    def forward(self, stack: Tensor) -> Tensor:
        b = self.b.to(stack.dtype)
        if self.version == "v1":
            return torch.einsum("cn,btnd->btcd", b, stack)
        out = torch.einsum("cnd,btnd->btcd", b, stack)
        if self.w is not None:
            gate_input = stack if self.gate_norm is None else self.gate_norm(stack)
            gates = F.relu(torch.einsum("btnd,cd->btcn", gate_input, self.w.to(stack.dtype)))
            out = out + torch.matmul(gates, stack)  # [B,T,c,n] @ [B,T,n,d]
        return out

    def entry_weights(self, stack: Tensor) -> Tensor:
        """[B, T, streams, n]: the weight of each entry of G [B, T, n, d] in each read, averaged
        over dimensions: b_i (v1), mean_k b_ik (v2), mean_k b_ik + ReLU(w . G_i) (v3)."""
        b = self.b.to(stack.dtype)
        b = b if self.version == "v1" else b.mean(-1)
        weights = b.expand(*stack.shape[:2], *b.shape)
        if self.w is not None:
            gate_input = stack if self.gate_norm is None else self.gate_norm(stack)
            weights = weights + F.relu(torch.einsum("btnd,cd->btcn", gate_input,
                                                    self.w.to(stack.dtype)))
        return weights


@dataclass
class DCAState:
    head: Tensor  # x_0 (+ the deltas folded in by k-DCA)
    tail: list = field(default_factory=list)  # the separate deltas f_{t-k+1}, ..., f_t
    views: Tensor | None = None  # g^Q, g^K, g^V [B, T, 3, d] of the current block; None: all equal
    stream: Tensor | None = None  # the skip stream plus this block's sublayer outputs
    delta: Tensor | None = None  # this block's sublayer outputs so far

    def entries(self) -> list[Tensor]:
        return [self.head] + self.tail

    def plain_sum(self) -> Tensor:
        total = self.head
        for f in self.tail:
            total = total + f
        return total


@register_depth_operator("dca")
class DeepCrossAttention(DepthOperator):
    aggregates = ("GRN-weighted sums (static per-dimension bias + ReLU input gate) of the "
                  "embedding and all earlier block deltas; DCA: separate Q, K, V reads")
    mixing = "dynamic"
    paper = ("Heddes, Javanmard, Axiotis, Fu, Bateni, Mirrokni: DeepCrossAttention "
             "(ICML 2025, arXiv 2502.06785)")
    starts_at_baseline = True
    granularity = "block"

    @dataclass
    class Options:
        grn: str = "dca"  # v1 | v2 | v3 | dca (three GRN-v3 reads for attention's Q, K, V)
        k: int | None = None  # k-DCA: keep only the last k deltas separate; None = full stack
        gate_norm: bool = False  # RMS-normalise stack entries inside the GRN-v3 gate

    @classmethod
    def validate_config(cls, config, options) -> None:
        require(options.grn in GRN_VERSIONS, "depth_options.grn", options.grn, ", ".join(GRN_VERSIONS))
        require(options.k is None or options.k >= 1, "depth_options.k", options.k,
                "null (full stack) or an integer >= 1")

    def __init__(self, config, sites, options):
        super().__init__(config, sites, options)
        has_attention = any(site.kind == "attn" for site in sites)
        self.streams = 3 if options.grn == "dca" and has_attention else 1
        version = "v3" if options.grn == "dca" else options.grn
        self.gate_norm = RMSNorm(config.d_model, config.norm_eps, affine=False) if options.gate_norm else None
        d = config.d_model
        self.grns = nn.ModuleDict({
            str(t): GRN(version, self._n_entries(t), d, self.streams, self.gate_norm)
            for t in range(self.n_layers) if self.is_active(t)})
        self.final_active = self.is_active(self.n_layers - 1)
        if self.final_active:
            self.final_grn = GRN(version, self._n_entries(self.n_layers), d, 1, self.gate_norm)

    @classmethod
    def option_metadata(cls, options):
        return {"mixing": "static" if options.grn in ("v1", "v2") else "dynamic"}

    def _n_entries(self, t: int) -> int:
        """Stack size before block t (t = n_layers: the final read)."""
        return 1 + (t if self.options.k is None else min(t, self.options.k))

    # ---------------------------------------------------------------- hooks
    def init_state(self, x0, ctx):
        return DCAState(head=x0)

    def read(self, state, site, norm, ctx):
        if site.first:
            self._start_block(state, site.layer)
        if site.kind == "attn" and state.views is not None:
            normed = norm(state.views)  # attention's norm on each view, [B, T, 3, d] in one pass
            return QKVViews(*normed.unbind(2))
        return norm(state.stream)

    def _start_block(self, state: DCAState, layer: int) -> None:
        state.delta = None
        state.views = None
        if not self.is_active(layer):
            state.stream = state.plain_sum()
            return
        stack = torch.stack(state.entries(), dim=2)
        if self._routing is not None:
            self._record_grn(self.grns[str(layer)], stack, f"L{layer}", layer)
        reads = self.grns[str(layer)](stack)  # [B, T, streams, d]
        state.stream = reads[:, :, 0] if self.streams == 3 else reads.squeeze(2)
        if self.streams == 3:
            state.views = reads

    def write(self, state, site, out, ctx):
        state.delta = out if state.delta is None else state.delta + out
        add_to_stream_and_views(state, site, out)
        if site.last:
            self._append(state, state.delta)
        return state

    def _append(self, state: DCAState, delta: Tensor) -> None:
        state.tail.append(delta)
        if self.options.k is not None and len(state.tail) > self.options.k:
            state.head = state.head + state.tail.pop(0)  # ResNet addition of the oldest delta

    def finalize(self, state, ctx):
        if not self.final_active:
            return state.plain_sum()
        stack = torch.stack(state.entries(), dim=2)
        if self._routing is not None:
            self._record_grn(self.final_grn, stack, "final", self.n_layers)
        return self.final_grn(stack).squeeze(2)

    # ---------------------------------------------------------------- routing weights
    def _record_grn(self, grn: "GRN", stack: Tensor, reader: str, t: int) -> None:
        """The read's per-token entry weights [B, T, streams, n] (`GRN.entry_weights`) over the
        stack [head, f_{t-k+1}, ..., f_t]: the head is "emb" ("emb+old" once k-DCA has folded
        old deltas into it), f_j the delta of block "L{j}"."""
        n_tail = stack.shape[2] - 1
        head = "emb" if n_tail == t else "emb+old"
        labels = [head] + [f"L{j}" for j in range(t - n_tail, t)]
        ways = ["Q", "K", "V"] if grn.b.shape[0] == 3 else None
        self._routing.add_weights(reader, labels, grn.entry_weights(stack), ways)

    def routing_result(self, recorder) -> dict:
        """depth_attention: each GRN read's weight per stack entry, averaged over tokens,
        dimensions and (dca) the Q, K, V reads (per read in per_head). Unnormalised: at init
        every weight is 1 (the standard residual)."""
        return depth_attention_result(recorder, normalised=False, static=self.mixing == "static")

    # ---------------------------------------------------------------- accounting
    def depth_state_vectors(self) -> int:
        return self._n_entries(self.n_layers)

    # ---------------------------------------------------------------- pipeline stages
    def _grn_read_after(self, layer: int) -> bool:
        return any(self.is_active(t) for t in range(layer + 1, self.n_layers)) or self.final_active

    def stage_transient(self, layer: int) -> frozenset[str]:
        """The block's stream, views and delta: the next block's read rebuilds them (the delta
        is also the last stack entry)."""
        return frozenset({"stream", "views", "delta"})

    def stage_state(self, state: DCAState, layer: int) -> tuple[Tensor, ...]:
        if not self._grn_read_after(layer):  # only plain sums follow
            return (state.plain_sum(),)
        return super().stage_state(state, layer)

    def from_stage_state(self, tensors: tuple[Tensor, ...], layer: int) -> DCAState:
        if not self._grn_read_after(layer):
            return DCAState(head=tensors[0])
        return super().from_stage_state(tensors, layer)

    def pipeline_payload(self, layer: int) -> tuple[str, int]:
        if not self._grn_read_after(layer):
            return "1 (the plain sum; no GRN read follows)", 1
        n = self._n_entries(layer + 1)
        return ("l+2 stack entries" if self.options.k is None else "min(k, l+1)+1 stack entries"), n

    def forward_macs_per_token(self, seq_len: int) -> int:
        """Per GRN read of a stack of n entries, c streams (3 for "dca", else 1): v1 and v2 the
        weighted sum, c n d; v3 also the gate logits w . G_i and the gated sum, 3 c n d
        (+ 2 n d for gate_norm). Blocks fed three views normalise two more inputs, 2 x 2d.
        The final GRN has c = 1. k-DCA's folding of old deltas is a plain addition (free)."""
        d, total = self.d_model, 0
        grns = [*self.grns.values()] + ([self.final_grn] if self.final_active else [])
        for grn in grns:
            streams, n = grn.b.shape[0], grn.b.shape[1]
            total += (3 if grn.w is not None else 1) * streams * n * d
            if grn.w is not None and grn.gate_norm is not None:
                total += 2 * n * d
        views = sum(1 for grn in self.grns.values() if grn.b.shape[0] == 3)
        return total + views * 2 * 2 * d

    def no_weight_decay(self) -> set[str]:
        """All of them: the GRN biases b (init 1, the ResNet sum) and gate weights w (init 0) are
        mixing coefficients; decay would pull b = 1 toward 0, away from the standard residual."""
        return {name for name, _ in self.named_parameters()}
