"""Cached (incremental) decoding equals the full forward, for every depth operator x local mixer.

The combinations are read from the registries at collection time, so operators and mixers added
later are covered without editing this file. Every case runs in float32 on a tiny model whose
parameters are perturbed off their (often baseline-exact) initialisation, with a ShortSWA window
of 4 and sequences of 14 tokens, i.e. prompts several windows long.
"""
from __future__ import annotations

import pytest
import torch

from resstream import ResStreamLM, list_depth_operators, list_local_mixers
from resstream.cache import RollingKVCache
from resstream.errors import UserError
from resstream.testing import perturb_parameters, tiny_config

WINDOW = 4
SEQ_LEN = 14
ATOL = 1e-5

# (label, local_mixer, mixer_options); "shortswa-only" is the stack without global attention
MIXERS = ([("none", None, {})] + [(name, name, {}) for name in list_local_mixers()]
          + [("shortswa-only", "shortswa", {"replace_attention": True})])
# non-default operator variants: ones that keep cross-token state (DDL's TC compressor, EC
# expander), carry more than one d-vector (LAuReL's previous-activation history per block), have
# parameters only as an option (the value residual's learnable lambdas), or run on another path
# (the AttnRes ablation switches: plain autograd, decode included)
DEPTH_VARIANTS = {
    "ddl": [("ddl-tc-ec", {"value_dim": 2, "compressor": "tc", "expander": "ec"})],
    "block_attnres": [(f"block_attnres-{k}", {"block_size": 3, k: v}) for k, v in
                      (("query", "input"), ("weights", "sigmoid"), ("heads", 4),
                       ("key_norm", False))],
    "attnres": [("attnres-ablations", {"query": "input", "weights": "sigmoid", "heads": 2,
                                       "key_norm": False})],
    # the released code's block order and no final read
    "delta_attnres": [("delta_attnres-code", {"granularity": "block", "block_size": 2,
                                              "block_append": "after_read", "final_read": False})],
    "laurel": [("laurel-rw-lr-pa-block", {"variant": "rw_lr_pa", "granularity": "block"})],
    "value_residual": [("value-residual-learnable", {"learnable": True})],
    # an extra norm on the embedding; the raw embedding into the first sublayer
    "peri_ln": [("peri-ln-embedding-norm", {"embedding_norm": True})],
    "deepnorm": [("deepnorm-raw-embedding", {"embedding_norm": False, "init": "scale"})],
    # the JAX training config's pre/post norms; the single-way static dense ablation
    "mudd": [("mudd-prepost", {"form": "prepost"}),
             ("mudd-single-way-static", {"multiway": False, "dynamic": False})],
    # k-DCA's three stacks; the port's separate K and V norms
    "dca": [("dca-k", {"k": 1}), ("dca-k-folded", {"k": 1, "k_stack": "folded"}),
            ("dca-first-last-separate-norms", {"k": 1, "k_stack": "first_last",
                                               "separate_norms": True})],
    # the other parameterisations of mHC's stream mix; static Frac-Connections
    "mhc": [("mhc-lite", {"parameterisation": "lite", "streams": 3}),
            ("mhc-kron", {"parameterisation": "kron"})],
    "frac": [("frac-static", {"dynamic": False, "fractions": 2})],
}
OPERATORS = [(name, name, {}) for name in list_depth_operators()] + [
    (label, name, options) for name, variants in DEPTH_VARIANTS.items()
    if name in list_depth_operators() for label, options in variants]
CASES = [(*operator, *mixer) for operator in OPERATORS for mixer in MIXERS]


def build(depth: str, mixer: str | None, mixer_options: dict, depth_options: dict | None = None,
          **changes) -> ResStreamLM:
    config = tiny_config(depth=depth, depth_options=depth_options or {}, local_mixer=mixer,
                         mixer_options=mixer_options, local_window=WINDOW, **changes)
    torch.manual_seed(0)
    model = ResStreamLM(config).float().eval()
    perturb_parameters(model, scale=0.05)  # leave the exact-baseline init: every weight acts
    return model


def run_chunks(model: ResStreamLM, ids: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Logits of `ids` fed through one cache in chunks of the given sizes (repeating the last)."""
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    outputs, start, i = [], 0, 0
    while start < ids.shape[1]:
        size = sizes[min(i, len(sizes) - 1)]
        outputs.append(model(ids[:, start:start + size], cache=cache))
        start, i = start + size, i + 1
    assert cache.length == ids.shape[1]
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("depth_label,depth,depth_options,label,mixer,mixer_options", CASES,
                         ids=[f"{c[0]}-{c[3]}" for c in CASES])
@torch.no_grad()
def test_cached_decoding_equals_full_forward(depth_label, depth, depth_options, label, mixer,
                                             mixer_options, device):
    model = build(depth, mixer, mixer_options, depth_options).to(device)
    ids = torch.randint(0, model.config.vocab_size, (2, SEQ_LEN),
                        generator=torch.Generator().manual_seed(1)).to(device)
    full = model(ids)
    schedules = {
        "prefill 5 (past the window) + token-by-token decode": [5, 1],
        # one token at offset 0, then chunks smaller than, larger than and equal to the window
        # at nonzero offsets
        "chunked prefill": [1, 3, 6, 4],
    }
    for name, sizes in schedules.items():
        torch.testing.assert_close(run_chunks(model, ids, sizes), full, atol=ATOL, rtol=0,
                                   msg=lambda m, name=name: f"{depth_label}/{label}, {name}: {m}")


@torch.no_grad()
def test_shortswa_cache_holds_exactly_window_positions_per_layer():
    model = build("standard", "shortswa", {"replace_attention": True}, max_seq_len=16)
    entries = [e for e in model.new_cache(1).entries.values()]
    assert len(entries) == model.config.n_layers and all(isinstance(e, RollingKVCache) for e in entries)
    sizes = []
    for context in (3, 10, 40):  # 40 > max_seq_len: this stack can slide
        cache = model.new_cache(1, context)
        model(torch.randint(0, 64, (1, context)), cache=cache)
        assert all(e.k.shape[2] == WINDOW and e.v.shape[2] == WINDOW for e in cache.entries.values())
        sizes.append(cache.nbytes())
    assert sizes[0] == sizes[1] == sizes[2]
    attn = model.blocks[0].mix.attention
    expected = model.config.n_layers * 2 * WINDOW * attn.n_kv_heads * attn.head_dim * 4
    assert sizes[0] == expected


@torch.no_grad()
def test_shortswa_only_stack_slides_past_max_seq_len_exactly():
    """Positions keep growing past max_seq_len (RoPE at large offsets) and decoding stays exact."""
    model = build("standard", "shortswa", {"replace_attention": True}, max_seq_len=16)
    assert model.can_slide
    ids = torch.randint(0, 64, (1, 40))
    full = model(ids)
    torch.testing.assert_close(run_chunks(model, ids, [5, 1]), full, atol=ATOL, rtol=0)
    # bounded state: the last logits depend only on the last n_layers * (w - 1) + 1 tokens, and
    # only on relative positions (RoPE); decoding at offset 24 agrees with the same tokens at 0
    receptive = model.config.n_layers * (WINDOW - 1) + 1
    older = torch.randint(0, 64, (1, 40 - receptive))
    other_past = run_chunks(model, torch.cat([older, ids[:, -receptive:]], dim=1), [7, 1])
    torch.testing.assert_close(other_past[:, -1], full[:, -1], atol=ATOL, rtol=0)
    at_zero = model(ids[:, -receptive:])
    torch.testing.assert_close(at_zero[:, -1], full[:, -1], atol=1e-4, rtol=0)
    assert not torch.allclose(other_past[:, -receptive - 1], full[:, -receptive - 1], atol=1e-3)


@torch.no_grad()
def test_model_with_global_attention_cannot_slide():
    model = build("standard", "shortswa", {}, max_seq_len=16)
    assert not model.can_slide
    with pytest.raises(UserError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))
    cache = model.new_cache(1)
    model(torch.zeros(1, 16, dtype=torch.long), cache=cache)
    with pytest.raises(UserError, match="cannot slide"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    with pytest.raises(UserError, match="max_len"):
        model.new_cache(1, 17)


@torch.no_grad()
def test_cache_batch_size_mismatch_is_a_clear_error():
    model = build("standard", None, {})
    with pytest.raises(UserError, match="batch_size=2"):
        model(torch.zeros(3, 4, dtype=torch.long), cache=model.new_cache(2))


def workspace_operators() -> list[str]:
    """Operators whose decode-cache entry is a DecodeWorkspace (weight-derived tensors)."""
    from resstream.depth.base import DecodeWorkspace

    return [name for name in list_depth_operators()
            if isinstance(build(name, None, {}).new_cache(1).entries.get("depth"), DecodeWorkspace)]


@pytest.mark.parametrize("depth", workspace_operators())
@torch.no_grad()
def test_decode_workspace_follows_weight_changes_between_sequences(depth):
    """A cache reused for a new sequence after the weights changed (in place, or replaced via
    `.data`) decodes with the new weights: after a prefill, and from a single token at offset 0."""
    model = build(depth, None, {})
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(5))
    cache = model.new_cache(2)

    def decode(prefill: int) -> torch.Tensor:
        cache.length = 0
        steps = [model(ids[:, :prefill], cache=cache)]
        return torch.cat(steps + [model(ids[:, t:t + 1], cache=cache)
                                  for t in range(prefill, ids.shape[1])], 1)

    assert cache.entries["depth"].tensors() == []  # no token history: nothing to count
    for prefill, change in ((3, "in place"), (1, "in place"), (3, "replaced"), (1, "replaced")):
        decode(prefill)
        params = list(model.depth.parameters())
        assert params, f"{depth} has a decode workspace but no weights"
        for i, param in enumerate(params):
            if change == "in place":
                param.mul_(1.0 + 0.1 * (i % 3 + 1))
            else:
                param.data = param.data * 0.9 + 0.01
        torch.testing.assert_close(decode(prefill), model(ids), atol=ATOL, rtol=0,
                                   msg=lambda m: f"{depth}, {change}, prefill {prefill}: {m}")


@pytest.mark.parametrize("depth", workspace_operators())
def test_decoding_may_switch_between_inference_mode_and_no_grad(depth):
    """Tensors made under inference_mode cannot be updated in place outside it: a workspace built
    there is rebuilt when the same sequence goes on under no_grad (and back)."""
    model = build(depth, None, {})
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(6))
    cache = model.new_cache(2)
    with torch.inference_mode():
        steps = [model(ids[:, :2], cache=cache), model(ids[:, 2:3], cache=cache)]
    with torch.no_grad():
        steps += [model(ids[:, 3:4], cache=cache)]
    with torch.inference_mode():
        steps += [model(ids[:, 4:5], cache=cache)]
    with torch.no_grad():
        steps += [model(ids[:, 5:6], cache=cache)]
        torch.testing.assert_close(torch.cat(steps, 1), model(ids), atol=ATOL, rtol=0)
