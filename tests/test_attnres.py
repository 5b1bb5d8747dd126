"""Full and Block Attention Residuals (depth/attnres.py) against float64 references written from
the paper's equations (Full) and the official pseudocode (Block), plus init, gradients, every
learned weight, depth_layers, decoding and options."""
import pytest
import torch

from resstream.depth.attnres import (DepthSources, NormalizedScores, SoftmaxMerge,
                                     phase_statistics, settle)
from resstream.errors import UserError
from resstream.model import ResStreamLM
from resstream.testing import (assert_each_parameter_changes_output, assert_gradients_match,
                               baseline_twin,
                               cached_logits, perturb_parameters, run_operator_hooks, tiny_config)

IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))


def rms_norm(x, weight, eps):
    return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def pseudo_query_read(op, key, values, eps):
    """softmax_i(w^T RMSNorm_g(v_i)) v_i, one source at a time."""
    if len(values) == 1:  # weight 1 whatever the query: the first read has no parameters
        return values[0]
    w, g = op.query[key], op.key_norm[key]
    logits = torch.stack([(w * rms_norm(v, g, eps)).sum(-1) for v in values])
    weights = torch.softmax(logits, dim=0)
    return sum(a.unsqueeze(-1) * v for a, v in zip(weights, values))


def sublayer_pairs(model):
    for block in model.blocks:
        yield from zip(block.sites, block.sublayers())


def reference_full(model, ids):
    """Full AttnRes (paper eqs.): h_l = sum_{i<l} softmax_i(w_l^T RMSNorm_l(v_i)) v_i over
    v_0 = embedding and every earlier sublayer output; inactive blocks read sum_i v_i."""
    op, eps = model.depth, model.config.norm_eps
    ctx = model.context(ids.shape[1], None, ids.device)
    sources = [model.embed(ids)]
    for site, sub in sublayer_pairs(model):
        if op.is_active(site.layer):
            h = pseudo_query_read(op, str(site.index), sources, eps)
        else:
            h = sum(sources)
        sources.append(sub(sub.norm(h), ctx))
    last_active = op.is_active(model.config.n_layers - 1)
    h = pseudo_query_read(op, "final", sources, eps) if last_active else sum(sources)
    return model.lm_head(model.norm(h))


def ablation_read(op, key, values, eps):
    """The paper's ablations from the equations, per head h (channels c_h) and source i:
    a_{h,i} = softmax_i or sigmoid( q[c_h] . K(v_i)[c_h] ),  h = sum_i a_{h,i} v_i[c_h], where
    q = w_l (static) or W_l RMSNorm(sum_i v_i) (input), K = RMSNorm_g (key norm) or identity."""
    if len(values) == 1:
        return values[0]
    opts = op.options
    query = op.query[key]
    if opts.query == "input":
        x = sum(values)
        query = torch.einsum("ed,btd->bte", query, rms_norm(x, torch.ones_like(x[0, 0]), eps))
    keys = [rms_norm(v, op.key_norm[key], eps) if opts.key_norm else v for v in values]
    width = values[0].shape[-1] // opts.heads
    out = torch.zeros_like(values[0])
    for h in range(opts.heads):
        c = slice(h * width, (h + 1) * width)
        logits = torch.stack([(query[..., c] * k[..., c]).sum(-1) for k in keys])
        weights = logits.softmax(0) if opts.weights == "softmax" else logits.sigmoid()
        out[..., c] = sum(a.unsqueeze(-1) * v[..., c] for a, v in zip(weights, values))
    return out


def reference_block(model, ids, block_size, read=pseudo_query_read):
    """Block AttnRes, the official pseudocode literally: read over blocks + [partial], THEN the
    boundary check (0-based sublayer index % block_size == 0) appends the partial; the partial
    starts as the embedding, so index 0 turns the embedding into block 0. Inactive blocks (and
    the final read when the last block is inactive) read the plain sum of those values."""
    op, eps = model.depth, model.config.norm_eps
    ctx = model.context(ids.shape[1], None, ids.device)
    blocks, partial = [], model.embed(ids)
    for site, sub in sublayer_pairs(model):
        values = blocks + ([partial] if partial is not None else [])
        h = read(op, str(site.index), values, eps) if op.is_active(site.layer) else sum(values)
        if site.index % block_size == 0:
            blocks.append(partial)
            partial = None
        out = sub(sub.norm(h), ctx)
        partial = out if partial is None else partial + out
    values = blocks + [partial]
    last_active = op.is_active(model.config.n_layers - 1)
    h = read(op, "final", values, eps) if last_active else sum(values)
    return model.lm_head(model.norm(h)), len(values)


def build(depth, options=None, seed=0, dtype=torch.float64, perturb=True, **changes):
    torch.manual_seed(seed)
    model = ResStreamLM(tiny_config(depth=depth, depth_options=options or {}, **changes))
    model = model.to(dtype)
    if perturb:
        perturb_parameters(model, scale=0.3, seed=seed)  # queries far from zero: peaked weights
    return model


@pytest.mark.parametrize("changes", [{}, {"local_mixer": "shortswa"}, {"depth_layers": [0, 2]},
                                     {"depth_layers": [1]}])
def test_full_matches_float64_reference(changes):
    model = build("attnres", **changes)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), reference_full(model, IDS), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("block_size,changes", [
    (4, {}), (3, {}), (2, {"local_mixer": "shortswa"}), (4, {"local_mixer": "shortswa"}),
    (1, {}), (100, {}), (3, {"depth_layers": [0, 2]}), (2, {"depth_layers": [1]})])
def test_block_matches_float64_pseudocode(block_size, changes):
    model = build("block_attnres", {"block_size": block_size}, **changes)
    expected, n_sources = reference_block(model, IDS, block_size)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), expected, rtol=1e-10, atol=1e-10)
    assert model.depth.depth_state_vectors() == n_sources  # sources seen by the final read


ABLATIONS = [{"query": "input"}, {"weights": "sigmoid"}, {"heads": 4}, {"key_norm": False},
             {"query": "input", "weights": "sigmoid", "heads": 2, "key_norm": False}]


@pytest.mark.parametrize("switches", ABLATIONS)
@pytest.mark.parametrize("depth,options,changes", [
    ("attnres", {}, {}), ("block_attnres", {"block_size": 3}, {"local_mixer": "shortswa"}),
    ("block_attnres", {"n_blocks": 2}, {"depth_layers": [0, 2]})])
def test_ablation_switches_match_float64_reference(switches, depth, options, changes):
    model = build(depth, {**options, **switches}, **changes)
    assert model.depth.plain  # the switches run on the plain-autograd path
    block_size = model.depth.block_size
    expected, _ = reference_block(model, IDS, block_size, read=ablation_read)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("switches", ABLATIONS)
def test_ablation_switches_gradients_and_weights(switches):
    model = build("block_attnres", {"block_size": 3, **switches})
    assert_gradients_match(model, lambda: model(IDS),
                           lambda: reference_block(model, IDS, 3, read=ablation_read)[0],
                           rtol=1e-8, atol=1e-11)
    params = dict(model.depth.named_parameters())
    per_read = 1 + switches.get("key_norm", True)  # the query (w_l or W_l) and the key norm
    assert len(params) == per_read * (2 * 3 - 1 + 1)
    float_model = build("block_attnres", {"block_size": 3, **switches}, dtype=torch.float32)
    assert_each_parameter_changes_output(float_model, IDS, dict(float_model.depth.named_parameters()))


@pytest.mark.parametrize("switches", ABLATIONS)
def test_ablation_switches_start_at_standard_model(switches):
    """Zero queries (w_l or W_l) give equal weights, softmax or sigmoid: (1/m or 1/2) x the
    standard residual, which the next RMSNorm removes (up to eps, hence norm_eps=1e-10)."""
    torch.manual_seed(0)
    model = ResStreamLM(tiny_config(depth="block_attnres", depth_options=switches, norm_eps=1e-10))
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), baseline_twin(model)(IDS), rtol=0, atol=1e-5)


@pytest.mark.parametrize("switches", ABLATIONS)
def test_ablation_switches_decode_incrementally(switches):
    model = build("block_attnres", {"block_size": 3, **switches})
    with torch.no_grad():
        full = model(IDS)
    torch.testing.assert_close(cached_logits(model, IDS, prefill=3), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n_blocks,block_size", [(3, 2), (2, 3), (4, 2), (8, 1), (1, 6)])
def test_n_blocks_sets_sublayers_per_block(n_blocks, block_size):
    """N blocks over the 6 sublayers: S = ceil(6 / N) (the paper's N = 8 on a deep model)."""
    by_count = build("block_attnres", {"n_blocks": n_blocks})
    assert by_count.depth.block_size == block_size
    by_size = build("block_attnres", {"block_size": block_size})
    by_size.load_state_dict(by_count.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(by_count(IDS), by_size(IDS), rtol=0, atol=0)


def test_block_size_one_is_full_attnres():
    full = build("attnres")
    block = build("block_attnres", {"block_size": 1})
    block.load_state_dict(full.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(block(IDS), full(IDS), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("depth,options", [("attnres", {}), ("block_attnres", {"block_size": 3})])
def test_gradients_match_reference(depth, options):
    """The hand-written backward passes agree with autograd through the reference loops."""
    model = build(depth, options, local_mixer="shortswa")
    reference = (lambda: reference_full(model, IDS)) if depth == "attnres" else \
        (lambda: reference_block(model, IDS, options["block_size"])[0])
    assert_gradients_match(model, lambda: model(IDS), reference, rtol=1e-8, atol=1e-11)


def test_custom_functions_gradcheck():
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    mix, lse, query, partial = rand(1, 2, 3), rand(1, 2), rand(3), rand(1, 2, 3)
    recent, logits = [rand(1, 2, 3), rand(1, 2, 3)], [rand(1, 2), rand(1, 2)]
    assert torch.autograd.gradcheck(
        lambda *a: SoftmaxMerge.apply(a[0], a[1], a[2], 1e-3, a[3], 2, *a[4:]),
        (mix, lse, query, partial, *recent, *logits))
    assert torch.autograd.gradcheck(lambda *a: SoftmaxMerge.apply(a[0], a[1], a[2], 1e-3, None, 2,
                                                                  *a[3:]),
                                    (mix, lse, query, *recent, *logits))
    assert torch.autograd.gradcheck(lambda v, q: NormalizedScores.apply(v, q, 1e-3),
                                    (partial, rand(4, 3)))


@pytest.mark.parametrize("capacity,n_columns", [(1, 2), (8, 2), (8, 1)])
def test_phase_statistics_over_buffer(capacity, n_columns):
    """The phase mix read from the source buffer (growing it when `capacity` is too small)
    equals softmax(logits) @ values, values and gradients included (PhaseMix's backward)."""
    gen = torch.Generator().manual_seed(0)
    values = [torch.randn(2, 3, 5, generator=gen, dtype=torch.float64).requires_grad_()
              for _ in range(5)]
    logits = [torch.randn(2, 3, 4, generator=gen, dtype=torch.float64).requires_grad_()
              for _ in range(5)]
    columns = range(1, 1 + n_columns)  # one column: the final read's outer-product backward

    def ours():
        sources = DepthSources(torch.float64, "cpu", None, capacity)
        for split in ([0, 1], [2], [3, 4]):  # three phases: the buffer fills in steps
            sources.recent = [(values[i], logits[i]) for i in split]
            settle(sources)
        mix, lse = phase_statistics(sources, columns)
        return mix, lse

    def reference():
        z = torch.stack([l[..., columns.start:columns.stop] for l in logits], -1)  # [B,T,n,m]
        return torch.softmax(z, -1) @ torch.stack(values, -2), torch.logsumexp(z, -1)

    weights = [torch.randn(2, 3, n_columns, 5, generator=gen, dtype=torch.float64),
               torch.randn(2, 3, n_columns, generator=gen, dtype=torch.float64)]
    results = []
    for fn in (ours, reference):
        outputs = fn()
        grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outputs, weights)),
                                    values + logits)
        results.append((outputs, grads))
    torch.testing.assert_close(results[0], results[1], rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *v: phase_statistics(
        _settled(list(zip(v, logits)), capacity), columns)[0], tuple(values))


def _settled(pairs, capacity):
    sources = DepthSources(torch.float64, "cpu", None, capacity)
    sources.recent = pairs
    settle(sources)
    return sources


@pytest.mark.parametrize("depth,options,changes", [
    ("attnres", {}, {}), ("block_attnres", {}, {}), ("block_attnres", {"block_size": 3}, {}),
    ("attnres", {}, {"local_mixer": "shortswa"}),
    ("block_attnres", {}, {"local_mixer": "shortswa"}),
    ("attnres", {}, {"depth_layers": [1]}),
])
def test_starts_at_standard_model(depth, options, changes):
    """Zero pseudo-queries give uniform weights: every read is (1/m) x the standard residual and
    the following RMSNorm removes 1/m -- exactly only up to eps (RMSNorm(x/m) uses eps*m^2
    relative to RMSNorm(x); with init_std=0.02 embeddings and eps=1e-5 that is a visible change),
    so we compare at norm_eps=1e-10, where the remaining difference is float32 rounding."""
    torch.manual_seed(0)
    model = ResStreamLM(tiny_config(depth=depth, depth_options=options, norm_eps=1e-10, **changes))
    twin = baseline_twin(model)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), twin(IDS), rtol=0, atol=1e-5)


@pytest.mark.parametrize("depth,options", [("attnres", {}), ("block_attnres", {"block_size": 3})])
def test_every_learned_weight_matters(depth, options):
    """Perturbing any pseudo-query or key-norm weight changes the output."""
    model = build(depth, options, dtype=torch.float32)
    params = dict(model.depth.named_parameters())
    # query and key norm per sublayer read except the first (one source) + the final read
    assert len(params) == 2 * (2 * 3 - 1 + 1)
    assert_each_parameter_changes_output(model, IDS, params)


@pytest.mark.parametrize("depth", ["attnres", "block_attnres"])
def test_no_active_layer_is_the_standard_model(depth):
    model = build(depth, depth_layers=[])
    assert not list(model.depth.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), baseline_twin(model)(IDS), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("depth,options,changes", [
    ("attnres", {}, {}), ("block_attnres", {}, {"local_mixer": "shortswa"}),
    ("attnres", {}, {"depth_layers": [1]}), ("block_attnres", {}, {"depth_layers": [0, 2]}),
    # blocks that straddle layers, and one block longer than the model
    ("block_attnres", {"block_size": 3}, {}), ("block_attnres", {"block_size": 5}, {}),
    ("block_attnres", {"block_size": 99}, {"local_mixer": "shortswa"})])
def test_incremental_decoding_matches_full_forward(depth, options, changes):
    """Prefill takes the general two-phase path, the one-token steps the decode path."""
    model = build(depth, options, **changes)  # float64: T=1 and T=7 kernels round differently
    with torch.no_grad():
        full = model(IDS)
    torch.testing.assert_close(cached_logits(model, IDS, prefill=3), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("tokens", [5, 1])  # 1 token without autograd: the decode path
@pytest.mark.parametrize("depth", ["attnres", "block_attnres"])
def test_depth_reads_run_in_float32_under_bfloat16_autocast(depth, tokens):
    """Under autocast the sublayers emit bfloat16; the depth reads must still be float32 math.
    (Hook-level: bfloat16 Linear layers crash on this CI's CPU even for `standard`.)"""
    model = build(depth, {"block_size": 3} if depth == "block_attnres" else {},
                  dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, tokens, 32, generator=gen)
    outputs = [torch.randn(2, tokens, 32, generator=gen).bfloat16() for _ in model.sites]
    with torch.no_grad():
        expected_reads, expected = run_operator_hooks(model.depth, x0, [o.float() for o in outputs])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reads, final = run_operator_hooks(model.depth, x0, outputs)
    assert final.dtype == torch.float32
    torch.testing.assert_close(final, expected, rtol=1e-6, atol=1e-6)
    for read, want in zip(reads, expected_reads):
        torch.testing.assert_close(read, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("depth", ["attnres", "block_attnres"])
def test_decode_path_with_a_bfloat16_stream_matches_the_general_path(depth):
    """A bfloat16 stream keeps its sources in bfloat16 on both paths and reads in float32:
    the decode path (no autograd) agrees with the general path on the same token to bfloat16
    rounding of the outputs. (Hook-level: bfloat16 matmuls crash on this CI's CPU.)"""
    model = build(depth, {"block_size": 3} if depth == "block_attnres" else {},
                  dtype=torch.float32)
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randn(2, 1, 32, generator=gen).bfloat16()
    outputs = [torch.randn(2, 1, 32, generator=gen).bfloat16() for _ in model.sites]
    general_reads, general = run_operator_hooks(model.depth, x0, outputs)  # autograd on
    with torch.no_grad():
        decode_reads, decoded = run_operator_hooks(model.depth, x0, outputs)
    assert decoded.dtype == general.dtype == torch.bfloat16
    for got, want in zip([*decode_reads, decoded], [*general_reads, general]):
        torch.testing.assert_close(got.float(), want.detach().float(), rtol=8e-3, atol=1e-5)


def test_decode_state_formula_matches_the_measured_state():
    from resstream.bench.decode import depth_state_bytes_per_token

    for depth, options in (("attnres", {}), ("block_attnres", {"block_size": 3})):
        model = build(depth, options, dtype=torch.float32)
        measured = depth_state_bytes_per_token(model, torch.device("cpu"))
        assert measured == model.depth.depth_state_values() * 4
        # each source of the decode stack carries one more value: sqrt(d * eps)
        assert model.depth.depth_state_values() == model.depth.depth_state_vectors() * 33


def test_accounting():
    model = build("block_attnres", {"block_size": 4}, dtype=torch.float32, n_layers=4)
    # after block 1 (sublayers 0..3) the boundary before sublayer 4 is not crossed yet:
    # embedding + the partial sum of sublayers 0..3
    assert model.depth.pipeline_payload(1)[1] == 2
    assert model.depth.pipeline_payload(2)[1] == 3  # + block {0..3}, partial {4, 5}
    full = build("attnres", dtype=torch.float32, n_layers=4)
    assert full.depth.pipeline_payload(1)[1] == 5  # embedding + 4 sublayer outputs
    assert full.depth.depth_state_vectors() == 9


@pytest.mark.parametrize("options", [{"block_size": 0}, {"block_size": -2}, {"window": 3},
                                     {"block_size": "four"}, {"block_size": 2.5},
                                     {"n_blocks": 0}, {"block_size": 2, "n_blocks": 8},
                                     {"query": "dynamic"}, {"weights": "relu"}, {"heads": 3},
                                     {"heads": 0}, {"key_norm": "no"}])
def test_options_validated(options):
    with pytest.raises(UserError, match="block_size|window|n_blocks|query|weights|heads|key_norm") \
            as error:
        tiny_config(depth="block_attnres", depth_options=options)
    assert "\n" not in str(error.value)
    with pytest.raises(UserError):
        tiny_config(depth="attnres", depth_options={"block_size": 2})
