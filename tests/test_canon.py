"""Canon layers (mixers/canon.py): h + sum_{i<k} w_i ⊙ h_{t-i} against a float64 loop reference,
the A/B/C/D placements (each built where it belongs and each changing the output), the exact
baseline at zero init, options, and cached chunked decoding."""
import math

import pytest
import torch
import torch.nn as nn

from resstream.cache import ForwardContext
from resstream.depth.base import QKVViews
from resstream.errors import UserError
from resstream.mixers.canon import Canon
from resstream.mixers.shortconv import CausalDepthwiseConv
from resstream.model import ResStreamLM
from resstream.testing import copy_shared_weights, perturb_parameters, tiny_config

SLOT_OF = {"A": ("attn", "input_mixer"), "B": ("attn", "qkv_mixer"), "C": ("mlp", "input_mixer"),
           "D": ("mlp", "hidden_mixer")}


def canon_reference(h, taps):
    """h_t + sum_{i<k, t-i>=0} taps[i] ⊙ h_{t-i}, float64, plain loops. h [B, T, C], taps [k, C]."""
    h, taps = h.double(), taps.double()
    out = h.clone()
    for t in range(h.shape[1]):
        for i in range(taps.shape[0]):
            if t - i >= 0:
                out[:, t] += taps[i] * h[:, t - i]
    return out


def slot_module(block, letter):
    owner, attr = SLOT_OF[letter]
    return getattr(getattr(block, owner), attr)


def canon_model(placements="ABCD", **options):
    torch.manual_seed(0)
    model = ResStreamLM(tiny_config(local_mixer="canon",
                                    mixer_options={"placements": placements, **options})).double()
    perturb_parameters(model, scale=0.05)
    return model


@pytest.mark.parametrize("placements", ["ABCD", "AC", "D", "BA"])
def test_placements_build_exactly_their_slots(placements):
    config = tiny_config(local_mixer="canon", mixer_options={"placements": placements})
    block = ResStreamLM(config).blocks[1]
    widths = {"A": config.d_model, "B": (config.n_heads + 2 * config.kv_heads) * config.head_dim,
              "C": config.d_model, "D": 2 * config.ffn_hidden}
    for letter in "ABCD":
        module = slot_module(block, letter)
        assert (module is not None) == (letter in placements)
        if module is not None:
            assert module.channels == widths[letter] and module.residual
            assert module.streams == (3 if letter == "A" else 1)


@pytest.mark.parametrize("letter", list("ABCD"))
def test_each_placement_matches_reference_and_changes_the_output(letter):
    model = canon_model()
    module = slot_module(model.blocks[1], letter)
    h = torch.randn(2, 8, module.channels, dtype=torch.float64)
    torch.testing.assert_close(module(h), canon_reference(h, module.weight.detach()))
    ids = torch.randint(0, 64, (2, 10))
    before = model(ids)
    with torch.no_grad():
        module.weight[2] += 0.2  # a lag-2 tap: only reachable by mixing over tokens
    after = model(ids)
    assert (after - before).abs().max() > 1e-6
    assert torch.equal(after[:, :2], before[:, :2])  # causal: tokens 0, 1 have no lag-2 input


def test_zero_init_is_exactly_the_baseline():
    torch.manual_seed(1)
    model = ResStreamLM(tiny_config(local_mixer="canon", mixer_options={"init": "zero"})).double()
    plain = ResStreamLM(tiny_config()).double()
    copy_shared_weights(model, plain)
    ids = torch.randint(0, 64, (2, 10))
    torch.testing.assert_close(model(ids), plain(ids))


@pytest.mark.parametrize("kernel,bias", [(4, False), (3, True)])
def test_default_init_is_nn_conv1d_reset_parameters(kernel, bias):
    """The released code resets every Canon conv with nn.Conv1d.reset_parameters: on one seed
    the default taps (and bias) are exactly those of a depthwise nn.Conv1d."""
    init = Canon.Options().init
    torch.manual_seed(3)
    ours = CausalDepthwiseConv(24, kernel, bias, "none", residual=True, init=init)
    torch.manual_seed(3)
    torch_conv = nn.Conv1d(24, 24, kernel, groups=24, bias=bias)
    torch.testing.assert_close(ours._conv_weight(), torch_conv.weight, rtol=0, atol=0)
    if bias:
        torch.testing.assert_close(ours.bias, torch_conv.bias, rtol=0, atol=0)


def test_default_init_spans_the_conv1d_bounds():
    model = ResStreamLM(tiny_config(local_mixer="canon", mixer_options={"kernel": 4}))
    taps = torch.cat([slot_module(model.blocks[0], letter).weight.flatten() for letter in "ABCD"])
    bound = 1 / math.sqrt(4)  # fan_in = k for a depthwise conv
    assert taps.abs().max() <= bound and taps.abs().max() > 0.9 * bound


def test_small_init_option_draws_normal_taps():
    model = ResStreamLM(tiny_config(local_mixer="canon", mixer_options={"init": "small"}))
    taps = torch.cat([slot_module(model.blocks[0], letter).weight.flatten() for letter in "ABCD"])
    assert 0 < taps.abs().max() < 0.2 and abs(taps.std().item() - 0.02) < 0.003  # N(0, init_std)


def test_attention_input_views_keep_separate_histories():
    """A depth operator giving attention separate q/k/v inputs: each view gets its own conv
    history, so chunked decoding of the three views equals their full convs."""
    model = canon_model("A")
    attn = model.blocks[0].attn
    views = QKVViews(*(torch.randn(1, 9, 32, dtype=torch.float64) for _ in range(3)))
    full = attn._inputs(views, ForwardContext(torch.arange(9)))
    cache = model.new_cache(1, 9)
    pieces = []
    for start in range(0, 9, 2):
        ctx = ForwardContext(torch.arange(start, min(start + 2, 9)), cache)
        pieces.append(attn._inputs(QKVViews(*(v[:, start:start + 2] for v in views)), ctx))
        cache.length = min(start + 2, 9)
    for i in range(3):
        torch.testing.assert_close(torch.cat([p[i] for p in pieces], dim=1), full[i])
        torch.testing.assert_close(full[i], canon_reference(views[i], attn.input_mixer.weight.detach()))


@pytest.mark.parametrize("chunks", [[1], [2], [3], [7], [2, 1, 5]])
def test_cached_chunked_decoding_equals_full_forward(chunks):
    model = canon_model("ABCD", activation="silu", bias=True)
    ids = torch.randint(0, 64, (2, 15))
    cache = model.new_cache(2, 15)
    outputs, start, i = [], 0, 0
    while start < 15:
        size = chunks[i % len(chunks)]
        outputs.append(model(ids[:, start:start + size], cache=cache))
        start, i = start + size, i + 1
    torch.testing.assert_close(torch.cat(outputs, dim=1), model(ids))


def test_decode_state_is_k_minus_1_inputs_per_placement():
    config = tiny_config(local_mixer="canon", mixer_options={"kernel": 3})
    cache = ResStreamLM(config).new_cache(2, 16)
    conv_values = sum(e.history.numel() for e in cache.entries.values() if hasattr(e, "history"))
    width = 3 * config.d_model + (config.n_heads + 2 * config.kv_heads) * config.head_dim \
        + config.d_model + 2 * config.ffn_hidden
    assert conv_values == config.n_layers * 2 * (3 - 1) * width


@pytest.mark.parametrize("placements", ["", "AE", "AA", "abcd", "ABCDA"])
def test_placements_validated(placements):
    with pytest.raises(UserError, match="placements") as error:
        tiny_config(local_mixer="canon", mixer_options={"placements": placements})
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("options,field", [({"kernel": 0}, "kernel"), ({"activation": "gelu"}, "activation"),
                                           ({"init": "identity"}, "init"), ({"residual": "yes"}, "residual")])
def test_options_validated(options, field):
    with pytest.raises(UserError, match=field):
        tiny_config(local_mixer="canon", mixer_options=options)
