"""`resstream.ops.local_attention`: every backend computes the function of its definition,

    out_i = sum_j softmax_j(q_i . k_j / sqrt(D)) v_j  over keys j with 0 <= pos(i) - j < window,

with end-aligned queries (query i of Nq sits at key position Nk - Nq + i). The float64
definition below is written here from that formula with explicit loops over queries; forward
outputs and the gradients of q, k and v are compared with it on random shapes (hypothesis)."""
from __future__ import annotations

import importlib
import math
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resstream.errors import UserError
from resstream.ops import local_attention

module = importlib.import_module("resstream.ops.local_attention")  # the package attribute is the function

EXACT_BACKENDS = ("reference", "chunked", "auto")


def definition(q, k, v, window):
    """Float64 local attention from the formula: one query at a time, over its allowed keys."""
    q, k, v = q.double(), k.double(), v.double()
    n_queries, n_keys, dim = q.shape[2], k.shape[2], q.shape[3]
    rows = []
    for i in range(n_queries):
        position = n_keys - n_queries + i
        allowed = [j for j in range(n_keys)
                   if 0 <= position - j and (window is None or position - j < window)]
        keys, values = k[:, :, allowed], v[:, :, allowed]
        scores = torch.einsum("bhd,bhjd->bhj", q[:, :, i], keys) / math.sqrt(dim)
        rows.append(torch.einsum("bhj,bhjd->bhd", torch.softmax(scores, dim=-1), values))
    return torch.stack(rows, dim=2)


def random_inputs(b, h, n_queries, n_keys, d, dtype=torch.float64, device="cpu"):
    q = torch.randn(b, h, n_queries, d, dtype=dtype).to(device).requires_grad_()
    k = torch.randn(b, h, n_keys, d, dtype=dtype).to(device).requires_grad_()
    v = torch.randn(b, h, n_keys, d, dtype=dtype).to(device).requires_grad_()
    return q, k, v


def assert_matches_definition(backend, q, k, v, window, tol=1e-10):
    """Forward and the q, k, v gradients (for one random output gradient) equal the definition."""
    out = local_attention(q, k, v, window=window, backend=backend)
    expected = definition(q, k, v, window)
    assert out.shape == expected.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)
    grad = torch.randn_like(expected)
    got = torch.autograd.grad(out, (q, k, v), grad.to(out.dtype))
    want = torch.autograd.grad(expected, (q, k, v), grad)
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g.double(), w.double(), atol=tol, rtol=tol, msg=f"d{name}")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), backend=st.sampled_from(EXACT_BACKENDS),
       # the chunked loop's step size: 1 (one block per step, in place), small, the default
       group_elements=st.sampled_from([1, 300, module._GROUP_ELEMENTS]))
def test_backends_equal_definition_forward_and_gradients(data, backend, group_elements):
    b = data.draw(st.integers(1, 2), label="batch")
    h = data.draw(st.integers(1, 3), label="heads")
    n_keys = data.draw(st.integers(1, 70), label="n_keys")
    n_queries = data.draw(st.one_of(st.just(n_keys), st.integers(1, n_keys)), label="n_queries")
    d = data.draw(st.integers(1, 8), label="head_dim")
    window = data.draw(st.one_of(st.none(), st.integers(1, 80)), label="window")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "_GROUP_ELEMENTS", group_elements)
        assert_matches_definition(backend, *random_inputs(b, h, n_queries, n_keys, d), window)


EDGE_CASES = {  # (n_queries, n_keys, window)
    "N not a multiple of the window": (10, 10, 4),
    "window = N": (10, 10, 10),
    "window > N": (7, 7, 50),
    "window = 1": (9, 9, 1),
    "N = 1": (1, 1, 3),
    "N = 1, window = 1": (1, 1, 1),
    "full causal": (12, 12, None),
    "fewer queries than keys": (3, 11, 4),
    "decode step past the window": (1, 20, 6),
    "decode step inside the window": (1, 5, 8),
    "queries = window, keys beyond": (6, 17, 6),
}


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_edge_cases(backend, case, device):
    n_queries, n_keys, window = EDGE_CASES[case]
    inputs = random_inputs(2, 2, n_queries, n_keys, 4, device=device)
    assert_matches_definition(backend, *inputs, window)


@pytest.mark.parametrize("backend", ("chunked", "auto"))
def test_long_sequence_float32(backend, monkeypatch):
    """Past the dense limit of `auto`, and long enough for the chunked loop to take a step that
    reads and writes the tensors in place (overlapping key windows as strided views) between
    the first and last steps, which copy into padded scratch memory; float32 vs float64."""
    n, window = 3000, 128
    q, k, v = random_inputs(1, 1, n, n, 8, torch.float32)
    assert n * n > module._DENSE_LIMIT
    in_place = []
    is_direct = module._Band.is_direct
    monkeypatch.setattr(module._Band, "is_direct", lambda *a: in_place.append(is_direct(*a)) or in_place[-1])
    assert_matches_definition(backend, q, k, v, window, tol=2e-5)
    assert True in in_place and False in in_place


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
def test_non_contiguous_inputs(backend, device):
    """q, k, v as usually built: [B, N, H, D] projections transposed to [B, H, N, D]."""
    projections = torch.randn(3, 2, 40, 3, 8, dtype=torch.float64).to(device)  # (q|k|v), B, N, H, D
    q, k, v = (p.transpose(1, 2).requires_grad_() for p in projections)
    assert not q.is_contiguous()
    assert_matches_definition(backend, q, k, v, 7)


@pytest.mark.parametrize("backend", ("reference", "chunked"))
def test_window_holds_exactly_w_keys(backend):
    """Changing the key w positions back moves nothing; the key w-1 back changes the output."""
    window, n = 5, 12
    q, k, v = (t.detach() for t in random_inputs(1, 1, n, n, 4))
    base = local_attention(q, k, v, window, backend)
    last = n - 1
    for distance, should_change in ((window, False), (window - 1, True), (0, True)):
        k2, v2 = k.clone(), v.clone()
        k2[:, :, last - distance] += 3.0
        v2[:, :, last - distance] += 3.0
        changed = (local_attention(q, k2, v2, window, backend)[:, :, last] - base[:, :, last]).abs().max()
        assert (changed > 1e-6) == should_change, (distance, changed)


def test_custom_scale():
    q, k, v = (t.detach() for t in random_inputs(1, 2, 30, 30, 4))
    for backend in ("reference", "chunked"):
        got = local_attention(q, k, v, 6, backend, scale=0.3)
        # scale s on q.k equals the default 1/sqrt(D) with q multiplied by s * sqrt(D)
        torch.testing.assert_close(got, definition(q * 0.3 * 2.0, k, v, 6))


# --------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("window", [0, -3, 2.5, True, "8"])
def test_bad_window_is_a_user_error(window):
    q = torch.randn(1, 1, 4, 2)
    with pytest.raises(UserError, match=r"^window=") as error:
        local_attention(q, q, q, window=window)
    assert "\n" not in str(error.value)


def test_unknown_backend_is_a_user_error():
    q = torch.randn(1, 1, 4, 2)
    allowed = r"backend='triton'.*allowed: auto, reference, chunked, flex"
    with pytest.raises(UserError, match=allowed) as error:
        local_attention(q, q, q, 2, backend="triton")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("shapes", [
    ((1, 1, 4, 2), (1, 1, 4, 2), (1, 1, 5, 2)),  # k and v differ
    ((1, 1, 4, 2), (1, 1, 4, 3), (1, 1, 4, 3)),  # head dims differ
    ((1, 2, 4, 2), (1, 1, 4, 2), (1, 1, 4, 2)),  # heads differ
    ((2, 1, 4, 2), (1, 1, 4, 2), (1, 1, 4, 2)),  # batch differs
    ((4, 2), (4, 2), (4, 2)),  # not [B, H, N, D]
    ((1, 1, 5, 2), (1, 1, 4, 2), (1, 1, 4, 2)),  # more queries than keys
    ((1, 1, 0, 2), (1, 1, 4, 2), (1, 1, 4, 2)),  # no query
])
def test_mismatched_shapes_are_user_errors(shapes):
    q, k, v = (torch.randn(s) for s in shapes)
    with pytest.raises(UserError) as error:
        local_attention(q, k, v, 2, backend="chunked")
    assert "\n" not in str(error.value)


def test_mixed_dtypes_are_a_user_error():
    q = torch.randn(1, 1, 4, 2)
    with pytest.raises(UserError, match="dtype"):
        local_attention(q, q.double(), q, 2)


# -------------------------------------------------------------------------------------- flex

def test_flex_with_gradients_on_cpu_is_a_clear_error():
    if not module._flex_available():
        pytest.skip("torch.nn.attention.flex_attention is not available")
    q = torch.randn(1, 1, 8, 4, requires_grad=True)
    with pytest.raises(UserError, match="no CPU backward.*backend='chunked'") as error:
        local_attention(q, q, q, 4, backend="flex")
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_flex_forward_on_cpu_equals_definition():
    """One shape only (each shape compiles, ~20-60 s on 2 cores): end-aligned queries and a key
    count that is not a multiple of the window. It skips only where the platform lacks what
    flex needs (the module, or a C++ compiler for inductor's CPU code); where both are there a
    compile failure is a failure."""
    if not module._flex_available():
        pytest.skip("torch.nn.attention.flex_attention is not available")
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("flex on CPU compiles C++ and no C++ compiler was found")
    # inputs that require grad, as in a model evaluated under no_grad (flex refuses them on CPU)
    q, k, v = (t.detach().float().requires_grad_() for t in random_inputs(1, 2, 37, 50, 16))
    with torch.no_grad():
        out = local_attention(q, k, v, 16, backend="flex")
    torch.testing.assert_close(out.double(), definition(q, k, v, 16), atol=2e-5, rtol=2e-5)


# ------------------------------------------------------------------------ local-attention pkg

def _package(window_size):
    local_attention_pkg = pytest.importorskip("local_attention")
    return local_attention_pkg.LocalAttention(
        window_size=window_size, causal=True, look_backward=1, exact_windowsize=True,
        autopad=True, dropout=0.0, use_rotary_pos_emb=False)


@pytest.mark.parametrize("n, window", [(24, 4), (23, 4), (30, 7), (9, 2), (5, 12), (64, 17)])
def test_equals_local_attention_package_with_window_size_w_minus_1(n, window):
    """docs/design.md, decision 1: the package's exact window attends to distance <= window_size (w + 1
    keys), so its window_size = w - 1 is our window = w; forward and gradients agree."""
    q, k, v = random_inputs(2, 3, n, n, 8)
    theirs = _package(window - 1)(q, k, v)
    ours = local_attention(q, k, v, window, "chunked")
    torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ours, definition(q, k, v, window), atol=1e-10, rtol=1e-10)
    grad = torch.randn_like(ours)
    for g_ours, g_theirs in zip(torch.autograd.grad(ours, (q, k, v), grad),
                                torch.autograd.grad(theirs, (q, k, v), grad)):
        torch.testing.assert_close(g_ours, g_theirs, atol=1e-10, rtol=1e-10)


def test_local_attention_package_window_size_w_sees_w_plus_1_keys():
    """The off-by-one docs/design.md (decision 1) warns about: the package's window_size = w equals our w + 1."""
    q, k, v = (t.detach() for t in random_inputs(1, 2, 20, 20, 8))
    theirs = _package(4)(q, k, v)
    torch.testing.assert_close(theirs, local_attention(q, k, v, 5, "chunked"), atol=1e-10, rtol=1e-10)
    assert (theirs - local_attention(q, k, v, 4, "chunked")).abs().max() > 1e-3


def test_chunked_refuses_double_backward():
    """The chunked backward is not itself differentiable: say so instead of a wrong result."""
    q, k, v = random_inputs(1, 1, 40, 40, 4)
    out = local_attention(q, k, v, 8, "chunked")
    grad = torch.randn_like(out, requires_grad=True)
    (dq,) = torch.autograd.grad(out, (q,), grad, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dq.sum().backward()
