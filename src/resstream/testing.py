"""Helpers for testing operators and mixers (used by our test suite; handy for new operators)."""
from __future__ import annotations

from typing import Any

import torch

from resstream.config import ModelConfig
from resstream.model import ResStreamLM


def tiny_config(**changes: Any) -> ModelConfig:
    """A small, fast configuration (2 cores): 3 blocks, d=32, 4 heads, 2 KV heads."""
    base = dict(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=64,
                mlp_hidden=48, local_window=4)
    base.update(changes)
    return ModelConfig(**base)


def copy_shared_weights(source: torch.nn.Module, target: torch.nn.Module) -> list[str]:
    """Copy every parameter/buffer that both models have (same name and shape) from source into
    target; returns the names of target tensors that were not copied (the operator's own)."""
    source_state = source.state_dict()
    target_state = target.state_dict()
    own = []
    with torch.no_grad():
        for name, tensor in target_state.items():
            if name in source_state and source_state[name].shape == tensor.shape:
                tensor.copy_(source_state[name])
            else:
                own.append(name)
    return own


def baseline_twin(model: ResStreamLM) -> ResStreamLM:
    """The `standard` model with the same shape, mixer and shared weights as `model`."""
    config = model.config.replace(depth="standard", depth_options={}, depth_window=None,
                                  depth_layers=None)
    twin = ResStreamLM(config).to(next(model.parameters()).dtype)
    copy_shared_weights(model, twin)
    return twin


def perturb_parameters(model: torch.nn.Module, scale: float = 0.02, seed: int = 0) -> None:
    """Add small Gaussian noise to every parameter (moves zero-initialised parameters off zero,
    so that tests can see whether each one matters)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * scale)


def assert_each_parameter_changes_output(model: torch.nn.Module, inputs: torch.Tensor,
                                         params: dict[str, torch.nn.Parameter], scale: float = 0.5,
                                         threshold: float = 1e-4, seed: int = 5) -> None:
    """Perturb each parameter in turn (then restore it) and assert the output moves by more than
    `threshold`: catches mixing weights that are computed but never applied."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        before = model(inputs)
        for name, param in params.items():
            noise = torch.randn(param.shape, generator=generator, dtype=param.dtype) * scale
            param.add_(noise)
            moved = (model(inputs) - before).abs().max()
            param.sub_(noise)
            assert moved > threshold, f"perturbing {name} does not change the output"


def assert_gradients_match(model: torch.nn.Module, forward, reference, rtol: float = 1e-8,
                           atol: float = 1e-11) -> None:
    """Every parameter's gradient of mean(output^2) through `forward()` equals the one through
    `reference()` (e.g. a float64 loop written from the paper's equations)."""

    def gradients(run):
        model.zero_grad()
        run().square().mean().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    expected = gradients(reference)
    for name, grad in gradients(forward).items():
        torch.testing.assert_close(grad, expected[name], rtol=rtol, atol=atol, msg=name)


def cached_logits(model: ResStreamLM, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of a prefill of `prefill` tokens followed by one-token cached decode steps."""
    with torch.no_grad():
        cache = model.new_cache(ids.shape[0])
        steps = [model(ids[:, :prefill], cache=cache)]
        steps += [model(ids[:, t:t + 1], cache=cache) for t in range(prefill, ids.shape[1])]
    return torch.cat(steps, 1)


def run_operator_hooks(op, x0: torch.Tensor, outputs: list[torch.Tensor]):
    """Drive a depth operator's hooks with given sublayer outputs and an identity pre-norm;
    returns (what each site read, the finalised stream)."""
    state = op.init_state(x0, None)
    reads = []
    for site, out in zip(op.sites, outputs):
        reads.append(op.read(state, site, lambda x: x, None))
        state = op.write(state, site, out, None)
    return reads, op.finalize(state, None)


def reference_model(depth: str, options: dict | None = None, mixer: str | None = None,
                    dtype: torch.dtype = torch.float64, perturb: bool = True, scale: float = 0.05,
                    **changes: Any) -> ResStreamLM:
    """The model the float64 reference tests compare against their equations: `tiny_config`
    with `depth` and its options, a ShortSWA window of 3, in `dtype`, its parameters perturbed
    off their (often baseline-exact) initialisation unless perturb=False."""
    config = tiny_config(depth=depth, depth_options=options or {}, local_mixer=mixer,
                         local_window=3, **changes)
    model = ResStreamLM(config).to(dtype)
    if perturb:
        perturb_parameters(model, scale=scale)
    return model


def sample_ids(model: ResStreamLM, batch: int = 2, length: int = 6) -> torch.Tensor:
    """A fixed batch of token ids for `model` (its own generator: independent of the test's)."""
    return torch.randint(0, model.config.vocab_size, (batch, length),
                         generator=torch.Generator().manual_seed(3))
