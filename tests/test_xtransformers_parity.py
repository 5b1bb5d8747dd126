"""Parity with x-transformers (lucidrains, PyPI `x-transformers`, a dev dependency) where it
implements a method we implement, compared on the same inputs and mapped weights in float64.

x-transformers' decoder blocks are not ours (its attention has no RoPE by default and another
RMSNorm; hyper-connection layouts differ), so a whole-model weight mapping would test the
mapping more than the methods. Each test below isolates the operator's arithmetic inside the
x-transformers module that implements it and runs ours on the same tensors:

* value residual (ResFormer, `add_value_residual`): its `Attention` with a fixed mix
  (`learned_value_residual_mix=False`: v = V_1.lerp(V_n, 0.5)) against attention computed by
  hand around our `ValueResidual.attention_values` (lambda_1 = lambda_2 = 0.5) on its weights.
  Its default, a per-token learned mix sigmoid(W x) per head, is not one of ours.
* hyper-connections (`num_residual_streams > 1`): its `HyperConnection` is neither HC nor mHC
  (per-stream LayerNorm'd coefficients as in HC, sigmoid / Sinkhorn / 2 sigmoid constraints as
  in mHC, a doubly applied sigmoid on the write). In version 2.31.10 its Sinkhorn runs on
  [1 x s] blocks (the rearrange before it splits a dimension of size s, not s^2), so the stream
  mix it applies is all ones: every stream becomes the sum of the streams, whatever its weights
  (asserted below, so that a fix upstream shows here). Compared: (1) its `sinkhorn` function
  with our Sinkhorn-Knopp (its softmax over dim -2 first equals ours started from
  log_softmax(logits, -2)); (2) the stream arithmetic (read A_m^T H, mix A_r^T H, write
  B_i T(.)) of one module with zero dynamic weights, mapped onto our static HC (A_m =
  sigmoid(static alpha_0), A_r = its all-ones mix, B = 2 sigmoid(static beta + scale)).
* orthogonal residual update (`orthog_residual`): its `orthog_project` flattens each batch
  element's whole [T, d] before projecting; the paper (and ours) projects per token. Equal
  for one token per sequence (compared), different for longer ones (asserted).

Not compared, and why:
* GRU-gated residuals (`gate_residual`, GTrXL's GRUCell gate), LIMe (`integrate_layers`,
  layer-integrated memory: each layer reads a learned mix of all earlier hidden states): we do
  not implement them yet.
* aggregated residuals (`attn_aggregated_residuals`, its `AttentionResidual`): the brief for
  this file listed them as not implemented; its docstring cites Attention Residuals (arXiv
  2603.15031, our `attnres`), but its query is the latest hidden plus a LoRA of it, not AttnRes'
  learned pseudo-query, and its keys/values are per-layer hiddens, not our sources; whether
  our `attnres` ablation `query="input"` matches it has not been checked. Skipped.
"""
from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("x_transformers")
from einops import rearrange  # noqa: E402  (an x-transformers dependency)
from x_transformers.x_transformers import (  # noqa: E402
    Attention, HyperConnection, OrthogonalResidualUpdate, sinkhorn)

from resstream import ResStreamLM  # noqa: E402
from resstream.depth.hyper import StreamState  # noqa: E402
from resstream.depth.mhc import naive_sinkhorn_knopp, sinkhorn_knopp  # noqa: E402
from resstream.depth.value_residual import ValueResidualState  # noqa: E402
from resstream.testing import tiny_config  # noqa: E402

D, HEADS, HEAD_DIM, T = 32, 4, 8, 5


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def perturbed(module, scale=0.3, seed=0):
    module = module.double()
    g = generator(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


# ------------------------------------------------------------------ value residual
def causal_attention(module: Attention, x, v):
    """softmax(q k^T / sqrt(head_dim), causal) v through the module's projections, v given."""
    split = lambda t: rearrange(t, "b n (h d) -> b h n d", h=HEADS)  # noqa: E731
    q, k = split(module.to_q(x)), split(module.to_k(x))
    scores = q @ k.transpose(-1, -2) * HEAD_DIM ** -0.5
    mask = torch.ones(T, T, dtype=torch.bool).triu(1)
    weights = scores.masked_fill(mask, float("-inf")).softmax(-1)
    return module.to_out(rearrange(weights @ split(v), "b h n d -> b n (h d)"))


def test_value_residual_matches_xtransformers_attention():
    first = perturbed(Attention(D, dim_head=HEAD_DIM, heads=HEADS, causal=True), seed=1)
    later = perturbed(Attention(D, dim_head=HEAD_DIM, heads=HEADS, causal=True,
                                learned_value_residual_mix=False), seed=2)
    for module in (first, later):  # its softmax runs in float32 (without qk_norm): float64 here
        module.attend.attn_fn = partial(F.softmax, dim=-1)
    x1 = torch.randn(2, T, D, generator=generator(3), dtype=torch.float64)
    x2 = torch.randn(2, T, D, generator=generator(4), dtype=torch.float64)
    out1, inter = first(x1, return_intermediates=True)
    theirs, _ = later(x2, value_residual=inter.values, return_intermediates=True)

    model = ResStreamLM(tiny_config(depth="value_residual", n_heads=HEADS)).double()
    op = model.depth
    assert model.config.d_model == D and model.config.head_dim == HEAD_DIM
    attention = [s for s in model.sites if s.kind == "attn"]
    state = ValueResidualState(stream=x1)
    v1 = op.attention_values(state, attention[0], first.to_v(x1), None)  # V_1, unchanged
    mixed = op.attention_values(state, attention[1], later.to_v(x2), None)  # 0.5 V_n + 0.5 V_1
    torch.testing.assert_close(causal_attention(first, x1, v1), out1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(causal_attention(later, x2, mixed), theirs, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ hyper-connections
@pytest.mark.parametrize("iters", [1, 5, 20])
def test_sinkhorn_matches_xtransformers(iters):
    logits = torch.randn(3, 4, 4, generator=generator(iters), dtype=torch.float64)
    theirs = sinkhorn(logits, iters)  # (computed in float32 whatever the input)
    start = torch.log_softmax(logits, dim=-2)  # its column softmax, then our row/column steps
    for ours in (sinkhorn_knopp(start, iters), naive_sinkhorn_knopp(start, iters)):
        torch.testing.assert_close(ours.float(), theirs.float(), rtol=1e-5, atol=1e-6)


def test_hyper_connection_stream_arithmetic_matches_xtransformers():
    n, index = 4, 1
    theirs = perturbed(HyperConnection(D, layer_index=index, num_residual_streams=n,
                                       sinkhorn_iters=5), seed=5)
    with torch.no_grad():  # zero dynamic weights: their coefficients are the static ones
        theirs.dynamic_alpha_fn.zero_()
        theirs.dynamic_beta_fn.zero_()
    streams = torch.randn(2, T, n, D, generator=generator(6), dtype=torch.float64)
    branch_input, residuals, kwargs = theirs.prepare(rearrange(streams, "b t s d -> (b s) t d"))
    # their stream mix is all ones (Sinkhorn over [1 x s] blocks, module docstring)
    torch.testing.assert_close(residuals, streams.sum(-2, keepdim=True).expand_as(residuals))

    model = ResStreamLM(tiny_config(depth="hyper", depth_options={"dynamic": False,
                                                                  "streams": n})).double()
    op, site = model.depth, model.sites[index]
    connection = op.connections[str(site.index)]
    with torch.no_grad():
        connection.a_m.copy_(torch.sigmoid(theirs.static_alpha[:, 0]))
        connection.a_r.copy_(torch.ones(n, n))
        # dynamic beta with zero weights: sigmoid(0) * 2 * scale; then 2 sigmoid(. + static)
        connection.b.copy_(2 * torch.sigmoid(theirs.static_beta + theirs.dynamic_beta_scale))
    torch.testing.assert_close(connection.b.expand(2, T, n), kwargs["beta"])
    state = StreamState(streams)
    h_in = op.read(state, site, lambda x: x, None)
    torch.testing.assert_close(h_in, branch_input, rtol=1e-12, atol=1e-12)
    out = torch.tanh(h_in)
    new = op.write(state, site, out, None).streams
    expected = rearrange(theirs(out, residuals, **kwargs), "(b s) t d -> b t s d", s=n)
    torch.testing.assert_close(new, expected, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ orthogonal residual update
def orthogonal_write(model, x, f):
    return model.depth.write(x, model.sites[0], f, None)


def test_orthogonal_update_matches_xtransformers_per_token():
    model = ResStreamLM(tiny_config(depth="orthogonal", depth_options={"eps": 1e-30})).double()
    theirs = OrthogonalResidualUpdate(D)
    x = torch.randn(6, 1, D, generator=generator(7), dtype=torch.float64)  # one token each
    f = torch.randn(6, 1, D, generator=generator(8), dtype=torch.float64)
    torch.testing.assert_close(orthogonal_write(model, x, f), theirs(f, x), rtol=1e-12, atol=1e-12)
    # longer sequences: theirs projects the flattened [T, d] of each sequence, ours each token
    x = torch.randn(2, T, D, generator=generator(9), dtype=torch.float64)
    f = torch.randn(2, T, D, generator=generator(10), dtype=torch.float64)
    assert (orthogonal_write(model, x, f) - theirs(f, x)).abs().max() > 1e-3


# ------------------------------------------------------------------ not implemented here
@pytest.mark.skip(reason="GRU-gated residuals (x-transformers gate_residual): not implemented in resstream yet")
def test_gru_gated_residual():
    raise AssertionError


@pytest.mark.skip(reason="LIMe (x-transformers integrate_layers): not implemented in resstream yet")
def test_lime():
    raise AssertionError


@pytest.mark.skip(reason="aggregated residuals (x-transformers attn_aggregated_residuals): not "
                         "compared; its LoRA-conditioned query is not our attnres (module docstring)")
def test_aggregated_residuals():
    raise AssertionError
