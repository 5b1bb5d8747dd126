"""depth_swa: the depth-wise ShortSWA read of arXiv 2603.16039 §2.2."""
import math

import pytest
import torch
from reference import head, multihead, norm_weight, rmsnorm, site_kinds, sublayer

from resstream import ResStreamLM
from resstream.depth.depth_swa import DepthState
from resstream.errors import UserError
from resstream.testing import baseline_twin, perturb_parameters, tiny_config


def depth_read_reference(states: list, h, w: dict, prefix: str, heads: int, window, eps):
    """z = softmax(q K^T / sqrt(d_k)) V over the last K (normalised) states, for one sequence."""
    win = states if window is None else states[-window:]
    normed = [rmsnorm(s, w["depth.state_norm.weight"], eps) for s in win]
    t, d = h.shape
    hd = d // heads
    q = (rmsnorm(h, w["depth.state_norm.weight"], eps) @ w[f"{prefix}.q_proj.weight"].T).view(t, heads, hd)
    keys = torch.stack([(s @ w[f"{prefix}.k_proj.weight"].T).view(t, heads, hd) for s in normed], 2)
    values = torch.stack([(s @ w[f"{prefix}.v_proj.weight"].T).view(t, heads, hd) for s in normed], 2)
    scores = torch.einsum("thd,thkd->thk", q, keys) / math.sqrt(hd)
    z = torch.einsum("thk,thkd->thd", torch.softmax(scores, -1), values).reshape(t, d)
    return z @ w[f"{prefix}.o_proj.weight"].T


def depth_swa_logits(model, ids, mode="add"):
    config = model.config
    w = {k: v.double() for k, v in model.state_dict().items()}
    shared = config.depth_options.get("shared", True)
    out = []
    for row in ids:
        h = w["embed.weight"][row]
        states = []
        for layer in range(config.n_layers):
            states.append(h)
            prefix = "depth.attention.0" if shared else f"depth.attention.{layer}"
            update = depth_read_reference(states, h, w, prefix, config.n_heads, config.depth_window,
                                          config.norm_eps)
            h = h + update if mode == "add" else update
            for kind in site_kinds(config):
                x = rmsnorm(h, norm_weight(w, layer, kind), config.norm_eps)
                h = h + sublayer(kind, layer, x, w, config)
        out.append(head(h, w, config))
    return torch.stack(out)


@pytest.mark.parametrize("window", [None, 1, 2])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("mixer", [None, "shortswa"])
def test_matches_float64_reference(window, shared, mixer):
    config = tiny_config(depth="depth_swa", depth_window=window, depth_options={"shared": shared},
                         local_mixer=mixer, n_kv_heads=None)
    model = ResStreamLM(config).double()
    perturb_parameters(model, scale=0.1)
    ids = torch.randint(0, config.vocab_size, (2, 7))
    torch.testing.assert_close(model(ids), depth_swa_logits(model, ids), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("options", [{}, {"shared": False}, {"granularity": "sublayer"}, {"heads": 2}])
@pytest.mark.parametrize("window", [None, 1, 3])
def test_add_mode_starts_at_the_standard_model(options, window):
    model = ResStreamLM(tiny_config(depth="depth_swa", depth_window=window, depth_options=options,
                                    local_mixer="shortswa"))
    twin = baseline_twin(model)
    ids = torch.randint(0, 64, (2, 9))
    torch.testing.assert_close(model(ids), twin(ids), rtol=0, atol=1e-5)


def test_replace_mode_with_window_one_reduces_to_projected_state():
    """K = 1: softmax over one state is 1, so the block input is W_O W_V N(h^(l))."""
    config = tiny_config(depth="depth_swa", depth_window=1, depth_options={"mode": "replace"})
    model = ResStreamLM(config).double()
    perturb_parameters(model, scale=0.1)
    w = {k: v.double() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 64, (2, 6))
    expected = []
    for row in ids:
        h = w["embed.weight"][row]
        for layer in range(config.n_layers):
            normed = rmsnorm(h, w["depth.state_norm.weight"], config.norm_eps)
            h = normed @ w["depth.attention.0.v_proj.weight"].T @ w["depth.attention.0.o_proj.weight"].T
            for kind in site_kinds(config):
                h = h + sublayer(kind, layer, rmsnorm(h, norm_weight(w, layer, kind), config.norm_eps), w, config)
        expected.append(head(h, w, config))
    torch.testing.assert_close(model(ids), torch.stack(expected), rtol=1e-9, atol=1e-9)


def test_replace_mode_at_init_reads_the_normalised_state():
    model = ResStreamLM(tiny_config(depth="depth_swa", depth_window=1, depth_options={"mode": "replace"}))
    state = DepthState(torch.randn(2, 5, 32))
    z = model.depth.read_step(state)
    torch.testing.assert_close(model.depth.attention[0].o_proj(z), model.depth.state_norm(state.h))


@pytest.mark.parametrize("window", [2, 3])
def test_states_outside_the_window_do_not_change_the_read(window):
    model = ResStreamLM(tiny_config(depth="depth_swa", depth_window=window)).double()
    perturb_parameters(model, scale=0.1)
    states = [torch.randn(1, 4, 32, dtype=torch.float64) for _ in range(6)]

    def last_read(sequence):
        state = DepthState(sequence[0])
        for h in sequence:
            state.h = h
            z = model.depth.read_step(state)
        return z

    base = last_read(states)
    outside = list(states)
    outside[len(states) - window - 1] = outside[len(states) - window - 1] + 5.0
    inside = list(states)
    inside[len(states) - window] = inside[len(states) - window] + 5.0
    assert torch.equal(last_read(outside), base)
    assert not torch.allclose(last_read(inside), base)


def test_invalid_options():
    with pytest.raises(UserError, match="mode"):
        tiny_config(depth="depth_swa", depth_options={"mode": "sideways"})
    with pytest.raises(UserError, match="depth_window"):
        tiny_config(depth="depth_swa", depth_window=0)
    with pytest.raises(UserError, match="unknown option"):
        tiny_config(depth="depth_swa", depth_options={"windw": 2})
    with pytest.raises(UserError, match="depth_window"):
        tiny_config(depth="standard", depth_window=2)
