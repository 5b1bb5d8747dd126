"""Delta Attention Residuals (Luo, Cai, Hu, "Delta Attention Residuals", arXiv 2605.18855;
code: github.com/wdlctc/delta-attention-residuals-code).

The ordinary cumulative residual x is kept with weight 1 and a softmax mixture of depth deltas
is added on top of it (the additive form; Kimi's AttnRes replaces x by the mixture instead):

    read:   h_in = x + gate * sum_i softmax_i( w^T RMSNorm(delta_i) ) delta_i
    write:  x <- x + f(Norm(h_in))

Sources (`granularity`):
- "sublayer": delta_0 = token embedding, delta_i = output of sublayer i (2L+1 sources at the end).
- "block": delta_0 = embedding, then one delta per completed block of `block_size` sublayers,
  delta_k = x(boundary k) - x(boundary k-1) = the sum of that block's sublayer outputs. We keep it
  as a running sum of the block's outputs, which is this difference exactly (and without float
  cancellation). The released code instead stores x(boundary k) minus the previously *appended
  source*; that equals the block delta only for the first two sources and re-adds earlier terms
  from the third on (embedding 1, block deltas 10, 100, 1000 are stored as 1, 10, 101, 1010).
  We do not reproduce that bug; tests/test_delta_attnres.py checks the bookkeeping.
  A boundary falls before every sublayer whose global 0-based index is a positive multiple of
  `block_size`; the running sum of the current block is not a source. When a finished block
  becomes a source is `block_append` (below). The end of the model closes the last
  block, so the final read sees every sublayer's output. `block_size` counts sublayers
  (attention + MLP = 2 per layer) as in `block_attnres`, default 4; the code counts layers
  (num_blocks = 4 => ceil(L / 4) layers per block), i.e. code B layers = our 2B sublayers.

Reads that see a single source (the first sublayer; with block granularity every read before the
first block is appended) attend to the embedding with weight 1 and have no query parameters. The
first read is h = x_0 + x_0, or x_0 with gate="alpha" (there a gate would only rescale x_0, which
the norm removes, so it has none) or with block_append="after_read".

Final read (`final_read`): True (default) runs one more read with its own query and key norm,
h = x + gate * mixture, before the final norm and LM head, as Block AttnRes does. The released
code does NOT do this for its delta modes (its final routing runs only in its block, block_v,
full and delta_centered_reset modes): there the final norm sees x; `final_read=False` is that.
The paper text we could find (abstract and introduction) does not say, so our earlier choice
stays the default.

Block append (`block_append`, block granularity only): "before_read" (default) appends a
finished block before the read of the next block's first sublayer, so that read sees it (Block
AttnRes's order). "after_read" is the released code's `delta_block` mode: the block delta (and,
at the first sublayer, the embedding) is appended after that read, so the first read of a block
sees only the blocks before the one just finished, and the model's first read sees no source
(h = x_0). The paper text we could find does not say which.

Our choices where text and code differ (docs/design.md, decision 4: paper text by default;
where the text is silent, as for the two points above, our choice is the default and the code's
an option):
- `query_init="zero"` (paper text) by default; `"normal"` is the code's N(0, 0.02) (we use the
  config's init_std, 0.02 by default).
- `gate="none"` (the paper's method, no gate) by default: at init (zero queries, uniform weights)
  every read is x + mean(sources). With sublayer granularity the sources sum to x, so the read is
  (1 + 1/m) x and the sublayer's norm removes the factor: the model starts at the standard
  residual up to the norm's eps (as AttnRes does). With block granularity the running block sum
  is not a source, so x + mean(sources) is not a multiple of x and the model does NOT start at the
  baseline (only its first read, 2 x_0, and the final read are multiples of x).
  `gate="alpha"` multiplies the mixture by a learnable scalar per read, initialised to 0 (the
  code's `learnable_alpha`): the model then starts exactly at the standard residual, any
  granularity, any eps. So starts_at_baseline is True with the gate, or with sublayer
  granularity and zero queries; False otherwise (block granularity without the gate, or
  `query_init="normal"`, whose random queries do not weight the sources uniformly).
Left out: the code's optional null source, sigmoid gates, V-stream decoupling and entropy bonus.

Implementation (`impl`): "fused" shares the depth sources, pseudo-queries and the two-phase
softmax read with attnres.py (PseudoQueryReads, hand-written backward passes); "naive" is the
equations with plain autograd ops (`PlainDeltaState`: a list of sources, the running block sum
and x; each read stacks its sources); "auto" (default) is fused in eager mode and naive under
torch.compile (resstream.depth.base.use_naive). x is the running plain sum of all outputs.

depth_layers: an inactive block's sublayers read x (standard addition) and still produce deltas;
the final read runs iff `final_read` and the last block is active.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from resstream.depth.attnres import AttnResState, PseudoQueryReads
from resstream.depth.base import compute_dtype, use_naive, validate_impl
from resstream.options import require
from resstream.routing import site_label
from resstream.registry import register_depth_operator

GRANULARITIES = ("sublayer", "block")
QUERY_INITS = ("zero", "normal")
GATES = ("none", "alpha")
BLOCK_APPENDS = ("before_read", "after_read")


@dataclass
class PlainDeltaState:
    """The naive path's state: the sources (embedding, finished deltas), the running sum of the
    current block's outputs (None right after a block closed) and x, the cumulative residual."""
    sources: list
    partial: Tensor | None
    total: Tensor


@register_depth_operator("delta_attnres")
class DeltaAttnRes(PseudoQueryReads):
    aggregates = ("x + softmax(w . RMSNorm(delta_i)) mixture of the embedding and sublayer (or "
                  "block) deltas, added on top of the kept residual")
    paper = "Luo, Cai, Hu, Delta Attention Residuals (arXiv 2605.18855)"
    partial_is_source = False

    @dataclass
    class Options:
        granularity: str = "sublayer"  # "sublayer" | "block"
        block_size: int = 4  # sublayers per block when granularity="block"
        query_init: str = "zero"  # "zero" (paper) | "normal" (code: N(0, init_std))
        gate: str = "none"  # "none" (paper) | "alpha" (learnable scalar per read, init 0)
        final_read: bool = True  # True (ours) | False (code: the final norm sees x)
        block_append: str = "before_read"  # "before_read" (ours) | "after_read" (code)
        impl: str = "auto"  # "fused" | "naive" | "auto" (module docstring)

    @classmethod
    def validate_config(cls, config, options) -> None:
        require(options.granularity in GRANULARITIES, "depth_options.granularity",
                options.granularity, ", ".join(GRANULARITIES))
        require(options.block_size >= 1, "depth_options.block_size", options.block_size,
                "an integer >= 1 (sublayers per block)")
        require(options.query_init in QUERY_INITS, "depth_options.query_init", options.query_init,
                ", ".join(QUERY_INITS))
        require(options.gate in GATES, "depth_options.gate", options.gate, ", ".join(GATES))
        require(options.block_append in BLOCK_APPENDS, "depth_options.block_append",
                options.block_append, ", ".join(BLOCK_APPENDS))
        require(options.block_append == "before_read" or options.granularity == "block",
                "depth_options.block_append", options.block_append,
                'before_read (after_read needs granularity="block")')
        validate_impl(options.impl)

    @classmethod
    def option_metadata(cls, options):
        # up to the norms' eps; block granularity without the gate reads x + mean(sources) where
        # the sources miss the running block sum, and random queries (query_init="normal") do not
        # weight the sources uniformly (see the module docstring)
        uniform = options.granularity == "sublayer" and options.query_init == "zero"
        return {"granularity": options.granularity,
                "starts_at_baseline": options.gate == "alpha" or uniform}

    def __init__(self, config, sites, options):
        block_size = options.block_size if options.granularity == "block" else 1
        query_std = config.init_std if options.query_init == "normal" else 0.0
        super().__init__(config, sites, options, block_size, query_std)
        self.gate = None
        if options.gate == "alpha":  # every active read but the first (it would only rescale x_0)
            keys = [str(s.index) for s in sites if self.is_active(s.layer) and s.index > 0]
            keys += ["final"] if self.final_active else []
            self.gate = nn.ParameterDict({k: nn.Parameter(torch.zeros(())) for k in keys})

    @property
    def appends_after_read(self) -> bool:
        return self.options.block_append == "after_read"

    def has_final_read(self) -> bool:
        return self.options.final_read

    def _sees_several_sources(self, index: int) -> bool:
        return self._sources_seen(index) > 1

    def _sources_seen(self, index: int) -> int:
        """Sources the read before sublayer `index` attends to: the embedding and the blocks
        finished before it (with "after_read", not the one finished at `index` itself)."""
        if self.appends_after_read:
            return -(-index // self.block_size)
        return index // self.block_size + 1

    def init_state(self, x0, ctx):
        if use_naive(self.options.impl):
            return PlainDeltaState([], x0, x0)  # the embedding is the first block to close
        return self._new_state(x0, keep_total=True)  # total = the cumulative residual x

    def _next_site(self, state: AttnResState, index: int) -> None:
        if not self.appends_after_read:
            return super()._next_site(state, index)
        # the block closes after this read (see read); phase 0 starts there too, once the
        # embedding is a source (its reads all come later)
        if index % self.phase_length == 0 and index > 0:
            self._start_phase(state.sources, index // self.phase_length)

    def _read(self, state: AttnResState, key: str, active: bool):
        """x + gate * mixture; `key` is the site index or "final"."""
        if not active or (key == "0" and self.appends_after_read):  # code: no source yet
            return state.total
        # before the first completed block the only source is the embedding (weight 1)
        mixture = self._attend(state, key) if key in self.column else state.embedding
        if self.gate is None:
            return state.total + mixture
        if key not in self.gate:  # the first read
            return state.total
        return state.total + self.gate[key].to(mixture.dtype) * mixture

    def read(self, state, site, norm, ctx):
        if isinstance(state, PlainDeltaState):
            return norm(self._plain_read(state, site.index, self.is_active(site.layer)))
        self._next_site(state, site.index)
        h = self._read(state, str(site.index), self.is_active(site.layer))
        if self.appends_after_read and site.index % self.block_size == 0:
            self._close_block(state)
            if site.index == 0:
                self._start_phase(state.sources, 0)
        return norm(h)

    def write(self, state, site, out, ctx):
        if not isinstance(state, PlainDeltaState):
            return super().write(state, site, out, ctx)
        state.partial = out if state.partial is None else state.partial + out
        state.total = state.total + out
        return state

    def finalize(self, state, ctx):
        if isinstance(state, PlainDeltaState):
            return self._plain_read(state, len(self.sites), self.final_active)
        if state.partial is not None:  # the end of the model closes the last block
            self._append(state.sources, state.partial)
            state.partial = None
        self._next_site(state, len(self.sites))
        return self._read(state, "final", self.final_active)

    # ---------------------------------------------------------------- naive path
    def _plain_read(self, state: PlainDeltaState, index: int, active: bool) -> Tensor:
        """x + gate * sum_i softmax_i(w^T RMSNorm_g(delta_i)) delta_i before sublayer `index`
        (len(sites): the final read), with the block bookkeeping of the module docstring."""
        final = index == len(self.sites)
        closes = final or index % self.block_size == 0  # a block boundary (the end closes one)
        if closes and not self.appends_after_read:
            self._plain_close(state)
        key = "final" if final else str(index)
        if not active or (index == 0 and self.appends_after_read):
            h = state.total
        elif key not in self.column:  # the embedding is the only source (weight 1)
            h = state.total if self.gate is not None else state.total + state.sources[0]
        else:
            mixture = self._plain_mix(key, state.sources)
            gate = self.gate[key].to(mixture.dtype) if self.gate is not None else 1.0
            h = state.total + gate * mixture
        if closes and self.appends_after_read:
            self._plain_close(state)
        return h

    @staticmethod
    def _plain_close(state: PlainDeltaState) -> None:
        if state.partial is not None:
            state.sources.append(state.partial)
            state.partial = None

    def _plain_mix(self, key: str, sources: list[Tensor]) -> Tensor:
        dtype = compute_dtype(sources[0].dtype)
        with torch.autocast(sources[0].device.type, enabled=False):
            v = torch.stack(sources, -2).to(dtype)  # [B, T, m, d]
            keys = v * torch.rsqrt(v.square().mean(-1, keepdim=True) + self.eps)
            logits = keys @ (self.query[key] * self.key_norm[key]).to(dtype)  # [B, T, m]
            weights = logits.softmax(-1)
            if self._routing is not None:
                reader = "final" if key == "final" else site_label(self.sites[int(key)])
                labels = [self._source_label(i) for i in range(len(sources))]
                self._routing.add_weights(reader, labels, weights)
            mixture = (weights.unsqueeze(-1) * v).sum(-2)
        return mixture.to(sources[0].dtype)

    def stage_state(self, state, layer: int) -> tuple[Tensor, ...]:
        if isinstance(state, PlainDeltaState):  # after a write the block sum is never None
            return (*state.sources, state.partial)
        return super().stage_state(state, layer)

    def from_stage_state(self, tensors: tuple[Tensor, ...], layer: int):
        if self.options.impl != "naive":
            return super().from_stage_state(tensors, layer)
        *sources, partial = tensors
        return PlainDeltaState(list(sources), partial, sum(sources, partial))

    # ---------------------------------------------------------------- accounting
    def depth_state_vectors(self) -> int:
        return self._sources_after(len(self.sites)) + 1  # sources and x

    def keeps_total(self) -> bool:
        return True  # x, the cumulative residual

    def pipeline_payload(self, layer: int) -> tuple[str, int]:
        """`stage_state`: the sources and the running block sum; x is not sent, the receiver
        recomputes it as their sum (x = embedding + every delta)."""
        n_sites = sum(1 for s in self.sites if s.layer <= layer)
        if not self.column:
            return "embedding + x (no learned read)", 2
        formula = ("embedding + every sublayer output so far (s+1)" if self.block_size == 1
                   else "embedding + completed block deltas + running block sum "
                        "(floor((s-1)/S)+2)")
        return formula, self._sources_after(n_sites)

    def forward_macs_per_token(self, seq_len: int) -> int:
        """Per read with a pseudo-query over m sources (the embedding and the deltas completed
        so far): logits and softmax mix, 2 m d, plus d for the gate's scaling with gate="alpha";
        the key RMS of every source once, d each. x + mixture is a free addition; reads of the
        embedding alone and of inactive blocks are free."""
        if not self.column:
            return 0
        d, n_sites, size = self.d_model, len(self.sites), self.block_size
        appended = -(-n_sites // size) + 1  # a boundary every S sublayers, the last block at the end
        total = d * appended
        for key in self.column:
            m = appended if key == "final" else self._sources_seen(int(key))
            total += 2 * m * d + (d if self.gate is not None and key in self.gate else 0)
        return total

    def no_weight_decay(self) -> set[str]:
        """All of them: pseudo-queries w and key-norm gains (1-D) and the alpha gates (scalars,
        init 0: the code's `learnable_alpha`) are mixing coefficients."""
        return {name for name, _ in self.named_parameters()}
