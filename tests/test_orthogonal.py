"""The Orthogonal Residual Update against a float64 reference written from its equation (a plain
loop over the sublayers, weights from the state_dict by name, sublayers from tests/reference.py),
with the ShortSWA sub-block, `depth_layers` and gradients; the update's orthogonality; option
validation. Decode parity, gradients to every parameter, weight decay, pipeline round trips, the
operators table and the FLOP declaration are checked for every registered operator elsewhere."""
from __future__ import annotations

import pytest
import torch
from reference import head, norm_weight, rmsnorm, site_kinds, sublayer

from resstream.errors import UserError
from resstream.testing import baseline_twin, reference_model, sample_ids, tiny_config

TIGHT = dict(rtol=1e-9, atol=1e-9)


def build(options=None, mixer=None, perturb=True, **changes):
    return reference_model("orthogonal", options, mixer, perturb=perturb, **changes)


ids_for = sample_ids


def orthogonal_reference(model, ids):
    """f = F_s(Norm_s(x_s)); x_{s+1} = x_s + f - <x_s, f> / (<x_s, x_s> + eps) x_s per token at
    active sublayers, x_s + f elsewhere."""
    w = {k: v.double() for k, v in model.state_dict(keep_vars=True).items()}
    config = model.config
    eps = config.depth_options.get("eps", 1e-6)
    active = set(range(config.n_layers) if config.depth_layers is None else config.depth_layers)
    outputs = []
    for row in ids:
        h = w["embed.weight"][row]
        for layer in range(config.n_layers):
            for kind in site_kinds(config):
                f = sublayer(kind, layer, rmsnorm(h, norm_weight(w, layer, kind), config.norm_eps), w, config)
                if layer in active:
                    f = f - ((h * f).sum(-1, keepdim=True) / ((h * h).sum(-1, keepdim=True) + eps)) * h
                h = h + f
        outputs.append(head(h, w, config))
    return torch.stack(outputs)


@pytest.mark.parametrize("mixer", [None, "shortswa"])
@pytest.mark.parametrize("options", [{}, {"eps": 0.01}], ids=str)
def test_matches_float64_reference(options, mixer):
    model = build(options, mixer)
    ids = ids_for(model)
    torch.testing.assert_close(model(ids), orthogonal_reference(model, ids), **TIGHT)


def test_depth_layers_and_gradients_match_reference():
    model = build({}, "shortswa", n_layers=4, depth_layers=[0, 3])
    ids = ids_for(model)
    torch.testing.assert_close(model(ids), orthogonal_reference(model, ids), **TIGHT)
    probe = torch.randn(1, ids.shape[1], model.config.vocab_size, dtype=torch.float64)
    params = list(model.parameters())
    got = torch.autograd.grad((model(ids[:1]) * probe).sum(), params)
    want = torch.autograd.grad((orthogonal_reference(model, ids[:1]) * probe).sum(), params)
    for (name, _), g, expected in zip(model.named_parameters(), got, want):
        torch.testing.assert_close(g, expected, **TIGHT, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_update_is_orthogonal_to_the_stream(dtype):
    model = build(perturb=False)
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 5, 32, generator=generator) * 3).to(dtype)
    out = torch.randn(2, 5, 32, generator=generator).to(dtype)
    new = model.depth.write(x, model.sites[0], out, None)
    assert new.dtype == dtype
    update = (new.double() - x.double())
    cosine = (update * x.double()).sum(-1) / (update.norm(dim=-1) * x.double().norm(dim=-1))
    assert cosine.abs().max() < (1e-5 if dtype == torch.float32 else 3e-2)


def test_not_the_baseline_and_no_parameters():
    model = build(perturb=False)
    assert not type(model.depth).starts_at_baseline and not list(model.depth.parameters())
    ids = ids_for(model)
    with torch.no_grad():
        assert (model(ids) - baseline_twin(model)(ids)).abs().max() > 1e-6


@pytest.mark.parametrize("options, match", [
    ({"eps": 0}, r"depth_options.eps=0.0 is invalid; allowed: a number > 0"),
    ({"eps": -1e-6}, r"depth_options.eps=-1e-06 is invalid"),
    ({"epsilon": 1e-6}, "unknown option"),
])
def test_bad_options_are_one_line_errors(options, match):
    with pytest.raises(UserError, match=match) as error:
        tiny_config(depth="orthogonal", depth_options=options)
    assert isinstance(error.value, ValueError) and "\n" not in str(error.value)
