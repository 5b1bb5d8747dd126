"""Vertical Attention: input-independent softmax weights over norm-scaled earlier layer outputs.

Source: "Vertical Attention" (Kojima, Iwasawa, Yokota, Miyao, Suzuki, Matsuo; ICLR 2026
submission, OpenReview forum A6uabXKiXc, rejected). **We have not found the paper's text**: it
is not in the public sources we could search, and no code was released, so the form below is
NOT taken from the paper and may differ from it. It is rebuilt from summaries of the public
reviews, which describe a learned, input-independent score per (layer, earlier layer),
softmax-normalised, over sources divided by their activation norm; one reviewer calls it
ELC-BERT's layer selection plus ELC's normalised variant. We implement that description
(blocks l = 0..L-1):

    o_0 = embedding,  o_j = output of block j-1          (sources; see `sources` below)
    x_l = sum_{j=0}^{l} softmax(theta_l)_j N(o_j)        theta_l in R^{l+1}, learned
    N(o) = o / sqrt(mean(o^2) + eps)                     RMS scaling, no affine weight
    block l runs unchanged on x_l (its internal residuals kept); final hidden = last block output

Our choices (all documented options):
- `sources="cumulative"` (default): o_j is block j-1's full output (its input plus its
  sublayer outputs), the "layer activations" / hidden states of a LLaMA-style model that the
  authors' logit-lens analysis reads. `sources="delta"`: o_j is the block's output minus its
  input; that variant is ELC-BERT's "normalized" variant up to where the norm sits, so the
  cumulative default keeps Vertical Attention a distinct point of the design space.
- N divides by the RMS rather than the L2 norm (a constant sqrt(d) apart, absorbed by the next
  pre-norm) so sources have unit scale like a normalised stream.
- `keep_residual=False` (default): x_l replaces the residual (the reviewers' reading, as in
  ELC-BERT). `keep_residual=True`: the adjacent residual is kept and the read is added,
  x_l = o^full_{l-1} + sum_j softmax(theta_l)_j N(o_j) (o^full_{-1} = embedding).
- Init: theta_l = 0 (uniform average; the paper's init is unknown) except the adjacent source's
  logit, `init_adjacent_logit` (default 0). Either way the model does not start at the
  standard residual (starts_at_baseline is False): every block's input holds a softmax average
  of RMS-scaled sources (block 0 already reads N(embedding) in place of the embedding).
- Block 0 reads one source (softmax over one logit is 1): no parameter there.
- The mixer sub-block (ShortSWA) is part of the block: S = x_l + ShortSWA(Norm(x_l)).
- `depth_layers`: an inactive block reads the plain residual: the previous block's output
  (cumulative sources; exactly the standard residual), or embedding + sum of deltas (delta
  sources). With depth_layers = [] and keep_residual=False the model is the standard one.
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

SOURCES = ("cumulative", "delta")


@dataclass
class VerticalState:
    previous_output: Tensor  # o^full of the previous block (the embedding before block 0)
    plain_sum: Tensor  # embedding + sum of block deltas (the standard residual, delta sources)
    normed: list = field(default_factory=list)  # N(o_0), ..., N(o_{l})
    block_input: Tensor | None = None
    delta: Tensor | None = None


@register_depth_operator("vertical")
class Vertical(DepthOperator):
    aggregates = ("softmax-weighted sum of RMS-normalised embedding and earlier block outputs "
                  "(reconstructed from reviews)")
    mixing = "static"
    paper = ("Kojima, Iwasawa, Yokota, Miyao, Suzuki, Matsuo: Vertical Attention "
             "(ICLR 2026 submission, OpenReview A6uabXKiXc; form reconstructed from reviews)")
    source_note = ("the paper's text could not be found; this form is rebuilt from summaries of "
                   "its public reviews, not from the paper, and may differ from it")
    starts_at_baseline = False
    granularity = "block"

    @dataclass
    class Options:
        sources: str = "cumulative"  # cumulative | delta
        keep_residual: bool = False  # add the read to the adjacent residual instead of replacing it
        init_adjacent_logit: float = 0.0  # logit of the most recent source at init (0: uniform)

    @classmethod
    def validate_config(cls, config, options) -> None:
        require(options.sources in SOURCES, "depth_options.sources", options.sources, ", ".join(SOURCES))
        value = float(options.init_adjacent_logit)
        require(abs(value) < 1e4, "depth_options.init_adjacent_logit", options.init_adjacent_logit,
                "a finite number with |value| < 1e4")

    def __init__(self, config, sites, options):
        super().__init__(config, sites, options)
        self.delta_sources = options.sources == "delta"
        self.logits = nn.ParameterDict({str(layer): nn.Parameter(self._init_logits(layer + 1))
                                        for layer in range(1, self.n_layers) if self.is_active(layer)})
        self.source_norm = RMSNorm(config.d_model, config.norm_eps, affine=False)
        active = [l for l in range(self.n_layers) if self.is_active(l)]
        self.last_active = max(active) if active else -1

    def _init_logits(self, n: int) -> Tensor:
        logits = torch.zeros(n)
        logits[-1] = float(self.options.init_adjacent_logit)
        return logits

    # ---------------------------------------------------------------- hooks
    def init_state(self, x0, ctx):
        state = VerticalState(previous_output=x0, plain_sum=x0)
        if self.last_active >= 0:
            state.normed.append(self.source_norm(x0))
        return state

    def read(self, state, site, norm, ctx):
        if site.first:
            state.block_input = self._block_input(state, site.layer)
            state.delta = None
        stream = state.block_input if state.delta is None else state.block_input + state.delta
        return norm(stream)

    def _block_input(self, state: VerticalState, layer: int) -> Tensor:
        if not self.is_active(layer):
            return state.plain_sum if self.delta_sources else state.previous_output
        if layer == 0:
            read = state.normed[0]
        else:
            read = weighted_sum(softmax_weights(self.logits[str(layer)], state.normed[0].dtype),
                                state.normed)
        return state.previous_output + read if self.options.keep_residual else read

    def write(self, state, site, out, ctx):
        state.delta = out if state.delta is None else state.delta + out
        if site.last:
            output = state.block_input + state.delta
            source = state.delta if self.delta_sources else output
            if site.layer < self.last_active:  # a later learned read needs it
                state.normed.append(self.source_norm(source))
            if self.delta_sources:
                state.plain_sum = state.plain_sum + state.delta
            state.previous_output = output
        return state

    def finalize(self, state, ctx):
        return state.previous_output

    # ---------------------------------------------------------------- routing weights
    def routing_result(self, recorder) -> dict:
        """depth_attention from the (static) softmax weights: block l reads the normalised
        embedding and block outputs L0..L{l-1} (or deltas). Block 0 (one source) and
        inactive blocks have no weights."""
        sources = ["emb"] + [f"L{j}" for j in range(self.n_layers)]
        rows = [(f"L{layer}", sources[:int(layer) + 1], torch.softmax(logits.detach().double(), -1))
                for layer, logits in self.logits.items()]
        return static_weights_result(rows, normalised=True)

    # ---------------------------------------------------------------- accounting
    def depth_state_vectors(self) -> int:
        # the normalised sources of the last learned read, plus the running stream
        return max(self.last_active + 1, 0) + 1

    # ---------------------------------------------------------------- pipeline stages
    def _live_after(self, layer: int) -> tuple[bool, bool, bool]:
        """Which state a boundary after block `layer` must carry: (the normalised sources, the
        previous block output, the plain sum). The sources while a learned read follows; the
        previous output only if the next block reads it (inactive with cumulative sources, or
        active with keep_residual; the next block's output replaces it); the plain sum of
        deltas while an inactive block follows with delta sources."""
        following = range(layer + 1, self.n_layers)
        nxt = layer + 1
        sources = self.last_active > layer
        previous = (self.options.keep_residual if self.is_active(nxt)
                    else not self.delta_sources)
        plain = self.delta_sources and any(not self.is_active(m) for m in following)
        return sources, previous, plain

    def stage_transient(self, layer: int) -> frozenset[str]:
        sources, previous, plain = self._live_after(layer)
        dead = {"block_input", "delta"}  # recomputed by the next block
        dead |= set() if sources else {"normed"}
        dead |= set() if previous else {"previous_output"}
        dead |= set() if plain else {"plain_sum"}
        return frozenset(dead)

    def pipeline_payload(self, layer: int) -> tuple[str, int]:
        sources, previous, plain = self._live_after(layer)
        value = (layer + 2 if sources else 0) + previous + plain
        if sources and not previous and not plain:
            return "l+2 normalised sources (the next block reads only them)", value
        return ("l+2 normalised sources while a learned read follows, + the previous output "
                "if the next block reads it, + the plain sum if an inactive block follows "
                "(delta sources)"), value

    def forward_macs_per_token(self, seq_len: int) -> int:
        """The weighted read of every active block l >= 1 over its l+1 normalised sources,
        (l+1) d, plus the RMS scaling of each source a learned read uses (the embedding and
        the outputs of blocks before the last active one), 2d each."""
        d = self.d_model
        reads = sum((int(layer) + 1) * d for layer in self.logits)
        norms = (self.last_active + 1) * 2 * d if self.last_active >= 0 else 0
        return reads + norms

    def no_weight_decay(self) -> set[str]:
        """All of them: the scores theta_l (1-D) are softmax mixing coefficients."""
        return {name for name, _ in self.named_parameters()}
