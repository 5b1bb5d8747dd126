"""The standard decoder (with and without the Algorithm 1 ShortSWA block) against a float64
reference written from the equations, and against Hugging Face Llama."""
import pytest
import torch
from reference import standard_logits

from resstream import ResStreamLM
from resstream.testing import perturb_parameters, tiny_config


@pytest.mark.parametrize("mixer_options", [None, {}, {"rope": False}, {"kv_heads": 2}])
def test_decoder_matches_float64_reference(mixer_options, device):
    mixer = None if mixer_options is None else "shortswa"
    config = tiny_config(local_mixer=mixer, mixer_options=mixer_options or {}, local_window=3)
    model = ResStreamLM(config).double()
    perturb_parameters(model)
    model.to(device)
    ids = torch.randint(0, config.vocab_size, (2, 11)).to(device)
    torch.testing.assert_close(model(ids), standard_logits(model, ids), rtol=1e-9, atol=1e-9)


def test_shortswa_window_limits_what_a_token_sees():
    config = tiny_config(local_mixer="shortswa", local_window=3, n_layers=1)
    model = ResStreamLM(config).double()
    mixer = model.blocks[0].mix.attention
    x = torch.randn(1, 10, config.d_model, dtype=torch.float64)
    base = mixer(x, torch.arange(10))
    changed = x.clone()
    changed[0, 5] += 1.0  # position 5 is in the window of positions 5, 6, 7 only
    delta = (mixer(changed, torch.arange(10)) - base).abs().amax(-1)[0]
    assert torch.all(delta[:5] == 0) and torch.all(delta[8:] == 0)
    assert torch.all(delta[5:8] > 0)


def test_from_hf_llama_matches_logits():
    transformers = pytest.importorskip("transformers")
    for tie, kv_heads in [(False, 2), (True, 4)]:
        hf_config = transformers.LlamaConfig(
            vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
            tie_word_embeddings=tie, rms_norm_eps=1e-6, rope_theta=5000.0)
        hf_model = transformers.LlamaForCausalLM(hf_config).eval()
        model = ResStreamLM.from_hf_llama(hf_model).eval()
        assert model.config.depth == "standard" and model.config.n_kv_heads == kv_heads
        ids = torch.randint(0, 97, (2, 23))
        with torch.no_grad():
            torch.testing.assert_close(model(ids), hf_model(ids).logits, rtol=0, atol=1e-5)


def test_from_hf_llama_rejects_unsupported_config():
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=1, num_attention_heads=4,
                                         attention_bias=True)
    with pytest.raises(ValueError, match="attention_bias"):
        ResStreamLM.from_hf_llama(transformers.LlamaForCausalLM(hf_config))
