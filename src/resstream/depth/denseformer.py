"""DenseFormer: Depth-Weighted Averaging (DWA) of block outputs.

Paper: "DenseFormer: Enhancing Information Flow in Transformers via Depth Weighted Averaging",
Matteo Pagliardini, Amirkeivan Mohtashami, Francois Fleuret, Martin Jaggi (NeurIPS 2024,
arXiv 2402.02622). Equations (blocks numbered i = 1..L; block i is our 0-based layer i-1):

    X_0 = embedding,  Y_0 = X_0
    X_i = B_i(Y_{i-1})                                 full block output, internal residuals kept
    Y_i = sum_{j in S_i} alpha_{i,j} X_j               if a DWA sits after block i
    Y_i = X_i                                          otherwise
    S_i = {j <= i : j = i (mod k)}                     dilation k (`dilation`)
    a DWA sits after block i  iff  i = 0 (mod p)       period p (`period`)
    output: final norm + head on Y_L

"k x p-DenseFormer"; the paper recommends 4 x 5 (p = k + 1 keeps the first output computed
from the previous DWA, X_{i-k}, in S_i). alpha are unconstrained reals (no softmax), initialised
to alpha_{i,i} = 1 and 0 elsewhere, so the model is exactly the standard transformer at step 0.
As in the released code, no DWA is forced after the last block when L is not a multiple of p.

Our choices:
- Storage: only the X_j that some later DWA reads are kept (for k x p with p > 1 many are
  never read); each is dropped after its last reader. A DWA is one stack of its #S_i inputs and
  one matrix-vector product; blocks without a DWA cost nothing extra. Nothing is re-stacked
  at every block (the paper's in-place accumulator trick solves the same problem).
- `depth_layers`: no DWA after an inactive block (Y_i = X_i there); S_i of the remaining DWAs
  is unchanged.
- The mixer sub-block (ShortSWA, "mix") is part of B_i: the block keeps its own residuals.
- Parameters live in `alphas[str(i)]` (i = 1-based block after which the DWA sits), entries in
  increasing j: L(L+3)/2 scalars for 1x1 (every DWA present), far fewer for k x p.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch import Tensor

from resstream.depth.base import DepthOperator
from resstream.depth.weighting import weighted_sum
from resstream.options import require
from resstream.registry import register_depth_operator
from resstream.routing import static_weights_result


@dataclass
class DenseState:
    stream: Tensor  # the residual stream inside the current block (Y_{i-1} plus sublayer outputs)
    kept: dict = field(default_factory=dict)  # j -> X_j, only outputs some later DWA reads


@register_depth_operator("denseformer")
class DenseFormer(DepthOperator):
    aggregates = ("unconstrained weighted sum of the embedding and earlier block outputs "
                  "(cumulative states) after every p-th block, every k-th output")
    mixing = "static"
    paper = ("Pagliardini, Mohtashami, Fleuret, Jaggi: DenseFormer, Depth Weighted Averaging "
             "(NeurIPS 2024, arXiv 2402.02622)")
    starts_at_baseline = True
    granularity = "block"

    @dataclass
    class Options:
        dilation: int = 1  # k: a DWA after block i reads X_j with j = i (mod k)
        period: int = 1  # p: a DWA after every p-th block

    @classmethod
    def validate_config(cls, config, options) -> None:
        require(options.dilation >= 1, "depth_options.dilation", options.dilation, "an integer >= 1")
        require(1 <= options.period <= config.n_layers, "depth_options.period", options.period,
                f"an integer in [1, n_layers={config.n_layers}]")

    def __init__(self, config, sites, options):
        super().__init__(config, sites, options)
        k, p = options.dilation, options.period
        # 1-based block indices i with a DWA after them, and S_i for each
        self.sources = {i: list(range(i % k, i + 1, k)) for i in range(1, self.n_layers + 1)
                        if i % p == 0 and self.is_active(i - 1)}
        self.alphas = nn.ParameterDict({str(i): nn.Parameter(self._identity(len(s)))
                                        for i, s in self.sources.items()})
        self.last_reader = {}  # j -> the last DWA that reads X_j
        for i, s in self.sources.items():
            for j in s:
                self.last_reader[j] = max(i, self.last_reader.get(j, i))

    @staticmethod
    def _identity(n: int) -> Tensor:
        alpha = torch.zeros(n)
        alpha[-1] = 1.0
        return alpha

    # ---------------------------------------------------------------- hooks
    def init_state(self, x0, ctx):
        state = DenseState(x0)
        if 0 in self.last_reader:
            state.kept[0] = x0
        return state

    def read(self, state, site, norm, ctx):
        return norm(state.stream)

    def write(self, state, site, out, ctx):
        state.stream = state.stream + out
        if site.last:
            self._after_block(state, site.layer + 1)
        return state

    def _after_block(self, state: DenseState, i: int) -> None:
        if i in self.last_reader:
            state.kept[i] = state.stream
        if i in self.sources:
            inputs = [state.kept[j] for j in self.sources[i]]
            state.stream = weighted_sum(self.alphas[str(i)], inputs)
            for j in self.sources[i]:  # free outputs no later DWA reads
                if self.last_reader[j] == i:
                    del state.kept[j]

    def finalize(self, state, ctx):
        return state.stream

    # ---------------------------------------------------------------- routing weights
    def routing_result(self, recorder) -> dict:
        """depth_weights: the alphas (static, unconstrained). The DWA after 1-based block i
        feeds block "L{i}" ("final" after the last); X_j is "emb" (j = 0) or "L{j-1}"."""
        rows = [("final" if i == self.n_layers else f"L{i}",
                 ["emb" if j == 0 else f"L{j - 1}" for j in sources],
                 self.alphas[str(i)].detach().double()) for i, sources in self.sources.items()]
        return static_weights_result(rows, normalised=False, kind="depth_weights")

    # ---------------------------------------------------------------- accounting
    def _alive_after(self, i: int) -> int:
        """d-vectors per token that must survive block i (1-based): kept outputs a later DWA
        reads, plus the stream Y_i unless it is one of them (Y_i = X_i when no DWA at i)."""
        kept = {j for j, last in self.last_reader.items() if j <= i < last}
        stream_is_kept = i not in self.sources and i in kept
        return len(kept) + (0 if stream_is_kept else 1)

    def depth_state_vectors(self) -> int:
        return max(self._alive_after(i) for i in range(self.n_layers + 1))

    def pipeline_payload(self, layer: int) -> tuple[str, int]:
        return ("X_j (j <= l+1) a later DWA reads, plus Y_{l+1} unless it is one of them "
                "(l+3 for 1x1)",
                self._alive_after(layer + 1))

    def forward_macs_per_token(self, seq_len: int) -> int:
        """Each DWA is a weighted sum of its #S_i inputs: sum_i #S_i d (k x p DenseFormer:
        about 1/(k p) of the 1x1 count)."""
        return sum(len(sources) * self.d_model for sources in self.sources.values())

    def no_weight_decay(self) -> set[str]:
        """All of them: the DWA weights alpha (1-D, alpha_ii = 1, others 0) are mixing
        coefficients; decay would pull alpha_ii = 1 toward 0, away from the standard residual."""
        return {name for name, _ in self.named_parameters()}
