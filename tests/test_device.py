"""Device-generic checks that only mean something off the CPU (`pytest --device cuda`, run by
scripts/gpu-check): every depth operator x local mixer computes on the device what it computes
on the CPU (float64, forward and gradients; the CPU results are themselves checked against the
float64 references elsewhere), flex attention runs forward and backward, and one compiled bf16
training step runs for every operator. On the CPU they skip: the CPU run is the reference."""
from __future__ import annotations

import pytest
import torch

from resstream import ResStreamLM, list_depth_operators, list_local_mixers
from resstream.ops import local_attention
from resstream.testing import perturb_parameters, tiny_config

COMBINATIONS = [(op, mixer) for op in list_depth_operators() for mixer in [None] + list_local_mixers()]


@pytest.fixture
def accelerator(device):
    if device.type == "cpu":
        pytest.skip("compares a device with the CPU: run with --device cuda (scripts/gpu-check)")
    return device


def _loss_and_grads(model: ResStreamLM, ids: torch.Tensor):
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())  # float64
    loss.backward()
    grads = {name: p.grad.detach().cpu() for name, p in model.named_parameters()}
    return logits.detach().cpu(), grads


@pytest.mark.parametrize("operator, mixer", COMBINATIONS)
def test_device_equals_cpu_in_float64(operator, mixer, accelerator):
    model = ResStreamLM(tiny_config(depth=operator, local_mixer=mixer, n_layers=2)).double()
    perturb_parameters(model)
    ids = torch.randint(0, 64, (2, 10))
    cpu_logits, cpu_grads = _loss_and_grads(model, ids)
    model.zero_grad(set_to_none=True)
    dev_logits, dev_grads = _loss_and_grads(model.to(accelerator), ids.to(accelerator))
    torch.testing.assert_close(dev_logits, cpu_logits, atol=1e-9, rtol=1e-9)
    for name, grad in cpu_grads.items():
        torch.testing.assert_close(dev_grads[name], grad, atol=1e-9, rtol=1e-9, msg=name)


def test_flex_forward_and_backward_equal_the_chunked_backend(accelerator):
    shape = (2, 4, 300, 64)
    q, k, v = (torch.randn(shape, device=accelerator, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device=accelerator)
    outputs = {}
    for backend in ("flex", "chunked"):
        out = local_attention(q, k, v, 32, backend=backend)
        outputs[backend] = (out, *torch.autograd.grad(out, (q, k, v), grad))
    for name, got, want in zip(("out", "dq", "dk", "dv"), outputs["flex"], outputs["chunked"]):
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3, msg=name)


@pytest.mark.parametrize("operator", list_depth_operators())
def test_compiled_bf16_training_step(operator, accelerator):
    """One torch.compile'd training step under bf16 autocast: finite loss and gradients."""
    model = ResStreamLM(tiny_config(depth=operator, n_layers=2))
    perturb_parameters(model)
    model.to(accelerator)
    compiled = torch.compile(model)
    ids = torch.randint(0, 64, (4, 32), device=accelerator)
    with torch.autocast(accelerator.type, dtype=torch.bfloat16):
        logits = compiled(ids)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())
    loss.backward()
    assert loss.isfinite()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.isfinite().all(), name
