"""Hyper-Connections (depth/hyper.py) and mHC (depth/mhc.py): float64 references written from the
equations, the `hyper-connections` package (lucidrains, PyPI) on the same weights where its
semantics match the paper, init, every learned weight, depth_layers, decoding and options.

Where the package differs from the papers (so only the matching parts are compared):
* HC: the package's per-stream norm is an eps-free RMSNorm with weight (1 + gamma); ours has a
  learned weight and the model's eps. We map weight = 1 + gamma and compare at norm_eps=1e-12.
  Streams live folded into the batch, '(b s) t d' with s inner; we convert.
  Static HC = the package's module with its dynamic projections set to zero.
* mHC: the package's `ManifoldConstrainedHyperConnections` computes its coefficients per stream
  from that stream's own d-vector (as HC does), passes HC's static init through sigmoid/Sinkhorn,
  and scales pre/residual dynamics with separate scalars; the paper (and ours) computes all
  coefficients from the flattened, RMS-normalised n*d state. Not comparable as a module. The
  matching part is the Sinkhorn-Knopp projection (row then column normalisation, 20 iterations),
  compared on the same logits (the package contracts over its first index: its matrix is our
  H_res transposed).
* mHC-lite and KromHC (`parameterisation="lite"|"kron"`): H_res from the res logits written
  here from the equations (every permutation of range(n) by itertools, Kronecker products by
  torch.kron over the prime factors), compared with the model through the full reference.
"""
import itertools
import math
from functools import reduce

import pytest
import torch
from hyper_connections import HyperConnections as PackageHC
from hyper_connections.manifold_constrained_hyper_connections import sinkhorn_knopps

from resstream.depth.hyper import StreamState
from resstream.depth.mhc import sinkhorn_knopp
from resstream.errors import UserError
from resstream.model import ResStreamLM
from resstream.testing import (assert_gradients_match, baseline_twin, cached_logits,
                               perturb_parameters, tiny_config)

IDS = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))


def rms_norm(x, weight, eps):
    return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def sublayer_pairs(model):
    for block in model.blocks:
        yield from zip(block.sites, block.sublayers())


def hc_coefficients(conn, streams, eps, n):
    """Per stream j: A_m[j], A_r[j, :], B[j] (paper section 2), from stream j alone."""
    read, mix, write = [], [], []
    for j, h in enumerate(streams):
        if conn.dynamic:
            h_bar = rms_norm(h, conn.norm_weight, eps)
            read.append(conn.s_alpha * torch.tanh(h_bar @ conn.w_m) + conn.a_m[j])
            mix.append([conn.s_alpha * torch.tanh(h_bar @ conn.w_r[:, i]) + conn.a_r[j, i]
                        for i in range(n)])
            write.append(conn.s_beta * torch.tanh(h_bar @ conn.w_b) + conn.b[j])
        else:
            read.append(conn.a_m[j])
            mix.append([conn.a_r[j, i] for i in range(n)])
            write.append(conn.b[j])
    return read, mix, write


def sinkhorn_reference(logits, iters):
    m = torch.exp(logits)
    for _ in range(iters):
        m = m / m.sum(-1, keepdim=True)  # rows
        m = m / m.sum(-2, keepdim=True)  # columns
    return m


def permutation_combination(logits, size):
    """sum_k softmax(logits)_k P_k over the size! permutations sigma_k of range(size), with
    P_k[i, sigma_k(i)] = 1 (mHC-lite, Birkhoff-von Neumann), logits [..., size!]."""
    weights = torch.softmax(logits, dim=-1)
    out = torch.zeros(*logits.shape[:-1], size, size, dtype=logits.dtype)
    for k, sigma in enumerate(itertools.permutations(range(size))):
        for i in range(size):
            out[..., i, sigma[i]] += weights[..., k]
    return out


def residual_matrix_reference(conn, logits, n):
    """H_res from its logits: Sinkhorn on [n, n]; lite: one combination of n! permutations;
    kron: the Kronecker product of one combination per prime factor of n."""
    if conn.parameterisation == "sinkhorn":
        return sinkhorn_reference(logits.reshape(*logits.shape[:-1], n, n) + 0, conn.sinkhorn_iters)
    sizes = [n] if conn.parameterisation == "lite" else {1: [], 2: [2], 3: [3], 4: [2, 2],
                                                         6: [2, 3], 8: [2, 2, 2]}[n]
    if not sizes:
        return torch.ones(*logits.shape[:-1], 1, 1, dtype=logits.dtype)
    factors, start = [], 0
    for size in sizes:
        count = math.factorial(size)
        factors.append(permutation_combination(logits[..., start:start + count], size))
        start += count
    assert start == logits.shape[-1]
    flat = [f.reshape(-1, f.shape[-2], f.shape[-1]) for f in factors]
    kron = torch.stack([reduce(torch.kron, [f[t] for f in flat]) for t in range(flat[0].shape[0])])
    return kron.reshape(*logits.shape[:-1], kron.shape[-2], kron.shape[-1])


def mhc_coefficients(conn, streams, eps, n):
    """H_pre, H_post, H_res (mHC eqs. 7-9) from the flattened, RMS-normalised n*d state;
    returned in HC's layout: mix[j][i] = H_res[i, j] (weight of stream j in new stream i)."""
    flat = torch.cat(streams, dim=-1)
    x = flat / torch.sqrt(flat.pow(2).mean(-1, keepdim=True) + eps)
    p = x @ conn.phi
    pre = torch.sigmoid(conn.alpha_pre * p[..., :n] + conn.b_pre)
    post = 2 * torch.sigmoid(conn.alpha_post * p[..., n:2 * n] + conn.b_post)
    res_logits = conn.alpha_res * p[..., 2 * n:] + conn.b_res.flatten()
    res = residual_matrix_reference(conn, res_logits, n)
    read = [pre[..., j] for j in range(n)]
    mix = [[res[..., i, j] for i in range(n)] for j in range(n)]
    write = [post[..., i] for i in range(n)]
    return read, mix, write


def reference_streams(model, ids):
    """n streams (copies of the embedding); per active sublayer h_in = sum_j read_j H_j and
    new H_i = write_i * out + sum_j mix[j][i] H_j; inactive: mean read, out added to every
    stream; final: sum of the streams."""
    op, eps, n = model.depth, model.config.norm_eps, model.depth.n
    coefficients = mhc_coefficients if model.config.depth == "mhc" else hc_coefficients
    ctx = model.context(ids.shape[1], None, ids.device)
    x0 = model.embed(ids)
    streams = [x0.clone() for _ in range(n)]
    for site, sub in sublayer_pairs(model):
        if not op.is_active(site.layer):
            out = sub(sub.norm(sum(streams) / n), ctx)
            streams = [h + out for h in streams]
            continue
        read, mix, write = coefficients(op.connections[str(site.index)], streams, eps, n)
        h_in = sum(_w(r) * h for r, h in zip(read, streams))
        out = sub(sub.norm(h_in), ctx)
        streams = [_w(write[i]) * out + sum(_w(mix[j][i]) * streams[j] for j in range(n))
                   for i in range(n)]
    return model.lm_head(model.norm(sum(streams)))


def _w(coefficient):
    """A per-token coefficient [B, T] (or a scalar) broadcast over d."""
    return coefficient.unsqueeze(-1) if coefficient.dim() else coefficient


def build(depth, options=None, seed=0, dtype=torch.float64, perturb=True, scale=0.3, **changes):
    torch.manual_seed(seed)
    model = ResStreamLM(tiny_config(depth=depth, depth_options=options or {}, **changes)).to(dtype)
    if perturb:
        perturb_parameters(model, scale=scale, seed=seed)
    return model


CASES = [
    ("hyper", {}, {}),
    ("hyper", {"dynamic": False}, {}),
    ("hyper", {"streams": 3}, {"local_mixer": "shortswa"}),
    ("hyper", {"streams": 2}, {"depth_layers": [0, 2]}),
    ("mhc", {}, {}),
    ("mhc", {"streams": 3, "sinkhorn_iters": 5}, {"local_mixer": "shortswa"}),
    ("mhc", {"init": "zero"}, {"depth_layers": [1]}),
    ("mhc", {"parameterisation": "lite"}, {}),
    ("mhc", {"parameterisation": "lite", "streams": 3, "init": "zero"}, {"local_mixer": "shortswa"}),
    ("mhc", {"parameterisation": "kron"}, {"depth_layers": [0, 2]}),
    ("mhc", {"parameterisation": "kron", "streams": 6}, {}),
    ("mhc", {"parameterisation": "kron", "streams": 2, "init": "zero"}, {}),
]


@pytest.mark.parametrize("depth,options,changes", CASES)
def test_matches_float64_reference(depth, options, changes):
    model = build(depth, options, **changes)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), reference_streams(model, IDS),
                                   rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("depth,options", [("hyper", {}), ("hyper", {"dynamic": False}),
                                           ("mhc", {"sinkhorn_iters": 4}),
                                           ("mhc", {"parameterisation": "lite", "streams": 3}),
                                           ("mhc", {"parameterisation": "kron"})])
def test_gradients_match_reference(depth, options):
    model = build(depth, options)
    assert_gradients_match(model, lambda: model(IDS), lambda: reference_streams(model, IDS),
                           rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("depth,options,changes", [
    ("hyper", {}, {}), ("hyper", {"dynamic": False}, {"local_mixer": "shortswa"}),
    ("hyper", {}, {"depth_layers": [1]}), ("mhc", {}, {}), ("mhc", {"init": "zero"}, {}),
    ("mhc", {}, {"local_mixer": "shortswa", "depth_layers": [0, 2]}),
    ("mhc", {"parameterisation": "lite"}, {}), ("mhc", {"parameterisation": "kron"}, {}),
    ("mhc", {"parameterisation": "kron", "streams": 6, "init": "zero"}, {"local_mixer": "shortswa"}),
])
def test_starts_at_standard_model(depth, options, changes):
    """Identical streams stay equal to the standard residual (HC: B = 1, A_r = I; mHC: doubly
    stochastic H_res, H_post = 2 sigmoid(0) = 1), each sublayer reads a multiple of it and the
    final read sums n copies: equal to `standard` up to the norms' eps (compared at 1e-10)."""
    torch.manual_seed(0)
    model = ResStreamLM(tiny_config(depth=depth, depth_options=options, norm_eps=1e-10, **changes))
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), baseline_twin(model)(IDS), rtol=0, atol=1e-5)


def run_site(op, site, streams, out_fn):
    """One read and write through the operator's hooks (identity pre-norm)."""
    state = StreamState(streams)
    h_in = op.read(state, site, lambda x: x, None)
    out = out_fn(h_in)
    return h_in, op.write(state, site, out, None).streams


def test_mhc_math_at_init():
    """Streams identical at init: the first sublayer reads (sum_j sigmoid(b_pre_j)) x_0 =
    (sigmoid(1) + 3 sigmoid(-1)) x_0, every stream becomes x_0 + out, and H_res = Sinkhorn(2 I) is
    exactly doubly stochastic with diagonal e^2 / (e^2 + 3)."""
    model = build("mhc", perturb=False)
    op = model.depth
    x0 = torch.randn(2, 3, 32, dtype=torch.float64)
    streams = x0.unsqueeze(-2).expand(2, 3, 4, 32).contiguous()
    h_in, new = run_site(op, model.sites[0], streams, torch.tanh)
    sig = torch.sigmoid(torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(h_in, (sig + 3 * (1 - sig)) * x0)
    torch.testing.assert_close(new, (x0 + torch.tanh(h_in)).unsqueeze(-2).expand_as(new))
    res = sinkhorn_knopp(op.connections["0"].b_res.detach(), 20)
    e2 = torch.exp(torch.tensor(2.0, dtype=torch.float64))
    torch.testing.assert_close(res.diagonal(), (e2 / (e2 + 3)).expand(4))
    torch.testing.assert_close(res.sum(0), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(res.sum(1), torch.ones(4, dtype=torch.float64))
    # the favoured stream rotates with the sublayer index (symmetry breaking)
    assert [int(op.connections[str(k)].b_pre.argmax()) for k in range(6)] == [0, 1, 2, 3, 0, 1]


def test_mhc_stream_mix_is_doubly_stochastic_after_training_noise():
    model = build("mhc", {"sinkhorn_iters": 20})
    conn = model.depth.connections["3"]
    streams = torch.randn(2, 3, 4, 32, dtype=torch.float64)
    _, mix, _ = conn.coefficients(streams)  # mix = H_res^T
    ones = torch.ones(2, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(mix.sum(-1), ones)  # columns of H_res: normalised last
    torch.testing.assert_close(mix.sum(-2), ones, atol=1e-3, rtol=0)  # rows: converged
    assert (mix >= 0).all()


@pytest.mark.parametrize("options,identity", [
    ({"parameterisation": "lite"}, 1 / (1 + 23 * math.exp(-8))),  # 4! - 1 = 23 other permutations
    ({"parameterisation": "lite", "streams": 3}, 1 / (1 + 5 * math.exp(-8))),
    ({"parameterisation": "kron"}, (1 / (1 + math.exp(-8))) ** 2),  # 2 x 2 (x) 2 x 2
    ({"parameterisation": "kron", "streams": 6}, 1 / (1 + math.exp(-8)) / (1 + 5 * math.exp(-8))),
])
def test_permutation_parameterisations_are_exactly_doubly_stochastic(options, identity):
    """mHC-lite and KromHC: H_res is a convex combination of permutations (or a Kronecker
    product of such), so its rows and columns sum to 1 to rounding, at any logits; at the
    symmetry-breaking init the identity permutation has logit 0 and every other one -8."""
    model = build("mhc", options, scale=1.0)
    conn = model.depth.connections["3"]
    n = model.depth.n
    assert conn.b_res.shape == (conn.res_size,) and conn.phi.shape[-1] == conn.res_size + 2 * n
    streams = torch.randn(2, 3, n, 32, dtype=torch.float64)
    _, mix, _ = conn.coefficients(streams)
    ones = torch.ones(2, 3, n, dtype=torch.float64)
    torch.testing.assert_close(mix.sum(-1), ones, rtol=0, atol=1e-14)
    torch.testing.assert_close(mix.sum(-2), ones, rtol=0, atol=1e-14)
    assert (mix >= 0).all()
    fresh = build("mhc", options, perturb=False).depth.connections["3"]
    with torch.no_grad():
        res = fresh.residual_matrix(fresh.b_res.double(), naive=False)
    # the identity permutation (first in each factor) gets the product of its factors' weights
    sizes = {"lite": [n], "kron": {4: [2, 2], 6: [2, 3]}.get(n)}[options["parameterisation"]]
    segments = fresh.b_res.detach().double().split([math.factorial(i) for i in sizes])
    assert math.prod(torch.softmax(x, 0)[0].item() for x in segments) == pytest.approx(identity)
    assert all((x[1:] == -8).all() and x[0] == 0 for x in segments)
    assert res.diagonal().min() >= identity - 1e-12
    torch.testing.assert_close(res.sum(-1), torch.ones(n, dtype=torch.float64), rtol=0, atol=1e-14)


# Two places where mHC's stream mix H_res cannot matter (inherent to mHC, not bugs): at the first
# sublayer the streams are identical copies of the embedding and a doubly stochastic H_res maps
# identical streams to themselves (only Sinkhorn's row-convergence error shows); at the last
# sublayer only the sum of the streams is read, and sum_i (H_res x)_i = sum_j colsum_j x_j with
# column sums exactly 1. (The res columns of phi there still feed nothing; phi as a whole matters.)
DEAD_STREAM_MIX = {"connections.0.b_res": 1e-3, "connections.0.alpha_res": 1e-3,
                   "connections.5.b_res": 1e-8, "connections.5.alpha_res": 1e-8}


@pytest.mark.parametrize("depth,options", [("hyper", {}), ("hyper", {"dynamic": False}),
                                           ("mhc", {}), ("mhc", {"parameterisation": "lite"}),
                                           ("mhc", {"parameterisation": "kron"})])
def test_every_learned_weight_matters(depth, options):
    """d(output)/d(weight) != 0 for every parameter of the operator (after perturbation, so that
    zero-initialised weights are off zero): a mixing result that is computed but never applied
    has a zero gradient."""
    # (lite / kron in float64: their H_res is exactly doubly stochastic, so the dead gradients
    # below are rounding alone, about 1e-5 in float32)
    model = build(depth, options, dtype=torch.float64 if "parameterisation" in options else torch.float32)
    params = dict(model.depth.named_parameters())
    per_site = {"hyper": 9 if options.get("dynamic", True) else 3, "mhc": 7}[depth]
    assert len(params) == per_site * 6
    probe = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(5)).to(model.embed.weight.dtype)
    (model(IDS) * probe).sum().backward()
    for name, p in params.items():
        if depth == "mhc" and name in DEAD_STREAM_MIX:
            assert p.grad.abs().max() < DEAD_STREAM_MIX[name], name
            continue
        assert p.grad.abs().max() > 1e-4, name


@pytest.mark.parametrize("depth,name", [("hyper", "a_r"), ("hyper", "w_r"), ("mhc", "b_res"),
                                        ("mhc", "phi")])
def test_perturbing_the_stream_mix_changes_the_output(depth, name):
    model = build(depth, dtype=torch.float32)
    with torch.no_grad():
        before = model(IDS)
        for key in ("2", "3"):
            p = getattr(model.depth.connections[key], name)
            noise = torch.randn(p.shape, generator=torch.Generator().manual_seed(int(key))) * 0.5
            p.add_(noise)
            assert (model(IDS) - before).abs().max() > 1e-3, (key, name)
            p.sub_(noise)


def package_connection(conn, n, d):
    """The `hyper-connections` module with our weights: static_alpha = [A_m | A_r],
    dynamic_alpha_fn = [W_m | W_r], static_beta = B, dynamic_beta_fn = W_beta, scales s_alpha and
    s_beta, norm gamma = our norm weight - 1 (its RMSNorm scales by 1 + gamma)."""
    pkg = PackageHC(n, dim=d, layer_index=0, tanh=True).double()
    with torch.no_grad():
        pkg.static_alpha.copy_(torch.cat([conn.a_m[:, None], conn.a_r], dim=1))
        pkg.static_beta.copy_(conn.b)
        if conn.dynamic:
            pkg.dynamic_alpha_fn.copy_(torch.cat([conn.w_m[:, None], conn.w_r], dim=1))
            pkg.dynamic_alpha_scale.copy_(conn.s_alpha)
            pkg.dynamic_beta_fn.copy_(conn.w_b)
            pkg.dynamic_beta_scale.copy_(conn.s_beta)
            pkg.norm.gamma.copy_(conn.norm_weight - 1)
        else:  # static HC: no input-dependent part
            pkg.dynamic_alpha_fn.zero_()
            pkg.dynamic_beta_fn.zero_()
    return pkg


def to_package(streams):  # ours [B, T, n, d] -> theirs [(B n), T, d]
    b, t, n, d = streams.shape
    return streams.permute(0, 2, 1, 3).reshape(b * n, t, d)


def from_package(residual, n):
    bn, t, d = residual.shape
    return residual.view(bn // n, n, t, d).permute(0, 2, 1, 3)


@pytest.mark.parametrize("dynamic", [True, False])
def test_one_sublayer_matches_hyper_connections_package(dynamic):
    model = build("hyper", {"dynamic": dynamic, "streams": 3}, norm_eps=1e-12)
    site, sub = list(sublayer_pairs(model))[3]
    ctx = model.context(IDS.shape[1], None, IDS.device)
    streams = torch.randn(2, IDS.shape[1], 3, 32, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        h_in, ours = run_site(model.depth, site, streams, lambda x: sub(sub.norm(x), ctx))
        pkg = package_connection(model.depth.connections[str(site.index)], 3, 32)
        branch_input, add_residual = pkg(to_package(streams))
        theirs = from_package(add_residual(sub(sub.norm(branch_input), ctx)), 3)
    torch.testing.assert_close(h_in, branch_input, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dynamic,changes", [(True, {}), (False, {"local_mixer": "shortswa"})])
def test_stack_matches_hyper_connections_package(dynamic, changes):
    """The whole model: expand (repeat) -> per-sublayer package modules around our sublayers ->
    reduce (sum) -> final norm and head, against our operator on the same weights."""
    n = 4
    model = build("hyper", {"dynamic": dynamic}, norm_eps=1e-12, **changes)
    ctx = model.context(IDS.shape[1], None, IDS.device)
    with torch.no_grad():
        x0 = model.embed(IDS)
        residual = x0.repeat_interleave(n, dim=0)  # the package's expand: 'b ... -> (b s) ...'
        for site, sub in sublayer_pairs(model):
            pkg = package_connection(model.depth.connections[str(site.index)], n, 32)
            branch_input, add_residual = pkg(residual)
            residual = add_residual(sub(sub.norm(branch_input), ctx))
        hidden = residual.view(-1, n, *residual.shape[1:]).sum(1)  # the package's reduce
        torch.testing.assert_close(model(IDS), model.lm_head(model.norm(hidden)),
                                   rtol=1e-9, atol=1e-10)


def test_sinkhorn_matches_hyper_connections_package():
    logits = torch.randn(5, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    ours = sinkhorn_knopp(logits, 20)
    theirs = sinkhorn_knopps(logits.transpose(-1, -2), iters=20).transpose(-1, -2)
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-5, atol=1e-6)  # theirs: float32
    torch.testing.assert_close(ours, sinkhorn_reference(logits, 20), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("depth", ["hyper", "mhc"])
def test_stream_math_runs_in_float32_under_bfloat16_autocast(depth):
    """Hook-level (bfloat16 Linear layers crash on this CI's CPU even for `standard`): with
    bfloat16 sublayer outputs under autocast, the stream arithmetic must stay float32."""
    model = build(depth, dtype=torch.float32)
    op = model.depth
    gen = torch.Generator().manual_seed(7)
    x0 = torch.randn(2, 5, 32, generator=gen)
    outputs = [torch.randn(2, 5, 32, generator=gen).bfloat16() for _ in op.sites]

    def run(outs):
        state = op.init_state(x0, None)
        for site, out in zip(op.sites, outs):
            op.read(state, site, lambda x: x, None)
            state = op.write(state, site, out, None)
        return op.finalize(state, None)

    with torch.no_grad():
        expected = run([o.float() for o in outputs])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            final = run(outputs)
    assert final.dtype == torch.float32
    torch.testing.assert_close(final, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("depth,changes", [("hyper", {"local_mixer": "shortswa"}), ("mhc", {})])
def test_incremental_decoding_matches_full_forward(depth, changes):
    model = build(depth, **changes)
    with torch.no_grad():
        full = model(IDS)
    torch.testing.assert_close(cached_logits(model, IDS, prefill=2), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("options,changes", [({"dynamic": False}, {}),
                                             ({"streams": 2}, {"depth_layers": [0, 2]})])
def test_decode_step_path_matches_full_forward(options, changes):
    """The decode step's own path (streams as [B, n, d]) for static HC and inactive sublayers."""
    model = build("hyper", options, **changes)
    with torch.no_grad():
        full = model(IDS)
    torch.testing.assert_close(cached_logits(model, IDS, prefill=2), full, rtol=1e-10, atol=1e-10)


def test_accounting_and_metadata():
    model = build("hyper", {"streams": 3}, perturb=False)
    assert model.depth.pipeline_payload(0)[1] == 3 and model.depth.depth_state_vectors() == 3
    assert model.depth.mixing == "dynamic"
    assert build("hyper", {"dynamic": False}, perturb=False).depth.mixing == "static"


@pytest.mark.parametrize("depth,options", [
    ("hyper", {"streams": 0}), ("hyper", {"dynamic": "yes"}), ("hyper", {"sinkhorn_iters": 3}),
    ("mhc", {"streams": 0}), ("mhc", {"sinkhorn_iters": 0}), ("mhc", {"init": "identity"}),
    ("mhc", {"dynamic": False}), ("mhc", {"parameterisation": "birkhoff"}),
    ("mhc", {"parameterisation": "lite", "streams": 7}), ("mhc", {"parameterisation": "kron", "streams": 7}),
])
def test_options_validated(depth, options):
    with pytest.raises(UserError, match="streams|dynamic|sinkhorn_iters|init|parameterisation"):
        tiny_config(depth=depth, depth_options=options)
