"""DDL's token-mixing parts (the paper's equations; docs/design.md, decision 4): the TC compressor and the EC embedding
expander, against float64 loop references of their convs and of the whole model, their initial
values, their decode caches (cached chunked decoding equals the full forward) and their options."""
import pytest
import torch
from reference import head, norm_weight, rmsnorm, site_kinds, sublayer

from resstream import ResStreamLM
from resstream.depth.ddl import ConvExpander, TokenConvCompressor
from resstream.errors import UserError
from resstream.testing import (assert_each_parameter_changes_output, copy_shared_weights,
                               perturb_parameters, tiny_config)

K = 4  # token_kernel default


def tc_reference(X, taps, read):
    """x_in[t, i] = sum_j r_j sum_{m<k, t-m>=0} w_m[i, j] X[t-m, i, j]; X [B, T, d, d_v],
    taps [k, d, d_v], read [d_v]. Plain loops over t and m, float64."""
    X, taps, read = X.double(), taps.double(), read.double()
    out = torch.zeros(X.shape[:3], dtype=torch.float64)
    for t in range(X.shape[1]):
        for m in range(taps.shape[0]):
            if t - m >= 0:
                out[:, t] += (taps[m] * X[:, t - m] * read).sum(-1)
    return out


def ec_reference(x, taps):
    """X_0[t, i, j] = sum_{m<k, t-m>=0} e_m[i, j] x[t-m, i]; x [B, T, d], taps [k, d, d_v]."""
    x, taps = x.double(), taps.double()
    out = torch.zeros(*x.shape, taps.shape[-1], dtype=torch.float64)
    for t in range(x.shape[1]):
        for m in range(taps.shape[0]):
            if t - m >= 0:
                out[:, t] += taps[m] * x[:, t - m, :, None]
    return out


def ddl_token_mixing_logits(model, ids):
    """The DDL model with TC / EC, one sequence at a time, from the equations (float64)."""
    config, opts = model.config, model.depth.options
    dv, d = opts.value_dim, config.d_model
    w = {k: v.double() for k, v in model.state_dict().items()}

    def compress(X, key):
        if opts.compressor == "tc":
            taps = w[f"depth.compressors.{key}.conv.weight"].view(-1, d, dv)
            return tc_reference(X[None], taps, w[f"depth.compressors.{key}.read"])[0]
        if dv == 1:
            return X[..., 0]
        return (X * w[f"depth.compressors.{key}.weight"]).sum(-1)

    out = []
    for row in ids:
        emb = w["embed.weight"][row]
        if opts.expander == "ec":
            X = ec_reference(emb[None], w["depth.expander.conv.weight"].view(-1, d, dv))[0]
        else:
            X = emb[..., None].repeat(1, 1, dv)
        index = 0
        for layer in range(config.n_layers):
            for kind in site_kinds(config):
                x_in = compress(X, index)
                c = rmsnorm(x_in, norm_weight(w, layer, kind), config.norm_eps)
                h = sublayer(kind, layer, c, w, config)
                k = h / torch.sqrt((h * h).sum(-1, keepdim=True) + 1e-10)
                g = f"depth.gates.{index}.out"
                beta = 2 * torch.sigmoid(c @ w[f"{g}.weight"].T + w[f"{g}.bias"])
                v = c @ w[f"depth.values.{index}.weight"].T + w[f"depth.values.{index}.bias"]
                readout = torch.einsum("td,tdv->tv", k, X)
                X = X + beta[..., None] * k[..., None] * (v - readout)[:, None, :]
                index += 1
        out.append(head(compress(X, "final"), w, config))
    return torch.stack(out)


def ddl_model(**options):
    torch.manual_seed(0)
    model = ResStreamLM(tiny_config(depth="ddl", depth_options=options)).double()
    perturb_parameters(model, scale=0.1)
    return model


def test_tc_compressor_matches_loop_reference():
    torch.manual_seed(1)
    tc = TokenConvCompressor(5, 3, K, "mean").double()
    with torch.no_grad():
        tc.conv.weight.normal_()
        tc.read.normal_()
    X = torch.randn(2, 9, 5, 3, dtype=torch.float64)
    expected = tc_reference(X, tc.conv.weight.detach().view(K, 5, 3), tc.read.detach())
    torch.testing.assert_close(tc(X), expected)


def test_ec_expander_matches_loop_reference():
    torch.manual_seed(2)
    ec = ConvExpander(5, 3, K).double()
    x = torch.randn(2, 9, 5, dtype=torch.float64)
    torch.testing.assert_close(ec(x), x[..., None].expand(2, 9, 5, 3))  # identity init: copies
    with torch.no_grad():
        ec.conv.weight.normal_()
    torch.testing.assert_close(ec(x), ec_reference(x, ec.conv.weight.detach().view(K, 5, 3)))


@pytest.mark.parametrize("options", [
    {"value_dim": 4, "compressor": "tc", "expander": "ec"},
    {"value_dim": 1, "compressor": "tc"},
    {"value_dim": 3, "expander": "ec"},
    {"value_dim": 2, "compressor": "tc", "token_kernel": 2, "compressor_init": "average"},
])
def test_model_matches_float64_reference(options):
    model = ddl_model(**options)
    ids = torch.randint(0, 64, (2, 7))
    torch.testing.assert_close(model(ids), ddl_token_mixing_logits(model, ids), rtol=1e-9, atol=1e-9)


def test_initial_values():
    """TC (mean init) starts equal to the default CC compressor, EC equals plain repetition, and
    the "average" TC init averages the last k tokens (what `compressor_init="code"` did: it is
    no longer accepted, as it was not the released code's init)."""
    torch.manual_seed(3)
    ids = torch.randint(0, 64, (2, 9))
    plain = ResStreamLM(tiny_config(depth="ddl", depth_options={"value_dim": 4})).double()
    for options in ({"compressor": "tc"}, {"expander": "ec"}, {"compressor": "tc", "expander": "ec"}):
        mixed = ResStreamLM(tiny_config(depth="ddl", depth_options={"value_dim": 4, **options})).double()
        copy_shared_weights(plain, mixed)
        torch.testing.assert_close(mixed(ids), plain(ids))
    average = TokenConvCompressor(3, 2, K, "average")
    assert torch.equal(average.conv.weight, torch.full((K, 6), 1 / K))
    assert torch.equal(average.read, torch.full((2,), 0.5))
    options = {"value_dim": 2, "compressor": "tc", "compressor_init": "average"}
    model = ResStreamLM(tiny_config(depth="ddl", depth_options=options))
    assert all(torch.equal(c.conv.weight, torch.full((K, 32 * 2), 1 / K))
               for c in model.depth.compressors.values())
    with pytest.raises(UserError, match="compressor_init='code' is invalid; allowed: mean, average"):
        tiny_config(depth="ddl", depth_options={"compressor": "tc", "compressor_init": "code"})


@pytest.mark.parametrize("chunks", [[1], [2], [3], [7]])
@pytest.mark.parametrize("options", [{"value_dim": 4, "compressor": "tc", "expander": "ec"},
                                     {"value_dim": 1, "compressor": "tc", "expander": "ec"},
                                     {"value_dim": 2, "compressor": "tc", "init": "code"}])
def test_cached_chunked_decoding_equals_full_forward(chunks, options):
    """(`init="code"`: one TC compressor per block, a decode history per site reading it.)"""
    model = ddl_model(**options)
    ids = torch.randint(0, 64, (2, 15))
    cache = model.new_cache(2, 15)
    outputs, start = [], 0
    while start < 15:
        outputs.append(model(ids[:, start:start + chunks[0]], cache=cache))
        start += chunks[0]
    torch.testing.assert_close(torch.cat(outputs, dim=1), model(ids))


def test_token_taps_matter():
    """Every TC site, the final readout and EC: moving a lag tap (reachable only by mixing
    tokens) or the read vector changes the logits of later tokens, never of earlier ones."""
    model = ddl_model(value_dim=2, compressor="tc", expander="ec")
    ids = torch.randint(0, 64, (1, 8))
    base = model(ids)
    convs = {name: module for name, module in model.depth.named_modules()
             if name.endswith("conv")}
    assert len(convs) == len(model.sites) + 2  # every site, the final readout, the expander
    for name, conv in convs.items():
        with torch.no_grad():
            conv.weight[3].add_(0.5)
            changed = model(ids)
            conv.weight[3].sub_(0.5)
        assert (changed - base)[:, 3:].abs().max() > 1e-6, name
        assert torch.equal(changed[:, :3], base[:, :3]), name  # causal
    reads = {name: param for name, param in model.depth.named_parameters() if name.endswith("read")}
    assert reads
    assert_each_parameter_changes_output(model, ids, reads)


def test_cross_token_state_and_cache_size():
    config = tiny_config(depth="ddl", depth_options={"value_dim": 4, "compressor": "tc", "expander": "ec"})
    model = ResStreamLM(config)
    assert model.depth.cross_token_state
    cache = model.new_cache(2, 16)
    values = sum(t.numel() for key, entry in cache.entries.items() if key.startswith("depth")
                 for t in entry.tensors())
    d, dv, sites = config.d_model, 4, len(model.sites) + 1
    assert values == 2 * (K - 1) * (sites * d * dv + d)
    for options in ({}, {"value_dim": 4}):
        assert not ResStreamLM(tiny_config(depth="ddl", depth_options=options)).depth.cross_token_state


@pytest.mark.parametrize("options,field", [({"compressor": "xx"}, "compressor"), ({"expander": "yy"}, "expander"),
                                           ({"token_kernel": 0}, "token_kernel")])
def test_invalid_options(options, field):
    with pytest.raises(UserError, match=field):
        tiny_config(depth="ddl", depth_options=options)
