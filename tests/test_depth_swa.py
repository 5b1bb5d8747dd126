"""depth_swa: the depth-wise ShortSWA read of arXiv 2603.16039 §2.2."""
import math

import pytest
import torch
from reference import head, multihead, norm_weight, rmsnorm, site_kinds, sublayer

from resstream import ResStreamLM
from resstream.cache import ForwardContext
from resstream.depth.depth_swa import DecodeState, DepthState
from resstream.errors import UserError
from resstream.testing import baseline_twin, cached_logits, perturb_parameters, tiny_config


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


# ------------------------------------------------------------------ decode steps (the lean path)
DECODE_OPTIONS = [{}, {"mode": "replace"}, {"granularity": "sublayer"}, {"heads": 2},
                  {"norm_states": False}, {"shared": False}]


def decode_model(window, options, dtype=torch.float64, **changes):
    config = tiny_config(depth="depth_swa", depth_window=window, depth_options=options, **changes)
    model = ResStreamLM(config).to(dtype).eval()
    perturb_parameters(model, scale=0.1)
    return model


@pytest.mark.parametrize("options", DECODE_OPTIONS)
@pytest.mark.parametrize("window", [None, 1, 2, 5])
def test_incremental_decoding_matches_full_forward(window, options):
    """Prefill takes the general path, the one-token steps the lean decode path (shared module;
    one module per read keeps the general path)."""
    model = decode_model(window, options)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
    torch.testing.assert_close(cached_logits(model, ids, prefill=3), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("window", [None, 2])
def test_incremental_decoding_with_inactive_layers(window):
    model = decode_model(window, {}, depth_layers=[0, 2], local_mixer="shortswa")
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids)
    torch.testing.assert_close(cached_logits(model, ids, prefill=2), full, rtol=1e-10, atol=1e-10)


def test_only_cached_decode_steps_take_the_lean_path():
    model = decode_model(None, {}, dtype=torch.float32)
    states = []
    init_state = model.depth.init_state
    model.depth.init_state = lambda x0, ctx: states.append(init_state(x0, ctx)) or states[-1]
    ids = torch.randint(0, 64, (2, 6))
    cached_logits(model, ids, prefill=3)  # prefill, then 3 decode steps
    with torch.no_grad():
        model(ids[:, :1])  # one token without a cache
    model(ids[:, :1], cache=model.new_cache(2))  # one token with autograd on
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ctx = ForwardContext(torch.arange(1), model.new_cache(2))
        model.depth.init_state(model.embed(ids[:, :1]), ctx)
    assert [type(s) for s in states] == [DepthState] + [DecodeState] * 3 + [DepthState] * 3


def test_decode_record_matches_the_full_forward():
    model = decode_model(2, {})
    ids = torch.randint(0, 64, (1, 4))
    model.depth.record = []
    with torch.no_grad():
        model(ids)
        full = [z[:, -1:] for _, z in model.depth.record]
        model.depth.record = []
        cached_logits(model, ids, prefill=3)
    decoded = [z for _, z in model.depth.record[-len(full):]]
    model.depth.record = None
    for z, expected in zip(decoded, full, strict=True):
        torch.testing.assert_close(z, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("options", [{}, {"shared": False}, {"granularity": "sublayer"}])
@pytest.mark.parametrize("window", [None, 2, 9])
def test_depth_state_formula_matches_the_measured_decode_state(window, options):
    from resstream.bench.decode import depth_state_bytes_per_token

    model = decode_model(window, options, dtype=torch.float32)
    measured = depth_state_bytes_per_token(model, torch.device("cpu"))
    assert measured == model.depth.depth_state_vectors() * model.config.d_model * 4
    per_state = 3 if options.get("shared", True) else 1  # q, k, v in a slot, or the normed state
    n_states = min(window or 99, len(model.depth.reads))
    assert model.depth.depth_state_vectors() == per_state * n_states + 1
    assert model.new_cache(1).entries["depth"].tensors() == []  # the workspace is no KV cache
