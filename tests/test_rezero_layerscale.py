"""ReZero and LayerScale: scaled residual branches.

Each is checked against a float64 reference written from its equation (a plain loop over the
sublayers, weights read from the state_dict by name, sublayers from tests/reference.py), with the
ShortSWA sub-block and with `depth_layers`, at init against the init math, and for option
validation. Decode parity, gradients to every parameter, weight decay, the operators table and
the FLOP declaration are checked for every registered operator elsewhere.
"""
from __future__ import annotations

import pytest
import torch
from reference import head, norm_weight, rmsnorm, sublayer

from resstream import ResStreamLM
from resstream.depth.layerscale import cait_epsilon
from resstream.errors import UserError
from resstream.testing import reference_model, sample_ids, tiny_config

TIGHT = dict(rtol=1e-9, atol=1e-9)


build = reference_model
ids_for = sample_ids


def scaled_residual_logits(model, ids, scale_of):
    """x_{s+1} = x_s + scale_of(w, s) * F_s(read), per sequence in float64; `scale_of` returns
    None for a standard (unscaled) site, and the read is Norm(x_s) unless ReZero's norm=False."""
    w = {k: v.double() for k, v in model.state_dict().items()}
    config = model.config
    keep_norm = config.depth_options.get("norm", True)
    kinds = list(model.blocks[0].site_kinds)
    outputs = []
    for row in ids:
        h = w["embed.weight"][row]
        site = 0
        for layer in range(config.n_layers):
            for kind in kinds:
                scale = scale_of(w, site, layer)
                normed = rmsnorm(h, norm_weight(w, layer, kind), config.norm_eps)
                x = normed if (keep_norm or scale is None) else h
                out = sublayer(kind, layer, x, w, config)
                h = h + (out if scale is None else scale * out)
                site += 1
        outputs.append(head(h, w, config))
    return torch.stack(outputs)


def active_slots(config, kinds_per_block):
    """site index -> position among the active sites (the parameters' rows)."""
    active = range(config.n_layers) if config.depth_layers is None else config.depth_layers
    sites = [(layer * kinds_per_block + i, layer) for layer in range(config.n_layers)
             for i in range(kinds_per_block)]
    return {index: slot for slot, (index, _) in enumerate(s for s in sites if s[1] in active)}


def rezero_reference(model, ids):
    slots = active_slots(model.config, len(model.blocks[0].site_kinds))
    return scaled_residual_logits(
        model, ids, lambda w, s, layer: w["depth.alpha"][slots[s]] if s in slots else None)


def layerscale_reference(model, ids):
    slots = active_slots(model.config, len(model.blocks[0].site_kinds))
    return scaled_residual_logits(
        model, ids, lambda w, s, layer: w["depth.scale"][slots[s]] if s in slots else None)


REFERENCES = {"rezero": rezero_reference, "layerscale": layerscale_reference}
CASES = [("rezero", {}), ("rezero", {"norm": False}), ("layerscale", {}), ("layerscale", {"init": 0.3})]


@pytest.mark.parametrize("mixer", [None, "shortswa"])
@pytest.mark.parametrize("name, options", CASES, ids=lambda v: str(v))
def test_matches_float64_reference(name, options, mixer):
    model = build(name, options, mixer)
    ids = ids_for(model)
    torch.testing.assert_close(model(ids), REFERENCES[name](model, ids), **TIGHT)


@pytest.mark.parametrize("name, options", CASES, ids=lambda v: str(v))
def test_depth_layers_matches_reference(name, options):
    for active in ([1, 2], [0, 3]):
        model = build(name, options, "shortswa", n_layers=4, depth_layers=active)
        assert model.depth.slot.keys() == {s.index for s in model.sites if s.layer in active}
        ids = ids_for(model)
        torch.testing.assert_close(model(ids), REFERENCES[name](model, ids), **TIGHT)


def test_rezero_starts_as_the_identity_across_depth():
    model = build("rezero", perturb=False)
    assert not type(model.depth).starts_at_baseline
    assert torch.equal(model.depth.alpha, torch.zeros(3 * 2))  # one scalar per sublayer, init 0
    ids = ids_for(model)
    w = {k: v.double() for k, v in model.state_dict().items()}
    identity = torch.stack([head(w["embed.weight"][row], w, model.config) for row in ids])
    torch.testing.assert_close(model(ids), identity, **TIGHT)


def test_rezero_only_alpha_learns_at_the_first_step():
    model = build("rezero", perturb=False)
    ids = ids_for(model)
    torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    assert model.depth.alpha.grad.abs().min() > 0
    assert model.blocks[0].attn.q_proj.weight.grad.abs().max() == 0


@pytest.mark.parametrize("n_layers, epsilon", [(3, 0.1), (18, 0.1), (19, 1e-5), (24, 1e-5), (25, 1e-6)])
def test_layerscale_init_follows_the_paper_rule(n_layers, epsilon):
    assert cait_epsilon(n_layers) == epsilon
    config = tiny_config(depth="layerscale", n_layers=n_layers)
    with torch.device("meta"):
        model = ResStreamLM(config)
    assert model.depth.scale.shape == (2 * n_layers, config.d_model)
    model = ResStreamLM(tiny_config(depth="layerscale", n_layers=2))
    assert torch.equal(model.depth.scale, torch.full((4, 32), 0.1))
    model = ResStreamLM(tiny_config(depth="layerscale", depth_options={"init": 0.25}))
    assert torch.equal(model.depth.scale, torch.full((6, 32), 0.25))


@pytest.mark.parametrize("name, options, match", [
    ("rezero", {"norm": "maybe"}, r"norm=.maybe. is invalid; allowed: true or false"),
    ("layerscale", {"init": 0}, "depth_options.init"),
    ("layerscale", {"init": -1e-5}, "depth_options.init"),
    ("layerscale", {"scale": 1}, "unknown option"),
])
def test_bad_options_are_one_line_errors(name, options, match):
    with pytest.raises(UserError, match=match) as error:
        tiny_config(depth=name, depth_options=options)
    assert isinstance(error.value, ValueError) and "\n" not in str(error.value)
