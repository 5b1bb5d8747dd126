"""Routing weights (`ResStreamLM.depth_routing`): every operator reports a known kind; at init
the weights are what each paper's init implies; with perturbed weights they equal a float64
recomputation from the equations; the JSON form round-trips; the figures are valid PNGs."""
import json
import math

import pytest
import torch

from reference import rmsnorm, site_kinds, sublayer
from resstream import list_depth_operators
from resstream.model import ResStreamLM
from resstream.routing import KINDS, mean_max_weight, routing_from_json, routing_to_json
from resstream.testing import perturb_parameters, tiny_config

SOFTMAX_READS = ("attnres", "block_attnres", "delta_attnres", "depth_swa", "elc_bert", "vertical")


def routing(depth: str, perturb: bool = False, dtype=torch.float32, ids=None, **changes):
    model = ResStreamLM(tiny_config(depth=depth, **changes)).to(dtype)
    if perturb:
        perturb_parameters(model, scale=0.3)
    ids = torch.randint(0, 64, (2, 12)) if ids is None else ids
    return model, ids, model.depth_routing(ids)


def visible(weights):
    return torch.isfinite(weights).sum(-1)


@pytest.mark.parametrize("depth", list_depth_operators())
def test_every_operator_reports_a_known_kind(depth):
    _, _, result = routing(depth, perturb=True)
    assert result["kind"] in KINDS
    data = json.loads(json.dumps(routing_to_json(result), allow_nan=False))
    back = routing_from_json(data)
    assert back.keys() == result.keys()
    if result["kind"] in ("depth_attention", "depth_weights"):
        weights = result["weights"]
        assert weights.shape == (len(result["readers"]), len(result["sources"]))
        assert (visible(weights) >= 1).all()
        assert torch.equal(torch.isnan(back["weights"]), torch.isnan(weights))
        if result["normalised"]:
            torch.testing.assert_close(weights.nansum(-1), torch.ones(len(weights)))
    if result["kind"] == "depth_attention":
        assert result["mean_max"].shape == (len(result["readers"]),)
    if result["kind"] == "stream_mixing":
        n = result["streams"]
        assert result["matrices"].shape == (len(result["sites"]), n + 1, n + 1)
    if result["kind"] == "ddl_beta":
        assert len(result["beta"]) == len(result["sites"])
        assert all(((b >= 0) & (b <= 2)).all() for b in result["beta"])


def test_too_short_input_is_refused():
    model = ResStreamLM(tiny_config(depth="attnres"))
    with pytest.raises(Exception, match="at least 2 tokens"):
        model.depth_routing(torch.zeros(1, 1, dtype=torch.long))


# ---------------------------------------------------------------------------- at init

@pytest.mark.parametrize("depth,options", [("attnres", {}), ("block_attnres", {"block_size": 2}),
                                           ("delta_attnres", {}),
                                           ("delta_attnres", {"granularity": "block"}),
                                           ("elc_bert", {}), ("vertical", {})])
def test_zero_queries_and_logits_read_uniformly(depth, options):
    _, _, result = routing(depth, depth_options=options)
    weights, n = result["weights"], visible(result["weights"]).float()
    rows = torch.where(torch.isfinite(weights), 1 / n[:, None], weights)
    torch.testing.assert_close(weights, rows, equal_nan=True)
    torch.testing.assert_close(result["mean_max"], 1 / n)


def test_attnres_labels_sources_and_readers():
    _, _, result = routing("attnres")
    assert result["sources"][:3] == ["emb", "L0.attn", "L0.mlp"]
    assert result["readers"][0] == "L0.mlp" and result["readers"][-1] == "final"
    # reader i sees the embedding and every earlier sublayer output
    assert visible(result["weights"]).tolist() == list(range(2, 2 + len(result["readers"])))


def test_block_attnres_partial_is_the_block_it_becomes():
    _, _, result = routing("block_attnres", depth_options={"block_size": 2})
    assert result["sources"] == ["emb", "B1", "B2", "B3"]
    # L0.mlp: emb + partial of B1; L1.attn: emb, B1; L1.mlp: emb, B1, partial of B2; ...
    assert visible(result["weights"]).tolist() == [2, 2, 3, 3, 4, 4]


def test_elc_bert_base_variant_favours_the_previous_output():
    _, _, result = routing("elc_bert", depth_options={"variant": "base"})
    last = result["weights"][-1]  # block 2 reads emb, L0, L1 with logits 0, 0, 1
    e = math.e
    torch.testing.assert_close(last, torch.tensor([1 / (2 + e), 1 / (2 + e), e / (2 + e)]))


def test_denseformer_starts_on_the_previous_state():
    _, _, result = routing("denseformer", depth_options={"dilation": 2})
    weights = result["weights"]
    assert result["readers"] == ["L1", "L2", "final"]
    for row in weights:
        seen = torch.isfinite(row).nonzero().flatten()
        assert row[seen[-1]] == 1 and (row[seen[:-1]] == 0).all()
    assert visible(weights).tolist() == [1, 2, 2]  # S_i = {j <= i: j = i mod 2}


def test_mudd_starts_on_the_current_output_in_every_way():
    _, _, result = routing("mudd")
    assert result["heads"] == ["Q", "K", "V", "R"] and not result["normalised"]
    for r, reader in enumerate(result["readers"]):
        ways = range(3, 4) if reader == "final" else range(4)  # the last DA produces R only
        for h in ways:
            row = result["per_head"][r, h]
            seen = torch.isfinite(row).nonzero().flatten()
            assert row[seen[-1]] == 1 and (row[seen[:-1]] == 0).all()


def test_dca_starts_with_all_ones():
    _, _, result = routing("dca")
    weights = result["weights"]
    assert (weights[torch.isfinite(weights)] == 1).all()
    assert result["readers"] == ["L0", "L1", "L2", "final"]


def test_depth_swa_rows_see_the_window():
    _, _, result = routing("depth_swa", depth_window=2)
    assert visible(result["weights"]).tolist() == [1, 2, 2]
    assert result["per_head"].shape == (3, 4, 3)
    assert result["mean_max"][0] == 1


@pytest.mark.parametrize("beta_init", [1.0, 0.5])
def test_ddl_beta_starts_at_its_init(beta_init):
    _, ids, result = routing("ddl", depth_options={"beta_init": beta_init})
    assert len(result["sites"]) == 6
    for beta in result["beta"]:
        assert beta.numel() == ids.numel()
        torch.testing.assert_close(beta, torch.full_like(beta, beta_init))


def test_ddl_beta_is_subsampled():
    _, _, result = routing("ddl", ids=torch.randint(0, 64, (80, 64)))
    assert all(b.numel() == 4096 for b in result["beta"])


@pytest.mark.parametrize("dynamic", [True, False])
def test_hyper_starts_at_the_paper_init(dynamic):
    _, _, result = routing("hyper", depth_options={"dynamic": dynamic})
    n = result["streams"]
    for k in range(len(result["sites"])):
        torch.testing.assert_close(result["a_m"][k], torch.eye(n)[k % n])
        torch.testing.assert_close(result["a_r"][k], torch.eye(n))
        torch.testing.assert_close(result["b"][k], torch.ones(n))
    assert result["matrices"][0, 0, 0] == 0


def test_mhc_starts_at_its_biases():
    _, _, result = routing("mhc")
    n, e2 = result["streams"], math.e ** 2
    res = torch.full((n, n), 1 / (e2 + n - 1)) + torch.eye(n) * (e2 - 1) / (e2 + n - 1)
    for k in range(len(result["sites"])):
        pre = torch.full((n,), torch.sigmoid(torch.tensor(-1.0)).item())
        pre[k % n] = torch.sigmoid(torch.tensor(1.0)).item()
        torch.testing.assert_close(result["a_m"][k], pre)
        torch.testing.assert_close(result["a_r"][k], res, atol=1e-5, rtol=0)
        torch.testing.assert_close(result["b"][k], torch.ones(n))


# ---------------------------------------------------------------------------- float64 recomputation

def check_rows(result, per_token: list, mean_max: bool = True) -> None:
    """Each reader's row equals the token mean of its per-token weights [tokens, n], and its
    mean_max their mean per-token maximum."""
    got = result["weights"]
    assert len(got) == len(per_token)
    for r, weights in enumerate(per_token):
        row = got[r][torch.isfinite(got[r])]
        torch.testing.assert_close(row, weights.mean(0).float(), rtol=1e-5, atol=1e-6)
    if mean_max:
        expected = torch.stack([mean_max_weight(w) for w in per_token])
        torch.testing.assert_close(result["mean_max"], expected.float(), rtol=1e-5, atol=1e-6)


def attnres_reference(model, ids, block_size: int) -> list:
    """Per-token softmax weights [B*T, m] of every read with a query, from the equations."""
    w = {k: v.double() for k, v in model.state_dict().items()}
    config = model.config
    kinds = site_kinds(config)
    per_read = {}
    for row in ids:
        blocks, partial = [], w["embed.weight"][row]

        def attend(key):
            values = blocks + ([partial] if partial is not None else [])
            q = w[f"depth.query.{key}"] * w[f"depth.key_norm.{key}"]
            logits = torch.stack([rmsnorm(v, None, config.norm_eps) @ q for v in values], -1)
            alpha = torch.softmax(logits, -1)
            per_read.setdefault(key, []).append(alpha)
            return sum(alpha[:, i:i + 1] * v for i, v in enumerate(values))

        for s in range(config.n_layers * len(kinds)):
            layer, kind = divmod(s, len(kinds))
            if s % block_size == 0:
                blocks.append(partial)
                partial = None
            h = blocks[0] if s == 0 else attend(str(s))
            x = rmsnorm(h, w[f"blocks.{layer}.{kinds[kind]}.norm.weight"], config.norm_eps)
            out = sublayer(kinds[kind], layer, x, w, config)
            partial = out if partial is None else partial + out
        attend("final")
    return [torch.cat(v) for v in per_read.values()]


@pytest.mark.parametrize("depth,block_size", [("attnres", 1), ("block_attnres", 2)])
def test_attnres_weights_equal_the_equations(depth, block_size):
    options = {"block_size": block_size} if depth == "block_attnres" else {}
    model, ids, result = routing(depth, perturb=True, dtype=torch.float64, depth_options=options)
    check_rows(result, attnres_reference(model, ids, block_size))


def test_depth_swa_weights_equal_the_equations():
    model, ids, result = routing("depth_swa", perturb=True, dtype=torch.float64, depth_window=2)
    w = {k: v.double() for k, v in model.state_dict().items()}
    config, heads = model.config, model.config.n_heads
    p = "depth.attention.0"
    per_read = {}
    for row in ids:
        h, states = w["embed.weight"][row], []
        for layer in range(config.n_layers):
            n = rmsnorm(h, w["depth.state_norm.weight"], config.norm_eps)
            states = (states + [n])[-2:]
            q = (n @ w[f"{p}.q_proj.weight"].T).view(len(row), heads, -1)
            keys = [(s @ w[f"{p}.k_proj.weight"].T).view(len(row), heads, -1) for s in states]
            values = [(s @ w[f"{p}.v_proj.weight"].T).view(len(row), heads, -1) for s in states]
            scores = torch.stack([(q * k).sum(-1) for k in keys], -1) / q.shape[-1] ** 0.5
            alpha = torch.softmax(scores, -1)  # [T, H, K]
            per_read.setdefault(layer, []).append(alpha)
            z = sum(alpha[..., i:i + 1] * v for i, v in enumerate(values)).reshape(len(row), -1)
            h = h + z @ w[f"{p}.o_proj.weight"].T
            for kind in site_kinds(config):
                x = rmsnorm(h, w[f"blocks.{layer}.{kind}.norm.weight"], config.norm_eps)
                h = h + sublayer(kind, layer, x, w, config)
    alphas = [torch.cat(v) for v in per_read.values()]  # [B*T, H, K]
    check_rows(result, [a.mean(1) for a in alphas], mean_max=False)  # head-averaged means ...
    torch.testing.assert_close(result["mean_max"].double(),  # ... and of per-head maxima
                               torch.stack([a.amax(-1).mean() for a in alphas]),
                               rtol=1e-5, atol=1e-6)


def test_ddl_beta_equals_the_equations():
    model, ids, result = routing("ddl", perturb=True, dtype=torch.float64)
    w = {k: v.double() for k, v in model.state_dict().items()}
    config, kinds = model.config, site_kinds(model.config)
    betas = {}
    for row in ids:
        X = w["embed.weight"][row]
        for s in range(config.n_layers * len(kinds)):
            layer, kind = divmod(s, len(kinds))
            c = rmsnorm(X, w[f"blocks.{layer}.{kinds[kind]}.norm.weight"], config.norm_eps)
            out = sublayer(kinds[kind], layer, c, w, config)
            gate = f"depth.gates.{s}.out"
            beta = 2 * torch.sigmoid(c @ w[f"{gate}.weight"].T + w[f"{gate}.bias"])
            v = c @ w[f"depth.values.{s}.weight"].T + w[f"depth.values.{s}.bias"]
            k = out / torch.sqrt(out.square().sum(-1, keepdim=True) + 1e-10)
            X = X + beta * k * (v - (k * X).sum(-1, keepdim=True))
            betas.setdefault(s, []).append(beta.flatten())
    for got, expected in zip(result["beta"], betas.values()):
        torch.testing.assert_close(got.double(), torch.cat(expected), rtol=1e-5, atol=1e-6)


def test_hyper_matrices_equal_the_equations():
    model, ids, result = routing("hyper", perturb=True, dtype=torch.float64)
    w = {k: v.double() for k, v in model.state_dict().items()}
    config, kinds, n = model.config, site_kinds(model.config), result["streams"]
    tables = {}
    for row in ids:
        H = w["embed.weight"][row][:, None].repeat(1, n, 1)  # [T, n, d]
        for s in range(config.n_layers * len(kinds)):
            layer, kind = divmod(s, len(kinds))
            c = {name: w[f"depth.connections.{s}.{name}"] for name in
                 ("a_m", "a_r", "b", "norm_weight", "w_m", "w_r", "w_b", "s_alpha", "s_beta")}
            Hbar = rmsnorm(H, c["norm_weight"], config.norm_eps)
            a_m = c["s_alpha"] * torch.tanh(Hbar @ c["w_m"]) + c["a_m"]  # [T, n]
            a_r = c["s_alpha"] * torch.tanh(Hbar @ c["w_r"]) + c["a_r"]  # [T, n, n]
            b = c["s_beta"] * torch.tanh(Hbar @ c["w_b"]) + c["b"]
            tables.setdefault(s, []).append(torch.cat([a_m[..., None], a_r, b[..., None]], -1))
            h_in = (a_m[..., None] * H).sum(1)
            x = rmsnorm(h_in, w[f"blocks.{layer}.{kinds[kind]}.norm.weight"], config.norm_eps)
            out = sublayer(kinds[kind], layer, x, w, config)
            H = b[..., None] * out[:, None] + torch.einsum("tji,tjd->tid", a_r, H)
    mean = torch.stack([torch.cat(t).mean(0) for t in tables.values()])  # [sites, n, n+2]
    torch.testing.assert_close(result["a_m"].double(), mean[..., 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result["a_r"].double(), mean[..., 1:n + 1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result["b"].double(), mean[..., n + 1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("depth", ["elc_bert", "vertical", "denseformer"])
def test_static_weights_are_the_parameters(depth):
    model, _, result = routing(depth, perturb=True)
    params = model.depth.alphas if depth == "denseformer" else model.depth.logits
    for r, (key, p) in enumerate(params.items()):
        expected = p.detach() if depth == "denseformer" else torch.softmax(p.detach(), -1)
        row = result["weights"][r]
        torch.testing.assert_close(row[torch.isfinite(row)], expected)


def test_mean_max_weight_takes_maxima_per_token():
    weights = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.5, math.nan], [0.5, math.nan]]])
    torch.testing.assert_close(mean_max_weight(weights), torch.tensor([1.0, 0.5]))


def test_recording_is_off_after_the_read():
    model, ids, _ = routing("attnres")
    assert model.depth._routing is None
    model(ids).sum().backward()  # the training path runs without a recorder


# ---------------------------------------------------------------------------- figures

def test_figures_are_pngs(tmp_path):
    from resstream import report_figures as rf

    results = {name: routing_to_json(routing(name, perturb=True)[2]) for name in
               ["attnres", "depth_swa", "denseformer", "mudd", "ddl", "hyper", "mhc"]}
    attention = {n: r for n, r in results.items()
                 if r["kind"] in ("depth_attention", "depth_weights")}
    mixing = {n: r for n, r in results.items() if r["kind"] == "stream_mixing"}
    paths = [rf.plot_depth_attention(attention, tmp_path / "a.png"),
             rf.plot_mean_max_weight(attention, tmp_path / "b.png"),
             rf.plot_ddl_beta(results["ddl"], tmp_path / "c.png"),
             rf.plot_ddl_beta(routing_from_json(results["ddl"]), tmp_path / "c2.png"),
             rf.plot_stream_mixing(mixing, tmp_path / "d.png")]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert rf.plot_stream_mixing({}, tmp_path / "e.png") is None
    assert rf.plot_depth_attention({"s": {"kind": "none"}}, tmp_path / "f.png") is None
