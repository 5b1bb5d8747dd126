"""Norm placement across depth: Post-LN, DeepNorm, Peri-LN and LayerNorm Scaling.

Each is checked against a float64 reference written from its equation (a plain loop over the
sublayers, weights read from the state_dict by name, sublayers from tests/reference.py), with the
ShortSWA sub-block and with `depth_layers`; plus their inits (DeepNet's alpha, beta and weight
scaling, LNS without the scaled output init), their declared state, and option validation.
Decode parity, gradients to every parameter, weight decay, pipeline stage round trips, the
operators table and the FLOP declaration are checked for every registered operator elsewhere.
"""
from __future__ import annotations

import math

import pytest
import torch
from reference import head, norm_weight, rmsnorm, site_kinds, sublayer

from resstream import ResStreamLM
from resstream.depth.deepnorm import deepnet_alpha, deepnet_beta
from resstream.errors import UserError
from resstream.testing import baseline_twin, reference_model, sample_ids, tiny_config

TIGHT = dict(rtol=1e-9, atol=1e-9)


build = reference_model
ids_for = sample_ids


def weights(model):
    return {k: v.double() for k, v in model.state_dict(keep_vars=True).items()}


def sites_of(config):
    """(site index, block, kind) in order."""
    kinds = site_kinds(config)
    return [(layer * len(kinds) + i, layer, kind)
            for layer in range(config.n_layers) for i, kind in enumerate(kinds)]


def active_blocks(config):
    return set(range(config.n_layers) if config.depth_layers is None else config.depth_layers)


# ---------------------------------------------------------------------------------- Post-LN, DeepNorm
def post_norm_reference(model, ids, alpha):
    """Every block active: x_0 = Norm_emb(embedding) (or the raw embedding), then for every
    sublayer x_{s+1} = PostNorm_s(alpha x_s + F_s(x_s)), logits = W_head x_last. PostNorm_s has the
    weight of the norm in sublayer s + 1's slot, the final norm's for the last sublayer; Norm_emb
    that of the first sublayer's slot."""
    w, config = weights(model), model.config
    sites = sites_of(config)
    slot_norms = [norm_weight(w, layer, kind) for _, layer, kind in sites] + [w["norm.weight"]]
    embedding_norm = config.depth_options.get("embedding_norm", True)
    outputs = []
    for row in ids:
        x = w["embed.weight"][row]
        if embedding_norm:
            x = rmsnorm(x, slot_norms[0], config.norm_eps)
        for s, layer, kind in sites:
            x = rmsnorm(alpha * x + sublayer(kind, layer, x, w, config), slot_norms[s + 1], config.norm_eps)
        outputs.append(x @ w["lm_head.weight"].T)
    return torch.stack(outputs)


def mixed_post_norm_reference(model, ids, alpha):
    """With `depth_layers`: an active sublayer normalises the stream it receives with its own
    norm and adds its output to alpha times that; an inactive one is pre-norm standard addition."""
    w, config = weights(model), model.config
    active = active_blocks(config)
    embedding_norm = config.depth_options.get("embedding_norm", True)
    outputs = []
    for row in ids:
        u = w["embed.weight"][row]
        for s, layer, kind in sites_of(config):
            normed = rmsnorm(u, norm_weight(w, layer, kind), config.norm_eps)
            if layer in active:
                x = normed if (s > 0 or embedding_norm) else u
                u = alpha * x + sublayer(kind, layer, x, w, config)
            else:
                u = u + sublayer(kind, layer, normed, w, config)
        outputs.append(head(u, w, config))
    return torch.stack(outputs)


POST_CASES = [("post_ln", {}), ("post_ln", {"embedding_norm": False}), ("deepnorm", {}),
              ("deepnorm", {"alpha": 1.7, "init": "scale", "embedding_norm": False})]


def alpha_of(model):
    return model.depth.alpha if model.config.depth == "deepnorm" else 1.0


@pytest.mark.parametrize("mixer", [None, "shortswa"])
@pytest.mark.parametrize("name, options", POST_CASES, ids=str)
def test_post_norm_matches_float64_reference(name, options, mixer):
    model = build(name, options, mixer)
    ids = ids_for(model)
    torch.testing.assert_close(model(ids), post_norm_reference(model, ids, alpha_of(model)), **TIGHT)
    torch.testing.assert_close(model(ids), mixed_post_norm_reference(model, ids, alpha_of(model)), **TIGHT)


@pytest.mark.parametrize("name, options", POST_CASES, ids=str)
def test_post_norm_depth_layers_and_gradients_match_reference(name, options):
    for active in ([1, 2], [0, 3]):
        model = build(name, options, "shortswa", n_layers=4, depth_layers=active)
        ids = ids_for(model)
        reference = mixed_post_norm_reference(model, ids, alpha_of(model))
        torch.testing.assert_close(model(ids), reference, **TIGHT)
    probe = torch.randn(1, ids.shape[1], model.config.vocab_size, dtype=torch.float64)
    params = list(model.parameters())
    got = torch.autograd.grad((model(ids[:1]) * probe).sum(), params, allow_unused=True)
    want = torch.autograd.grad((mixed_post_norm_reference(model, ids[:1], alpha_of(model)) * probe).sum(),
                               params, allow_unused=True)
    for (param_name, _), g, expected in zip(model.named_parameters(), got, want):
        assert (g is None) == (expected is None), param_name
        if g is not None:
            torch.testing.assert_close(g, expected, **TIGHT, msg=lambda m, n=param_name: f"{n}: {m}")


@pytest.mark.parametrize("name", ["post_ln", "deepnorm"])
def test_post_norm_has_the_baseline_parameters_and_is_not_the_baseline(name):
    model = build(name, perturb=False)
    twin = baseline_twin(model)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in twin.named_parameters()]
    assert not type(model.depth).starts_at_baseline
    ids = ids_for(model)
    with torch.no_grad():
        assert (model(ids) - twin(ids)).abs().max() > 1e-3


def test_deepnet_constants_follow_the_paper():
    assert deepnet_alpha(3) == pytest.approx(6 ** 0.25) and deepnet_beta(3) == pytest.approx(24 ** -0.25)
    model = ResStreamLM(tiny_config(depth="deepnorm", n_layers=6))
    assert model.depth.alpha == pytest.approx(12 ** 0.25) and model.depth.beta == pytest.approx(48 ** -0.25)
    custom = ResStreamLM(tiny_config(depth="deepnorm", depth_options={"alpha": 2.0, "beta": 0.5}))
    assert (custom.depth.alpha, custom.depth.beta) == (2.0, 0.5)


def seeded(config):
    torch.manual_seed(0)
    return ResStreamLM(config)


@pytest.mark.parametrize("mixer", [None, "shortswa"])
def test_deepnorm_scale_init_multiplies_the_model_init_by_beta(mixer):
    """init="scale" (torchscale): FFN, value and output weights of active blocks times beta,
    query / key and inactive blocks untouched."""
    config = tiny_config(depth="deepnorm", depth_options={"init": "scale"}, local_mixer=mixer,
                         n_layers=4, depth_layers=[0, 2])
    model = seeded(config)
    plain = seeded(config.replace(depth_options={"init": "none"}))
    beta = model.depth.beta
    scaled = ("v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    changed = 0
    for (name, p), (_, q) in zip(model.named_parameters(), plain.named_parameters()):
        layer = int(name.split(".")[1]) if name.startswith("blocks.") else None
        if layer in (0, 2) and name.split(".")[-2] in scaled:
            torch.testing.assert_close(p, beta * q, rtol=0, atol=0)
            changed += 1
        else:
            assert torch.equal(p, q), name
    assert changed == 2 * (5 + (2 if mixer else 0))  # the ShortSWA sub-block: its v and o


def test_deepnorm_xavier_init_uses_gain_beta_and_one():
    """init="xavier" (the paper): xavier_normal_ with gain beta (FFN, value, output) or 1 (q, k)."""
    config = tiny_config(depth="deepnorm", d_model=256, n_heads=4, n_kv_heads=4, mlp_hidden=256,
                         n_layers=2)
    model = seeded(config)
    beta = model.depth.beta
    attn, mlp = model.blocks[1].attn, model.blocks[1].mlp
    xavier = math.sqrt(2.0 / (256 + 256))
    for linear, gain in [(attn.q_proj, 1.0), (attn.k_proj, 1.0), (attn.v_proj, beta),
                         (attn.o_proj, beta), (mlp.gate_proj, beta), (mlp.down_proj, beta)]:
        assert linear.weight.std().item() == pytest.approx(gain * xavier, rel=0.02)
    assert model.embed.weight.std().item() == pytest.approx(config.init_std, rel=0.05)


@pytest.mark.parametrize("name, options", POST_CASES, ids=str)
def test_post_norm_state_is_one_vector(name, options):
    model = build(name, options, perturb=False)
    assert model.depth.depth_state_vectors() == 1 and model.depth.pipeline_payload(0) == ("1", 1)
    state = model.depth.init_state(torch.zeros(1, 2, 32, dtype=torch.float64), None)
    for site in model.sites[:2]:
        model.depth.read(state, site, lambda x: x, None)
        state = model.depth.write(state, site, torch.ones(1, 2, 32, dtype=torch.float64), None)
    assert len(model.depth.stage_state(state, 0)) == 1


# ---------------------------------------------------------------------------------- Peri-LN
def peri_ln_reference(model, ids):
    """x_{s+1} = x_s + NormOut_s(F_s(NormIn_s(x_s))) at active sublayers (standard addition
    elsewhere); x_0 = Norm_emb(embedding) with `embedding_norm`."""
    w, config = weights(model), model.config
    active = active_blocks(config)
    slots = {}
    for s, layer, _ in sites_of(config):
        if layer in active:
            slots[s] = len(slots)
    outputs = []
    for row in ids:
        h = w["embed.weight"][row]
        if config.depth_options.get("embedding_norm", False):
            h = rmsnorm(h, w["depth.embed_norm.weight"], config.norm_eps)
        for s, layer, kind in sites_of(config):
            out = sublayer(kind, layer, rmsnorm(h, norm_weight(w, layer, kind), config.norm_eps), w, config)
            if s in slots:
                out = rmsnorm(out, w[f"depth.out_norms.{slots[s]}.weight"], config.norm_eps)
            h = h + out
        outputs.append(head(h, w, config))
    return torch.stack(outputs)


PERI_CASES = [{}, {"embedding_norm": True, "output_init": 0.3}]


@pytest.mark.parametrize("mixer", [None, "shortswa"])
@pytest.mark.parametrize("options", PERI_CASES, ids=str)
def test_peri_ln_matches_float64_reference(options, mixer):
    model = build("peri_ln", options, mixer)
    ids = ids_for(model)
    torch.testing.assert_close(model(ids), peri_ln_reference(model, ids), **TIGHT)
    model = build("peri_ln", options, mixer, n_layers=4, depth_layers=[1, 3])
    assert len(model.depth.out_norms) == 2 * len(site_kinds(model.config))
    torch.testing.assert_close(model(ids), peri_ln_reference(model, ids), **TIGHT)


def test_peri_ln_init():
    model = build("peri_ln", perturb=False)
    assert not type(model.depth).starts_at_baseline and model.depth.embed_norm is None
    assert all(torch.equal(n.weight, torch.ones(32, dtype=torch.float64)) for n in model.depth.out_norms)
    model = build("peri_ln", {"output_init": 0.25, "embedding_norm": True}, perturb=False)
    assert all(torch.equal(n.weight, torch.full((32,), 0.25, dtype=torch.float64))
               for n in model.depth.out_norms)
    assert torch.equal(model.depth.embed_norm.weight, torch.ones(32, dtype=torch.float64))
    ids = ids_for(model)
    with torch.no_grad():  # normalised branches: not the baseline at init
        assert (model(ids) - baseline_twin(model)(ids)).abs().max() > 1e-3


# ---------------------------------------------------------------------------------- LNS
def ln_scaling_reference(model, ids):
    """x_{s+1} = x_s + F_s(Norm_s(x_s) / sqrt(l)), l = block + 1 (or sublayer + 1) at active
    sublayers, l = 1 elsewhere."""
    w, config = weights(model), model.config
    active = active_blocks(config)
    by_sublayer = config.depth_options.get("index", "block") == "sublayer"
    outputs = []
    for row in ids:
        h = w["embed.weight"][row]
        for s, layer, kind in sites_of(config):
            depth = (s if by_sublayer else layer) + 1 if layer in active else 1
            normed = rmsnorm(h, norm_weight(w, layer, kind), config.norm_eps) / math.sqrt(depth)
            h = h + sublayer(kind, layer, normed, w, config)
        outputs.append(head(h, w, config))
    return torch.stack(outputs)


@pytest.mark.parametrize("mixer", [None, "shortswa"])
@pytest.mark.parametrize("options", [{}, {"index": "sublayer", "scaled_init": True}], ids=str)
def test_ln_scaling_matches_float64_reference(options, mixer):
    model = build("ln_scaling", options, mixer)
    ids = ids_for(model)
    torch.testing.assert_close(model(ids), ln_scaling_reference(model, ids), **TIGHT)
    model = build("ln_scaling", options, mixer, n_layers=4, depth_layers=[0, 2])
    torch.testing.assert_close(model(ids), ln_scaling_reference(model, ids), **TIGHT)


def test_ln_scaling_first_block_alone_with_scaled_init_is_the_baseline():
    """l = 1 scales by 1: limited to block 0 and keeping the model's init, LNS is the baseline."""
    model = build("ln_scaling", {"scaled_init": True}, perturb=False, depth_layers=[0])
    assert model.depth.scale == {}
    ids = ids_for(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), baseline_twin(model)(ids), rtol=0, atol=1e-12)
    assert not type(model.depth).starts_at_baseline  # in general (l > 1, unscaled init)


@pytest.mark.parametrize("mixer", [None, "shortswa"])
def test_ln_scaling_removes_the_scaled_output_init(mixer):
    """Default: active blocks' o_proj / down_proj re-drawn from N(0, init_std); everything else
    (and everything with scaled_init=True) is the model's init."""
    config = tiny_config(depth="ln_scaling", d_model=128, n_heads=4, n_kv_heads=4, mlp_hidden=128,
                         n_layers=3, depth_layers=[0, 2], local_mixer=mixer)
    model = seeded(config)
    kept = seeded(config.replace(depth_options={"scaled_init": True}))
    redrawn = []
    for (name, p), (_, q) in zip(model.named_parameters(), kept.named_parameters()):
        if torch.equal(p, q):
            continue
        redrawn.append(name)
        assert p.std().item() == pytest.approx(config.init_std, rel=0.1)
        assert q.std().item() < config.init_std / 2  # init_std / sqrt(2 L) before
    expected = [f"blocks.{i}.{m}" for i in (0, 2) for m in
                (["mix.attention.o_proj.weight"] if mixer else []) + ["attn.o_proj.weight", "mlp.down_proj.weight"]]
    assert sorted(redrawn) == sorted(expected)


# ---------------------------------------------------------------------------------- options
@pytest.mark.parametrize("name, options, match", [
    ("post_ln", {"embedding_norm": "maybe"}, "embedding_norm='maybe' is invalid; allowed: true or false"),
    ("post_ln", {"alpha": 2}, "unknown option"),
    ("deepnorm", {"alpha": 0}, "depth_options.alpha=0.0 is invalid; allowed: null"),
    ("deepnorm", {"beta": -1.0}, "depth_options.beta=-1.0 is invalid"),
    ("deepnorm", {"init": "kaiming"}, "depth_options.init='kaiming' is invalid; allowed: xavier, scale, none"),
    ("peri_ln", {"output_init": 0}, "depth_options.output_init=0.0 is invalid; allowed: a number > 0"),
    ("ln_scaling", {"index": "layer"}, "depth_options.index='layer' is invalid; allowed: block, sublayer"),
    ("ln_scaling", {"scaled_init": "no"}, "scaled_init='no' is invalid"),
])
def test_bad_options_are_one_line_errors(name, options, match):
    with pytest.raises(UserError, match=match) as error:
        tiny_config(depth=name, depth_options=options)
    assert isinstance(error.value, ValueError) and "\n" not in str(error.value)
