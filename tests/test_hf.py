"""Hugging Face interop: save_pretrained / from_pretrained round trips keep logits identical for
several operators and mixers, AutoModelForCausalLM loads a saved directory with no network, and
HF generate() matches resstream's own generation."""
from __future__ import annotations

import contextlib
import socket
import warnings

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
    saved, restored = model.state_dict(), loaded.model.state_dict()
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[name], restored[name]) for name in saved)  # bit-identical
    # transformers' loader may place a tensor at another memory alignment (e.g. 48 bytes off a
    # 64-byte line), where BLAS kernels round the last bit differently: logits agree to fp32
    # rounding, not bit for bit. With use_cache (its default) the wrapper prefills a cache.
    torch.testing.assert_close(loaded(ids, use_cache=False).logits, model(ids), rtol=0,
                               atol=1e-5)
    torch.testing.assert_close(loaded(ids).logits, model(ids, cache=model.new_cache(2)), rtol=1e-5,
                               atol=1e-5)
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
    ours = model.generate(ids, 9, temperature=0)  # [2, 7 + 9]: prompt + new tokens, as HF's
    cached = hf_model.generate(ids, max_new_tokens=9, do_sample=False)
    uncached = hf_model.generate(ids, max_new_tokens=9, do_sample=False, use_cache=False)
    assert torch.equal(cached, ours)
    assert torch.equal(uncached, ours)
    assert torch.equal(cached[:, :7], ids)


@torch.no_grad()
def test_hf_forward_errors_and_untied_head(tmp_path):
    model = build(tie_embeddings=False)
    hf_model = rhf.from_resstream(model)
    ids = torch.randint(0, 64, (2, 5))
    with pytest.raises(UserError, match="padding"):
        hf_model(ids, attention_mask=torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]))
    assert torch.equal(hf_model(ids, attention_mask=torch.ones_like(ids)).logits, model(ids))
    out = hf_model(ids, labels=ids)
    expected = torch.nn.functional.cross_entropy(model(ids)[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    hf_model.save_pretrained(tmp_path)
    reloaded = rhf.ResStreamForCausalLM.from_pretrained(tmp_path)
    assert not torch.equal(reloaded.model.lm_head.weight, reloaded.model.embed.weight)
    assert torch.equal(reloaded(ids).logits, model(ids))


@contextlib.contextmanager
def deprecations_are_errors():
    """Deprecation/Future warnings raise, and transformers' own logger warnings that mention a
    deprecation are collected (its `warning_once` cache is cleared so that a warning already
    given earlier in this process is given again)."""
    import logging

    from transformers.utils import logging as hf_logging

    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            if "deprecat" in record.getMessage().lower():
                records.append(record.getMessage())

    handler, root = Collect(level=logging.WARNING), logging.getLogger("transformers")
    hf_logging.warning_once.cache_clear()
    root.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            warnings.simplefilter("error", FutureWarning)
            yield records
    finally:
        root.removeHandler(handler)
        hf_logging.warning_once.cache_clear()


@torch.no_grad()
def test_hf_generate_uses_the_current_cache_api_without_deprecation_warnings(tmp_path, no_network):
    from transformers import AutoModelForCausalLM

    model = build("ddl", "shortconv")
    rhf.save_model(model, tmp_path)
    rhf.register()
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 64, (2, 6))
    with deprecations_are_errors() as records:
        cached = hf_model.generate(ids, max_new_tokens=5, do_sample=False)
        uncached = hf_model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False)
        masked = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                   do_sample=False)
        out = hf_model(ids[:, :4], use_cache=True)
        step = hf_model(ids[:, 4:5], cache=out.cache)  # continuing by hand, HF >= 5 style
    assert records == []
    ours = model.generate(ids, 5, temperature=0)
    for result in (cached, uncached, masked):
        assert torch.equal(result, ours)
    torch.testing.assert_close(step.logits, model(ids[:, :5])[:, 4:5])


@torch.no_grad()
def test_hf_refuses_a_padded_attention_mask_in_generate():
    model = build()
    hf_model = rhf.from_resstream(model)
    ids = torch.randint(1, 64, (2, 5))
    left_padded = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with pytest.raises(UserError, match=r"attention_mask has zeros.*allowed: no attention_mask or "
                                        r"an all-ones one") as error:
        hf_model.generate(ids, attention_mask=left_padded, max_new_tokens=3, do_sample=False)
    assert "\n" not in str(error.value)
