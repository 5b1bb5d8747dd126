"""Pipeline parallelism (resstream.parallel.pipeline) on torch.distributed.pipelining, CPU/gloo.

(a) 2 stages give the unsplit model's loss and gradients (float64) under GPipe and 1F1B;
(b) every other operator and each mixer trains a few steps with the unsplit model's losses;
(c) the bytes each boundary sends, counted at the engine's send ops, equal pipeline_payload for
    every registered operator and mixer (interleaved 1F1B: 4 stages on 2 processes);
(d) bad arguments give one-line errors.
Each group of cases runs in ONE spawned 2-process gloo group (a module fixture) that loops over
the cases and reports each one; the parametrised tests then check their own case. Also an
in-process round trip of stage_state / from_stage_state for option variants (no processes).
"""
from __future__ import annotations

import traceback

import pytest
import torch

from resstream.errors import UserError
from resstream.model import ResStreamLM
from resstream.parallel.pipeline import (StageModule, build_pipeline, lm_loss, run_local,
                                         split_layers)
from resstream.registry import list_depth_operators, list_local_mixers
from resstream.testing import tiny_config

EXACT = ["standard", "ddl", "denseformer", "attnres", "block_attnres", "hyper", "mudd", "depth_swa"]
SCHEDULES = ["gpipe", "1f1b"]
VARIANTS = list_depth_operators() + list_local_mixers()  # a mixer runs on `standard`
TRAINED = [name for name in VARIANTS if name not in EXACT]
BATCH, TOKENS, VOCAB = 4, 8, 64


def make_model(name: str, n_layers: int, dtype=torch.float64, **changes) -> ResStreamLM:
    """A tiny model with the depth operator's parameters moved off their init (so that every
    operator mixes depth for real), the same on every rank."""
    kind = {"local_mixer": name} if name in list_local_mixers() else {"depth": name}
    torch.manual_seed(0)
    model = ResStreamLM(tiny_config(n_layers=n_layers, **kind, **changes)).to(dtype)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.depth.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return (torch.randint(0, VOCAB, (BATCH, TOKENS), generator=generator),
            torch.randint(0, VOCAB, (BATCH, TOKENS), generator=generator))


def gradients(named) -> dict[str, torch.Tensor]:
    return {name: (p.grad if p.grad is not None else torch.zeros_like(p)).clone() for name, p in named}


def guarded(case):
    """Run one case; a failure becomes its traceback (reported by the test of that case)."""
    try:
        return case()
    except Exception:  # noqa: BLE001
        return {"error": traceback.format_exc()}


# ---------------------------------------------------------------- workers (spawned processes)
def exact_worker(rank: int, world: int) -> dict:
    inputs, targets = batch()
    results = {}
    for name in EXACT:
        for schedule in SCHEDULES:
            def case():
                model = make_model(name, n_layers=4)
                reference = lm_loss(model(inputs), targets)
                reference.backward()
                expected = gradients(model.named_parameters())
                model.zero_grad(set_to_none=True)
                pipe = build_pipeline(model, rank, world, schedule=schedule, n_microbatches=2)
                loss = pipe.step(inputs, targets)
                got = gradients(pipe.named_parameters())
                return {"loss": None if loss is None else (loss.item(), reference.item()),
                        "grad_error": max((got[n] - expected[n]).abs().max().item() for n in got),
                        "params": len(got)}
            results[f"{name}-{schedule}"] = guarded(case)
    # (d) a batch that the micro-batches do not divide: raised before any communication
    pipe = build_pipeline(make_model("standard", n_layers=2), rank, world, n_microbatches=3)
    try:
        pipe.step(*batch())
        results["bad_batch"] = None
    except ValueError as error:
        results["bad_batch"] = str(error)
    return results


def training_worker(rank: int, world: int, steps: int) -> dict:
    inputs, targets = batch()
    results = {}
    for name in TRAINED:
        def case():
            model = make_model(name, n_layers=4)
            twin = make_model(name, n_layers=4)  # the unsplit reference, same weights
            pipe = build_pipeline(model, rank, world, schedule="1f1b", n_microbatches=2)
            opt = torch.optim.AdamW(pipe.parameters(), lr=1e-2)
            opt_twin = torch.optim.AdamW(twin.parameters(), lr=1e-2)
            losses, reference = [], []
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                loss = pipe.step(inputs, targets)
                opt.step()
                losses.append(None if loss is None else loss.item())
                opt_twin.zero_grad(set_to_none=True)
                ref = lm_loss(twin(inputs), targets)
                ref.backward()
                opt_twin.step()
                reference.append(ref.item())
            return {"losses": losses, "reference": reference}
        results[name] = guarded(case)
    return results


def traffic_worker(rank: int, world: int) -> dict:
    """4 stages on 2 ranks (interleaved 1F1B), float32: bytes sent per boundary, the formula."""
    inputs, targets = batch()
    n_layers, n_stages, microbatches = 5, 4, 2
    results = {}
    for name in VARIANTS:
        def case():
            model = make_model(name, n_layers=n_layers, dtype=torch.float32)
            with torch.no_grad():
                reference = lm_loss(model(inputs), targets).item()
            pipe = build_pipeline(model, rank, n_stages, schedule="interleaved",
                                  n_microbatches=microbatches)
            loss = pipe.step(inputs, targets)
            tokens = BATCH // microbatches * TOKENS
            boundaries = [r.stop - 1 for r in split_layers(n_layers, n_stages)[:-1]]
            expected = {i: model.depth.pipeline_payload(layer)[1] * tokens * model.config.d_model * 4
                        for i, layer in enumerate(boundaries)}
            per_microbatch = lambda table: {b: n // microbatches for b, n in table.items()}
            return {"forward": per_microbatch(pipe.traffic.forward),
                    "backward": per_microbatch(pipe.traffic.backward), "expected": expected,
                    "loss": None if loss is None else (loss.item(), reference)}
        results[name] = guarded(case)
    return results


def merged(per_rank: list[dict], case: str) -> list[dict]:
    results = [r[case] for r in per_rank]
    for result in results:
        if "error" in result:
            pytest.fail(f"{case}: {result['error']}")
    return results


# ---------------------------------------------------------------- (a) exact equivalence
@pytest.fixture(scope="module")
def exact_results():
    return run_local(exact_worker, 2, timeout_s=240)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("name", EXACT)
def test_two_stages_give_the_unsplit_loss_and_gradients(exact_results, name, schedule):
    results = merged(exact_results, f"{name}-{schedule}")
    (loss, reference), = [r["loss"] for r in results if r["loss"] is not None]  # the last stage
    assert loss == pytest.approx(reference, rel=1e-12, abs=1e-12)
    for rank, result in enumerate(results):
        assert result["grad_error"] < 1e-12, (rank, result["grad_error"])
    # every parameter of the model lives on some stage
    assert sum(r["params"] for r in results) >= len(list(make_model(name, 4).parameters()))


# ---------------------------------------------------------------- (b) training steps
@pytest.fixture(scope="module")
def training_results():
    return run_local(training_worker, 2, (3,), timeout_s=240)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", TRAINED)
def test_training_steps_match_the_unsplit_model(training_results, name):
    results = merged(training_results, name)
    losses = results[-1]["losses"]  # rank 1 holds the last stage
    reference = results[-1]["reference"]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses == pytest.approx(reference, rel=1e-9, abs=1e-9)
    assert losses[-1] <= losses[0]


# ---------------------------------------------------------------- (c) traffic = formula
@pytest.fixture(scope="module")
def traffic_results():
    return run_local(traffic_worker, 2, timeout_s=240)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", VARIANTS)
def test_bytes_sent_per_boundary_equal_the_payload_formula(traffic_results, name):
    results = merged(traffic_results, name)
    forward, backward = {}, {}
    for result in results:
        forward.update(result["forward"])
        backward.update(result["backward"])
    expected = results[0]["expected"]
    assert forward == expected, f"{name}: measured {forward}, pipeline_payload says {expected}"
    assert backward == expected, f"{name}: gradients {backward}, forward {expected}"
    (loss, reference), = [r["loss"] for r in results if r["loss"] is not None]
    assert loss == pytest.approx(reference, rel=1e-5)


# ---------------------------------------------------------------- (d) bad arguments
@pytest.mark.timeout(300)
def test_bad_batch_is_a_one_line_error(exact_results):
    for result in exact_results:
        message = result["bad_batch"]
        assert message is not None and "\n" not in message
        assert "batch size 4" in message and "n_microbatches=3" in message


@pytest.mark.parametrize("kwargs, match", [
    ({"n_stages": 5}, r"n_stages=5 .*allowed: 2\.\.n_layers=4"),
    ({"n_stages": 2, "schedule": "zigzag"}, r"schedule='zigzag' is unknown; allowed: gpipe, 1f1b, interleaved"),
    ({"n_stages": 2, "n_microbatches": 0}, r"n_microbatches=0 is invalid; allowed: an integer >= 1"),
])
def test_bad_arguments_are_one_line_errors(kwargs, match):
    model = ResStreamLM(tiny_config(n_layers=4))
    with pytest.raises(UserError, match=match) as error:
        build_pipeline(model, 0, **kwargs)
    assert isinstance(error.value, ValueError) and "\n" not in str(error.value)


# ---------------------------------------------------------------- stage state, in process
OPTION_VARIANTS = [(name, {}) for name in list_depth_operators()] + [
    ("denseformer", {"depth_options": {"dilation": 2, "period": 3}}),
    ("denseformer", {"depth_layers": [0, 2, 5]}),
    ("dca", {"depth_options": {"k": 2}}),
    ("dca", {"depth_layers": [0, 1]}),
    ("elc_bert", {"depth_options": {"variant": "weighted_output"}}),
    ("elc_bert", {"depth_options": {"variant": "normalized"}, "depth_layers": [0, 1]}),
    ("vertical", {"depth_options": {"sources": "delta"}, "depth_layers": [0, 1, 3]}),
    ("vertical", {"depth_options": {"keep_residual": True}, "depth_layers": [0, 3, 4]}),
    ("ddl", {"depth_options": {"value_dim": 2, "compressor": "tc", "expander": "ec"}}),
    ("depth_swa", {"depth_window": 2}),
    ("depth_swa", {"depth_window": 3, "depth_options": {"shared": False}}),
    ("depth_swa", {"depth_options": {"granularity": "sublayer"}}),
    ("block_attnres", {"depth_options": {"block_size": 3}, "depth_layers": [0, 3, 4]}),
    ("delta_attnres", {"depth_options": {"granularity": "block", "block_size": 3, "gate": "alpha"}}),
    ("delta_attnres", {"depth_options": {"granularity": "block", "block_size": 3,
                                         "block_append": "after_read", "final_read": False}}),
    ("block_attnres", {"depth_options": {"block_size": 3, "query": "input", "heads": 2}}),
    ("attnres", {"depth_options": {"weights": "sigmoid", "key_norm": False}}),
    ("hyper", {"depth_options": {"dynamic": False, "streams": 2}, "depth_layers": [1, 4]}),
    ("mudd", {"depth_layers": [0, 1, 2]}),
    ("mudd", {"local_mixer": "shortswa"}),
    ("mudd", {"depth_options": {"form": "prepost"}}),
    ("mudd", {"depth_options": {"form": "prepost"}, "depth_layers": [0, 1, 2]}),
    ("mudd", {"depth_options": {"form": "prepost", "impl": "naive"}, "local_mixer": "shortswa"}),
    ("mudd", {"depth_options": {"multiway": False, "dynamic": False}}),
    ("dca", {"depth_options": {"k": 2, "k_stack": "folded"}}),
    ("dca", {"depth_options": {"k": 2, "k_stack": "first_last", "separate_norms": True}}),
    ("attnres", {"local_mixer": "shortswa"}),
    ("laurel", {"depth_options": {"variant": "rw_lr_pa", "k": 4}, "local_mixer": "shortswa"}),
    ("laurel", {"depth_options": {"variant": "pa", "granularity": "block"}, "depth_layers": [1, 4]}),
    ("rezero", {"depth_options": {"norm": False}, "depth_layers": [0, 5]}),
    ("value_residual", {"depth_options": {"learnable": True}, "local_mixer": "shortconv"}),
    ("value_residual", {"depth_layers": [0, 2]}),  # V_1 stays behind after block 2
    ("post_ln", {"depth_layers": [1, 4], "local_mixer": "shortswa"}),
    ("deepnorm", {"depth_options": {"embedding_norm": False}, "depth_layers": [0, 3]}),
    ("peri_ln", {"depth_options": {"embedding_norm": True}, "depth_layers": [0, 2]}),
    ("ln_scaling", {"depth_options": {"index": "sublayer"}, "local_mixer": "shortswa"}),
    ("orthogonal", {"depth_layers": [2, 3]}),
    ("frac", {"depth_options": {"dynamic": False, "fractions": 2}, "depth_layers": [1, 4]}),
    ("frac", {"local_mixer": "shortswa"}),
    ("mhc", {"depth_options": {"parameterisation": "lite", "streams": 3}}),
    ("mhc", {"depth_options": {"parameterisation": "kron"}, "depth_layers": [0, 3]}),
]


@pytest.mark.parametrize("name, changes", OPTION_VARIANTS,
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(OPTION_VARIANTS)])
def test_stage_state_round_trip_in_process(name, changes):
    """Three stage modules chained in one process (tensors detached at each boundary, as the
    engine's send does): the unsplit loss and gradients, and as many values per token as
    pipeline_payload says."""
    model = make_model(name, n_layers=6, **changes)
    inputs, targets = batch()
    reference = lm_loss(model(inputs), targets)
    reference.backward()
    expected = gradients(model.named_parameters())
    model.zero_grad(set_to_none=True)
    layers = split_layers(6, 3)
    stages = [StageModule(model, r, i == 0, i == 2) for i, r in enumerate(layers)]
    sent, received, args = [], [], (inputs,)
    for stage in stages[:-1]:
        outputs = stage(*args)
        vectors = sum(t.numel() for t in outputs) / (inputs.numel() * model.config.d_model)
        assert vectors == model.depth.pipeline_payload(stage.layers.stop - 1)[1]
        args = tuple(t.detach().requires_grad_() for t in outputs)
        sent.append(outputs)
        received.append(args)
    loss = lm_loss(stages[-1](*args), targets)
    loss.backward()
    for outputs, inputs_ in zip(reversed(sent), reversed(received)):
        torch.autograd.backward(outputs, [t.grad if t.grad is not None else torch.zeros_like(t)
                                          for t in inputs_])
    assert loss.item() == pytest.approx(reference.item(), rel=1e-12)
    for key, grad in gradients(model.named_parameters()).items():
        torch.testing.assert_close(grad, expected[key], rtol=1e-10, atol=1e-12)
