"""ModelConfig validation: every bad value gets a ValueError naming the field, the value and
what is allowed."""
import json

import pytest
import torch

from resstream import ModelConfig, ResStreamLM, list_depth_operators, list_local_mixers
from resstream.testing import tiny_config

BAD_VALUES = [
    (dict(d_model=30, n_heads=4), "d_model", "multiple of n_heads"),
    (dict(n_heads=4, n_kv_heads=3), "n_kv_heads", "divisor"),
    (dict(n_layers=0), "n_layers", ">= 1"),
    (dict(local_window=0), "local_window", ">= 1"),
    (dict(depth="depth_swa", depth_window=0), "depth_window", ">= 1"),
    (dict(depth="residual_magic"), "residual_magic", "known: "),
    (dict(local_mixer="bigconv"), "bigconv", "known: "),
    (dict(depth_layers=[0, 7]), "depth_layers", "block indices"),
    (dict(attn_backend="cuda"), "attn_backend", "chunked"),
    (dict(vocab_size=True), "vocab_size", "integer"),
]


@pytest.mark.parametrize("changes, field, allowed", BAD_VALUES)
def test_invalid_values_name_field_and_allowed(changes, field, allowed):
    with pytest.raises(ValueError) as info:
        tiny_config(**changes)
    message = str(info.value)
    assert field in message and allowed in message and "\n" not in message


def test_unknown_operator_lists_known_ones():
    with pytest.raises(ValueError) as info:
        tiny_config(depth="nope")
    for name in list_depth_operators():
        assert name in str(info.value)


def test_from_dict_rejects_unknown_keys_and_round_trips():
    with pytest.raises(ValueError, match="unknown model config key.*d_modle.*valid keys"):
        ModelConfig.from_dict({"d_modle": 64})
    config = tiny_config(depth="ddl", depth_options={"value_dim": 2}, local_mixer="shortswa")
    assert ModelConfig.from_json(config.to_json()) == config
    json.loads(config.to_json())


def test_sequence_longer_than_max_seq_len():
    model = ResStreamLM(tiny_config(max_seq_len=8))
    with pytest.raises(ValueError, match="exceeds max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_registries_hold_the_paper_operators():
    assert {"standard", "depth_swa", "ddl"} <= set(list_depth_operators())
    assert "shortswa" in list_local_mixers()


def test_default_mlp_hidden_is_rounded_swiglu_width():
    assert ModelConfig(d_model=256, n_heads=8).ffn_hidden == 704  # 8/3 * 256 rounded up to 32
