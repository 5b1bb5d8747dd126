"""Frac-Connections (depth/frac.py) against a float64 reference written from the module
docstring's equations (a plain loop over the sublayers and over the fractions, weights from the
state_dict by name, sublayers from tests/reference.py): static and dynamic, the ShortSWA sub-block,
`depth_layers`, gradients; the exact start at the standard model (Gamma = A = I, B = 1); one
d-vector of depth state; every learned weight matters; option validation. Decode parity, weight
decay, pipeline round trips, the operators table and the FLOP declaration are checked for every
registered operator elsewhere.

No independent implementation is compared: the `hyper-connections` package's num_fracs
(lucidrains) generalises HC x fractions with a full m x m write matrix and reads every input
fraction from fraction 0 at init, which is not the paper's B in R^{1 x m} nor a Pre-Norm start."""
from __future__ import annotations

import pytest
import torch
from reference import head, norm_weight, rmsnorm, site_kinds, sublayer

from resstream.errors import UserError
from resstream.testing import baseline_twin, reference_model, sample_ids, tiny_config

TIGHT = dict(rtol=1e-9, atol=1e-9)


def build(options=None, mixer=None, perturb=True, **changes):
    torch.manual_seed(0)
    return reference_model("frac", options, mixer, perturb=perturb, scale=0.3, **changes)


ids_for = sample_ids


def frac_reference(model, ids):
    """H = h split into m fractions; per active sublayer k (weights depth.connections.k.*):
    per fraction j, H_bar_j = RMSNorm(H_j) and Gamma[j, i], A[j, i], B[j] (static part plus
    s * tanh of the projections when dynamic); input fraction i = sum_j Gamma[j, i] H_j, new
    fraction i = B_i T(.)_i + sum_j A[j, i] H_j. Inactive: h + T(Norm(h))."""
    w = {k: v.double() for k, v in model.state_dict(keep_vars=True).items()}
    config = model.config
    m = config.depth_options.get("fractions", 4)
    dynamic = config.depth_options.get("dynamic", True)
    active = set(range(config.n_layers) if config.depth_layers is None else config.depth_layers)
    outputs = []
    for row in ids:
        h = w["embed.weight"][row]  # [T, d]
        index = 0
        for layer in range(config.n_layers):
            for kind in site_kinds(config):
                weight = norm_weight(w, layer, kind)
                if layer not in active:
                    h = h + sublayer(kind, layer, rmsnorm(h, weight, config.norm_eps), w, config)
                    index += 1
                    continue
                c = {k.split(".")[-1]: v for k, v in w.items()
                     if k.startswith(f"depth.connections.{index}.")}
                parts = list(h.chunk(m, dim=-1))  # H_j [T, d/m]
                gamma = [[c["gamma"][j, i].expand(h.shape[0]) for i in range(m)] for j in range(m)]
                a = [[c["a"][j, i].expand(h.shape[0]) for i in range(m)] for j in range(m)]
                b = [c["b"][j].expand(h.shape[0]) for j in range(m)]
                if dynamic:
                    for j in range(m):
                        h_bar = rmsnorm(parts[j], c["norm_weight"], config.norm_eps)
                        for i in range(m):
                            gamma[j][i] = gamma[j][i] + c["s_alpha"] * torch.tanh(h_bar @ c["w_gamma"][:, i])
                            a[j][i] = a[j][i] + c["s_alpha"] * torch.tanh(h_bar @ c["w_alpha"][:, i])
                        b[j] = b[j] + c["s_beta"] * torch.tanh(h_bar @ c["w_beta"])
                h_in = torch.cat([sum(gamma[j][i][:, None] * parts[j] for j in range(m))
                                  for i in range(m)], dim=-1)
                out = sublayer(kind, layer, rmsnorm(h_in, weight, config.norm_eps), w, config)
                out_parts = out.chunk(m, dim=-1)
                h = torch.cat([b[i][:, None] * out_parts[i]
                               + sum(a[j][i][:, None] * parts[j] for j in range(m))
                               for i in range(m)], dim=-1)
                index += 1
        outputs.append(head(h, w, config))
    return torch.stack(outputs)


CASES = [({}, None, {}), ({"dynamic": False}, None, {}), ({"fractions": 2}, "shortswa", {}),
         ({"fractions": 8}, None, {"depth_layers": [0, 2]}), ({"fractions": 1}, None, {})]


@pytest.mark.parametrize("options,mixer,changes", CASES, ids=str)
def test_matches_float64_reference(options, mixer, changes):
    model = build(options, mixer, **changes)
    ids = ids_for(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), frac_reference(model, ids), **TIGHT)


@pytest.mark.parametrize("options", [{}, {"dynamic": False}], ids=str)
def test_gradients_match_reference(options):
    model = build(options, "shortswa", n_layers=3, depth_layers=[0, 2])
    ids = ids_for(model)[:1]
    probe = torch.randn(1, ids.shape[1], model.config.vocab_size, dtype=torch.float64)
    params = list(model.parameters())
    got = torch.autograd.grad((model(ids) * probe).sum(), params)
    want = torch.autograd.grad((frac_reference(model, ids) * probe).sum(), params)
    for (name, _), g, expected in zip(model.named_parameters(), got, want):
        torch.testing.assert_close(g, expected, **TIGHT, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("options,mixer", [({}, None), ({"dynamic": False}, "shortswa"),
                                           ({"fractions": 2}, None)], ids=str)
def test_starts_exactly_at_standard_model(options, mixer):
    """Gamma = A = I, B = 1: the sublayer reads h itself and every fraction receives its own part
    of the output, so the model is the standard one bit for bit (nothing is summed, no eps)."""
    model = build(options, mixer, perturb=False)
    ids = ids_for(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), baseline_twin(model)(ids), rtol=0, atol=0)


def test_depth_state_is_one_vector():
    """Fractions, not copies: the state across depth is one d-vector per token (HC keeps n)."""
    model = build({"fractions": 4})
    op = model.depth
    assert op.depth_state_vectors() == 1 and op.pipeline_payload(0)[1] == 1
    x0 = torch.randn(2, 5, model.config.d_model, dtype=torch.float64)
    state = op.init_state(x0, None)
    op.read(state, model.sites[0], lambda x: x, None)
    state = op.write(state, model.sites[0], torch.randn_like(x0), None)
    assert state.stream.shape == x0.shape and state.residual is None


def test_every_learned_weight_matters():
    model = build({})
    params = dict(model.depth.named_parameters())
    assert len(params) == 9 * 6  # gamma, a, b, norm_weight, w_gamma, w_alpha, w_beta, s_alpha, s_beta
    ids = ids_for(model)
    probe = torch.randn(2, 6, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    (model(ids) * probe).sum().backward()
    for name, p in params.items():
        assert p.grad.abs().max() > 1e-6, name


def test_metadata_and_accounting():
    static = build({"dynamic": False}, perturb=False)
    dynamic = build({}, perturb=False)
    assert static.depth.mixing == "static" and dynamic.depth.mixing == "dynamic"
    d, m, sites = 32, 4, 6
    assert static.depth.forward_macs_per_token(8) == sites * (2 * m + 1) * d
    assert dynamic.depth.forward_macs_per_token(8) == sites * ((2 * m + 1) + (2 * m + 2)) * d
    assert dynamic.depth.no_weight_decay() == {n for n, _ in dynamic.depth.named_parameters()}


@pytest.mark.parametrize("options, match", [
    ({"fractions": 0}, r"depth_options.fractions=0 is invalid; allowed: an integer >= 1 dividing d_model=32"),
    ({"fractions": 3}, r"depth_options.fractions=3 is invalid"),
    ({"streams": 4}, "unknown option"),
])
def test_bad_options_are_one_line_errors(options, match):
    with pytest.raises(UserError, match=match) as error:
        tiny_config(depth="frac", depth_options=options)
    assert isinstance(error.value, ValueError) and "\n" not in str(error.value)
