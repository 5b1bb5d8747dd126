"""Hugging Face interop: save_pretrained / from_pretrained round trips keep logits identical for
several operators and mixers, AutoModelForCausalLM loads a saved directory with no network, and
HF generate() matches resstream's own generation."""
from __future__ import annotations

import socket

import pytest
import torch

pytest.importorskip("transformers")

import resstream.hf as rhf  # noqa: E402
from resstream import ResStreamLM, list_depth_operators  # noqa: E402
from resstream.errors import UserError  # noqa: E402
from resstream.testing import perturb_parameters, tiny_config  # noqa: E402

MIXER_CASES = [("standard", "shortswa", {}), ("standard", "shortswa", {"replace_attention": True}),
               ("standard", "shortconv", {}), ("standard", "canon", {})]
OPERATOR_CASES = [(name, None, {}) for name in list_depth_operators()]
CASES = OPERATOR_CASES + MIXER_CASES


def build(depth="standard", mixer=None, mixer_options=None, **changes) -> ResStreamLM:
    torch.manual_seed(0)
    model = ResStreamLM(tiny_config(depth=depth, local_mixer=mixer, mixer_options=mixer_options or {},
                                    **changes)).eval()
    perturb_parameters(model, scale=0.3)
    return model


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted during an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("depth,mixer,options", CASES,
                         ids=[f"{d}-{m}{'-only' if o else ''}" for d, m, o in CASES])
@torch.no_grad()
def test_round_trip_keeps_logits_identical(tmp_path, no_network, depth, mixer, options):
    from transformers import AutoModelForCausalLM

    model = build(depth, mixer, options)
    ids = torch.randint(0, 64, (2, 11))
    rhf.from_resstream(model).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, rhf.ResStreamForCausalLM)
    assert loaded.model.config == model.config
    assert torch.equal(loaded(ids).logits, model(ids))
    assert torch.equal(rhf.load_model(tmp_path)(ids), model(ids))  # the transformers-free reader


@pytest.mark.parametrize("depth,mixer,depth_options", [
    ("standard", "shortswa", {}), ("ddl", "canon", {"value_dim": 2, "compressor": "tc", "expander": "ec"})])
@torch.no_grad()
def test_hf_generate_matches_resstream_generate(tmp_path, no_network, depth, mixer, depth_options):
    from transformers import AutoModelForCausalLM

    if depth not in list_depth_operators():
        pytest.skip(f"{depth} is not registered")
    model = build(depth, mixer, depth_options=depth_options)
    rhf.save_model(model, tmp_path)  # our writer (no transformers needed), read back by HF
    rhf.register()  # what a user does once per process before AutoModelForCausalLM.from_pretrained
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 64, (2, 7))
    ours = torch.tensor(model.generate(ids, 9, temperature=0).tokens)
    cached = hf_model.generate(ids, max_new_tokens=9, do_sample=False)
    uncached = hf_model.generate(ids, max_new_tokens=9, do_sample=False, use_cache=False)
    assert torch.equal(cached[:, 7:], ours)
    assert torch.equal(uncached[:, 7:], ours)
    assert torch.equal(cached[:, :7], ids)


@torch.no_grad()
def test_hf_forward_errors_and_untied_head(tmp_path):
    model = build(tie_embeddings=False)
    hf_model = rhf.from_resstream(model)
    ids = torch.randint(0, 64, (2, 5))
    with pytest.raises(UserError, match="padding"):
        hf_model(ids, attention_mask=torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]))
    out = hf_model(ids, labels=ids)
    expected = torch.nn.functional.cross_entropy(model(ids)[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    hf_model.save_pretrained(tmp_path)
    reloaded = rhf.ResStreamForCausalLM.from_pretrained(tmp_path)
    assert not torch.equal(reloaded.model.lm_head.weight, reloaded.model.embed.weight)
    assert torch.equal(reloaded(ids).logits, model(ids))
