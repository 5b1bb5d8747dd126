"""LAuReL: Learned Augmented Residual Layer.

Paper: "LAuReL: Learned Augmented Residual Layer", Gaurav Menghani, Ravi Kumar, Sanjiv Kumar
(ICML 2025, arXiv 2411.07501). The residual connection of a unit f (a sublayer, or a whole
block: `granularity`) becomes, with x_u the stream entering unit u (x_0 the embedding):

    x_{u+1} = alpha f(x_u) + g(x_u, x_{u-1}, ..., x_0)                        (paper eq. 2)

and the variants choose alpha and g (`variant`, its parts joined by "_"):

    rw       x_{u+1} = alpha f(x_u) + beta x_u                            (section 2.1)
    lr       x_{u+1} = f(x_u) + x_u + B A x_u                              (eq. 3)
    pa       x_{u+1} = f(x_u) + x_u + sum_{j<k} gamma_{u,j} x_{u-j}        (eq. 4, h = I)
    lr_pa    x_{u+1} = f(x_u) + x_u + sum_{j<k} gamma_{u,j} B_j A_j x_{u-j} (eq. 4, low-rank h)
    rw_lr    x_{u+1} = alpha f(x_u) + beta (x_u + B A x_u)                 (eq. 5)
    rw_pa, rw_lr_pa: alpha f(x_u) + beta (x_u + the pa / lr_pa sum)       (eq. 6)

A in R^{r x d}, B in R^{d x r} (rank r = `rank`); gamma_{u,j} scalars over the k = `k` latest
states x_u .. x_{u-k+1} (fewer near the embedding). f(x_u) is the unit's output: the sublayer's
F(Norm(x_u)), or for a block the sum of its sublayer outputs (the block keeps its internal
residuals, as the paper's "groups of multiple non-linear layers").

What the paper says and what we chose:
- Defaults: variant "rw_lr" (section 4.4: "the best trade-off", the variant of both its LLM
  runs), rank 32 and k = 3 (its ablation, section 4.3; "r in {32, 48, 64} work well for LLMs").
- alpha, beta (RW): "we cannot let alpha and beta grow unbounded, and using a normalization
  function such as softmax or sigmoid helps" (section 2.1); no init is given. `rw_weights`:
  "softmax" (default: (alpha, beta) = softmax of two logits), "sigmoid" (each the sigmoid of its
  own logit), both with logits 0, i.e. alpha = beta = 1/2 at init; or "none" (raw scalars,
  init 1: exactly the standard residual at init).
- A, B (LR): B = 0 and A the paper's LLM init A[j, i] = 1/sqrt(r d) if i mod r = j, else 0
  (section 3.3, footnote 2; Xavier was its ResNet choice).
- h (PA): eq. 4 allows the identity or a low-rank map; the parameter counts of the paper's
  Table 4 (PA: k; LR+PA: 2rkD + k) and Table 5 fit "pa" = identity h and "lr_pa" = one low-rank
  map B_j A_j per previous state, which is what we implement. gamma init: 0 for "pa" (the
  standard residual at init); 1 for "lr_pa", where B = 0 already gives the standard residual and
  gamma = 0 would leave both gamma and B without gradient.
- x_j are the stream values at unit boundaries ("the output of the j-th residual
  connection"), as the paper's eq. 2 defines them.
- Granularity: the paper places one LAuReL per "block" and its LLM parameter counts (2N for RW
  with N layers) mean one per transformer layer; it also allows f = attention or MLP alone. We
  default to one per sublayer (`granularity="sublayer"`), "block" is the per-layer placement.

starts_at_baseline: true unless the variant has "rw" with normalised weights (then every unit
starts as (f + x)/2, which, since every read is normalised, weights each earlier contribution
by 1/2 per later unit instead of 1).

`depth_layers`: an inactive block's units use standard addition; their states still enter the
PA history of later units.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from resstream.depth.base import DepthOperator
from resstream.depth.weighting import softmax_weights, weighted_sum
from resstream.options import require
from resstream.registry import register_depth_operator

VARIANTS = ("rw", "lr", "pa", "rw_lr", "rw_pa", "lr_pa", "rw_lr_pa")
RW_WEIGHTS = ("softmax", "sigmoid", "none")
GRANULARITIES = ("sublayer", "block")


def low_rank_down_init(n_maps: int, rank: int, d: int) -> Tensor:
    """The paper's column-orthogonal A (section 3.3): A[j, i] = 1/sqrt(r d) where i mod r = j."""
    down = torch.zeros(n_maps, rank, d)
    columns = torch.arange(d)
    down[:, columns % rank, columns] = 1.0 / math.sqrt(rank * d)
    return down


class LaurelUnit(nn.Module):
    """The parameters of one unit's residual connection (those its variant uses)."""

    def __init__(self, parts: set[str], rw_weights: str, n_states: int, rank: int, d: int):
        super().__init__()
        if "rw" in parts:  # (alpha, beta): logits 0 when normalised, raw 1 otherwise
            self.rw = nn.Parameter(torch.zeros(2) if rw_weights != "none" else torch.ones(2))
        if "pa" in parts:
            self.gamma = nn.Parameter(torch.full((n_states,), 1.0 if "lr" in parts else 0.0))
        if "lr" in parts:  # one map for lr, one per previous state for lr_pa
            n_maps = n_states if "pa" in parts else 1
            self.down = nn.Parameter(low_rank_down_init(n_maps, rank, d))  # A [n_maps, r, d]
            self.up = nn.Parameter(torch.zeros(n_maps, d, rank))  # B [n_maps, d, r]

    def low_rank(self, index: int, x: Tensor) -> Tensor:
        """B_j A_j x."""
        return F.linear(F.linear(x, self.down[index].to(x.dtype)), self.up[index].to(x.dtype))


@dataclass
class LaurelState:
    history: list = field(default_factory=list)  # x_u, x_{u-1}, ... (newest first, at most k)
    delta: Tensor | None = None  # f(x_u) so far: the sum of the unit's sublayer outputs


@register_depth_operator("laurel")
class Laurel(DepthOperator):
    aggregates = ("alpha f(x) + beta (x + low-rank B A x + learned mix of the k latest "
                  "stream states), per variant")
    mixing = "static"
    starts_at_baseline = False  # the default variant rw_lr (softmax weights); see option_metadata
    paper = ("Menghani, Kumar, Kumar: LAuReL: Learned Augmented Residual Layer "
             "(ICML 2025, arXiv 2411.07501)")

    @dataclass
    class Options:
        variant: str = "rw_lr"  # rw | lr | pa | rw_lr | rw_pa | lr_pa | rw_lr_pa
        rw_weights: str = "softmax"  # softmax | sigmoid | none (how alpha, beta are formed)
        rank: int = 32  # r of the low-rank maps (lr)
        k: int = 3  # previous states read by pa, the current one included
        granularity: str = "sublayer"  # "sublayer" | "block" (one LAuReL per layer)

    @classmethod
    def validate_config(cls, config, options) -> None:
        require(options.variant in VARIANTS, "depth_options.variant", options.variant,
                ", ".join(VARIANTS))
        require(options.rw_weights in RW_WEIGHTS, "depth_options.rw_weights", options.rw_weights,
                ", ".join(RW_WEIGHTS))
        require(1 <= options.rank <= config.d_model, "depth_options.rank", options.rank,
                f"an integer in [1, d_model={config.d_model}]")
        require(options.k >= 1, "depth_options.k", options.k, "an integer >= 1")
        require(options.granularity in GRANULARITIES, "depth_options.granularity",
                options.granularity, ", ".join(GRANULARITIES))

    @classmethod
    def option_metadata(cls, options):
        rw = "rw" in options.variant.split("_")
        return {"granularity": options.granularity,
                "starts_at_baseline": not rw or options.rw_weights == "none"}

    def __init__(self, config, sites, options):
        super().__init__(config, sites, options)
        self.parts = set(options.variant.split("_"))
        self.window = options.k if "pa" in self.parts else 1  # states kept in the history
        self.units = nn.ModuleDict({
            str(unit): LaurelUnit(self.parts, options.rw_weights, min(self.window, unit + 1),
                                  options.rank, config.d_model)
            for unit, layer in self._unit_layers() if self.is_active(layer)})

    def _unit_layers(self) -> list[tuple[int, int]]:
        """(unit index, its block) for every unit in order."""
        if self.options.granularity == "block":
            return [(layer, layer) for layer in range(self.n_layers)]
        return [(site.index, site.layer) for site in self.sites]

    def _parameters_of(self, site) -> LaurelUnit | None:
        """The parameters of the unit `site` belongs to; None for an inactive unit."""
        key = str(site.layer if self.options.granularity == "block" else site.index)
        return self.units[key] if key in self.units else None

    # ---------------------------------------------------------------- hooks
    def init_state(self, x0, ctx):
        return LaurelState(history=[x0])

    def read(self, state, site, norm, ctx):
        x = state.history[0]
        return norm(x if state.delta is None else x + state.delta)

    def write(self, state, site, out, ctx):
        state.delta = out if state.delta is None else state.delta + out
        if self.options.granularity == "sublayer" or site.last:
            new = self._combine(self._parameters_of(site), state.history, state.delta)
            state.history = [new] + state.history[:self.window - 1]
            state.delta = None
        return state

    def _combine(self, unit: LaurelUnit | None, history: list[Tensor], fx: Tensor) -> Tensor:
        """x_{u+1} from f(x_u) and the states x_u, x_{u-1}, ... (newest first)."""
        x = history[0]
        if unit is None:  # inactive: standard addition
            return x + fx
        skip = x
        if "pa" in self.parts:
            skip = skip + self._previous_activations(unit, history)
        elif "lr" in self.parts:
            skip = skip + unit.low_rank(0, x)
        if "rw" not in self.parts:
            return fx + skip
        alpha, beta = self._residual_weights(unit, x.dtype)
        return alpha * fx + beta * skip

    def _previous_activations(self, unit: LaurelUnit, history: list[Tensor]) -> Tensor:
        """sum_j gamma_j h_j(x_{u-j}) over the states the unit reads (h = I, or B_j A_j)."""
        states = history[:unit.gamma.numel()]
        if "lr" not in self.parts:
            return weighted_sum(unit.gamma, states)
        gamma = unit.gamma.to(states[0].dtype)
        total = gamma[0] * unit.low_rank(0, states[0])
        for j in range(1, len(states)):
            total = total + gamma[j] * unit.low_rank(j, states[j])
        return total

    def _residual_weights(self, unit: LaurelUnit, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        rw_weights = self.options.rw_weights
        if rw_weights == "softmax":
            weights = softmax_weights(unit.rw, dtype)
        elif rw_weights == "sigmoid":
            weights = torch.sigmoid(unit.rw).to(dtype)
        else:
            weights = unit.rw.to(dtype)
        return weights[0], weights[1]

    def finalize(self, state, ctx):
        return state.history[0]

    # ---------------------------------------------------------------- accounting
    def _states_after(self, units_done: int) -> int:
        """History length after `units_done` units: x_0 .. x_{units_done}, at most the window."""
        return min(self.window, units_done + 1)

    def _units_per_block(self) -> int:
        return 1 if self.options.granularity == "block" else len(self.sites) // self.n_layers

    def depth_state_vectors(self) -> int:
        """The history (largest after the last unit), or with block granularity the history
        inside the last block plus the running block output f(x_u)."""
        units = len(self._unit_layers())
        if self.options.granularity == "block":
            return self._states_after(units - 1) + 1
        return self._states_after(units)

    def stage_transient(self, layer: int) -> frozenset[str]:
        return frozenset({"delta"})  # None at every block end

    def pipeline_payload(self, layer: int) -> tuple[str, int]:
        if self.window == 1:
            return "1", 1
        done = (layer + 1) * self._units_per_block()
        return ("min(k, units so far + 1): the stream and the k-1 states before it",
                self._states_after(done))

    def forward_macs_per_token(self, seq_len: int) -> int:
        """Per active unit: rw 2d (alpha f + beta g); lr 2 r d per low-rank map (A then B, one map
        for lr, one per read state for lr_pa); pa (h = I) a weighted sum of the read states, d
        each, or with lr_pa one scalar multiply, d, per state."""
        d, r = self.d_model, self.options.rank
        total = 0
        for unit in self.units.values():
            if "rw" in self.parts:
                total += 2 * d
            if "pa" in self.parts:
                total += unit.gamma.numel() * d
            if "lr" in self.parts:
                total += unit.down.shape[0] * 2 * r * d
        return total

    def no_weight_decay(self) -> set[str]:
        """All of them: alpha/beta and gamma are mixing scalars; A (a fixed pattern) and B (zero)
        are the low-rank residual path, structured-initialised so that the model starts at the
        standard residual; decay would pull them away from that start."""
        return {name for name, _ in self.named_parameters()}
