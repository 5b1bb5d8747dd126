"""DeepCrossAttention (DCA) and Generalized Residual Networks (GRN v1, v2, v3).

Paper: "DeepCrossAttention: Supercharging Transformer Residual Connections", Mike Heddes, Adel
Javanmard, Kyriakos Axiotis, Gang Fu, MohammadHossein Bateni, Vahab Mirrokni (ICML 2025,
arXiv 2502.06785). No official code; the equations below (docs/design.md, decision 7) rest on
extractions of the paper's Sec. 3 (the paper text itself was not reachable when this was
written), cross-checked with the unofficial port lucidrains/deep-cross-attention
(deep_cross_attention/dca_gpt.py), whose differing choices are options here.

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

`separate_norms` (default False): the paper's block is a standard pre-norm block fed three
inputs, so one pre-norm (attention's) normalises all three views. The port gives each of its
Q, K, V projections its own RMSNorm; `separate_norms=True` is that parameterisation: Q keeps
attention's norm, K and V get operator-owned RMSNorms (`kv_norms[str(t)]`, weight 1 at init,
equal to the shared norm there). Its K and V reads then bypass the sublayer's norm, so the
operator declares reads_through_norm False with it (option_metadata).

A mixer sub-block (ShortSWA, "mix", before attention) reads Norm of the skip stream (g^Q; g for
v1-v3) and its delta m is added to every view, so S = H + ShortSWA(Norm(H)) (Algorithm 1) holds
per view; m is part of the block delta f.

A final GRN (v3 for "dca", else the chosen version) over the stack feeds the output norm.

k-DCA (`k`, None = full stack). The paper (as extracted): only the first and the last k layer
outputs enter the stack explicitly; the intermediate ones are combined by plain ResNet
addition. Readings (`k_stack`), for t > k:

    "middle_sum" (default; the reading that keeps both the explicit first entry and the ResNet
        sum of the sentence): G_t = [x_0, sum_{i <= t-k} f_i, f_{t-k+1}, ..., f_t]
        x_0 and the last k deltas explicit, the intermediate deltas summed into one entry
        (k+2 entries); G_t 1 is still the standard residual.
    "folded" (this library's earlier reading): G_t = [x_0 + sum_{i <= t-k} f_i, f_{t-k+1}, ..., f_t]
        the intermediate deltas added into the embedding's entry (k+1 entries); G_t 1 is the
        standard residual.
    "first_last" (the lucidrains port): the first k and the last k entries of
        [x_0, f_1, ..., f_t] (all of them while t+1 < 2k); the middle deltas are *dropped*.
        G_t 1 is then not the standard residual, so with a k this reading may not start at the
        baseline: the operator declares starts_at_baseline False for it (option_metadata),
        and an inactive block (`depth_layers`) reads G_t 1 of the entries kept.

Other choices:
- `gate_norm=False` (default, the paper's formula as extracted): the ReLU gate reads G_i as is;
  `gate_norm=True` RMS-normalises G_i inside the gate only (the port's choice; the port's
  gate norm has a gain, ours is scale-free).
- Without global attention (ShortSWA `replace_attention`: blocks [mix, mlp]) there are no Q, K,
  V inputs: "dca" then reads one GRN-v3 stream per block (the same as grn="v3").
- `depth_layers`: an inactive block reads the plain residual G_t 1 for every view (no
  parameters); the final GRN exists iff the last block is active (else the output is G_L 1).
- Parameters: `grns[str(t)]` for block t, `final_grn`; b has shape [streams, n, d] (v1: [1, n]),
  w [streams, d]; `kv_norms[str(t)]` with separate_norms.
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
K_STACKS = ("middle_sum", "folded", "first_last")


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
    first: list = field(default_factory=list)  # the leading entries: [x_0] ("first_last": up to k)
    middle: Tensor | None = None  # "middle_sum": the sum of the deltas between first and tail
    tail: list = field(default_factory=list)  # the last deltas kept separate, f_{t-k+1}, ..., f_t
    views: Tensor | None = None  # g^Q, g^K, g^V [B, T, 3, d] of the current block; None: all equal
    stream: Tensor | None = None  # the skip stream plus this block's sublayer outputs
    delta: Tensor | None = None  # this block's sublayer outputs so far

    def entries(self) -> list[Tensor]:
        return self.first + ([] if self.middle is None else [self.middle]) + self.tail

    def plain_sum(self) -> Tensor:
        """G_t 1: the sum of the stack's entries (the standard residual, except for
        "first_last", which has dropped the middle deltas)."""
        entries = self.entries()
        total = entries[0]
        for entry in entries[1:]:
            total = total + entry
        return total


@register_depth_operator("dca")
class DeepCrossAttention(DepthOperator):
    aggregates = ("GRN-weighted sums (static per-dimension bias + ReLU input gate) of the "
                  "embedding and all earlier block deltas; DCA: separate Q, K, V reads")
    mixing = "dynamic"
    paper = ("Heddes, Javanmard, Axiotis, Fu, Bateni, Mirrokni: DeepCrossAttention "
             "(ICML 2025, arXiv 2502.06785)")
    starts_at_baseline = True  # not with k_stack="first_last" and a k; see option_metadata
    reads_through_norm = True  # not with separate_norms; see option_metadata
    granularity = "block"

    @dataclass
    class Options:
        grn: str = "dca"  # v1 | v2 | v3 | dca (three GRN-v3 reads for attention's Q, K, V)
        k: int | None = None  # k-DCA: keep only the last k deltas separate; None = full stack
        k_stack: str = "middle_sum"  # k-DCA's stack: middle_sum | folded | first_last
        gate_norm: bool = False  # RMS-normalise stack entries inside the GRN-v3 gate
        separate_norms: bool = False  # own pre-norms for the K and V views (Q: attention's)

    @classmethod
    def validate_config(cls, config, options) -> None:
        require(options.grn in GRN_VERSIONS, "depth_options.grn", options.grn, ", ".join(GRN_VERSIONS))
        require(options.k is None or options.k >= 1, "depth_options.k", options.k,
                "null (full stack) or an integer >= 1")
        require(options.k_stack in K_STACKS, "depth_options.k_stack", options.k_stack,
                ", ".join(K_STACKS))

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
        # separate_norms: the K and V views of every block fed three views get their own
        # RMSNorm (weight 1 at init), the Q view keeps attention's
        self.kv_norms = nn.ModuleDict()
        if options.separate_norms and self.streams == 3:
            for key in self.grns:
                self.kv_norms[key] = nn.ModuleList(RMSNorm(d, config.norm_eps) for _ in range(2))
        self.kv_norms_of = {int(key): norms for key, norms in self.kv_norms.items()}

    @classmethod
    def option_metadata(cls, options):
        drops = options.k is not None and options.k_stack == "first_last"
        return {"mixing": "static" if options.grn in ("v1", "v2") else "dynamic",
                # the port's k-DCA drops the middle deltas: G_t 1 is no longer the residual
                "starts_at_baseline": not drops,
                # separate K and V norms: those reads bypass attention's norm (module docstring)
                "reads_through_norm": not (options.separate_norms and options.grn == "dca")}

    def _n_entries(self, t: int) -> int:
        """Stack size before block t (t = n_layers: the final read)."""
        k = self.options.k
        if k is None or t <= k:
            return t + 1
        if self.options.k_stack == "middle_sum":
            return k + 2  # x_0, the middle sum, the last k deltas
        if self.options.k_stack == "folded":
            return k + 1  # x_0 + the older deltas, the last k deltas
        return min(t + 1, 2 * k)  # first_last: the first k and the last k entries

    # ---------------------------------------------------------------- hooks
    def init_state(self, x0, ctx):
        return DCAState(first=[x0])

    def read(self, state, site, norm, ctx):
        if site.first:
            self._start_block(state, site.layer)
        if site.kind == "attn" and state.views is not None:
            return QKVViews(*self._normalise_views(state.views, norm, site.layer).unbind(2))
        return norm(state.stream)

    def _normalise_views(self, views: Tensor, norm: nn.Module, layer: int) -> Tensor:
        """The Q, K, V views [B, T, 3, d] normalised: all by attention's norm (in one pass), or
        with separate_norms Q by attention's and K, V by this block's own norms."""
        if layer not in self.kv_norms_of:
            return norm(views)
        k_norm, v_norm = self.kv_norms_of[layer]
        q, k, v = views.unbind(2)
        return torch.stack([norm(q), k_norm(k), v_norm(v)], 2)

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
        k, layout = self.options.k, self.options.k_stack
        if k is not None and layout == "first_last" and len(state.first) < k:
            state.first.append(delta)  # one of the first k entries [x_0, f_1, ..., f_{k-1}]
            return
        state.tail.append(delta)
        if k is None or len(state.tail) <= k:
            return
        oldest = state.tail.pop(0)
        if layout == "middle_sum":  # ResNet addition of the intermediate deltas, one entry
            state.middle = oldest if state.middle is None else state.middle + oldest
        elif layout == "folded":  # ... into the embedding's entry
            state.first[0] = state.first[0] + oldest
        # first_last: the oldest of the last k leaves the stack

    def finalize(self, state, ctx):
        if not self.final_active:
            return state.plain_sum()
        stack = torch.stack(state.entries(), dim=2)
        if self._routing is not None:
            self._record_grn(self.final_grn, stack, "final", self.n_layers)
        return self.final_grn(stack).squeeze(2)

    # ---------------------------------------------------------------- routing weights
    def _entry_labels(self, t: int) -> list[str]:
        """The stack entries before block t: "emb" (x_0), "L{j}" (the delta of 0-based block
        j), "old" (the middle sum) or "emb+old" (x_0 with the older deltas folded in)."""
        labels = ["emb"] + [f"L{j}" for j in range(t)]
        k = self.options.k
        if k is None or t <= k:
            return labels
        if self.options.k_stack == "middle_sum":
            return ["emb", "old"] + labels[-k:]
        if self.options.k_stack == "folded":
            return ["emb+old"] + labels[-k:]
        return labels if t + 1 < 2 * k else labels[:k] + labels[-k:]

    def _record_grn(self, grn: "GRN", stack: Tensor, reader: str, t: int) -> None:
        """The read's per-token entry weights [B, T, streams, n] (`GRN.entry_weights`) over the
        stack before block t (labels: `_entry_labels`)."""
        ways = ["Q", "K", "V"] if grn.b.shape[0] == 3 else None
        self._routing.add_weights(reader, self._entry_labels(t), grn.entry_weights(stack), ways)

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
            return DCAState(first=[tensors[0]])
        return super().from_stage_state(tensors, layer)

    def pipeline_payload(self, layer: int) -> tuple[str, int]:
        if not self._grn_read_after(layer):
            return "1 (the plain sum; no GRN read follows)", 1
        n = self._n_entries(layer + 1)
        formula = {"middle_sum": "min(l+2, k+2)", "folded": "min(k, l+1)+1",
                   "first_last": "min(l+2, 2k)"}[self.options.k_stack]
        return ("l+2 stack entries" if self.options.k is None else f"{formula} stack entries"), n

    def forward_macs_per_token(self, seq_len: int) -> int:
        """Per GRN read of a stack of n entries, c streams (3 for "dca", else 1): v1 and v2 the
        weighted sum, c n d; v3 also the gate logits w . G_i and the gated sum, 3 c n d
        (+ 2 n d for gate_norm). Blocks fed three views normalise two more inputs, 2 x 2d.
        The final GRN has c = 1. k-DCA's sums of old deltas are plain additions (free)."""
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
        mixing coefficients; decay would pull b = 1 toward 0, away from the standard residual;
        the K/V norm gains are 1-D."""
        return {name for name, _ in self.named_parameters()}
