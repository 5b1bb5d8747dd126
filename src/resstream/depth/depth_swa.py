"""Depth-wise residual attention: ShortSWA over depth (the read of "Residual Stream Duality in
Modern Transformer Architectures", Zhang, arXiv 2603.16039, §2.2).

Fix a token t and read its cumulative states through depth as a sequence
X_t = [h^(0); ...; h^(L)] (h^(0) = embedding, h^(l) = output of block l-1). Before block l:

    W   = [h^(max(0, l-K+1)); ...; h^(l)]                (K_l = min(K, l+1) states, current included)
    q   = W_Q N(h^(l)),  K = N(W) W_K,  V = N(W) W_V      (N = RMSNorm, see below)
    z^l = softmax(q K^T / sqrt(d_k)) V  =  ShortSWA(N(X_t); K)[l]

computed by `resstream.ops.local_attention` on the depth stack with tokens folded into the batch
(the same function ShortSWA uses along the sequence). K = depth_window (None = full depth).

Choices where the paper is silent (spec decision 3):
- injection `mode="add"` (default): block l reads u = h^(l) + W_O z^l with W_O zero-initialised,
  so the model starts exactly as the standard residual; `mode="replace"`: u = W_O z^l (z becomes
  the block input, as in Attention Residuals but with the input-dependent query above; W_V and
  W_O start as identities, so with K = 1 the block input is N(h^(l)) -- it does not start at
  the baseline).
- granularity "block" (default; one read per block, the block keeps its internal residuals) or
  "sublayer" (one read before every sublayer over the sublayer-level cumulative states).
- one ShortSWA module shared across depth (`shared=True`, default: the duality is literal, each
  state is projected once); `shared=False` gives every read its own W_Q, W_K, W_V, W_O.
- states are RMS-normalised before the projections (`norm_states=True`), as ShortSWA reads
  Norm(H) on the sequence axis; no RoPE over depth; heads default to the model's n_heads.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch import Tensor

from resstream.depth.base import DepthOperator
from resstream.layers import RMSNorm
from resstream.mixers.shortswa import LocalSelfAttention
from resstream.options import require
from resstream.registry import register_depth_operator


@dataclass
class DepthState:
    h: Tensor  # the current cumulative state of every token, [B, T, d]
    normed: list = field(default_factory=list)  # N(h^(j)) of the window's states, [B*T, 1, d]
    keys: list = field(default_factory=list)  # their keys/values (shared module: projected once)
    values: list = field(default_factory=list)


def depth_read(attention: LocalSelfAttention, query_state: Tensor, keys: list[Tensor],
               values: list[Tensor], window: int | None) -> Tensor:
    """z for the newest depth position: query_state [B, T, d] (already normalised), keys/values
    lists of [B*T, H_kv, 1, D] for the window's states. Returns [B, T, H*D] (before W_O)."""
    b, t, d = query_state.shape
    q, _, _ = attention.project(query_state.reshape(b * t, 1, d), None)
    k, v = torch.cat(keys, dim=2), torch.cat(values, dim=2)  # [B*T, H_kv, K_l, D]
    return attention.attend(q, k, v).reshape(b, t, -1)


@register_depth_operator("depth_swa")
class DepthSWA(DepthOperator):
    aggregates = "softmax attention over the last K cumulative states of the same token"
    mixing = "dynamic"
    paper = "Zhang, Residual Stream Duality in Modern Transformer Architectures (arXiv 2603.16039)"
    uses_depth_window = True

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

    @property
    def granularity(self) -> str:  # type: ignore[override]
        return self.options.granularity

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

    # ---------------------------------------------------------------- hooks
    def init_state(self, x0, ctx):
        return DepthState(x0)

    def read(self, state, site, norm, ctx):
        if site.index in self.reads:
            state.h = self._inject(state, site)
        return norm(state.h)

    def _inject(self, state: DepthState, site) -> Tensor:
        z = self.read_step(state, site.index)
        update = self._attention_for(site.index).o_proj(z)
        return state.h + update if self.options.mode == "add" else update

    def read_step(self, state: DepthState, site_index: int = 0) -> Tensor:
        """Append the current state h to the token's depth sequence and return the causal
        window-K attention read z of the newest position, [B, T, H*D] (before W_O)."""
        attention = self._attention_for(site_index)
        normed = self.state_norm(state.h)
        b, t, d = normed.shape
        state.normed.append(normed.reshape(b * t, 1, d))
        if self.window is not None:
            del state.normed[:-self.window]
        if self.options.shared:  # one module over depth: each state is projected once
            _, k, v = attention.project(state.normed[-1], None)
            state.keys.append(k)
            state.values.append(v)
            if self.window is not None:
                del state.keys[:-self.window], state.values[:-self.window]
            keys, values = state.keys, state.values
        else:  # this read's own W_K, W_V over the whole window
            _, k, v = attention.project(torch.cat(state.normed, dim=1), None)
            keys, values = [k], [v]
        z = depth_read(attention, normed, keys, values, self.window)
        if self.record is not None:
            self.record.append((state.h, z))
        return z

    def write(self, state, site, out, ctx):
        state.h = state.h + out
        return state

    def finalize(self, state, ctx):
        return state.h

    # ---------------------------------------------------------------- accounting
    def depth_state_vectors(self) -> int:
        n_states = len(self.reads) + 1  # embedding and every state a read can see
        return n_states if self.window is None else min(self.window, n_states)

    def pipeline_payload(self, layer: int) -> tuple[str, int]:
        # states after block `layer`: every state read so far plus the current stream
        n_states = sum(1 for s in self.sites if s.index in self.reads and s.layer <= layer) + 1
        if self.window is None:
            return "all depth states so far (l+2 at block granularity)", n_states
        return "min(K, l+2) at block granularity", min(self.window, n_states)
