"""Training FLOPs per token from the structure (resstream.flops): hand counts for the baseline and
two operators, FlopCounterMode as an independent check of the baseline's matmuls and attention,
and every registered operator and mixer declaring its own cost."""
from fractions import Fraction

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from resstream.config import ModelConfig
from resstream.depth.base import DepthOperator
from resstream.errors import UserError
from resstream.flops import (flops_breakdown, forward_flops_per_token, forward_macs_breakdown,
                             mean_window_keys, training_flops_per_token)
from resstream.mixers.base import LocalMixer
from resstream.model import ResStreamLM
from resstream.registry import list_depth_operators, list_local_mixers

# d=64, L=2, 4 heads of 16, 2 KV heads, SwiGLU hidden 160, vocab 256, tied embeddings, T=32
HAND = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
            mlp_hidden=160, tie_embeddings=True)
T = 32


def hand_config(**changes) -> ModelConfig:
    return ModelConfig(**{**HAND, **changes})


def test_baseline_by_hand():
    d, L, d_q, d_kv, f, V = 64, 2, 4 * 16, 2 * 16, 160, 256
    attention = L * (d * d_q + d * d_kv + d * d_kv + d_q * d)  # 2 x (4096 + 2048 + 2048 + 4096)
    assert attention == 24576
    scores = L * 2 * d_q * Fraction(T + 1, 2)  # q.k and p.v over (T+1)/2 keys on average
    assert scores == 4224
    mlp = L * 3 * d * f  # gate, up, down
    assert mlp == 61440
    head = d * V  # tied: the embedding lookup is free, the head is a matmul
    assert head == 16384
    macs = attention + scores + mlp + head
    assert macs == 106624
    config = hand_config()
    assert forward_macs_breakdown(config, T) == {"attention": 24576, "attention_scores": 4224,
                                                 "mlp": 61440, "lm_head": 16384,
                                                 "local_mixer": 0, "depth": 0}
    assert forward_flops_per_token(config, T) == 2 * macs == 213248
    assert training_flops_per_token(config, T) == 6 * macs == 639744
    assert sum(flops_breakdown(config, T).values()) == 639744
    # untied head: same FLOPs (more parameters, same matmul)
    assert training_flops_per_token(hand_config(tie_embeddings=False), T) == 639744


def test_depth_swa_by_hand():
    """K = 2 over L = 3 blocks: 3 reads (one per block) seeing 1, 2, 2 states."""
    config = hand_config(n_layers=3, depth="depth_swa", depth_window=2)
    d = 64
    norm = 2 * d  # RMSNorm of the new state
    q, o = d * d, d * d
    kv_new = 2 * d * d  # shared module: only the new state is projected to k, v
    read = [norm + q + kv_new + 2 * keys * d + o for keys in (1, 2, 2)]
    assert read == [16640, 16768, 16768]
    assert forward_macs_breakdown(config, T)["depth"] == sum(read) == 50176
    # one module per read: each read projects its whole window with its own W_K, W_V
    config = hand_config(n_layers=3, depth="depth_swa", depth_window=2, depth_options={"shared": False})
    read = [norm + q + 2 * keys * d * d + 2 * keys * d + o for keys in (1, 2, 2)]
    assert forward_macs_breakdown(config, T)["depth"] == sum(read) == 16640 + 2 * 24960


def test_hyper_by_hand():
    """n = 4 streams around each of the 2 L = 4 sublayers."""
    n, d, sites = 4, 64, 4
    static = n * d + n * n * d + n * d  # read A_m^T H, mix A_r^T H, write B_i out
    assert static == 1536
    dynamic = n * d + n * (n + 2) * d  # per-stream RMS and [W_m | W_r | W_beta]
    assert dynamic == 1792
    config = hand_config(depth="hyper", depth_options={"streams": 4})
    assert forward_macs_breakdown(config, T)["depth"] == sites * (static + dynamic) == 13312
    config = hand_config(depth="hyper", depth_options={"streams": 4, "dynamic": False})
    assert forward_macs_breakdown(config, T)["depth"] == sites * static == 6144


def test_ddl_by_hand():
    d, sites = 64, 4
    per_site = d + d + 2 * d + 2 * d  # gate logit, value (d_v = 1), k = h/|h|, readout + rewrite
    config = hand_config(depth="ddl")
    assert forward_macs_breakdown(config, T)["depth"] == sites * per_site == 1536
    # d_v = 2 with the CC compressor before each of the 4 reads and the final readout
    dv = 2
    per_site = d + d * dv + 2 * d + 2 * d * dv
    config = hand_config(depth="ddl", depth_options={"value_dim": dv})
    assert forward_macs_breakdown(config, T)["depth"] == sites * per_site + 5 * d * dv


def test_windowed_scores():
    assert mean_window_keys(T, None) == Fraction(T + 1, 2)
    assert mean_window_keys(4, 2) == Fraction(1 + 2 + 2 + 2, 4)
    assert mean_window_keys(8, 100) == mean_window_keys(8, None)
    d = 64
    config = hand_config(local_mixer="shortswa", local_window=4)
    per_block = 4 * d * d + 2 * d * mean_window_keys(T, 4)  # own q, k, v, o (MHA) + window
    assert forward_macs_breakdown(config, T)["local_mixer"] == 2 * per_block
    # a ShortSWA-only stack has no global attention
    config = hand_config(local_mixer="shortswa", mixer_options={"replace_attention": True})
    macs = forward_macs_breakdown(config, T)
    assert macs["attention"] == macs["attention_scores"] == 0


def test_flop_counter_agrees_on_the_baseline():
    """FlopCounterMode counts the forward's matmuls (aten.mm) and, with the math SDPA backend,
    attention's two batched products over the full T x T square (a fused kernel computes the
    causal half too, but counts the square): ours counts (T+1)/2 keys per query."""
    config = hand_config()
    model = ResStreamLM(config)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 256, (1, T)))
    counts = {str(op).split(".")[1]: flops for op, flops in counter.get_flop_counts()["Global"].items()}
    macs = forward_macs_breakdown(config, T)
    matmuls = 2 * T * (macs["attention"] + macs["mlp"] + macs["lm_head"])
    assert counts["mm"] == matmuls
    full_square = 2 * T * config.n_layers * 2 * (config.n_heads * config.head_dim) * T
    assert counts["bmm"] == full_square
    assert 2 * T * macs["attention_scores"] == full_square * Fraction(T + 1, 2 * T)
    assert set(counts) == {"mm", "bmm"}


def counted_macs(config: ModelConfig) -> dict[str, int]:
    """FlopCounterMode's forward count per op, as multiply-adds per token."""
    model = ResStreamLM(config)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 256, (1, T)))
    return {str(op).split(".")[1]: flops // (2 * T)
            for op, flops in counter.get_flop_counts()["Global"].items()}


@pytest.mark.parametrize("name,options,ops", [
    ("depth_swa", {}, ("mm",)),  # W_Q, W_K, W_V, W_O per read (the window read is elementwise)
    ("hyper", {"dynamic": False}, ("bmm",)),  # [A_m | A_r]^T H per sublayer (the write: addcmul)
    ("hyper", {}, ("mm",)),  # H_bar [W_m | W_r | W_beta]
    ("mhc", {}, ("mm",)),  # x~ phi
    ("mudd", {}, ("mm", "bmm")),  # W_1, W_2 (mm) and the C weighted sums (bmm)
    ("denseformer", {}, ("mm",)), ("elc_bert", {}, ("mm",)),
    ("ddl", {}, ("addmm",)),  # gate logit and value per sublayer
    ("laurel", {"variant": "lr"}, ("mm",)),  # A, then B, per sublayer
])
def test_flop_counter_sees_the_declared_matmuls(name, options, ops):
    """The matmuls FlopCounterMode sees in an operator (its count over the baseline's) equal the
    corresponding terms of its declaration, written out here per operator."""
    base = counted_macs(hand_config())
    counted = counted_macs(hand_config(depth=name, depth_options=options))
    extra = sum(counted.get(op, 0) - base.get(op, 0) for op in ops)
    d, n, sites = 64, 4, 4
    expected = {
        ("depth_swa", ()): 2 * 4 * d * d,  # 2 reads
        ("hyper", (("dynamic", False),)): sites * (n + 1) * n * d,
        ("hyper", ()): sites * n * (n + 2) * d,
        ("mhc", ()): sites * n * d * (n * n + 2 * n),
        # DA after block 0: n = 2 sources, C = 4, hidden 64; after block 1 (last): n = 3, C = 1, hidden 64
        ("mudd", ()): (d * 64 + 64 * 8 + 8 * d) + (d * 64 + 64 * 3 + 3 * d),
        ("denseformer", ()): (2 + 3) * d, ("elc_bert", ()): 2 * d,
        ("ddl", ()): sites * 2 * d,
        ("laurel", (("variant", "lr"),)): sites * 2 * 32 * d,  # rank 32
    }[(name, tuple(options.items()))]
    assert extra == expected
    assert forward_macs_breakdown(hand_config(depth=name, depth_options=options), T)["depth"] >= expected


def test_base_classes_demand_a_declaration():
    with pytest.raises(NotImplementedError):
        DepthOperator.forward_macs_per_token(DepthOperator(hand_config(), [], None), T)
    with pytest.raises(NotImplementedError):
        LocalMixer.forward_macs_per_token(hand_config(), T)


@pytest.mark.parametrize("name", list_depth_operators())
def test_every_depth_operator_declares_its_flops(name):
    small, deep = hand_config(depth=name), hand_config(depth=name, n_layers=4)
    baseline = training_flops_per_token(hand_config(), T)
    depth = forward_macs_breakdown(small, T)["depth"]
    assert isinstance(depth, Fraction) and depth.denominator == 1 and depth >= 0
    assert training_flops_per_token(small, T) >= baseline
    # position-wise over depth: no dependence on the sequence length
    assert forward_macs_breakdown(small, 8)["depth"] == depth
    if name in ("standard", "post_ln"):  # post_ln moves the norms: no arithmetic of its own
        assert depth == 0
    else:
        assert depth > 0
        assert forward_macs_breakdown(deep, T)["depth"] > depth  # more blocks, more reads
    if name != "standard":
        # everything else is the baseline's
        rest = {k: v for k, v in forward_macs_breakdown(small, T).items() if k != "depth"}
        assert rest == {k: v for k, v in forward_macs_breakdown(hand_config(), T).items() if k != "depth"}


@pytest.mark.parametrize("name", list_local_mixers())
def test_every_local_mixer_declares_its_flops(name):
    one = forward_macs_breakdown(hand_config(local_mixer=name, n_layers=1), T)["local_mixer"]
    two = forward_macs_breakdown(hand_config(local_mixer=name, n_layers=2), T)["local_mixer"]
    assert one > 0 and two == 2 * one  # per block
    assert training_flops_per_token(hand_config(local_mixer=name), T) > training_flops_per_token(hand_config(), T)


def test_operator_options_change_the_count():
    def depth(**options):
        return forward_macs_breakdown(hand_config(n_layers=4, depth=options.pop("name"), **options), T)["depth"]
    assert depth(name="denseformer", depth_options={"dilation": 2, "period": 2}) < depth(name="denseformer")
    assert depth(name="block_attnres") < depth(name="attnres")
    assert depth(name="dca", depth_options={"k": 1}) < depth(name="dca")
    assert depth(name="dca", depth_options={"grn": "v1"}) < depth(name="dca", depth_options={"grn": "v3"})
    assert depth(name="mhc") > depth(name="hyper")
    assert depth(name="depth_swa", depth_window=2) < depth(name="depth_swa")
    assert depth(name="ddl", depth_options={"value_dim": 4}) > depth(name="ddl")
    assert depth(name="hyper", depth_layers=[0]) == depth(name="hyper") // 4
    assert depth(name="elc_bert", depth_layers=[]) == 0


def test_bad_seq_len():
    with pytest.raises(UserError, match="seq_len"):
        training_flops_per_token(hand_config(), 0)


def test_operators_table_has_the_flops_column():
    from resstream.operators_table import build_table

    base = hand_config()
    table = build_table(base)
    assert table["config"]["standard_train_flops_per_token"] == training_flops_per_token(base, 64)
    for row in table["operators"]:
        config = base.replace(depth=row["operator"])
        assert row["train_flops_per_token"] == training_flops_per_token(config, 64), row["operator"]
    for row in table["mixers"]:
        config = base.replace(local_mixer=row["mixer"])
        assert row["train_flops_per_token"] == training_flops_per_token(config, 64), row["mixer"]
