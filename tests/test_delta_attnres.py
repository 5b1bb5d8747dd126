"""Delta Attention Residuals (depth/delta_attnres.py) against a float64 reference written from the
equations, the block-delta bookkeeping (the released code's bug must not come back), init,
every learned weight, depth_layers, decoding and options."""
import pytest
import torch

from resstream.errors import UserError
from resstream.model import ResStreamLM
from resstream.testing import (assert_each_parameter_changes_output, assert_gradients_match,
                               baseline_twin,
                               cached_logits, perturb_parameters, run_operator_hooks, tiny_config)

IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))


def rms_norm(x, weight, eps):
    return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def mixture(op, key, sources, eps):
    """sum_i softmax_i(w^T RMSNorm_g(delta_i)) delta_i, one source at a time."""
    w, g = op.query[key], op.key_norm[key]
    logits = torch.stack([(w * rms_norm(v, g, eps)).sum(-1) for v in sources])
    weights = torch.softmax(logits, dim=0)
    return sum(a.unsqueeze(-1) * v for a, v in zip(weights, sources))


def reference_delta(model, ids):
    """h_in = x + gate * mixture(deltas); x <- x + f(Norm(h_in)). Block deltas are stored as
    x(boundary k) - x(boundary k-1), literally; boundaries before every sublayer whose index is a
    positive multiple of block_size, and at the end of the model. block_append="after_read" (the
    released code): the embedding and each block delta are appended after the read at the
    boundary. final_read=False: the final norm sees x."""
    op, eps, opts = model.depth, model.config.norm_eps, model.depth.options
    block_size = opts.block_size if opts.granularity == "block" else 1
    after = opts.block_append == "after_read"
    ctx = model.context(ids.shape[1], None, ids.device)
    x = x0 = model.embed(ids)
    sources, boundary = ([] if after else [x0]), x0

    def read(key, index, active):
        if not active or not sources:
            return x
        m = sources[0] if len(sources) == 1 else mixture(op, key, sources, eps)
        if opts.gate == "alpha":  # no gate at the first read: it would only rescale x_0
            return x if index == 0 else x + op.gate[key] * m
        return x + m

    for block in model.blocks:
        for site, sub in zip(block.sites, block.sublayers()):
            at_boundary = site.index % block_size == 0
            if at_boundary and site.index > 0 and not after:
                sources.append(x - boundary)
                boundary = x
            h = read(str(site.index), site.index, op.is_active(site.layer))
            if at_boundary and after:
                sources.append(x0 if site.index == 0 else x - boundary)
                boundary = x
            x = x + sub(sub.norm(h), ctx)
    if not torch.equal(x, boundary):
        sources.append(x - boundary)
    h = x
    if opts.final_read:
        h = read("final", -1, op.is_active(model.config.n_layers - 1))
    return model.lm_head(model.norm(h))


def build(options=None, seed=0, dtype=torch.float64, perturb=True, **changes):
    torch.manual_seed(seed)
    model = ResStreamLM(tiny_config(depth="delta_attnres", depth_options=options or {}, **changes))
    model = model.to(dtype)
    if perturb:
        perturb_parameters(model, scale=0.3, seed=seed)
    return model


CASES = [
    ({}, {}),
    ({"gate": "alpha"}, {"local_mixer": "shortswa"}),
    ({"granularity": "block", "block_size": 2}, {}),
    ({"granularity": "block", "block_size": 4, "gate": "alpha"}, {"local_mixer": "shortswa"}),
    ({"granularity": "block", "block_size": 3, "query_init": "normal"}, {"depth_layers": [0, 2]}),
    ({}, {"depth_layers": [1]}),
    ({"final_read": False}, {}),
    ({"granularity": "block", "block_size": 2, "block_append": "after_read"}, {}),
    ({"granularity": "block", "block_size": 3, "block_append": "after_read", "gate": "alpha",
      "final_read": False}, {"local_mixer": "shortswa", "depth_layers": [0, 2]}),
]


@pytest.mark.parametrize("options,changes", CASES)
def test_matches_float64_reference(options, changes):
    model = build(options, **changes)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), reference_delta(model, IDS), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("append", ["before_read", "after_read"])
def test_gradients_match_reference(append):
    model = build({"granularity": "block", "block_size": 3, "gate": "alpha", "block_append": append})
    assert_gradients_match(model, lambda: model(IDS), lambda: reference_delta(model, IDS),
                           rtol=1e-8, atol=1e-11)


def test_block_deltas_are_differences_of_consecutive_boundaries():
    """Embedding 1, block deltas 10, 100, 1000 (blocks of 2 sublayers, zero queries: uniform
    weights). Correct sources: 1, 10, 100, 1000. The released code's bookkeeping (x minus the
    previously appended source) would store 1, 10, 101, 1010 and give other reads."""
    model = build({"granularity": "block", "block_size": 2}, perturb=False)  # 3 layers, 6 sublayers
    x0 = torch.ones(1, 1, 32, dtype=torch.float64)
    outputs = [x0 * v for v in (5, 5, 50, 50, 500, 500)]
    reads, final = run_operator_hooks(model.depth, x0, outputs)
    # read at sublayer 4: x = 111, sources (1, 10, 100)
    torch.testing.assert_close(reads[4], x0 * (111 + (1 + 10 + 100) / 3))
    # final read: x = 1111, sources (1, 10, 100, 1000); the bug would give 1111 + 280.5
    torch.testing.assert_close(final, x0 * (1111 + (1 + 10 + 100 + 1000) / 4))


def test_after_read_appends_a_finished_block_after_the_next_read():
    """The released code's order: the read at a boundary does not see the block finished there
    (nor the first read the embedding). Same numbers as above: embedding 1, blocks 10, 100, 1000."""
    model = build({"granularity": "block", "block_size": 2, "block_append": "after_read"},
                  perturb=False)
    x0 = torch.ones(1, 1, 32, dtype=torch.float64)
    outputs = [x0 * v for v in (5, 5, 50, 50, 500, 500)]
    reads, final = run_operator_hooks(model.depth, x0, outputs)
    torch.testing.assert_close(reads[0], x0)  # no source yet: h = x_0 (before_read: 2 x_0)
    torch.testing.assert_close(reads[2], x0 * (11 + 1))  # the embedding only
    torch.testing.assert_close(reads[4], x0 * (111 + (1 + 10) / 2))  # not yet block 2 (100)
    torch.testing.assert_close(reads[5], x0 * (611 + (1 + 10 + 100) / 3))
    torch.testing.assert_close(final, x0 * (1111 + (1 + 10 + 100 + 1000) / 4))


def test_without_final_read_the_final_norm_sees_x():
    model = build({"final_read": False}, perturb=False)
    x0 = torch.ones(1, 1, 32, dtype=torch.float64)
    _, final = run_operator_hooks(model.depth, x0, [x0 * v for v in (2, 3, 4, 5, 6, 7)])
    torch.testing.assert_close(final, x0 * 28)  # x, where the final read gives 28 + 28 / 7
    assert "final" not in model.depth.query


def test_sublayer_sources_at_init_are_plain_deltas():
    model = build({}, perturb=False)
    x0 = torch.ones(1, 1, 32, dtype=torch.float64)
    outputs = [x0 * v for v in (2, 3, 4, 5, 6, 7)]
    reads, final = run_operator_hooks(model.depth, x0, outputs)
    deltas = [1, 2, 3, 4, 5, 6, 7]
    for s, read in enumerate(reads):
        x = sum(deltas[:s + 1])
        torch.testing.assert_close(read, x0 * (x + x / (s + 1)))  # x + mean(deltas) = (1 + 1/m) x
    torch.testing.assert_close(final, x0 * (28 + 4))


def test_gate_alpha_starts_exactly_at_standard_model():
    """The zero gate makes every read exactly x: identical to `standard`, at any eps."""
    for options in ({"gate": "alpha"}, {"gate": "alpha", "granularity": "block"}):
        torch.manual_seed(0)
        model = ResStreamLM(tiny_config(depth="delta_attnres", depth_options=options,
                                        local_mixer="shortswa"))
        with torch.no_grad():
            torch.testing.assert_close(model(IDS), baseline_twin(model)(IDS), rtol=0, atol=1e-6)


def test_ungated_sublayer_granularity_starts_at_standard_up_to_eps():
    """x + mean(deltas) = (1 + 1/m) x and the sublayer norm removes the factor (up to eps: we use
    norm_eps=1e-10 so that only float32 rounding remains)."""
    torch.manual_seed(0)
    model = ResStreamLM(tiny_config(depth="delta_attnres", norm_eps=1e-10))
    assert model.depth.starts_at_baseline
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), baseline_twin(model)(IDS), rtol=0, atol=1e-5)


def test_ungated_block_granularity_does_not_start_at_standard():
    torch.manual_seed(0)
    model = ResStreamLM(tiny_config(depth="delta_attnres", norm_eps=1e-10,
                                    depth_options={"granularity": "block", "block_size": 3}))
    assert not model.depth.starts_at_baseline
    with torch.no_grad():
        assert (model(IDS) - baseline_twin(model)(IDS)).abs().max() > 1e-4


def test_query_init_options():
    zero = build({}, perturb=False)
    normal = build({"query_init": "normal"}, perturb=False)
    assert all((q == 0).all() for q in zero.depth.query.values())
    values = torch.cat([q.detach() for q in normal.depth.query.values()])
    assert 0.01 < values.std() < 0.04  # N(0, init_std = 0.02)


@pytest.mark.parametrize("options,n_params", [
    ({"gate": "alpha"}, 3 * 6),  # query, key norm, gate per read but the first, + final
    ({"granularity": "block", "block_size": 3}, 2 * 4),  # reads at sublayers 3, 4, 5 and final
    ({"granularity": "block", "block_size": 2, "gate": "alpha"}, 2 * 5 + 6),
    ({"granularity": "block", "block_size": 2, "block_append": "after_read"}, 2 * 4),  # 3, 4, 5, final
    ({"final_read": False}, 2 * 5),  # reads at sublayers 1 .. 5
])
def test_every_learned_weight_matters(options, n_params):
    model = build(options, dtype=torch.float32)
    params = dict(model.depth.named_parameters())
    assert len(params) == n_params
    assert_each_parameter_changes_output(model, IDS, params)


def test_no_active_layer_is_the_standard_model():
    model = build({}, depth_layers=[])
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), baseline_twin(model)(IDS), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("options", [{}, {"granularity": "block", "block_size": 3},
                                     {"granularity": "block", "block_size": 2,
                                      "block_append": "after_read", "final_read": False}])
def test_incremental_decoding_matches_full_forward(options):
    model = build(options, local_mixer="shortswa")
    with torch.no_grad():
        full = model(IDS)
    torch.testing.assert_close(cached_logits(model, IDS, prefill=2), full, rtol=1e-10, atol=1e-10)


def test_accounting():
    model = build({"granularity": "block", "block_size": 4}, perturb=False, n_layers=4)
    # x is not sent across a stage boundary: it is the sum of the sources and the running sum
    assert model.depth.pipeline_payload(2)[1] == 3  # embedding, block {0..3}, running sum
    sub = build({}, perturb=False, n_layers=4)
    assert sub.depth.pipeline_payload(1)[1] == 5  # embedding, 4 outputs (last not appended)
    assert sub.depth.depth_state_vectors() == 10


@pytest.mark.parametrize("options", [{"granularity": "layer"}, {"block_size": 0},
                                     {"query_init": "uniform"}, {"gate": "sigmoid"},
                                     {"null_source": True}, {"gate": 1}, {"final_read": "no"},
                                     {"block_append": "code"}, {"block_append": "after_read"}])
def test_options_validated(options):
    with pytest.raises(UserError, match="granularity|block_size|query_init|gate|null_source|"
                                        "final_read|block_append") as error:
        tiny_config(depth="delta_attnres", depth_options=options)
    assert "\n" not in str(error.value)
