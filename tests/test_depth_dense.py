"""Block-granularity dense depth operators: elc_bert, denseformer, vertical, dca, mudd.

Each operator is checked against a float64 reference written from its equations (plain loops
over blocks and sources, weights read from the state_dict by name, sublayers from
tests/reference.py), at init against the standard model or the init math, for every learned
mixing weight mattering, with the ShortSWA sub-block and grouped KV heads, with `depth_layers`,
under cached decoding, and for option validation.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from reference import head, multihead, norm_weight, rmsnorm, sublayer

from resstream.errors import UserError
from resstream.testing import baseline_twin, reference_model, sample_ids, tiny_config

TIGHT = dict(rtol=1e-9, atol=1e-9)  # float64 model vs float64 reference
INIT = dict(rtol=0, atol=1e-5)  # float32 model vs float32 standard twin


# ------------------------------------------------------------------ shared reference pieces
class Ref:
    """Float64 weights of one model and the sublayers of tests/reference.py for one sequence."""

    def __init__(self, model):
        self.config = model.config
        # the parameters themselves (keep_vars): the reference is differentiable as well
        self.w = {k: v.double() for k, v in model.state_dict(keep_vars=True).items()}
        self.kinds = list(model.blocks[0].site_kinds)  # [mix,] [attn,] mlp
        self.eps = self.config.norm_eps
        active = self.config.depth_layers
        self.active = set(range(self.config.n_layers)) if active is None else set(active)

    def p(self, name):
        return self.w[f"depth.{name}"]

    def has(self, name):
        return f"depth.{name}" in self.w

    def normed(self, h, layer, kind):
        return rmsnorm(h, norm_weight(self.w, layer, kind), self.eps)

    def run(self, kind, layer, h):
        """f(Norm(h)) of sublayer `kind` of block `layer`."""
        return sublayer(kind, layer, self.normed(h, layer, kind), self.w, self.config)

    def attention(self, layer, xq, xk, xv):
        """Attention of block `layer` on separate (already normalised) Q, K, V inputs."""
        c = self.config
        return multihead(xq, xk, xv, self.w, f"blocks.{layer}.attn", c.n_heads, c.kv_heads, None,
                         c.rope_theta)

    def scale_free(self, x):
        return rmsnorm(x, None, self.eps)

    def logits(self, h):
        return head(h, self.w, self.config)


def reference_logits(model, ids, block_fn):
    """Run `block_fn(ref, embedding [T, d]) -> final hidden [T, d]` per sequence."""
    ref = Ref(model)
    return torch.stack([ref.logits(block_fn(ref, ref.w["embed.weight"][row])) for row in ids])


build = reference_model
ids_for = sample_ids


def standard_block(ref, layer, h):
    for kind in ref.kinds:
        h = h + ref.run(kind, layer, h)
    return h


# ------------------------------------------------------------------ references from the equations
def elc_reference(model, ids, weights=None):
    """ELC-BERT: x_n = sum_i softmax(w_n)_i H_i; H_n per variant; final H_L or softmax(w_out).H.
    `weights(layer or "out", n)` overrides the learned softmax (for the init math)."""
    variant = model.config.depth_options.get("variant", "zero")

    def probs(ref, key, n):
        if weights is not None:
            return weights(key, n)
        name = "output_logits" if key == "out" else f"logits.{key}"
        return torch.softmax(ref.p(name), -1)

    def forward(ref, emb):
        L = ref.config.n_layers
        H = [ref.scale_free(emb) if variant == "normalized" else emb]
        for n in range(L):
            if n == 0:
                x = H[0]
            elif n in ref.active:
                pr = probs(ref, n, n + 1)
                x = sum(pr[i] * H[i] for i in range(n + 1))
            else:
                x = sum(H)
            delta = torch.zeros_like(x)
            for kind in ref.kinds:
                inp = delta if (variant == "base" and kind == "mlp") else x + delta
                delta = delta + ref.run(kind, n, inp)
            H.append(ref.scale_free(delta) if variant == "normalized" else delta)
        if L - 1 not in ref.active:
            return sum(H)
        if variant == "weighted_output":
            pr = probs(ref, "out", L + 1)
            return sum(pr[i] * H[i] for i in range(L + 1))
        return H[-1]

    return reference_logits(model, ids, forward)


def denseformer_reference(model, ids):
    opts = model.config.depth_options
    k, p = opts.get("dilation", 1), opts.get("period", 1)

    def forward(ref, emb):
        X, Y = [emb], emb
        for i in range(1, ref.config.n_layers + 1):
            X.append(standard_block(ref, i - 1, Y))
            if i % p == 0 and (i - 1) in ref.active:
                S = [j for j in range(i + 1) if j % k == i % k]
                alpha = ref.p(f"alphas.{i}")
                assert alpha.shape == (len(S),)
                Y = sum(alpha[n] * X[j] for n, j in enumerate(S))
            else:
                Y = X[i]
        return Y

    return reference_logits(model, ids, forward)


def vertical_reference(model, ids, weights=None):
    opts = model.config.depth_options
    delta_sources = opts.get("sources", "cumulative") == "delta"
    keep = opts.get("keep_residual", False)

    def forward(ref, emb):
        normed, previous, plain = [ref.scale_free(emb)], emb, emb
        for layer in range(ref.config.n_layers):
            if layer not in ref.active:
                x = plain if delta_sources else previous
            else:
                if weights is not None:
                    pr = weights(layer, layer + 1)
                elif layer == 0:
                    pr = torch.ones(1, dtype=torch.float64)
                else:
                    pr = torch.softmax(ref.p(f"logits.{layer}"), -1)
                read = sum(pr[j] * normed[j] for j in range(layer + 1))
                x = previous + read if keep else read
            out = standard_block(ref, layer, x)
            delta = out - x
            normed.append(ref.scale_free(delta if delta_sources else out))
            plain, previous = plain + delta, out
        return previous

    return reference_logits(model, ids, forward)


def grn_reference(entries, version, b, w, gate_scale_free):
    """One GRN read: sum_i coef_i (.) G_i with coef = b_i (v1, v2) or b_i + ReLU(w.G_i) (v3)."""
    out = torch.zeros_like(entries[0])
    for i, g in enumerate(entries):
        coef = b[i]
        if version == "v3":
            gate_in = gate_scale_free(g) if gate_scale_free else g
            coef = coef + torch.relu(gate_in @ w)[:, None]
        out = out + coef * g
    return out


def dca_entries(x0, deltas, t, k, layout):
    """The stack G_t before block t from x_0 and the deltas f_1..f_t (k None: [x_0, f_1..f_t]):
    middle_sum [x_0, sum_{i <= t-k} f_i, f_{t-k+1}..f_t] (the middle sum once t > k);
    folded [x_0 + sum_{i <= t-k} f_i, f_{t-k+1}..f_t]; first_last: the first k and the last k
    entries of [x_0, f_1..f_t], the middle dropped."""
    full = [x0] + deltas[:t]
    if k is None or t <= k:
        return full
    if layout == "middle_sum":
        return [x0, sum(deltas[:t - k])] + deltas[t - k:t]
    if layout == "folded":
        return [x0 + sum(deltas[:t - k])] + deltas[t - k:t]
    return full if len(full) < 2 * k else full[:k] + full[-k:]


def dca_reference(model, ids):
    opts = model.config.depth_options
    mode, k = opts.get("grn", "dca"), opts.get("k")
    layout = opts.get("k_stack", "middle_sum")
    version = "v3" if mode == "dca" else mode

    def forward(ref, emb):
        gsf = ref.scale_free if opts.get("gate_norm", False) else None
        deltas = []
        three = mode == "dca" and "attn" in ref.kinds
        for t in range(ref.config.n_layers):
            G = dca_entries(emb, deltas, t, k, layout)
            if t in ref.active:
                b, w = ref.p(f"grns.{t}.b"), (ref.p(f"grns.{t}.w") if version == "v3" else None)
                streams = [grn_reference(G, version, b[c], None if w is None else w[c], gsf)
                           for c in range(b.shape[0])]
            else:
                streams = [sum(G)] * (3 if three else 1)
            skip = streams[0]
            views = list(streams) if three and t in ref.active else None
            stream = skip
            for kind in ref.kinds:
                if kind == "attn" and views is not None:
                    normed = [ref.normed(views[0], t, "attn")]
                    if ref.has(f"kv_norms.{t}.0.weight"):  # separate_norms: own K and V norms
                        normed += [rmsnorm(views[c], ref.p(f"kv_norms.{t}.{c - 1}.weight"), ref.eps)
                                   for c in (1, 2)]
                    else:
                        normed += [ref.normed(v, t, "attn") for v in views[1:]]
                    out = ref.attention(t, *normed)
                else:
                    out = ref.run(kind, t, stream)
                if kind == "mix" and views is not None:
                    views = [v + out for v in views]
                stream = stream + out
            deltas.append(stream - skip)
        G = dca_entries(emb, deltas, ref.config.n_layers, k, layout)
        if ref.config.n_layers - 1 not in ref.active:
            return sum(G)
        b, w = ref.p("final_grn.b"), (ref.p("final_grn.w") if version == "v3" else None)
        return grn_reference(G, version, b[0], None if w is None else w[0], gsf)

    return reference_logits(model, ids, forward)


def mudd_reference(model, ids):
    """X^c = sum_j A[c, j] X_j with A = GELU(RMSNorm(X_i) W_1) W_2 + a (static: a alone);
    "prepost": sources PreNorm_j(X_j), X^{Q,K,V} = X_i + DA, X^R = X_i + PostNorm_i(DA_R)."""
    prepost = model.config.depth_options.get("form", "paper") == "prepost"

    def forward(ref, emb):
        L = ref.config.n_layers
        X = [emb]
        q = k = v = r = emb
        distinct = False
        for i in range(L):
            stream = r
            for kind in ref.kinds:
                if kind == "attn" and distinct:
                    nq = ref.normed(q, i, "attn")
                    if ref.has(f"kv_norms.{i}.0.weight"):
                        nk = rmsnorm(k, ref.p(f"kv_norms.{i}.0.weight"), ref.eps)
                        nv = rmsnorm(v, ref.p(f"kv_norms.{i}.1.weight"), ref.eps)
                    else:
                        nk, nv = ref.normed(k, i, "attn"), ref.normed(v, i, "attn")
                    out = ref.attention(i, nq, nk, nv)
                else:
                    out = ref.run(kind, i, stream)
                if kind == "mix":
                    q, k, v = q + out, k + out, v + out
                stream = stream + out
            X.append(stream)
            if not ref.has(f"das.{i}.prior"):
                q = k = v = r = stream
                distinct = False
                continue
            prior = ref.p(f"das.{i}.prior")  # [C, n]
            C, n = prior.shape
            if ref.has(f"das.{i}.w1.weight"):
                hidden = F.gelu(ref.scale_free(stream) @ ref.p(f"das.{i}.w1.weight").T)
                A = (hidden @ ref.p(f"das.{i}.w2.weight").T).view(-1, C, n) + prior  # [T, C, n]
            else:  # static dense: the prior for every token
                A = prior.expand(stream.shape[0], C, n)
            sources = [rmsnorm(X[j], ref.p(f"pre_norms.{j}.weight"), ref.eps) if prepost else X[j]
                       for j in range(n)]
            out_streams = [sum(A[:, c, j, None] * sources[j] for j in range(n)) for c in range(C)]
            if prepost:
                post = rmsnorm(out_streams[-1], ref.p(f"post_norms.{i}.weight"), ref.eps)
                out_streams = [stream + s for s in out_streams[:-1]] + [stream + post]
            if C == 1:
                r = out_streams[0]
                q = k = v = r
                distinct = False
            else:
                q, k, v, r = out_streams
                distinct = True
        return r

    return reference_logits(model, ids, forward)


REFERENCES = {"elc_bert": elc_reference, "denseformer": denseformer_reference,
              "vertical": vertical_reference, "dca": dca_reference, "mudd": mudd_reference}

# (operator, options) pairs exercising every variant and option
CONFIGS = [
    ("elc_bert", {"variant": "zero"}), ("elc_bert", {"variant": "base"}),
    ("elc_bert", {"variant": "normalized"}), ("elc_bert", {"variant": "weighted_output"}),
    ("denseformer", {}), ("denseformer", {"dilation": 2, "period": 3}),
    ("denseformer", {"dilation": 4, "period": 5}),
    ("vertical", {}), ("vertical", {"sources": "delta"}),
    ("vertical", {"keep_residual": True, "init_adjacent_logit": 1.5}),
    ("dca", {}), ("dca", {"k": 2}), ("dca", {"grn": "v1"}), ("dca", {"grn": "v2", "k": 1}),
    ("dca", {"grn": "v3", "gate_norm": True}), ("dca", {"k": 2, "k_stack": "folded"}),
    ("dca", {"k": 1, "k_stack": "first_last"}), ("dca", {"k": 2, "k_stack": "first_last"}),
    ("dca", {"separate_norms": True}),
    ("mudd", {}), ("mudd", {"separate_norms": False, "hidden_multiple": 0, "expand_last": False}),
    ("mudd", {"multiway": False}), ("mudd", {"dynamic": False}), ("mudd", {"form": "prepost"}),
    ("mudd", {"form": "prepost", "dynamic": False, "multiway": False}),
]


def layers_for(name):
    return 6 if name == "denseformer" else 4  # 6: two DWAs for 2x3, one for 4x5


def config_id(case):
    name, options = case
    return name + "".join(f"-{k}={v}" for k, v in options.items())


# ------------------------------------------------------------------ (1) float64 reference
REFERENCE_CASES = ([(case, "shortswa") for case in CONFIGS]
                   + [((name, {}), None) for name in REFERENCES])


@pytest.mark.parametrize("case, mixer", REFERENCE_CASES,
                         ids=[f"{config_id(c)}-{m}" for c, m in REFERENCE_CASES])
def test_matches_float64_reference_after_perturbation(case, mixer):
    name, options = case
    model = build(name, options, mixer, n_layers=layers_for(name))  # tiny: 4 heads, 2 KV heads
    ids = ids_for(model)
    torch.testing.assert_close(model(ids), REFERENCES[name](model, ids), **TIGHT)


@pytest.mark.parametrize("case", [("elc_bert", {"variant": "base"}), ("denseformer", {"period": 2}),
                                  ("vertical", {"sources": "delta"}), ("dca", {"k": 1}), ("mudd", {}),
                                  ("mudd", {"form": "prepost"})],
                         ids=config_id)
def test_depth_layers_matches_reference(case):
    name, options = case
    for active in ([1, 2], [0, 3]):  # last block inactive; a middle block inactive
        model = build(name, options, "shortswa", n_layers=4, depth_layers=active)
        ids = ids_for(model)
        torch.testing.assert_close(model(ids), REFERENCES[name](model, ids), **TIGHT)


@pytest.mark.parametrize("case", [(name, {}) for name in REFERENCES]
                         + [("mudd", {"separate_norms": False}), ("dca", {"k": 1}),
                            ("dca", {"k": 1, "k_stack": "first_last", "separate_norms": True}),
                            ("mudd", {"form": "prepost"}), ("mudd", {"dynamic": False, "multiway": False})],
                         ids=config_id)
def test_gradients_match_reference(case):
    """Backward too (MUDD writes its sources into one buffer through a custom autograd function)."""
    name, options = case
    model = build(name, options, "shortswa", n_layers=4, depth_layers=[0, 1, 3])
    ids = ids_for(model, batch=1)
    probe = torch.randn(1, ids.shape[1], model.config.vocab_size, dtype=torch.float64)
    params = [p for p in model.parameters()]
    got = torch.autograd.grad((model(ids) * probe).sum(), params)
    want = torch.autograd.grad((REFERENCES[name](model, ids) * probe).sum(), params)
    for (pname, _), g, w in zip(model.named_parameters(), got, want):
        torch.testing.assert_close(g, w, **TIGHT, msg=lambda m, pname=pname: f"{pname}: {m}")


# ------------------------------------------------------------------ (2) init
@pytest.mark.parametrize("mixer", [None, "shortswa"])
@pytest.mark.parametrize("case", [c for c in CONFIGS if c[0] in ("denseformer", "dca", "mudd")],
                         ids=config_id)
def test_starts_exactly_at_the_standard_model(case, mixer):
    name, options = case
    model = build(name, options, mixer, dtype=torch.float32, perturb=False, n_layers=layers_for(name))
    ids = ids_for(model)
    with torch.no_grad():
        got, want = model(ids), baseline_twin(model)(ids)
    if not model.depth.starts_at_baseline:  # dca's first_last k-DCA drops the middle deltas
        assert name == "dca" and options["k_stack"] == "first_last"
        assert (got - want).abs().max() > 1e-3
        return
    torch.testing.assert_close(got, want, **INIT)


@pytest.mark.parametrize("name", ["elc_bert", "vertical", "dca", "mudd"])
def test_no_depth_layers_is_the_standard_model(name):
    options = {"variant": "zero"} if name == "elc_bert" else {}
    model = build(name, options, "shortswa", dtype=torch.float32, n_layers=4, depth_layers=[])
    assert sum(p.numel() for p in model.depth.parameters()) == 0
    ids = ids_for(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), baseline_twin(model)(ids), **INIT)


def uniform(key, n):
    return torch.full((n,), 1.0 / n, dtype=torch.float64)


def last_logit_one(key, n):
    """softmax([0, ..., 0, 1]): the previous output weighted e / (n - 1 + e)."""
    p = torch.full((n,), 1.0 / (n - 1 + math.e), dtype=torch.float64)
    p[-1] = math.e / (n - 1 + math.e)
    return p


@pytest.mark.parametrize("variant, weights", [("zero", uniform), ("base", last_logit_one),
                                              ("normalized", uniform), ("weighted_output", uniform)])
def test_elc_init_is_the_papers_math_not_the_baseline(variant, weights):
    model = build("elc_bert", {"variant": variant}, "shortswa", perturb=False, n_layers=4)
    ids = ids_for(model)
    got = model(ids)
    torch.testing.assert_close(got, elc_reference(model, ids, weights=weights), **TIGHT)
    assert not torch.allclose(got, baseline_twin(model)(ids), atol=1e-3)


@pytest.mark.parametrize("options, weights", [({}, uniform), ({"sources": "delta"}, uniform),
                                              ({"init_adjacent_logit": 1.0}, last_logit_one)])
def test_vertical_init_is_the_chosen_math(options, weights):
    model = build("vertical", options, None, perturb=False, n_layers=4)
    ids = ids_for(model)
    got = model(ids)
    torch.testing.assert_close(got, vertical_reference(model, ids, weights=weights), **TIGHT)
    assert not torch.allclose(got, baseline_twin(model)(ids), atol=1e-3)


# ------------------------------------------------------------------ (3) every mixing weight matters
@pytest.mark.parametrize("case", CONFIGS, ids=config_id)
def test_every_learned_mixing_weight_matters(case):
    name, options = case
    model = build(name, options, "shortswa", n_layers=layers_for(name))
    ids = ids_for(model)
    own = dict(model.depth.named_parameters())
    assert own, "operator has no parameters"
    # every element has a gradient (a mixing result computed but never applied would not)
    probe = torch.randn(ids.shape + (model.config.vocab_size,), dtype=torch.float64,
                        generator=torch.Generator().manual_seed(5))
    (model(ids) * probe).sum().backward()
    for pname, param in own.items():
        assert param.grad is not None and (param.grad != 0).all(), f"{pname}: zero gradient entries"
    # and perturbing each parameter tensor further changes the logits
    with torch.no_grad():
        base = model(ids)
        for pname, param in own.items():
            saved = param.clone()
            param.add_(0.1 * torch.randn_like(param))
            assert (model(ids) - base).abs().max() > 1e-6, f"{pname} does not change the output"
            param.copy_(saved)


# ------------------------------------------------------------------ (4) mixers, GQA, decoding
@pytest.mark.parametrize("case", [c for c in CONFIGS if c[1] == {} or c[0] == "elc_bert"], ids=config_id)
def test_cached_decoding_with_shortswa_and_gqa(case):
    name, options = case
    model = build(name, options, "shortswa", dtype=torch.float32, n_layers=3)
    assert model.config.kv_heads < model.config.n_heads
    ids = ids_for(model, length=9)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 9)
        steps = [model(ids[:, :4], cache=cache)]  # prefill, then one token at a time
        steps += [model(ids[:, t:t + 1], cache=cache) for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["dca", "mudd"])
def test_qkv_operators_without_global_attention_read_one_stream(name):
    model = build(name, {}, "shortswa", n_layers=4, mixer_options={"replace_attention": True})
    assert "attn" not in model.blocks[0].site_kinds
    ids = ids_for(model)
    torch.testing.assert_close(model(ids), REFERENCES[name](model, ids), **TIGHT)


def test_mudd_attention_receives_separate_views():
    model = build("mudd", {}, None, n_layers=3)
    seen = []
    hook = model.blocks[1].attn.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    model(ids_for(model))
    hook.remove()
    q, k, v = seen[0]
    assert not torch.allclose(q, k) and not torch.allclose(k, v)


# ------------------------------------------------------------------ structure and accounting
def test_denseformer_keeps_only_what_later_dwas_read():
    model = build("denseformer", {"dilation": 4, "period": 5}, perturb=False, n_layers=12)
    op = model.depth
    assert sorted(op.alphas.keys(), key=int) == ["5", "10"]
    assert op.sources == {5: [1, 5], 10: [2, 6, 10]}
    assert op.alphas["5"].tolist() == [0.0, 1.0]
    # after block 6: X_2 and X_6 (= Y_6, the stream) are needed by the DWA after block 10
    assert op.pipeline_payload(5)[1] == 2
    full = build("denseformer", {}, perturb=False, n_layers=12).depth
    # 1x1 after block 6: X_0..X_6 and the DWA output Y_6; peak after block 11: X_0..X_11 and Y_11
    assert full.pipeline_payload(5)[1] == 8 and full.depth_state_vectors() == 13
    assert sum(p.numel() for p in full.parameters()) == 12 * 15 // 2  # L(L+3)/2


def test_denseformer_depth_layers_removes_dwas():
    model = build("denseformer", {}, n_layers=4, depth_layers=[0, 2])
    assert sorted(model.depth.alphas.keys()) == ["1", "3"]


def test_parameter_counts_follow_the_papers():
    L, d = 5, 32

    def counts(name, opts):
        return sum(p.numel() for p in build(name, opts, perturb=False, n_layers=L).depth.parameters())

    assert counts("elc_bert", {}) == L * (L + 1) // 2 - 1  # block 1's single logit is dropped
    assert counts("elc_bert", {"variant": "weighted_output"}) == L * (L + 1) // 2 - 1 + L + 1
    assert counts("vertical", {}) == L * (L + 1) // 2 - 1
    assert counts("dca", {"grn": "v1"}) == sum(t + 1 for t in range(L + 1))
    assert counts("dca", {}) == sum(3 * ((t + 1) * d + d) for t in range(L)) + (L + 1) * d + d
    # k-DCA stacks before block t (t = L: the final read), k = 2
    assert counts("dca", {"k": 2, "grn": "v2"}) == sum(min(t + 1, 2 + 2) for t in range(L + 1)) * d
    assert counts("dca", {"k": 2, "grn": "v2", "k_stack": "folded"}) == \
        sum(min(t, 2) + 1 for t in range(L + 1)) * d
    assert counts("dca", {"k": 2, "grn": "v2", "k_stack": "first_last"}) == \
        sum(min(t + 1, 2 * 2) for t in range(L + 1)) * d
    assert counts("dca", {"separate_norms": True}) == counts("dca", {}) + 2 * d * L
    hidden = lambda n, c, last: ((n * c * (4 if last else 1)) // 64 + 1) * 64
    expected = sum(d * hidden(i + 2, 4, False) + hidden(i + 2, 4, False) * 4 * (i + 2) + 4 * (i + 2)
                   for i in range(L - 1))
    expected += d * hidden(L + 1, 1, True) + hidden(L + 1, 1, True) * (L + 1) + (L + 1)
    assert counts("mudd", {"separate_norms": False}) == expected
    assert counts("mudd", {}) == expected + 2 * d * (L - 1)


def test_mudd_init_values():
    da = build("mudd", {}, perturb=False, n_layers=3).depth.das["1"]
    assert da.w2.weight.abs().sum() == 0
    assert da.prior.tolist() == [[0.0, 0.0, 1.0]] * 4
    assert abs(da.w1.weight.std().item() - 32 ** -0.5) < 0.02


def test_mudd_prepost_init_values():
    """The JAX training config's form: prior 0 (the dynamic part is 0 too: every DA is 0 and
    every stream X_i), PreNorm gains 1 for X_0..X_L, PostNorm gains 1e-3 per DA."""
    op = build("mudd", {"form": "prepost"}, perturb=False, n_layers=3).depth
    assert all(da.prior.abs().sum() == 0 and da.w2.weight.abs().sum() == 0 for da in op.das.values())
    assert sorted(op.pre_norms, key=int) == ["0", "1", "2", "3"]
    assert sorted(op.post_norms) == sorted(op.das)
    assert all((norm.weight == 1).all() for norm in op.pre_norms.values())
    assert all(torch.allclose(norm.weight, torch.full_like(norm.weight, 1e-3))
               for norm in op.post_norms.values())
    assert op.pipeline_payload(0)[1] == 3  # X_0, X_1 normalised, and X_1 itself


def test_mudd_single_way_and_static_structure():
    single = build("mudd", {"multiway": False}, perturb=False, n_layers=3).depth
    assert {da.n_streams for da in single.das.values()} == {1} and not len(single.kv_norms)
    assert single.reads_through_norm  # no Q, K, V views: every read through the sublayer norm
    static = build("mudd", {"dynamic": False}, perturb=False, n_layers=3).depth
    assert all(da.w1 is None and da.w2 is None for da in static.das.values())
    assert static.mixing == "static" and static.das["1"].prior.tolist() == [[0.0, 0.0, 1.0]] * 4
    L, d = 3, 32
    params = sum(p.numel() for p in build("mudd", {"dynamic": False, "separate_norms": False},
                                           perturb=False, n_layers=L).depth.parameters())
    assert params == sum(4 * (i + 2) for i in range(L - 1)) + (L + 1)  # the priors a_i only


@pytest.mark.parametrize("name", list(REFERENCES))
def test_metadata(name):
    op = build(name, {}, perturb=False, n_layers=4).depth
    assert op.granularity == "block" and not op.cross_token_state
    assert op.mixing in ("static", "dynamic") and op.paper and op.aggregates
    formula, value = op.pipeline_payload(1)
    assert isinstance(formula, str) and value >= 3  # embedding + two block outputs at least
    assert op.depth_state_vectors() >= 4


# ------------------------------------------------------------------ (5) option validation
@pytest.mark.parametrize("name, options, match", [
    ("elc_bert", {"variant": "wide"}, "variant"),
    ("elc_bert", {"variants": "zero"}, "unknown option"),
    ("denseformer", {"dilation": 0}, "dilation"),
    ("denseformer", {"period": 7}, "period"),
    ("denseformer", {"period": 1.5}, r"period=1\.5 is invalid; allowed: an integer"),
    ("vertical", {"sources": "both"}, "sources"),
    ("vertical", {"keep_residual": "yes"}, "keep_residual='yes' is invalid; allowed: true or false"),
    ("vertical", {"init_adjacent_logit": float("inf")}, "init_adjacent_logit"),
    ("dca", {"grn": "v4"}, "grn"),
    ("dca", {"k": 0}, "depth_options.k"),
    ("mudd", {"hidden_multiple": -1}, "hidden_multiple"),
    ("mudd", {"sepln": True}, "unknown option"),
    ("mudd", {"form": "jax"}, "form"),
    ("dca", {"k_stack": "middle"}, "k_stack"),
])
def test_bad_options_are_user_errors(name, options, match):
    with pytest.raises(UserError, match=match):
        tiny_config(depth=name, depth_options=options, n_layers=6)


# ------------------------------------------------------------------ (5) MUDD's hand-written backward
@pytest.mark.parametrize("active, mixer_options", [([0, 1], {}), ([1, 3], {}),
                                                  (None, {"replace_attention": True})],
                         ids=["last-block-inactive", "first-block-inactive", "no-attention"])
def test_mudd_gradients_match_reference_in_more_layouts(active, mixer_options):
    """The DAs pass one source-gradient buffer down a chain (_Aggregate): the first DA of the
    backward need not cover every slot, and single-stream DAs take the C = 1 path."""
    model = build("mudd", {}, "shortswa", n_layers=4, depth_layers=active,
                  mixer_options=mixer_options)
    ids = ids_for(model, batch=2)
    probe = torch.randn(2, ids.shape[1], model.config.vocab_size, dtype=torch.float64)
    params = list(model.parameters())
    got = torch.autograd.grad((model(ids) * probe).sum(), params)
    want = torch.autograd.grad((mudd_reference(model, ids) * probe).sum(), params)
    for (pname, _), g, w in zip(model.named_parameters(), got, want):
        torch.testing.assert_close(g, w, **TIGHT, msg=lambda m, pname=pname: f"{pname}: {m}")


def test_mudd_backward_twice_through_a_retained_graph():
    """Each backward pass accumulates into a fresh source-gradient buffer."""
    model = build("mudd", {}, "shortswa", n_layers=3)
    ids = ids_for(model)
    loss = model(ids).square().sum()
    params = list(model.parameters())
    first = torch.autograd.grad(loss, params, retain_graph=True)
    second = torch.autograd.grad(loss, params)
    for g1, g2 in zip(first, second):
        torch.testing.assert_close(g1, g2, rtol=0, atol=0)


@pytest.mark.parametrize("weight_shape", [None, (5,), (3, 5)])
def test_mudd_fused_rms_norm_matches_the_module(weight_shape):
    from resstream.depth.mudd import rms_norm
    from resstream.layers import RMSNorm

    x = torch.randn(2, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    weight = None if weight_shape is None else torch.randn(weight_shape, dtype=torch.float64,
                                                            requires_grad=True)
    inputs = (x,) if weight is None else (x, weight)
    torch.autograd.gradcheck(lambda *a: rms_norm(a[0], a[1] if len(a) > 1 else None, 1e-5), inputs)
    module = RMSNorm(5, 1e-5, affine=False).double()
    want = module(x) if weight is None else weight * module(x)
    torch.testing.assert_close(rms_norm(x, weight, 1e-5), want, **TIGHT)
    half = x.detach().bfloat16()  # half dtypes keep the module's float32 arithmetic
    torch.testing.assert_close(rms_norm(half, None, 1e-5), module(half), rtol=0, atol=0)
