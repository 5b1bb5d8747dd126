"""Every registered depth operator composes with every local mixer (and grouped KV heads):
forward and backward run, and gradients reach every parameter."""
import pytest
import torch

from resstream import ResStreamLM, list_depth_operators, list_local_mixers
from resstream.testing import perturb_parameters, tiny_config

COMBINATIONS = [(op, mixer) for op in list_depth_operators() for mixer in [None] + list_local_mixers()]


@pytest.mark.parametrize("operator, mixer", COMBINATIONS)
def test_forward_backward_reaches_every_parameter(operator, mixer, device):
    model = ResStreamLM(tiny_config(depth=operator, local_mixer=mixer, n_layers=2))
    perturb_parameters(model)  # zero-initialised parameters (e.g. output gates) get gradients too
    model.to(device)
    ids = torch.randint(0, 64, (2, 10)).to(device)
    logits = model(ids)
    assert logits.shape == (2, 10, 64) and logits.isfinite().all()
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} gets no gradient"
        assert param.grad.abs().sum() > 0, f"{name} has a zero gradient"
