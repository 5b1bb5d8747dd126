"""match_parameters: widen the baseline's MLP (or d_model) to a target parameter count."""
import pytest

from resstream.config import ModelConfig
from resstream.errors import UserError
from resstream.model import ResStreamLM
from resstream.param_match import count_parameters, match_parameters

BASE = dict(vocab_size=256, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=64)


def cpu_params(config: ModelConfig) -> int:
    return sum(p.numel() for p in ResStreamLM(config).parameters())


def test_count_parameters_equals_a_built_model():
    config = ModelConfig(**BASE, depth="hyper")
    assert count_parameters(config) == cpu_params(config)


@pytest.mark.parametrize("variant", [dict(depth="mudd"), dict(depth="depth_swa"),
                                     dict(local_mixer="shortswa")])
def test_mlp_widening_reaches_the_variant(variant):
    base = ModelConfig(**BASE)
    target = count_parameters(base.replace(**variant))
    config, description = match_parameters(base, target)
    params = cpu_params(config)
    assert abs(params - target) <= 0.02 * target
    assert config.mlp_hidden % 8 == 0 and config.mlp_hidden > base.ffn_hidden
    assert {k: v for k, v in config.to_dict().items() if k != "mlp_hidden"} == \
        {k: v for k, v in base.to_dict().items() if k != "mlp_hidden"}
    assert description.startswith(f"mlp_hidden {base.ffn_hidden} -> {config.mlp_hidden}: ")
    assert "params (target" in description and "%)" in description


def test_closest_multiple_is_chosen():
    base = ModelConfig(**BASE)
    target = count_parameters(base.replace(mlp_hidden=200))  # between multiples of 8 / 32
    config, _ = match_parameters(base, target, multiple=8)
    assert config.mlp_hidden == 200
    config, _ = match_parameters(base, target, tolerance=0.2, multiple=32)
    for other in (config.mlp_hidden - 32, config.mlp_hidden + 32):
        assert abs(count_parameters(base.replace(mlp_hidden=other)) - target) >= \
            abs(count_parameters(config) - target)


def test_already_matched_is_unchanged():
    base = ModelConfig(**BASE)
    config, description = match_parameters(base, count_parameters(base))
    assert config.ffn_hidden == base.ffn_hidden and "(unchanged)" in description and "+0.0%" in description


def test_d_model_widening_keeps_heads_valid():
    base = ModelConfig(**BASE, mlp_hidden=192)
    target = count_parameters(base.replace(d_model=96))
    config, description = match_parameters(base, target, widen="d_model")
    assert config.d_model == 96 and config.mlp_hidden == 192
    assert config.d_model % config.n_heads == 0 and config.head_dim % 2 == 0
    assert description.startswith("d_model 64 -> 96")


def test_unreachable_target_is_a_user_error():
    base = ModelConfig(**BASE)
    with pytest.raises(UserError, match="cannot match"):
        match_parameters(base, 1000)  # below the embedding and attention alone
    target = count_parameters(base.replace(mlp_hidden=224)) + 400  # between multiples of 32
    with pytest.raises(UserError, match="within 0.0%"):
        match_parameters(base, target, tolerance=0.0)
    with pytest.raises(UserError, match="widen"):
        match_parameters(base, 10 ** 6, widen="depth")
