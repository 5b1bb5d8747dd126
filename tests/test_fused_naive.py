"""A naive path beside every fused one: depth operators whose Options have an `impl` field
("auto" | "fused" | "naive") are held to fused == naive in float64 (logits and every gradient)
and to cached decoding == full forward on the naive path; the naive path (what "auto" takes
under torch.compile) traces without graph breaks. In scope is every registered operator with
an `impl` option, so an operator that adds a fused path is tested here without being listed;
`test_every_hand_written_autograd_node_has_a_naive_path` finds the ones that forget to.
"""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

import resstream
from resstream.depth.base import use_naive
from resstream.errors import UserError
from resstream.model import ResStreamLM
from resstream.parallel.pipeline import StageModule
from resstream.registry import DEPTH_OPERATORS
from resstream.testing import cached_logits, perturb_parameters, tiny_config

SRC = Path(resstream.__file__).parent

# Files with hand-written autograd nodes and no `impl` option, handled elsewhere:
KNOWN_EXCEPTIONS = {
    # its naive path is the `reference` attention backend, tested against `chunked` in
    # test_local_attention.py
    "ops/local_attention.py",
}


def has_impl(name: str) -> bool:
    return "impl" in {f.name for f in dataclasses.fields(DEPTH_OPERATORS.get(name).Options)}


OPERATORS = [name for name in resstream.list_depth_operators() if has_impl(name)]

# the main option variants (and config changes) beyond the defaults; other operators in scope
# run with their defaults, with and without a local mixer
VARIANTS: dict[str, list[tuple[dict, dict]]] = {
    "hyper": [({"dynamic": False}, {}), ({"streams": 2}, {"depth_layers": [0, 2]})],
    "mhc": [({"streams": 3, "sinkhorn_iters": 5, "init": "zero"}, {}),
            ({"parameterisation": "lite", "streams": 3}, {}),
            ({"parameterisation": "kron"}, {"depth_layers": [0, 2]}),
            ({"parameterisation": "kron", "streams": 6, "init": "zero"}, {})],
    "ddl": [({"value_dim": 3}, {}), ({"compressor": "tc"}, {}),
            ({"value_dim": 2, "compressor": "tc", "expander": "ec"}, {}),
            ({"beta_gate": "mlp", "value": "code", "init": "code"}, {"depth_layers": [1]}),
            ({"init": "code"}, {}), ({"value_dim": 2, "init": "code", "weight_decay": False}, {}),
            ({"value_dim": 2, "compressor": "tc", "init": "code", "value": "code"},
             {"local_mixer": "shortswa"}),
            ({"compressor": "tc", "compressor_init": "average"}, {})],
    "delta_attnres": [({"granularity": "block", "block_size": 2}, {}),
                      ({"granularity": "block", "block_size": 2, "block_append": "after_read",
                        "final_read": False}, {}),
                      ({"gate": "alpha", "query_init": "normal"}, {"depth_layers": [1, 2]})],
    "block_attnres": [({"block_size": 3}, {"depth_layers": [1, 2]}), ({"n_blocks": 2}, {})],
    "mudd": [({"separate_norms": False, "hidden_multiple": 0, "expand_last": False}, {}),
             ({}, {"depth_layers": [0, 2]}), ({"form": "prepost"}, {}),
             ({"multiway": False, "dynamic": False}, {"local_mixer": "shortswa"}),
             ({"form": "prepost", "dynamic": False}, {"depth_layers": [0, 2]})],
}
CASES = [(name, options, changes) for name in OPERATORS
         for options, changes in [({}, {}), ({}, {"local_mixer": "shortswa"})]
         + VARIANTS.get(name, [])]


def case_id(case) -> str:
    name, options, changes = case
    return "-".join([name] + [f"{k}={v}" for k, v in {**options, **changes}.items()])


def build(name: str, options: dict, changes: dict, impl: str, seed: int = 0) -> ResStreamLM:
    torch.manual_seed(seed)
    config = tiny_config(depth=name, depth_options={**options, "impl": impl}, **changes)
    return ResStreamLM(config).double()


def logits_and_gradients(model: ResStreamLM, ids: torch.Tensor, probe: torch.Tensor):
    model.zero_grad()
    logits = model(ids)
    (logits * probe).sum().backward()
    return logits.detach(), {name: p.grad for name, p in model.named_parameters()}


def test_operators_in_scope():
    assert {"hyper", "mhc", "ddl", "mudd"} <= set(OPERATORS)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fused_and_naive_agree(case):
    """Same weights (perturbed off their init, so that every parameter matters): same logits
    and the same gradient of every parameter."""
    fused = build(*case, impl="fused")
    perturb_parameters(fused, scale=0.1)
    naive = build(*case, impl="naive", seed=1)
    naive.load_state_dict(fused.state_dict())
    ids = torch.randint(0, 64, (2, 9))
    probe = torch.randn(2, 9, 64, dtype=torch.float64)
    want_logits, want = logits_and_gradients(fused, ids, probe)
    got_logits, got = logits_and_gradients(naive, ids, probe)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-10, atol=1e-12)
    assert want.keys() == got.keys()
    for name, grad in want.items():
        assert grad is not None and got[name] is not None, name
        torch.testing.assert_close(got[name], grad, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_naive_cached_decoding_equals_full_forward(case):
    model = build(*case, impl="naive")
    perturb_parameters(model, scale=0.1)
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        full = model(ids)
    torch.testing.assert_close(cached_logits(model, ids, prefill=3), full, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", OPERATORS)
def test_naive_pipeline_stages_give_the_unsplit_gradients(name):
    """The naive state crosses pipeline stage boundaries (`stage_state`, `from_stage_state`):
    three stages run in one process, each from detached inputs, backward chained by hand."""
    model = build(name, {}, {"n_layers": 4, "local_mixer": "shortswa"}, impl="naive")
    perturb_parameters(model, scale=0.1)
    ids = torch.randint(0, 64, (2, 6))
    model(ids).square().mean().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    stages = [StageModule(model, layers, i == 0, i == 2)
              for i, layers in enumerate([range(0, 1), range(1, 3), range(3, 4)])]
    inputs, sent = (ids,), []
    for stage in stages[:-1]:
        outputs = stage(*inputs)
        inputs = tuple(t.detach().requires_grad_() for t in outputs)
        sent.append((outputs, inputs))
    stages[-1](*inputs).square().mean().backward()
    for outputs, received in reversed(sent):
        torch.autograd.backward(outputs, [torch.zeros_like(t) if t.grad is None else t.grad
                                          for t in received])
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.parametrize("name", OPERATORS)
def test_auto_is_naive_only_under_compile_and_only_where_declared(name, monkeypatch):
    cls = DEPTH_OPERATORS.get(name)
    assert cls.Options().impl == "auto"
    when = cls.naive_when_compiling
    assert not use_naive("auto", when) and not use_naive("fused", when) and use_naive("naive", when)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert use_naive("auto", when) == when and not use_naive("fused", when)


@pytest.mark.parametrize("name", OPERATORS)
def test_bad_impl_is_a_one_line_user_error(name):
    with pytest.raises(UserError) as raised:
        ResStreamLM(tiny_config(depth=name, depth_options={"impl": "triton"}))
    message = str(raised.value)
    assert "\n" not in message, message
    assert "impl='triton' is invalid; allowed: auto, fused, naive" in message, message


@pytest.mark.parametrize("name", OPERATORS)
def test_auto_traces_without_graph_breaks(name):
    """torch._dynamo.explain (tracing only, no inductor): the training forward and a cached
    decode step after a prefill are one graph each with the default impl."""
    torch._dynamo.reset()
    model = ResStreamLM(tiny_config(depth=name, n_layers=2))
    ids = torch.randint(0, 64, (2, 10))
    train = torch._dynamo.explain(model)(ids)
    assert train.graph_break_count == 0, train.break_reasons
    torch._dynamo.reset()
    with torch.no_grad():
        cache = model.new_cache(2)
        model(ids[:, :5], cache=cache)
        decode = torch._dynamo.explain(model)(ids[:, 5:6], cache=cache)
    torch._dynamo.reset()
    assert decode.graph_break_count == 0, decode.break_reasons


def autograd_function_files() -> set[str]:
    """Files under src/resstream (relative paths) that define a torch.autograd.Function."""
    found = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and any(
                    ast.unparse(base).endswith("autograd.Function")
                    or ast.unparse(base) == "Function" for base in node.bases):
                found.add(path.relative_to(SRC).as_posix())
    return found


def test_every_hand_written_autograd_node_has_a_naive_path():
    """A file that defines an autograd.Function must be a depth operator's module whose
    operators all have `impl` (and so are tested above), or a known exception."""
    owners: dict[str, list[str]] = {}
    for name in resstream.list_depth_operators():
        module = DEPTH_OPERATORS.get(name).__module__  # resstream.depth.<file>
        file = module.removeprefix("resstream.").replace(".", "/") + ".py"
        owners.setdefault(file, []).append(name)
    files = autograd_function_files()
    assert "depth/hyper.py" in files  # the scan finds what is there
    for file in sorted(files - KNOWN_EXCEPTIONS):
        assert file.startswith("depth/") and owners.get(file), (
            f"{file} defines a torch.autograd.Function outside a depth operator's module")
        missing = [name for name in owners[file] if not has_impl(name)]
        assert not missing, f"{file}: operator(s) {missing} have a fused node but no `impl` option"
