"""Parameter matching: widen a configuration until it has (about) a target number of parameters.

A budget-matched comparison gives the baseline the parameters a variant adds (a depth operator's
mixing weights, a mixer's projections) by widening the baseline, so that a gain cannot be read as
"more parameters". `match_parameters` changes one width and counts parameters exactly, on models
built on the meta device (no memory, no init), the way `resstream presets` counts them:

    widen="mlp"      mlp_hidden (the SwiGLU hidden size) in multiples of `multiple` (default 8;
                     32 is the multiple the default 8/3 d rule rounds to, but one step of 32 is
                     3 x 32 d L parameters, ~6% of the `small` preset: too coarse for 2%).
                     Parameters are linear in it: 3 d per unit per block.
    widen="d_model"  d_model in multiples of 2 n_heads (heads stay valid: d_model divisible by
                     n_heads with an even head_dim for RoPE); an unset mlp_hidden follows the
                     8/3 d rule, a set one is kept.

The candidate closest to the target is returned (it may narrow the config when the target is
below its count); it must lie within `tolerance` (relative) of the target, else UserError.
"""
from __future__ import annotations

import torch

from resstream.config import ModelConfig
from resstream.errors import UserError

WIDEN = ("mlp", "d_model")


def count_parameters(config: ModelConfig) -> int:
    """sum(p.numel()) of ResStreamLM(config) (tied embeddings once), built on the meta device
    (on the CPU where some module cannot be built there)."""
    from resstream.model import ResStreamLM

    try:
        with torch.device("meta"):
            return ResStreamLM(config).num_parameters()
    except (NotImplementedError, RuntimeError):
        return ResStreamLM(config).num_parameters()


def _human(n: int) -> str:
    return f"{n / 1e6:.2f}M" if abs(n) >= 1e6 else f"{n / 1e3:.1f}K"


def _candidate(base: ModelConfig, widen: str, value: int) -> ModelConfig | None:
    try:
        return base.replace(mlp_hidden=value) if widen == "mlp" else base.replace(d_model=value)
    except UserError:  # e.g. an operator option that no longer divides the new width
        return None


def match_parameters(base: ModelConfig, target_params: int, tolerance: float = 0.02,
                     widen: str = "mlp", multiple: int = 8) -> tuple[ModelConfig, str]:
    """(config, description): `base` with its MLP hidden size (widen="mlp", in multiples of
    `multiple`) or its d_model (widen="d_model", in multiples of 2 n_heads) set so that its
    parameter count is the closest reachable to `target_params`, within `tolerance` (relative),
    e.g. "mlp_hidden 352 -> 416: 1.02M -> 1.09M params (target 1.09M, +0.4%)".
    Raises UserError when no width gets within tolerance."""
    if not isinstance(base, ModelConfig):
        raise TypeError(f"base must be a ModelConfig, got {type(base).__name__}")
    if widen not in WIDEN:
        raise UserError(f"widen={widen!r} is invalid; allowed: {', '.join(WIDEN)}")
    if not isinstance(target_params, int) or isinstance(target_params, bool) or target_params < 1:
        raise UserError(f"target_params={target_params!r} is invalid; allowed: an integer >= 1")
    if not (isinstance(tolerance, (int, float)) and 0 <= tolerance < 1):
        raise UserError(f"tolerance={tolerance!r} is invalid; allowed: a number in [0, 1)")
    if not isinstance(multiple, int) or multiple < 1:
        raise UserError(f"multiple={multiple!r} is invalid; allowed: an integer >= 1")
    base_params = count_parameters(base)
    if widen == "mlp":
        field, step, start = "mlp_hidden", multiple, base.ffn_hidden
        slope_config = _candidate(base, widen, start + step)
        slope = (count_parameters(slope_config) - base_params) / step  # params per hidden unit
        estimate = start + (target_params - base_params) / slope
        centre = max(1, round(estimate / step))
        values = {k * step for k in range(max(1, centre - 2), centre + 3)}
    else:
        field, step, start = "d_model", 2 * base.n_heads, base.d_model
        low, high = 1, max(2, -(-start // step))
        while True:  # grow until the count passes the target (parameters grow with d_model)
            config = _candidate(base, widen, high * step)
            if config is None or count_parameters(config) >= target_params or high * step > 1 << 16:
                break
            low, high = high, 2 * high
        while high - low > 1:  # bisection on k, d_model = k * step
            mid = (low + high) // 2
            config = _candidate(base, widen, mid * step)
            if config is not None and count_parameters(config) < target_params:
                low = mid
            else:
                high = mid
        values = {k * step for k in range(max(1, low - 1), high + 2)}
    best = None
    for value in sorted(values):
        config = _candidate(base, widen, value)
        if config is None:
            continue
        params = count_parameters(config)
        if best is None or abs(params - target_params) < abs(best[1] - target_params):
            best = (config, params, value)
    if best is None:
        raise UserError(f"no valid {field} near the target {target_params:,} parameters")
    config, params, value = best
    error = (params - target_params) / target_params
    if abs(error) > tolerance:
        raise UserError(f"cannot match {target_params:,} parameters within {tolerance:.1%} by "
                        f"changing {field}: the closest, {field}={value}, gives {params:,} "
                        f"({error:+.1%}); allowed: a target reachable in steps of {step}")
    change = f"{field} {start} -> {value}" if value != start else f"{field} {start} (unchanged)"
    description = (f"{change}: {_human(base_params)} -> {_human(params)} params "
                   f"(target {_human(target_params)}, {error:+.1%})")
    return config, description


__all__ = ["count_parameters", "match_parameters", "WIDEN"]
