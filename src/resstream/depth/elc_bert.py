"""ELC-BERT ("Every Layer Counts"): each block reads a learned convex combination of the
embedding and every earlier block output.

Paper: "Not all layers are equally as important: Every Layer Counts BERT", Lucas Georges
Gabriel Charpentier, David Samuel (BabyLM challenge / CoNLL 2023, arXiv 2311.02265); code
ltgoslo/elc-bert (models/model_elc_bert_{base,zero,normalized,weighted_output}.py).

Equations (blocks n = 1..L; block n is our 0-based layer n-1):

    H_0 = embedding
    x_n = sum_{i=0}^{n-1} softmax(w_n)_i H_i            w_n in R^n, one logit per source
    H_n = block n's output, as the variant defines it (below)
    final hidden = H_L  (variant "weighted_output": softmax(w_out) . [H_0..H_L], w_out in R^{L+1})

How each variant maps onto our pre-norm block [mix] -> attn -> mlp. Inside block n the sublayer
outputs m (mix, if any), a (attention), f (MLP) accumulate into the block delta D; x_n is the
block input. Every sublayer reads its own pre-norm, Norm(.), of the stream below:

    variant          mix reads   attn reads     MLP reads          H_n
    zero (default)   x_n         x_n + m        x_n + m + a        D = m + a + f
    base             x_n         x_n + m        m + a  (no skip)   D = m + a + f
    normalized       x_n         x_n + m        x_n + m + a        RMSNorm_noaffine(D)
    weighted_output  as zero                                       D (final hidden as above)

i.e. "zero" is the paper's a + FFN(x_n + a): our pre-norm block minus its input; "base" is the
paper's a + FFN(a): the MLP sees the attention output (plus the mixer's delta) without the skip
from x_n. Without a mixer, m = 0. ShortSWA's sub-block is the first part of the block: Algorithm
1's S = H + ShortSWA(Norm(H)) holds with H = x_n, and its delta is part of H_n.

Init (as the released code): all logits 0 (uniform average over the sources) except "base":
last logit 1 (the previous output weighted e / (n - 1 + e)); w_out = 0. None of the variants
starts at the standard residual (starts_at_baseline is False): "zero" at init reads the uniform
*average* of the embedding and the block deltas where the standard residual reads their sum,
and its final hidden is the last block's delta alone.

Our choices where the sources differ from our decoder:
- LTG-BERT normalises with LayerNorm; we use our RMSNorm (no affine) for "normalized". In that
  variant H_0 is normalised too (LTG-BERT's embedding passes a no-affine LayerNorm, so all its
  sources share one scale); the other variants use the raw embedding as our decoder does.
- Block 1 has a single source (softmax over one logit is 1): it gets no parameter, so our count
  is L(L+1)/2 - 1 (+ L+1 for weighted_output) instead of the code's L(L+1)/2.
- The final hidden H_L of zero/base/normalized is the last block's delta alone (as the paper);
  our final RMSNorm then plays the role of the classifier's LayerNorm.
- `depth_layers`: an inactive block reads the plain residual sum x_n = sum_i H_i (all-ones
  weights, no parameters) and writes H_n as its variant does. The final read counts as active
  iff the last block is; inactive, it returns sum_i H_i. With depth_layers = [] the "zero"
  variant is exactly the standard residual.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch import Tensor

from resstream.depth.weighting import softmax_weights, weighted_sum
from resstream.depth.base import DepthOperator
from resstream.layers import RMSNorm
from resstream.options import require
from resstream.registry import register_depth_operator
from resstream.routing import static_weights_result

VARIANTS = ("base", "zero", "normalized", "weighted_output")


def plain_sum(tensors: list[Tensor]) -> Tensor:
    total = tensors[0]
    for t in tensors[1:]:
        total = total + t
    return total


@dataclass
class ELCState:
    sources: list = field(default_factory=list)  # H_0, H_1, ..., H_{n-1}
    block_input: Tensor | None = None  # x_n
    delta: Tensor | None = None  # sum of this block's sublayer outputs so far


@register_depth_operator("elc_bert")
class ELCBert(DepthOperator):
    aggregates = "softmax-weighted sum of the embedding and all earlier block outputs (deltas)"
    mixing = "static"
    paper = ("Charpentier & Samuel: Not all layers are equally as important: Every Layer Counts "
             "BERT (CoNLL/BabyLM 2023, arXiv 2311.02265)")
    starts_at_baseline = False
    granularity = "block"

    @dataclass
    class Options:
        variant: str = "zero"  # base | zero | normalized | weighted_output

    @classmethod
    def validate_config(cls, config, options) -> None:
        require(options.variant in VARIANTS, "depth_options.variant", options.variant,
                ", ".join(VARIANTS))

    def __init__(self, config, sites, options):
        super().__init__(config, sites, options)
        self.variant = options.variant
        self.final_active = self.is_active(self.n_layers - 1)
        # block `layer` (0-based) reads layer+1 sources; block 0 has one and needs no logit
        self.logits = nn.ParameterDict({str(layer): nn.Parameter(self._init_logits(layer + 1))
                                        for layer in range(1, self.n_layers) if self.is_active(layer)})
        if self.variant == "weighted_output" and self.final_active:
            self.output_logits = nn.Parameter(torch.zeros(self.n_layers + 1))
        self.output_norm = RMSNorm(config.d_model, config.norm_eps, affine=False)

    def _init_logits(self, n: int) -> Tensor:
        logits = torch.zeros(n)
        if self.variant == "base":
            logits[-1] = 1.0
        return logits

    # ---------------------------------------------------------------- hooks
    def init_state(self, x0, ctx):
        h0 = self.output_norm(x0) if self.variant == "normalized" else x0
        return ELCState(sources=[h0])

    def read(self, state, site, norm, ctx):
        if site.first:
            state.block_input = self._block_input(state.sources, site.layer)
            state.delta = None
        return norm(self._sublayer_input(state, site))

    def _block_input(self, sources: list[Tensor], layer: int) -> Tensor:
        if layer == 0:
            return sources[0]
        if not self.is_active(layer):
            return plain_sum(sources)
        return weighted_sum(softmax_weights(self.logits[str(layer)], sources[0].dtype), sources)

    def _sublayer_input(self, state: ELCState, site) -> Tensor:
        if state.delta is None:
            return state.block_input
        if self.variant == "base" and site.kind == "mlp":
            return state.delta  # "a + FFN(a)": no skip from the block input
        return state.block_input + state.delta

    def write(self, state, site, out, ctx):
        state.delta = out if state.delta is None else state.delta + out
        if site.last:
            output = self.output_norm(state.delta) if self.variant == "normalized" else state.delta
            state.sources.append(output)
        return state

    def finalize(self, state, ctx):
        if not self.final_active:
            return plain_sum(state.sources)
        if self.variant == "weighted_output":
            return weighted_sum(softmax_weights(self.output_logits, state.sources[0].dtype),
                                state.sources)
        return state.sources[-1]

    # ---------------------------------------------------------------- routing weights
    def routing_result(self, recorder) -> dict:
        """depth_attention from the (static) softmax weights: block l reads the embedding and
        block outputs L0..L{l-1}; "final" with weighted_output. Block 0 (one source, weight 1)
        and inactive blocks (plain sum) have no weights."""
        sources = ["emb"] + [f"L{j}" for j in range(self.n_layers)]
        rows = [(f"L{layer}", sources[:int(layer) + 1], torch.softmax(logits.detach().double(), -1))
                for layer, logits in self.logits.items()]
        if self.variant == "weighted_output" and self.final_active:
            rows.append(("final", sources, torch.softmax(self.output_logits.detach().double(), -1)))
        return static_weights_result(rows, normalised=True)

    # ---------------------------------------------------------------- accounting
    def _learned_read_after(self, layer: int) -> bool:
        later_blocks = any(self.is_active(l) for l in range(layer + 1, self.n_layers))
        return later_blocks or (self.variant == "weighted_output" and self.final_active)

    def depth_state_vectors(self) -> int:
        if self.variant == "weighted_output" and self.final_active:
            return self.n_layers + 1
        active = [l for l in range(1, self.n_layers) if self.is_active(l)]
        return max(active) + 1 if active else 1

    # ---------------------------------------------------------------- pipeline stages
    def stage_transient(self, layer: int) -> frozenset[str]:
        """The block input and the block's delta: the next block recomputes them."""
        return frozenset({"block_input", "delta"})

    def stage_state(self, state: ELCState, layer: int) -> tuple[Tensor, ...]:
        if not self._learned_read_after(layer):  # only plain sums follow
            return (plain_sum(state.sources),)
        return super().stage_state(state, layer)

    def from_stage_state(self, tensors: tuple[Tensor, ...], layer: int) -> ELCState:
        if not self._learned_read_after(layer):
            return ELCState(sources=[tensors[0]])
        return super().from_stage_state(tensors, layer)

    def pipeline_payload(self, layer: int) -> tuple[str, int]:
        if self._learned_read_after(layer):
            return "l+2 (embedding and every block output so far)", layer + 2
        return "1 (the plain sum; no learned read follows)", 1

    def forward_macs_per_token(self, seq_len: int) -> int:
        """The softmax-weighted read of every active block l >= 1 over its l+1 sources, (l+1) d;
        "weighted_output": the final read over L+1 sources, (L+1) d; "normalized": RMSNorm of
        the embedding and of every block output, 2d each. Plain sums (inactive blocks) are free."""
        d = self.d_model
        total = sum((int(layer) + 1) * d for layer in self.logits)
        if self.variant == "weighted_output" and self.final_active:
            total += (self.n_layers + 1) * d
        if self.variant == "normalized":
            total += (self.n_layers + 1) * 2 * d
        return total

    def no_weight_decay(self) -> set[str]:
        """All of them (the released code's optimiser is not followed here): the layer logits w_n
        and w_out are softmax mixing coefficients (1-D, zero / one-hot init)."""
        return {name for name, _ in self.named_parameters()}
