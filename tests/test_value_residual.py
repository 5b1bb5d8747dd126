"""The value residual (ResFormer) against a float64 reference written from its equation
U_n = A_n (lambda_1 V_n + lambda_2 V_1) (a plain loop over sublayers with its own attention,
weights read from the state_dict by name), with grouped KV heads, the ShortSWA sub-block, a qkv
mixer and `depth_layers`; the interface hook it uses (DepthOperator.attention_values) and its
declared state and payload. Decode parity, gradients, weight decay and the table are checked for
every registered operator elsewhere."""
from __future__ import annotations

import math

import pytest
import torch
from reference import band_attention, head, norm_weight, rmsnorm, rope, sublayer

from resstream import ResStreamLM
from resstream.depth.base import DepthOperator
from resstream.errors import UserError
from resstream.testing import reference_model, sample_ids, tiny_config

TIGHT = dict(rtol=1e-9, atol=1e-9)


def build(options=None, mixer=None, **changes):
    return reference_model("value_residual", options, mixer, **changes)


ids_for = sample_ids


def attention(x, w, prefix, config, mix_values):
    """Global causal attention of one sequence [T, d] whose values pass `mix_values` first."""
    t = x.shape[0]
    heads, kv, hd = config.n_heads, config.kv_heads, config.head_dim
    q = (x @ w[f"{prefix}.q_proj.weight"].T).view(t, heads, hd).transpose(0, 1)
    k = (x @ w[f"{prefix}.k_proj.weight"].T).view(t, kv, hd).transpose(0, 1)
    v = mix_values(x @ w[f"{prefix}.v_proj.weight"].T).view(t, kv, hd).transpose(0, 1)
    positions = torch.arange(t)
    q, k = rope(q, positions, config.rope_theta), rope(k, positions, config.rope_theta)
    k, v = k.repeat_interleave(heads // kv, 0), v.repeat_interleave(heads // kv, 0)
    out = band_attention(q, k, v, None).transpose(0, 1).reshape(t, heads * hd)
    return out @ w[f"{prefix}.o_proj.weight"].T


def value_residual_reference(model, ids):
    w = {k: v.double() for k, v in model.state_dict().items()}
    config = model.config
    options = {"lambda1": 0.5, "lambda2": 0.5, "learnable": False, **config.depth_options}
    active = set(range(config.n_layers) if config.depth_layers is None else config.depth_layers)
    kinds = list(model.blocks[0].site_kinds)

    def forward(h):
        first, mixing = [], 0  # V_1 once computed; index of the next mixing layer
        for layer in range(config.n_layers):
            for kind in kinds:
                x = rmsnorm(h, norm_weight(w, layer, kind), config.norm_eps)
                if kind != "attn":
                    h = h + sublayer(kind, layer, x, w, config)
                    continue

                def mix(v, layer=layer):
                    nonlocal mixing
                    if not first:
                        first.append(v)
                        return v
                    if layer not in active:
                        return v
                    if options["learnable"]:
                        lambda1, lambda2 = w["depth.lambdas"][mixing]
                    else:
                        lambda1, lambda2 = options["lambda1"], options["lambda2"]
                    mixing += 1
                    return lambda1 * v + lambda2 * first[0]

                h = h + attention(x, w, f"blocks.{layer}.attn", config, mix)
        return h

    return torch.stack([head(forward(w["embed.weight"][row]), w, config) for row in ids])


CASES = [({}, None), ({"learnable": True}, None), ({"lambda1": 1.0, "lambda2": -0.3}, "shortswa"),
         ({"learnable": True}, "shortswa")]


@pytest.mark.parametrize("options, mixer", CASES, ids=str)
def test_matches_float64_reference(options, mixer):
    model = build(options, mixer)
    ids = ids_for(model)
    torch.testing.assert_close(model(ids), value_residual_reference(model, ids), **TIGHT)


def test_depth_layers_match_reference_and_lambdas_per_mixing_layer():
    model = build({"learnable": True}, "shortswa", n_layers=4, depth_layers=[0, 2])
    assert model.depth.lambdas.shape == (1, 2)  # block 0's attention makes V_1; block 2 mixes
    ids = ids_for(model)
    torch.testing.assert_close(model(ids), value_residual_reference(model, ids), **TIGHT)
    fresh = ResStreamLM(tiny_config(depth="value_residual", depth_options={"learnable": True}))
    assert torch.equal(fresh.depth.lambdas, torch.full((2, 2), 0.5))  # ResFormer's 0.5, 0.5


def test_values_hook_is_the_interface_default_and_no_attention_means_standard():
    assert DepthOperator.transforms_values is False
    model = build({}, "shortswa", mixer_options={"replace_attention": True})
    standard = ResStreamLM(model.config.replace(depth="standard", depth_options={})).double()
    standard.load_state_dict(model.state_dict())
    ids = ids_for(model)
    torch.testing.assert_close(model(ids), standard(ids), rtol=0, atol=0)
    assert model.depth.pipeline_payload(0) == ("1", 1) and model.depth.depth_state_values() == 32


def test_declared_state_and_payload():
    model = build()  # tiny: d = 32, 2 KV heads of 8: V_1 is 16 wide
    assert model.depth.depth_state_values() == 32 + 16
    assert [model.depth.pipeline_payload(layer)[1] for layer in range(3)] == [1.5, 1.5, 1]
    assert math.isclose(model.depth.forward_macs_per_token(8), 2 * 2 * 16)


@pytest.mark.parametrize("options, match", [
    ({"learnable": "sometimes"}, "learnable='sometimes' is invalid; allowed: true or false"),
    ({"lambda1": "big"}, "lambda1='big' is invalid; allowed: a finite number"),
    ({"lambda3": 1.0}, "unknown option"),
])
def test_bad_options_are_one_line_errors(options, match):
    with pytest.raises(UserError, match=match) as error:
        tiny_config(depth="value_residual", depth_options=options)
    assert "\n" not in str(error.value)
