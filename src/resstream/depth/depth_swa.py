"""Depth-wise residual attention: ShortSWA over depth (the read of "Residual Stream Duality in
Modern Transformer Architectures", Zhang, arXiv 2603.16039, §2.2).

Fix a token t and read its cumulative states through depth as a sequence
X_t = [h^(0); ...; h^(L)] (h^(0) = embedding, h^(l) = output of block l-1). Before block l:

    W   = [h^(max(0, l-K+1)); ...; h^(l)]                (K_l = min(K, l+1) states, current included)
    q   = W_Q N(h^(l)),  K = N(W) W_K,  V = N(W) W_V      (N = RMSNorm, see below)
    z^l = softmax(q K^T / sqrt(d_k)) V  =  ShortSWA(N(X_t); K)[l]

with the projections of the ShortSWA module (`LocalSelfAttention`) and tokens folded into the
batch. Only the newest depth position is read, and its one query sees every key of the window,
so the causal window mask is empty: z is plain softmax attention over the K_l keys (the same
function `resstream.ops.local_attention` computes for that query, without building its mask).
K = depth_window (None = full depth).

Choices where the paper is silent (docs/design.md, decision 3):
- injection `mode="add"` (default): block l reads u = h^(l) + W_O z^l with W_O zero-initialised,
  so the model starts exactly as the standard residual; `mode="replace"`: u = W_O z^l (z becomes
  the block input, as in Attention Residuals but with the input-dependent query above; W_V and
  W_O start as identities, so with K = 1 the block input is N(h^(l)) -- it does not start at
  the baseline: starts_at_baseline is True for "add" only).
- granularity "block" (default; one read per block, the block keeps its internal residuals) or
  "sublayer" (one read before every sublayer over the sublayer-level cumulative states).
- one ShortSWA module shared across depth (`shared=True`, default: the duality is literal, each
  state is projected once); `shared=False` gives every read its own W_Q, W_K, W_V, W_O.
- states are RMS-normalised before the projections (`norm_states=True`), as ShortSWA reads
  Norm(H) on the sequence axis; no RoPE over depth; heads default to the model's n_heads.

State: with a shared module each state is projected once, when it is read, and its key and
value are kept while a later read can see them; with one module per read (`shared=False`) the
window's normalised states are kept instead. Decode steps (one token, shared module, float32/64)
take a lean path with a few ops per read: one matvec with the fused, norm-folded [W_Q; W_K; W_V]
writes q, k, v straight into the state's slot of a buffer kept in the decode cache, SDPA reads
the window in place, and u = h + W_O z is one baddbmm (the first read, with one key, is z = v).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from resstream.depth.base import DecodeWorkspace, DepthOperator, decode_workspace, is_decode_step
from resstream.layers import RMSNorm
from resstream.mixers.shortswa import LocalSelfAttention
from resstream.options import require
from resstream.registry import register_depth_operator
from resstream.routing import depth_attention_result, site_label


@dataclass
class DepthState:
    """General path (training, prefill); `read_step` on it works for any number of steps."""

    h: Tensor  # the current cumulative state of every token, [B, T, d]
    normed: list = field(default_factory=list)  # shared=False: the window's N(h^(j)), [B*T, 1, d]
    keys: list = field(default_factory=list)  # shared only: keys/values of the window's states,
    values: list = field(default_factory=list)  # [B*T, H, D] each (each state projected once)


class DecodeSlots:
    """The window's slots for decode steps: one buffer [S, B, 3, H, D] (S = min(K, reads)) into
    which read i's projection writes the q, k, v of its state, in slot i mod S (the order of the
    slots is irrelevant to a single query without positions; q is dead after its read, but
    keeping it lets one matvec fill the slot), with the views a read uses, made once."""

    def __init__(self, like: Tensor, n_slots: int, heads: int, head_dim: int):
        batch, d = like.shape[0], heads * head_dim
        self.buffer = like.new_empty(n_slots, batch, 3, heads, head_dim)
        self.targets = self.buffer.view(n_slots, batch, 1, 3 * d).unbind(0)  # [B, 1, 3d] per slot
        self.kv_targets = [target[..., d:] for target in self.targets]  # their k, v part
        self.first_values = [target[..., 2 * d:] for target in self.targets]  # v as [B, 1, d]
        self.queries = self.buffer[:, :, 0].unsqueeze(3).unbind(0)  # [B, H, 1, D] per slot
        keys = self.buffer[:, :, 1].permute(1, 2, 0, 3)  # [B, H, S, D]
        values = self.buffer[:, :, 2].permute(1, 2, 0, 3)
        self.windows = [(keys[:, :, :n], values[:, :, :n]) for n in range(1, n_slots + 1)]


@dataclass
class DecodeState:
    """Decode-step path (shared module): the stream and the workspace (fused weights, slots)."""

    h: Tensor  # [B, 1, d]
    workspace: "DepthSWAWorkspace"
    reads: int = 0  # reads done so far in this step


class DepthSWAWorkspace(DecodeWorkspace):
    """The operator's decode-cache entry (shared module), so that a step allocates nothing and
    makes no views (see `DecodeWorkspace` for when it is rebuilt):
      qkv_t  (diag(w) [W_Q; W_K; W_V])^T, [d, 3d]: one matvec projects a state, with the RMSNorm
             weight w folded in (kv_t: its K, V columns)
      o_t    W_O^T as a [B, d, d] view: u = h + W_O z in one baddbmm
      slots  the DecodeSlots every step writes into (scratch, overwritten by the next step)"""

    def weights(self, op: "DepthSWA") -> list[Tensor]:
        attention = op.attention[0]
        return [attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight,
                attention.o_proj.weight, *op.state_norm.parameters()]

    def build(self, op: "DepthSWA", like: Tensor) -> None:
        attention, norm = op.attention[0], op.state_norm
        params = self.weights(op)
        d = like.shape[-1]
        qkv = torch.cat(params[:3]).detach()
        if isinstance(norm, RMSNorm):  # W N(h) = (W diag(w)) (h / rms(h))
            qkv = qkv * norm.weight.detach()
        self.qkv_t, self.kv_t = qkv.t(), qkv[d:].t()
        self.o_t = params[3].detach().t().expand(self.batch_size, d, d)
        self.eps = like.new_full((1, 1, 1), norm.eps) if isinstance(norm, RMSNorm) else None
        self.slots = DecodeSlots(like, op.window_states, attention.n_heads, attention.head_dim)

    def normalise(self, h: Tensor) -> Tensor:
        """h / rms(h), [B, 1, d] (the RMSNorm weight is in qkv_t): rms^2 = eps + h.h / d, from one
        batched matmul."""
        if self.eps is None:
            return h
        return h * torch.baddbmm(self.eps, h, h.mT, alpha=1 / h.shape[-1]).rsqrt_()


def attend_newest(q: Tensor, keys: list[Tensor], values: list[Tensor]) -> Tensor:
    """z of the newest depth position, whose one query sees every key of the window (no mask):
    q [N, H, D], keys/values K_l tensors [N, H, D]. Returns [N, H, D] (before W_O).

    One query over a few keys, for many rows: a dot product per key (the scores) and a weighted
    sum of the values are large elementwise ops, 1.5-4x faster forward + backward than SDPA over
    N * H tiny problems at N = 1024, and need no concatenated copy of the window (autograd saves
    the keys and values themselves)."""
    q = q * q.shape[-1] ** -0.5
    scores = torch.stack([torch.linalg.vecdot(k, q) for k in keys], dim=-1)  # [N, H, K_l]
    weights = scores.softmax(dim=-1).unsqueeze(-1).unbind(dim=2)
    terms = [w * v for w, v in zip(weights, values)]
    return sum(terms[1:], terms[0])


def split_heads(x: Tensor, heads: int) -> list[Tensor]:
    """[N, n, H * D] -> n tensors [N, H, D]."""
    n_rows, n, width = x.shape
    return list(x.view(n_rows, n, heads, width // heads).unbind(dim=1))


@register_depth_operator("depth_swa")
class DepthSWA(DepthOperator):
    aggregates = "softmax attention over the last K cumulative states of the same token"
    mixing = "dynamic"
    paper = "Zhang, Residual Stream Duality in Modern Transformer Architectures (arXiv 2603.16039)"
    uses_depth_window = True
    granularity = "block"  # the default; `option_metadata` gives the value for other options

    @dataclass
    class Options:
        mode: str = "add"  # "add" (zero-init W_O, starts at the baseline) | "replace"
        granularity: str = "block"  # "block" | "sublayer"
        shared: bool = True  # one ShortSWA module over depth (literal duality) or one per read
        heads: int | None = None  # None: the model's n_heads
        norm_states: bool = True

    @classmethod
    def validate_config(cls, config, options) -> None:
        require(options.mode in ("add", "replace"), "depth_options.mode", options.mode, "add, replace")
        require(options.granularity in ("block", "sublayer"), "depth_options.granularity",
                options.granularity, "block, sublayer")
        heads = options.heads or config.n_heads
        require(heads >= 1 and config.d_model % heads == 0, "depth_options.heads", options.heads,
                f"a divisor of d_model={config.d_model}")

    @classmethod
    def option_metadata(cls, options):
        # mode="replace" reads W_O z (identity W_V, W_O): not the standard residual at init
        return {"granularity": options.granularity, "starts_at_baseline": options.mode == "add"}

    def __init__(self, config, sites, options):
        super().__init__(config, sites, options)
        self.window = config.depth_window
        self.reads = [s.index for s in sites if self._reads_at(s)]
        n_modules = 1 if options.shared else len(self.reads)
        self.attention = nn.ModuleList(self._new_attention(config, options) for _ in range(n_modules))
        self.state_norm = RMSNorm(config.d_model, config.norm_eps) if options.norm_states else nn.Identity()
        self.record: list | None = None  # set to [] to record (h, z) of every read (duality demo)

    def _reads_at(self, site) -> bool:
        block_site = site.first or self.options.granularity == "sublayer"
        return block_site and self.is_active(site.layer)

    def _new_attention(self, config, options) -> LocalSelfAttention:
        heads = options.heads or config.n_heads
        replace = options.mode == "replace"
        attention = LocalSelfAttention(config.d_model, heads, heads, self.window, None,
                                       config.attn_backend, config.init_std, config.init_std,
                                       zero_output=not replace)
        if replace:  # identity W_V and W_O: with K = 1 the read returns N(h) itself
            nn.init.eye_(attention.v_proj.weight)
            nn.init.eye_(attention.o_proj.weight)
        return attention

    def _attention_for(self, site_index: int) -> LocalSelfAttention:
        return self.attention[0 if self.options.shared else self.reads.index(site_index)]

    @property
    def window_states(self) -> int:
        """S: states a read sees at most (the window, or every read's state at full depth)."""
        return len(self.reads) if self.window is None else min(self.window, len(self.reads))

    # ---------------------------------------------------------------- hooks
    def init_state(self, x0, ctx):
        if self._lean_decode(x0, ctx):
            return DecodeState(x0, decode_workspace(self, x0, ctx))
        return DepthState(x0)

    def _lean_decode(self, x0: Tensor, ctx) -> bool:
        """Decode steps with a cache (which holds the workspace) take the lean path when the
        states share one module (each state's q, k, v from one fused matvec) and are float32/64
        without autocast (there eps + h.h / d in the stream dtype is RMSNorm's statistic up to
        rounding, which it computes in float32 for lower precisions; autocast would run the
        matmuls in its own dtype)."""
        return (is_decode_step(x0) and ctx is not None and ctx.cache is not None
                and self.options.shared and x0.dtype in (torch.float32, torch.float64)
                and not torch.is_autocast_enabled(x0.device.type))

    def read(self, state, site, norm, ctx):
        if site.index in self.reads:
            if isinstance(state, DecodeState):
                state.h = self._decode_read(state)
            else:
                state.h = self._inject(state.h, self.read_step(state, site.index), site)
        return norm(state.h)

    def _inject(self, h: Tensor, z: Tensor, site) -> Tensor:
        update = self._attention_for(site.index).o_proj(z)
        return h + update if self.options.mode == "add" else update

    def read_step(self, state: DepthState, site_index: int = 0) -> Tensor:
        """Append the current state h to the token's depth sequence and return the causal
        window-K attention read z of the newest position, [B, T, H*D] (before W_O)."""
        attention = self._attention_for(site_index)
        heads = attention.n_heads
        normed = self.state_norm(state.h)
        b, t, d = normed.shape
        rows = normed.reshape(b * t, 1, d)
        [q] = split_heads(attention.q_proj(rows), heads)
        if self.options.shared:  # one module over depth: each state is projected once
            [k] = split_heads(attention.k_proj(rows), heads)
            [v] = split_heads(attention.v_proj(rows), heads)
            keys, values = self._keep(state.keys, k), self._keep(state.values, v)
        else:  # this read's own W_K, W_V over the window's states
            window = torch.cat(self._keep(state.normed, rows), dim=1)
            keys = split_heads(attention.k_proj(window), heads)
            values = split_heads(attention.v_proj(window), heads)
        if self._routing is not None:
            self._record_read(site_index, q, keys)
        z = attend_newest(q, keys, values).view(b, t, d)
        if self.record is not None:
            self.record.append((state.h, z))
        return z

    def _keep(self, states: list, new: Tensor) -> list:
        """Append `new` and drop what no later read can see (a window's oldest state)."""
        states.append(new)
        if self.window is not None:
            del states[:-self.window]
        return states

    def _decode_read(self, state: DecodeState) -> Tensor:
        """The read and its injection for one token per sequence: the block's input u, [B, 1, d]."""
        workspace = state.workspace
        slots = workspace.slots
        slot, n_keys = state.reads % len(slots.targets), min(state.reads + 1, len(slots.targets))
        state.reads += 1
        normed = workspace.normalise(state.h)
        if n_keys == 1:  # softmax over one key is exactly 1: z = v, no query needed
            torch.matmul(normed, workspace.kv_t, out=slots.kv_targets[slot])
            z = slots.first_values[slot]
        else:
            torch.matmul(normed, workspace.qkv_t, out=slots.targets[slot])
            keys, values = slots.windows[n_keys - 1]
            z = F.scaled_dot_product_attention(slots.queries[slot], keys, values).view(normed.shape)
        if self.record is not None:
            self.record.append((state.h, z.clone()))  # z may view a slot the next step reuses
        if self.options.mode == "add":
            return torch.baddbmm(state.h, z, workspace.o_t)
        return self.attention[0].o_proj(z)

    def write(self, state, site, out, ctx):
        state.h = state.h + out
        return state

    def finalize(self, state, ctx):
        return state.h

    # ---------------------------------------------------------------- routing weights
    def _record_read(self, site_index: int, q: Tensor, keys: list[Tensor]) -> None:
        """The read's per-head softmax weights [N, H, K_l] over its window, as attend_newest
        computes them (its weights are not returned: it is the training path)."""
        q = q * q.shape[-1] ** -0.5
        weights = torch.stack([torch.linalg.vecdot(k, q) for k in keys], -1).softmax(-1)
        read = self.reads.index(site_index)
        window = self.reads[read - len(keys) + 1:read + 1]
        heads = [f"h{i}" for i in range(q.shape[1])]
        self._routing.add_weights(self._state_label(site_index, reader=True),
                                  [self._state_label(s) for s in window], weights, heads)

    def _state_label(self, site_index: int, reader: bool = False) -> str:
        """A read's label (the block or sublayer it feeds) or, as a source, the label of the
        state it appends: the embedding or the output of the block / sublayer before it."""
        site = self.sites[site_index] if reader else self.sites[site_index - 1]
        if not reader and site_index == 0:
            return "emb"
        return f"L{site.layer}" if self.options.granularity == "block" else site_label(site)

    def routing_result(self, recorder) -> dict:
        """depth_attention: every read, averaged over tokens and heads (per head: per_head)."""
        return depth_attention_result(recorder, normalised=True)

    def new_cache_entry(self, batch_size: int, max_len: int, device, dtype) -> DepthSWAWorkspace:
        return DepthSWAWorkspace(batch_size)

    # ---------------------------------------------------------------- accounting
    def depth_state_vectors(self) -> int:
        """d-vectors per token kept across depth: the stream h plus, for each of the last
        S = min(K, reads) states, with a shared module its q, k, v in the decode step's slot
        (3 S + 1; the general path keeps k, v: 2 S + 1), with one module per read the normalised
        state, which every read projects with its own W_K, W_V (S + 1)."""
        per_state = 3 if self.options.shared else 1
        return per_state * self.window_states + 1

    # ---------------------------------------------------------------- pipeline stages
    def _kept_across(self, layer: int) -> int:
        """Earlier states a later read still sees after block `layer`: every state read so far
        (r), or the last K-1 of them (the next read adds the current state to its window)."""
        read = sum(1 for s in self.sites if s.index in self.reads and s.layer <= layer)
        return read if self.window is None else min(self.window - 1, read)

    def stage_state(self, state: DepthState, layer: int) -> tuple[Tensor, ...]:
        """The stream h and, for each state a later read still sees, its key and value (shared
        module: they were projected once, when it was read) or its normalised state (one
        module per read: every read projects the window with its own W_K, W_V)."""
        m = self._kept_across(layer)
        if self.options.shared:
            return (state.h, *state.keys[len(state.keys) - m:], *state.values[len(state.values) - m:])
        return (state.h, *state.normed[len(state.normed) - m:])

    def from_stage_state(self, tensors: tuple[Tensor, ...], layer: int) -> DepthState:
        h, *kept = tensors
        if self.options.shared:
            m = len(kept) // 2
            return DepthState(h, keys=kept[:m], values=kept[m:])
        return DepthState(h, normed=kept)

    def pipeline_payload(self, layer: int) -> tuple[str, int]:
        """`stage_state`: with r states read so far (l+1 at block granularity), the stream plus
        per kept state its key and value (shared) or its normalised state (not shared)."""
        m = self._kept_across(layer)
        kept = "r" if self.window is None else "min(K-1, r)"
        if self.options.shared:
            return f"1 + 2 {kept} (stream; keys and values of the kept states)", 1 + 2 * m
        return f"1 + {kept} (stream; normalised kept states)", 1 + m

    def forward_macs_per_token(self, seq_len: int) -> int:
        """Per read i (0-based; K_i = min(K, i+1) states in its window): RMSNorm of the new
        state 2d (norm_states), W_Q d^2, the window's keys and values (shared module: the new
        state's only, 2 d^2, the others were projected when they were read; one module per
        read: all K_i states, 2 K_i d^2), scores and mix 2 K_i d, W_O d^2. Block input
        h + W_O z: the addition is free."""
        d, total = self.d_model, 0
        for i in range(len(self.reads)):
            keys = i + 1 if self.window is None else min(self.window, i + 1)
            projected = 1 if self.options.shared else keys
            total += (2 * d if self.options.norm_states else 0) + d * d + 2 * projected * d * d \
                + 2 * keys * d + d * d
        return total

    def no_weight_decay(self) -> set[str]:
        """W_Q, W_K (and W_V in mode "add") are ordinary attention matrices, random-init and
        decayed like global attention's. Not decayed: W_O in mode "add" (zero-initialised, it
        gates the injection h + W_O z, so the model starts at the standard residual) and W_V,
        W_O in mode "replace" (identity-initialised), plus the state norm's gain."""
        names = {name for name, _ in self.named_parameters() if name.startswith("state_norm.")}
        for i in range(len(self.attention)):
            names.add(f"attention.{i}.o_proj.weight")
            if self.options.mode == "replace":
                names.add(f"attention.{i}.v_proj.weight")
        return names
