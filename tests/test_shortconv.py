"""ShortConv (mixers/shortconv.py): the depthwise causal conv against a float64 loop reference
of y_t = phi(sum_{i<k} w_i ⊙ x_{t-i} + b), its place on q/k/v, options, and cached decoding."""
import pytest
import torch

from resstream.cache import ForwardContext, ModelCache
from resstream.errors import UserError
from resstream.mixers.shortconv import CausalDepthwiseConv
from resstream.model import ResStreamLM
from resstream.testing import copy_shared_weights, perturb_parameters, tiny_config


def reference_conv(x, taps, bias=None, activation="none", residual=False):
    """Plain loops over the formula, float64. x [B, T, C], taps [k, C] with taps[i] for lag i."""
    x, taps = x.double(), taps.double()
    batch, length, channels = x.shape
    y = torch.zeros_like(x)
    for t in range(length):
        for i in range(taps.shape[0]):
            if t - i >= 0:
                y[:, t] += taps[i] * x[:, t - i]
        if bias is not None:
            y[:, t] += bias.double()
    if activation == "silu":
        y = y * torch.sigmoid(y)
    return x + y if residual else y


def decode_in_chunks(model, ids, chunk_sizes):
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    outputs, start, i = [], 0, 0
    while start < ids.shape[1]:
        size = chunk_sizes[i % len(chunk_sizes)]
        outputs.append(model(ids[:, start:start + size], cache=cache))
        start, i = start + size, i + 1
    return torch.cat(outputs, dim=1)


def module_context(module, batch_size, cache_length=0):
    module.cache_key = "conv"
    entry = module.new_cache_entry(batch_size, 64, torch.device("cpu"), torch.float64)
    return ModelCache({"conv": entry}, batch_size, 64, length=cache_length)


@pytest.mark.parametrize("activation,bias,kernel", [("silu", False, 4), ("none", True, 4), ("silu", True, 2),
                                                    ("none", False, 1)])
def test_conv_matches_loop_reference(activation, bias, kernel):
    torch.manual_seed(0)
    conv = CausalDepthwiseConv(6, kernel, bias, activation).double()
    with torch.no_grad():
        conv.weight.normal_()
        if bias:
            conv.bias.normal_()
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    expected = reference_conv(x, conv.weight, conv.bias, activation)
    torch.testing.assert_close(conv(x), expected)


@pytest.mark.parametrize("chunks", [[1], [2], [3], [7], [1, 5, 2]])
def test_conv_chunked_with_history_per_stream(chunks):
    """Three streams (the attention-input slot's q/k/v views) fed interleaved, chunk by chunk,
    each continue their own history and equal the full conv of their own sequence."""
    torch.manual_seed(1)
    conv = CausalDepthwiseConv(5, 4, True, "silu", streams=3).double()
    xs = [torch.randn(2, 13, 5, dtype=torch.float64) for _ in range(3)]
    cache = module_context(conv, 2)
    pieces = [[], [], []]
    start, i = 0, 0
    while start < 13:
        size = chunks[i % len(chunks)]
        ctx = ForwardContext(torch.arange(start, min(start + size, 13)), cache)
        for stream, x in enumerate(xs):
            pieces[stream].append(conv(x[:, start:start + size], ctx, stream=stream))
        cache.length += min(size, 13 - start)
        start, i = start + size, i + 1
    for stream, x in enumerate(xs):
        torch.testing.assert_close(torch.cat(pieces[stream], dim=1), conv(x))


def test_shortconv_sits_on_qkv_before_rope():
    config = tiny_config(local_mixer="shortconv")
    model = ResStreamLM(config)
    attn = model.blocks[0].attn
    assert attn.qkv_mixer is not None and attn.input_mixer is None
    assert attn.qkv_mixer.channels == (config.n_heads + 2 * config.kv_heads) * config.head_dim
    assert model.blocks[0].mlp.input_mixer is None and model.blocks[0].mlp.hidden_mixer is None


def test_attention_projection_uses_conv_of_qkv():
    """Attention._project returns RoPE(phi(conv([q;k;v]))) split back into q, k, v."""
    torch.manual_seed(3)
    model = ResStreamLM(tiny_config(local_mixer="shortconv")).double()
    attn = model.blocks[1].attn
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    ctx = ForwardContext(torch.arange(7))
    q, k, v = attn._project(x, ctx)
    qkv = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=-1)
    mixed = reference_conv(qkv, attn.qkv_mixer.weight.detach(), activation="silu")
    d_q, d_kv = attn.n_heads * attn.head_dim, attn.n_kv_heads * attn.head_dim
    heads = lambda t, n: t.reshape(2, 7, n, attn.head_dim).transpose(1, 2)
    cos, sin = attn.rope.cos_sin(ctx.positions, torch.float64)
    rope = lambda t: t * cos + torch.cat([-t[..., t.shape[-1] // 2:], t[..., :t.shape[-1] // 2]], -1) * sin
    torch.testing.assert_close(q, rope(heads(mixed[..., :d_q], attn.n_heads)))
    torch.testing.assert_close(k, rope(heads(mixed[..., d_q:d_q + d_kv], attn.n_kv_heads)))
    torch.testing.assert_close(v, heads(mixed[..., d_q + d_kv:], attn.n_kv_heads))


def test_identity_init_without_activation_is_the_baseline():
    torch.manual_seed(4)
    model = ResStreamLM(tiny_config(local_mixer="shortconv",
                                    mixer_options={"init": "identity", "activation": "none"})).double()
    plain = ResStreamLM(tiny_config()).double()
    copy_shared_weights(model, plain)
    ids = torch.randint(0, 64, (2, 10))
    torch.testing.assert_close(model(ids), plain(ids))


def test_conv_weights_matter():
    torch.manual_seed(5)
    model = ResStreamLM(tiny_config(local_mixer="shortconv")).double()
    perturb_parameters(model)
    ids = torch.randint(0, 64, (2, 10))
    before = model(ids)
    for block in model.blocks:
        with torch.no_grad():
            block.attn.qkv_mixer.weight[1:] += 0.1  # the lags, not just the current token
        after = model(ids)
        assert (after - before).abs().max() > 1e-6
        before = after


@pytest.mark.parametrize("chunks", [[1], [2], [3], [7]])
@pytest.mark.parametrize("options", [{}, {"activation": "none", "bias": True, "kernel": 3}])
def test_cached_chunked_decoding_equals_full_forward(chunks, options):
    torch.manual_seed(6)
    model = ResStreamLM(tiny_config(local_mixer="shortconv", mixer_options=options)).double()
    perturb_parameters(model)
    ids = torch.randint(0, 64, (2, 15))
    torch.testing.assert_close(decode_in_chunks(model, ids, chunks), model(ids))


@pytest.mark.parametrize("options,field", [({"kernel": 0}, "kernel"), ({"activation": "relu"}, "activation"),
                                           ({"init": "small"}, "init"), ({"kernel": "four"}, "kernel"),
                                           ({"placements": "AB"}, "placements")])
def test_options_validated(options, field):
    with pytest.raises(UserError, match=field) as error:
        tiny_config(local_mixer="shortconv", mixer_options=options)
    assert "\n" not in str(error.value)
