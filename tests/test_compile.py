"""torch.compile: every depth operator x local mixer traces as one graph (`fullgraph=True`) for
the training step and for a cached decode step, and the compiled model computes what the eager
one does.

Every combination is traced with the `aot_eager` backend: dynamo captures the whole forward
(a graph break is an error under fullgraph=True) and AOT autograd traces its backward, without
code generation, a few seconds each. Code generation is checked where it costs: inductor (the
default backend, C++ on CPU) compiles the training step of `standard` and of one depth
operator with a fused eager path, and the compiled logits and gradients equal eager to float32
rounding. Operators that still break the graph are listed in KNOWN_BREAKS with the reason; the
entry is a strict xfail, so it fails as soon as the operator compiles cleanly (then delete it).
"""
from __future__ import annotations

import pytest
import torch

from resstream import ResStreamLM, list_depth_operators, list_local_mixers
from resstream.testing import perturb_parameters, tiny_config

MIXERS = [None] + list_local_mixers()
COMBINATIONS = [(op, mixer) for op in list_depth_operators() for mixer in MIXERS]
# operator -> why it still breaks dynamo's graph (training and decode)
KNOWN_BREAKS: dict[str, str] = {}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every test compiles new model instances through the same forward code: a reset keeps
    dynamo's per-code cache (recompile limit 8) from silently falling back to eager."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(operator: str, mixer: str | None) -> ResStreamLM:
    model = ResStreamLM(tiny_config(depth=operator, local_mixer=mixer, n_layers=2))
    perturb_parameters(model)
    return model


def _known(operator: str):
    if operator in KNOWN_BREAKS:
        return pytest.mark.xfail(reason=KNOWN_BREAKS[operator], strict=True)
    return []


def _cases(pairs):
    return [pytest.param(op, mixer, marks=_known(op)) for op, mixer in pairs]


def _step(model, ids):
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())
    loss.backward()
    return logits.detach()


def _assert_compiled_equals_eager(model: ResStreamLM, backend: str, atol: float) -> None:
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    eager_logits = _step(model, ids)
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    torch.testing.assert_close(_step(compiled, ids), eager_logits, atol=atol, rtol=atol)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, eager_grads[name], atol=atol, rtol=atol, msg=name)


@pytest.mark.parametrize("operator, mixer", _cases(COMBINATIONS))
def test_training_step_is_one_graph(operator, mixer):
    _assert_compiled_equals_eager(_model(operator, mixer), "aot_eager", 1e-5)


# decode: every operator alone, every mixer with the baseline
DECODE = [(op, None) for op in list_depth_operators()] + [("standard", m) for m in MIXERS[1:]]


@pytest.mark.parametrize("operator, mixer", _cases(DECODE))
@torch.no_grad()
def test_cached_decode_step_is_one_graph(operator, mixer):
    model = _model(operator, mixer).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    caches = [model.new_cache(2, 16) for _ in range(2)]
    for cache in caches:
        model(ids[:, :5], cache=cache)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(ids[:, 5:], cache=caches[0]),
                               model(ids[:, 5:], cache=caches[1]), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("operator", ["standard", "attnres"])
def test_inductor_training_step_equals_eager(operator):
    """Inductor's generated code (C++ on CPU): logits and gradients to float32 rounding."""
    _assert_compiled_equals_eager(_model(operator, "shortswa"), "inductor", 1e-4)


@pytest.mark.parametrize("operator, mixer", DECODE)
@torch.no_grad()
def test_compiled_decode_compiles_once_for_every_token(operator, mixer):
    """resstream.compiled_decode: ten decode steps after a prefill, then a second sequence in
    a fresh cache of the same (batch, max_len), are one compilation; each step equals eager."""
    from torch._dynamo.testing import CompileCounter

    from resstream.compiled_decode import compiled_decode_step

    model = _model(operator, mixer).eval()
    counter = CompileCounter()
    step = compiled_decode_step(model, backend=counter)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    for max_len in (24, 24):
        compiled_cache, eager_cache = model.new_cache(2, max_len), model.new_cache(2, max_len)
        model(ids[:, :5], cache=compiled_cache)
        model(ids[:, :5], cache=eager_cache)
        for t in range(5, 15):
            torch.testing.assert_close(step(ids[:, t:t + 1], cache=compiled_cache),
                                       model(ids[:, t:t + 1], cache=eager_cache),
                                       atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1


@pytest.mark.slow
def test_generate_with_compiled_decode_equals_eager():
    model = _model("standard", "shortswa").eval()
    prompt = torch.randint(0, model.config.vocab_size, (2, 6))
    eager = model.generate(prompt, 8, temperature=0)
    assert torch.equal(model.generate(prompt, 8, temperature=0, compile=True), eager)
