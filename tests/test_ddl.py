"""Deep Delta Learning: the Delta-operator properties (the paper's equations; docs/design.md, decision 4) and the model
against a float64 reference written from the equations."""
import math

import pytest
import torch
import torch.nn as nn
from reference import head, norm_weight, rmsnorm, site_kinds, sublayer

from resstream import ResStreamLM
from resstream.depth.ddl import (LinearHeads, VectorDeltaWrite, delta_update, unit_direction,
                                  vector_delta_write)
from resstream.errors import UserError
from resstream.testing import assert_each_parameter_changes_output, perturb_parameters, tiny_config

D = 8


def random_delta_inputs(value_dim=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(D, value_dim, generator=g, dtype=torch.float64)
    k = torch.randn(D, generator=g, dtype=torch.float64)
    k = k / k.norm()
    v = torch.randn(value_dim, generator=g, dtype=torch.float64)
    return X, k, v


def delta_matrix(k, beta):
    return torch.eye(D, dtype=torch.float64) - beta * torch.outer(k, k)


def test_beta_zero_is_the_identity():
    X, k, v = random_delta_inputs()
    assert torch.equal(delta_update(X, k, torch.tensor(0.0, dtype=torch.float64), v), X)


def test_beta_one_writes_v_along_k():
    X, k, v = random_delta_inputs()
    new = delta_update(X, k, torch.tensor(1.0, dtype=torch.float64), v)
    torch.testing.assert_close(k @ new, v, rtol=1e-12, atol=1e-12)
    # components orthogonal to k are untouched
    P = torch.eye(D, dtype=torch.float64) - torch.outer(k, k)
    torch.testing.assert_close(P @ new, P @ X)


def test_beta_two_is_a_reflection_along_k():
    X, k, v = random_delta_inputs()
    A = delta_matrix(k, 2.0)
    torch.testing.assert_close(A @ A, torch.eye(D, dtype=torch.float64))  # involution
    torch.testing.assert_close(A @ k, -k)
    new = delta_update(X, k, torch.tensor(2.0, dtype=torch.float64), v)
    torch.testing.assert_close(new, A @ X + 2.0 * torch.outer(k, v))


@pytest.mark.parametrize("beta", [0.3, 1.0, 1.7])
def test_delta_operator_eigenvalues(beta):
    X, k, v = random_delta_inputs()
    zero_v = torch.zeros_like(v)
    # the update with v = 0 is the linear map A X; recover A column by column
    A = torch.stack([delta_update(torch.eye(D, dtype=torch.float64)[:, i:i + 1], k,
                                  torch.tensor(beta, dtype=torch.float64), zero_v[:1])[:, 0]
                     for i in range(D)], dim=1)
    eig = torch.linalg.eigvalsh(A)
    expected = torch.tensor(sorted([1.0] * (D - 1) + [1.0 - beta]), dtype=torch.float64)
    torch.testing.assert_close(eig, expected)
    # post-error along k is (1 - beta) times the pre-error
    pre = v - k @ X
    post = v - k @ delta_update(X, k, torch.tensor(beta, dtype=torch.float64), v)
    torch.testing.assert_close(post, (1 - beta) * pre)


def ddl_logits(model, ids):
    """Compress -> Process -> Rewrite around every sublayer, float64, from the equations."""
    config = model.config
    opts = model.depth.options
    dv = opts.value_dim
    w = {k: v.double() for k, v in model.state_dict().items()}
    out = []
    for row in ids:
        emb = w["embed.weight"][row]
        X = emb[..., None].repeat(1, 1, dv)  # [T, d, d_v]
        index = 0
        for layer in range(config.n_layers):
            for kind in site_kinds(config):
                x_in = (X * w[f"depth.compressors.{index}.weight"]).sum(-1) if dv > 1 else X[..., 0]
                c = rmsnorm(x_in, norm_weight(w, layer, kind), config.norm_eps)
                h = sublayer(kind, layer, c, w, config)
                k = h / torch.sqrt((h * h).sum(-1, keepdim=True) + 1e-10)
                g = f"depth.gates.{index}.out"
                beta = 2 * torch.sigmoid(c @ w[f"{g}.weight"].T + w[f"{g}.bias"])  # [T, 1]
                v = c @ w[f"depth.values.{index}.weight"].T + w[f"depth.values.{index}.bias"]
                readout = torch.einsum("td,tdv->tv", k, X)
                X = X + beta[..., None] * k[..., None] * (v - readout)[:, None, :]
                index += 1
        final = (X * w["depth.compressors.final.weight"]).sum(-1) if dv > 1 else X[..., 0]
        out.append(head(final, w, config))
    return torch.stack(out)


@pytest.mark.parametrize("value_dim", [1, 4])
@pytest.mark.parametrize("mixer", [None, "shortswa"])
def test_model_matches_float64_reference(value_dim, mixer):
    model = ResStreamLM(tiny_config(depth="ddl", depth_options={"value_dim": value_dim},
                                    local_mixer=mixer)).double()
    perturb_parameters(model, scale=0.1)
    ids = torch.randint(0, 64, (2, 7))
    torch.testing.assert_close(model(ids), ddl_logits(model, ids), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("beta_init", [1.0, 0.5])
def test_gate_starts_exactly_at_beta_init(beta_init):
    """DDL does not start at the baseline: at step 0 beta == beta_init for every token, and with
    beta_init = 1 each sublayer overwrites the state's component along k with v."""
    model = ResStreamLM(tiny_config(depth="ddl", depth_options={"beta_init": beta_init}))
    for gate in model.depth.gates.values():
        c = torch.randn(3, 5, 32)
        torch.testing.assert_close(gate(c), torch.full((3, 5), beta_init))
    ids = torch.randint(0, 64, (1, 6))
    torch.testing.assert_close(model.double()(ids), ddl_logits(model, ids), rtol=1e-9, atol=1e-9)


def test_learned_weights_matter():
    model = ResStreamLM(tiny_config(depth="ddl", depth_options={"value_dim": 2})).double()
    perturb_parameters(model, scale=0.1)
    ids = torch.randint(0, 64, (1, 6))
    assert_each_parameter_changes_output(model, ids, dict(model.depth.named_parameters()))


def test_code_variant_value_is_bounded_sigmoid_of_raw_state():
    model = ResStreamLM(tiny_config(depth="ddl", depth_options={"value": "code"})).double()
    ids = torch.randint(0, 64, (1, 4))
    # v in (0, 4): with beta = 1 at init, the readout of the final state along the last k lies in (0, 4)
    assert model(ids).isfinite().all()


def test_unit_direction():
    h = torch.randn(4, 16, dtype=torch.float64)
    torch.testing.assert_close(unit_direction(h).norm(dim=-1), torch.ones(4, dtype=torch.float64))
    assert unit_direction(torch.zeros(2, 16)).abs().max() == 0


def test_invalid_options():
    for options, field in [({"value_dim": 0}, "value_dim"), ({"beta_init": 3.0}, "beta_init"),
                           ({"beta_gate": "huge"}, "beta_gate"), ({"value": "x"}, "value"),
                           ({"init": "x"}, "init"), ({"weight_decay": "sometimes"}, "weight_decay"),
                           ({"init": "code", "compressor": "tc", "compressor_init": "average"},
                            "compressor_init")]:
        with pytest.raises(UserError, match=field):
            tiny_config(depth="ddl", depth_options=options)


# ---------------------------------------------------------------- fast paths (same results)
def random_write_inputs(shape=(2, 3), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x, h = (torch.randn(*shape, D, generator=g, dtype=dtype) for _ in range(2))
    z, v = (torch.randn(*shape, 1, generator=g, dtype=dtype) for _ in range(2))
    return x, h, z, v


def test_vector_delta_write_is_the_delta_update():
    x, h, z, v = random_write_inputs()
    h[0, 0] = 0  # a zero sublayer output: k = 0, the state passes unchanged
    beta = 2 * torch.sigmoid(z[..., 0])
    expected = delta_update(x[..., None], unit_direction(h), beta, v)[..., 0]
    torch.testing.assert_close(vector_delta_write(x, h, z, v)[0], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(vector_delta_write(x, h, z, v)[0][0, 0], x[0, 0])


def test_custom_functions_gradcheck():
    inputs = [t.requires_grad_() for t in random_write_inputs()]
    assert torch.autograd.gradcheck(VectorDeltaWrite.apply, inputs)
    g = torch.Generator().manual_seed(1)
    c = torch.randn(2, 3, D, generator=g, dtype=torch.float64, requires_grad=True)
    heads = [torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
             for shape in [(1, D), (1,), (3, D), (3,)]]
    assert torch.autograd.gradcheck(LinearHeads.apply, [c, *heads])


@pytest.mark.parametrize("options", [{}, {"value_dim": 3}, {"beta_gate": "mlp", "value": "code"}])
def test_fused_nodes_match_plain_autograd(options, monkeypatch):
    """The hand-written backward nodes give the gradients autograd gives through the plain ops,
    and the no-grad path (prefill, decode) gives the logits of the autograd path."""
    model = ResStreamLM(tiny_config(depth="ddl", depth_options=options)).double()
    perturb_parameters(model, scale=0.1)
    ids = torch.randint(0, 64, (2, 7))

    def logits_and_grads():
        model.zero_grad()
        logits = model(ids)
        logits.pow(2).mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    logits, fused = logits_and_grads()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), logits, rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(VectorDeltaWrite, "apply", lambda *a: vector_delta_write(*a)[0])
    monkeypatch.setattr(model.depth, "linear_heads", False)
    _, plain = logits_and_grads()
    for name, grad in fused.items():
        torch.testing.assert_close(grad, plain[name], rtol=1e-10, atol=1e-12, msg=name)


def run_hooks(op, x0, outputs):
    state = op.init_state(x0, None)
    for site, out in zip(op.sites, outputs):
        op.read(state, site, nn.Identity(), None)
        state = op.write(state, site, out, None)
    return op.finalize(state, None)


@pytest.mark.parametrize("grad", [True, False])
def test_bfloat16_outputs_under_autocast(grad):
    """Under autocast the sublayers emit bfloat16 onto the float32 stream: the write promotes
    them (as the unfused ops did), gradients come back in each input's dtype, and the gate keeps
    its own float32 path (the shared heads node is skipped). Hook-level: bfloat16 Linear layers
    of model size crash on this CI's CPU."""
    op = ResStreamLM(tiny_config(depth="ddl")).depth
    perturb_parameters(op, scale=0.1)
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 5, 32, generator=gen)
    outputs = [torch.randn(2, 5, 32, generator=gen).bfloat16().requires_grad_(grad) for _ in op.sites]
    with torch.set_grad_enabled(grad):
        expected = run_hooks(op, x0, [o.detach().float() for o in outputs])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not op.plain_heads(x0)
            final = run_hooks(op, x0, outputs)
    assert final.dtype == torch.float32
    torch.testing.assert_close(final, expected, rtol=2e-2, atol=2e-2)  # v is a bfloat16 head
    if grad:
        final.sum().backward()
        assert all(o.grad.dtype == torch.bfloat16 and o.grad.isfinite().all() for o in outputs)
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in op.gates.parameters())


def test_state_carries_only_the_stream_between_sites():
    model = ResStreamLM(tiny_config(depth="ddl"))
    op, seen = model.depth, []
    original = op.write

    def write(state, site, out, ctx):
        seen.append(original(state, site, out, ctx))
        return seen[-1]

    op.write = write
    model(torch.randint(0, 64, (1, 5)))
    assert seen and all(s.x_in is None and s.c is None for s in seen)


# ---------------------------------------------------------------- the released code (init="code")
def released_cc(X, taps, read):
    """The released code's CC compressor (its `ResidualShortConvCompressor`, DDL-gpt-mha-rope-CC-EC.py
    at commit 2b55f25): a conv along the d_v axis with d_v taps per feature, zero padding
    (d_v - 1) // 2 on the left and the rest on the right, as a cross-correlation, then the read
    vector. X [T, d, d_v], taps [d, d_v], read [d_v]; explicit loops, float64."""
    dv = X.shape[-1]
    pad = (dv - 1) // 2
    conv = torch.zeros_like(X)
    for k in range(dv):  # output channel
        for m in range(dv):  # tap
            j = k + m - pad
            if 0 <= j < dv:
                conv[..., k] += taps[:, m] * X[..., j]
    return (conv * read).sum(-1)


def shifted(x, m):
    """x [T, ...] delayed by m tokens (zeros before the first token)."""
    return torch.cat([torch.zeros_like(x[:m]), x[:x.shape[0] - m]]) if m else x


def released_ddl_logits(model, ids):
    """The released code's forward (commit 2b55f25: DDL-vdim1-gpt-mha-rope.py for d_v = 1,
    DDL-gpt-mha-rope-CC[-EC].py for CC, DDL-gpt-mha-rope[-EC].py for TC), float64, written from
    its equations rather than from resstream's modules: one compressor per block read by both
    of its sublayers and one for the readout; k as the code forms it, RMSNorm(h; eps_k^2 / d) /
    sqrt(d); beta = 2 sigmoid(beta(x_norm)) with the "mlp" gate's hidden layer bias-free;
    v = 4 sigmoid(v_proj(x_in)) (`value="code"`, x_in the un-normalised read) or v_proj(x_norm);
    X + k (beta (v - k^T X)) with the rank-1 product taken as the code takes it."""
    config, opts = model.config, model.depth.options
    d, dv = config.d_model, opts.value_dim
    w = {k: v.double() for k, v in model.state_dict().items()}

    def compress(X, key):
        p = f"depth.compressors.{key}"
        if opts.compressor == "tc":
            taps = w[f"{p}.conv.weight"].view(-1, d, dv)  # taps[m] multiplies X_{t-m}
            mixed = sum(taps[m] * shifted(X, m) for m in range(taps.shape[0]))
            return (mixed * w[f"{p}.read"]).sum(-1)
        return X[..., 0] if dv == 1 else released_cc(X, w[f"{p}.weight"], w[f"{p}.read"])

    out = []
    for row in ids:
        emb = w["embed.weight"][row]
        if opts.expander == "ec":
            taps = w["depth.expander.conv.weight"].view(-1, d, dv)
            X = sum(taps[m] * shifted(emb, m)[..., None] for m in range(taps.shape[0]))
        else:
            X = emb[..., None].repeat(1, 1, dv)
        index = 0
        for layer in range(config.n_layers):
            for kind in site_kinds(config):
                x_in = compress(X, f"layer{layer}")
                x_norm = rmsnorm(x_in, norm_weight(w, layer, kind), config.norm_eps)
                h = sublayer(kind, layer, x_norm, w, config)
                k_rms = h / torch.sqrt((h * h).mean(-1, keepdim=True) + 1e-10 / d)
                k_scale = 1 / math.sqrt(d)
                g = f"depth.gates.{index}"
                gate_in = x_norm
                if opts.beta_gate == "mlp":
                    assert f"{g}.hidden.bias" not in w  # the code's beta_in has no bias
                    gate_in = torch.tanh(x_norm @ w[f"{g}.hidden.weight"].T)
                beta = 2 * torch.sigmoid(gate_in @ w[f"{g}.out.weight"].T + w[f"{g}.out.bias"])  # [T, 1]
                proj = (k_rms[..., None] * X).sum(-2) * k_scale  # k^T X [T, d_v]
                value_in = x_in if opts.value == "code" else x_norm
                v = value_in @ w[f"depth.values.{index}.weight"].T + w[f"depth.values.{index}.bias"]
                if opts.value == "code":
                    v = 4 * torch.sigmoid(v)
                X = X + k_rms[..., None] * ((beta * (v - proj)) * k_scale)[:, None, :]
                index += 1
        out.append(head(compress(X, "final"), w, config))
    return torch.stack(out)


CODE_CASES = [
    {"value": "code"},  # DDL-vdim1-gpt-mha-rope.py
    {"value": "code", "value_dim": 4},  # DDL-gpt-mha-rope-CC.py
    {"value": "code", "value_dim": 4, "expander": "ec", "impl": "naive"},  # DDL-gpt-mha-rope-CC-EC.py
    {"value": "code", "value_dim": 2, "compressor": "tc", "beta_gate": "mlp"},  # DDL-gpt-mha-rope.py
    {"value_dim": 3, "compressor": "tc", "expander": "ec"},  # DDL-gpt-mha-rope-EC.py, paper's value
    {"value_dim": 3},
]


@pytest.mark.parametrize("options", CODE_CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("perturb", [False, True])
def test_code_init_matches_float64_reimplementation_of_the_released_code(options, perturb):
    torch.manual_seed(0)
    model = ResStreamLM(tiny_config(depth="ddl", depth_options={"init": "code", **options})).double()
    if perturb:
        perturb_parameters(model, scale=0.1)
    ids = torch.randint(0, 64, (2, 7))
    torch.testing.assert_close(model(ids), released_ddl_logits(model, ids), rtol=1e-9, atol=1e-9)


def test_code_init_draws_the_released_weights():
    """init="code": every >= 2-D DDL weight N(0, 0.5/sqrt(d)) (so beta starts at about
    1 +- 0.25 and depends on the input), the value bias nn.Linear's U(+-1/sqrt(d)), read vectors
    1/d_v, one compressor per block plus the readout's. The paper init (default) starts every
    token at beta = 1 exactly, with b_v = 0, CC weights 1/d_v and one compressor per site."""
    d, dv, layers = 256, 4, 3
    torch.manual_seed(0)
    changes = {"d_model": d, "n_heads": 4, "n_layers": layers}
    code = ResStreamLM(tiny_config(depth="ddl", depth_options={"init": "code", "value_dim": dv}, **changes)).depth
    paper = ResStreamLM(tiny_config(depth="ddl", depth_options={"value_dim": dv}, **changes)).depth
    std = 0.5 / math.sqrt(d)

    def pooled(op, suffix):
        return torch.cat([p.detach().flatten() for n, p in op.named_parameters() if n.endswith(suffix)])

    for suffix in ("out.weight", "values.0.weight", "layer0.weight", "final.weight"):
        assert pooled(code, suffix).std().item() == pytest.approx(std, rel=0.15), suffix
    bias = pooled(code, "bias")
    value_bias = torch.cat([v.bias.detach() for v in code.values.values()])
    assert value_bias.abs().max() <= 1 / math.sqrt(d) and value_bias.std() > 0.2 / math.sqrt(d)
    assert bias.numel() > value_bias.numel()
    assert set(code.compressors) == {f"layer{i}" for i in range(layers)} | {"final"}
    assert all(torch.equal(c.read, torch.full((dv,), 1 / dv)) for c in code.compressors.values())
    c = torch.randn(4096, d)  # a normalised read: |c| about sqrt(d)
    beta = torch.cat([gate(c) for gate in code.gates.values()])
    assert beta.mean().item() == pytest.approx(1.0, abs=0.03)
    assert 0.2 < beta.std().item() < 0.3
    # the paper init (default): beta exactly 1, b_v = 0, CC = 1/d_v, a compressor per site
    assert paper.options.init == "paper"
    beta = torch.cat([gate(c) for gate in paper.gates.values()])
    torch.testing.assert_close(beta, torch.ones_like(beta))
    assert all(not v.bias.any() for v in paper.values.values())
    assert len(paper.compressors) == 2 * layers + 1
    assert all(torch.equal(c.weight, torch.full((d, dv), 1 / dv)) for c in paper.compressors.values())
    mlp = ResStreamLM(tiny_config(depth="ddl", depth_options={"init": "code", "beta_gate": "mlp"})).depth
    assert all(g.hidden.bias is None for g in mlp.gates.values())


def test_code_cc_is_a_conv_along_the_channels():
    """The code's CC compressor as a d x d_v matrix: c_ij = sum_k r_k w[i, j - k + (d_v-1)//2]
    (for d_v = 4: r_0 w_1 + r_1 w_0 for j = 0, ..., r_2 w_3 + r_3 w_2 for j = 3)."""
    from resstream.depth.ddl import ChannelConvCompressor
    torch.manual_seed(1)
    cc = ChannelConvCompressor(5, 4).double()
    with torch.no_grad():
        cc.read.normal_()
    w, r = cc.weight.detach(), cc.read.detach()
    X = torch.randn(3, 5, 4, dtype=torch.float64)
    torch.testing.assert_close(cc(X), released_cc(X, w, r))
    c = cc.channel_weights().detach()
    torch.testing.assert_close(c[:, 0], r[0] * w[:, 1] + r[1] * w[:, 0])
    torch.testing.assert_close(c[:, 3], r[1] * w[:, 3] + r[2] * w[:, 2] + r[3] * w[:, 1])
