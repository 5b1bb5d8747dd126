"""LAuReL (every variant, both granularities) against a float64 reference written from the
paper's equations (2)-(6): a plain loop over units with the list of stream states, weights read
from the state_dict by name, sublayers from tests/reference.py. Also: the init (the standard
model where the variant starts there, the paper's A pattern otherwise), gradients through the
reference, `depth_layers`, the declared state and payload, and option validation. Decode parity,
gradients to every parameter, weight decay and the operators table are checked for every
registered operator elsewhere."""
from __future__ import annotations

import math

import pytest
import torch
from reference import head, norm_weight, rmsnorm, sublayer

from resstream.depth.laurel import VARIANTS
from resstream.errors import UserError
from resstream.testing import baseline_twin, reference_model, sample_ids, tiny_config

TIGHT = dict(rtol=1e-9, atol=1e-9)


def build(options=None, mixer=None, dtype=torch.float64, perturb=True, **changes):
    return reference_model("laurel", {"rank": 4, **(options or {})}, mixer, dtype, perturb,
                           **changes)


ids_for = sample_ids


def laurel_reference(model, ids):
    """x_{u+1} = alpha f(x_u) + beta (x_u + [B A x_u] + [sum_j gamma_j h_j(x_{u-j})]), per variant."""
    w = {k: v.double() for k, v in model.state_dict(keep_vars=True).items()}
    config, opts = model.config, {"variant": "rw_lr", "rw_weights": "softmax", "k": 3,
                                  "granularity": "sublayer", **model.config.depth_options}
    parts = opts["variant"].split("_")
    active = set(range(config.n_layers) if config.depth_layers is None else config.depth_layers)
    kinds = list(model.blocks[0].site_kinds)
    per_block = opts["granularity"] == "block"
    # units: (index, block, the kinds of the sublayers it runs)
    units = ([(layer, layer, kinds) for layer in range(config.n_layers)] if per_block else
             [(layer * len(kinds) + i, layer, [kind]) for layer in range(config.n_layers)
              for i, kind in enumerate(kinds)])

    def f(layer, unit_kinds, x):
        delta = torch.zeros_like(x)
        for kind in unit_kinds:
            normed = rmsnorm(x + delta, norm_weight(w, layer, kind), config.norm_eps)
            delta = delta + sublayer(kind, layer, normed, w, config)
        return delta

    def low_rank(p, j, x):
        return x @ w[f"{p}.down"][j].T @ w[f"{p}.up"][j].T  # B_j A_j x

    def forward(emb):
        states = [emb]  # x_0, x_1, ... (oldest first)
        for u, layer, unit_kinds in units:
            x = states[-1]
            fx = f(layer, unit_kinds, x)
            if layer not in active:
                states.append(x + fx)
                continue
            p = f"depth.units.{u}"
            g = x
            if "pa" in parts:
                for j in range(min(opts["k"], u + 1)):
                    h = low_rank(p, j, states[u - j]) if "lr" in parts else states[u - j]
                    g = g + w[f"{p}.gamma"][j] * h
            elif "lr" in parts:
                g = g + low_rank(p, 0, x)
            alpha = beta = 1.0
            if "rw" in parts:
                logits = w[f"{p}.rw"]
                alpha, beta = {"softmax": torch.softmax(logits, -1), "sigmoid": torch.sigmoid(logits),
                               "none": logits}[opts["rw_weights"]]
            states.append(alpha * fx + beta * g)
        return states[-1]

    return torch.stack([head(forward(w["embed.weight"][row]), w, config) for row in ids])


CASES = ([{"variant": v} for v in VARIANTS]
         + [{"variant": "rw_lr_pa", "granularity": "block", "k": 2},
            {"variant": "rw_pa", "rw_weights": "sigmoid", "k": 5},
            {"variant": "rw", "rw_weights": "none"}, {"variant": "lr_pa", "k": 1}])


@pytest.mark.parametrize("mixer", [None, "shortswa"])
@pytest.mark.parametrize("options", CASES, ids=str)
def test_matches_float64_reference(options, mixer):
    model = build(options, mixer)
    ids = ids_for(model)
    torch.testing.assert_close(model(ids), laurel_reference(model, ids), **TIGHT)


@pytest.mark.parametrize("options", [{"variant": "rw_lr_pa"}, {"variant": "pa", "granularity": "block"}],
                         ids=str)
def test_depth_layers_and_gradients_match_reference(options):
    model = build(options, "shortswa", n_layers=4, depth_layers=[0, 3])
    ids = ids_for(model)
    torch.testing.assert_close(model(ids), laurel_reference(model, ids), **TIGHT)
    probe = torch.randn(1, ids.shape[1], model.config.vocab_size, dtype=torch.float64)
    params = list(model.parameters())
    got = torch.autograd.grad((model(ids[:1]) * probe).sum(), params)
    want = torch.autograd.grad((laurel_reference(model, ids[:1]) * probe).sum(), params)
    for (name, _), g, expected in zip(model.named_parameters(), got, want):
        torch.testing.assert_close(g, expected, **TIGHT, msg=lambda m, name=name: f"{name}: {m}")


BASELINE_CASES = [o for o in CASES if o.get("rw_weights") == "none" or "rw" not in o["variant"]]


@pytest.mark.parametrize("mixer", [None, "shortswa"])
@pytest.mark.parametrize("options", BASELINE_CASES, ids=str)
def test_starts_exactly_at_the_standard_model(options, mixer):
    model = build(options, mixer, dtype=torch.float32, perturb=False)
    assert model.depth.starts_at_baseline
    ids = ids_for(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), baseline_twin(model)(ids), rtol=0, atol=1e-6)


@pytest.mark.parametrize("rw_weights", ["softmax", "sigmoid"])
def test_normalised_residual_weights_start_at_one_half(rw_weights):
    """The paper's normalised alpha, beta: the model does not start at the standard one."""
    model = build({"variant": "rw", "rw_weights": rw_weights}, perturb=False)
    assert not model.depth.starts_at_baseline
    assert all(torch.equal(unit.rw, torch.zeros(2)) for unit in model.depth.units.values())
    ids = ids_for(model)
    with torch.no_grad():
        assert (model(ids) - baseline_twin(model)(ids)).abs().max() > 1e-3


def test_init_of_the_low_rank_maps_and_gammas():
    model = build({"variant": "lr_pa", "rank": 4, "k": 3}, dtype=torch.float32, perturb=False)
    unit = model.depth.units["4"]
    assert unit.down.shape == (3, 4, 32) and unit.up.shape == (3, 32, 4) and unit.gamma.shape == (3,)
    expected = torch.zeros(4, 32)
    for i in range(32):  # A[j, i] = 1/sqrt(r d) where i mod r = j (the paper's LLM init)
        expected[i % 4, i] = 1 / math.sqrt(4 * 32)
    assert all(torch.equal(a, expected) for a in unit.down)
    assert not unit.up.any() and torch.equal(unit.gamma, torch.ones(3))
    assert model.depth.units["0"].gamma.numel() == 1  # unit 0 reads x_0 only
    pa = build({"variant": "pa"}, perturb=False)
    assert not pa.depth.units["5"].gamma.any() and not hasattr(pa.depth.units["5"], "down")


@pytest.mark.parametrize("options, vectors, payloads", [
    ({"variant": "rw_lr"}, 1, [1, 1]),
    ({"variant": "pa", "k": 4}, 4, [3, 4]),  # after block 0: x_0, x_1, x_2; then 4 of them
    ({"variant": "pa", "k": 4, "granularity": "block"}, 4, [2, 3]),  # 3 in the last block + f
    ({"variant": "lr", "granularity": "block"}, 2, [1, 1]),
])
def test_declared_state_and_pipeline_payload(options, vectors, payloads):
    model = build(options, perturb=False)
    assert model.depth.depth_state_vectors() == vectors
    assert [model.depth.pipeline_payload(layer)[1] for layer in (0, 1)] == payloads
    state = model.depth.init_state(torch.zeros(1, 2, 32, dtype=torch.float64), None)
    for site in model.sites[:len(model.blocks[0].site_kinds)]:
        model.depth.read(state, site, lambda x: x, None)
        state = model.depth.write(state, site, torch.ones(1, 2, 32, dtype=torch.float64), None)
    assert len(model.depth.stage_state(state, 0)) == payloads[0]


@pytest.mark.parametrize("options, match", [
    ({"variant": "rw+lr"}, "depth_options.variant='rw\\+lr' is invalid; allowed: rw, lr, pa"),
    ({"rw_weights": "tanh"}, "depth_options.rw_weights='tanh' is invalid; allowed: softmax"),
    ({"rank": 0}, "depth_options.rank=0 is invalid"),
    ({"rank": 33}, "in \\[1, d_model=32\\]"),
    ({"k": 0}, "depth_options.k=0 is invalid"),
    ({"granularity": "layer"}, "depth_options.granularity='layer' is invalid; allowed: sublayer, block"),
])
def test_bad_options_are_one_line_errors(options, match):
    with pytest.raises(UserError, match=match) as error:
        tiny_config(depth="laurel", depth_options=options)
    assert isinstance(error.value, ValueError) and "\n" not in str(error.value)
