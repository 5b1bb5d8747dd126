"""Generic contracts every depth operator and local mixer is held to, read from the registries at
collection time (operators and mixers added later are covered without editing this file):

1. an operator that declares `starts_at_baseline` equals the `standard` model on shared weights
   at init (float64, a tiny norm eps: some are equal only up to the norms' eps), one that does
   not is indeed away from it, and one that may not says why in its docstring;
2. every read passes through the sublayer's norm (zero norm weights make every sublayer input
   zero), in training, prefill and decode steps, unless the operator declares
   `reads_through_norm` False;
3. operator metadata is declared one way: class attributes, with option-dependent values from
   `option_metadata(options)`, never a property;
4. a mixer slot name the decoder does not know is an error;
5. a model may stack local mixers (`local_mixer: [a, b]`): forward/backward, decode parity,
   config round trips, and the single-mixer form unchanged.
"""
from __future__ import annotations

import inspect
import itertools

import pytest
import torch
import torch.nn as nn

from resstream import ModelConfig, ResStreamLM, list_depth_operators, list_local_mixers
from resstream.depth.base import METADATA, QKVViews
from resstream.errors import UserError
from resstream.flops import forward_macs_breakdown
from resstream.mixers.base import SLOTS
from resstream.registry import DEPTH_OPERATORS, LOCAL_MIXERS
from resstream.testing import baseline_twin, perturb_parameters, tiny_config
from test_decode_parity import OPERATORS as PARITY_OPERATORS
from test_decode_parity import run_chunks

# (label, operator, options): every operator at its defaults and the decode-parity variants, plus
# variants whose declared metadata depends on the options
METADATA_VARIANTS = [
    ("delta_attnres-gated-block", "delta_attnres", {"gate": "alpha", "granularity": "block"}),
    ("delta_attnres-block", "delta_attnres", {"granularity": "block", "block_size": 3}),
    ("delta_attnres-normal-queries", "delta_attnres", {"query_init": "normal"}),
    ("laurel-lr", "laurel", {"variant": "lr"}),
    ("laurel-rw-raw", "laurel", {"variant": "rw_pa", "rw_weights": "none"}),
    ("depth_swa-replace", "depth_swa", {"mode": "replace"}),
    ("rezero-paper", "rezero", {"norm": False}),
    ("hyper-static", "hyper", {"dynamic": False}),
    ("mudd-one-norm", "mudd", {"separate_norms": False}),
    ("mudd-single-way", "mudd", {"multiway": False}),
    ("mudd-static", "mudd", {"dynamic": False}),
    ("dca-separate-norms", "dca", {"separate_norms": True}),
]
OPERATORS = PARITY_OPERATORS + [case for case in METADATA_VARIANTS if case[1] in list_depth_operators()]
IDS = [case[0] for case in OPERATORS]


def operator_model(name: str, options: dict, mixer=None, dtype=torch.float32, **changes) -> ResStreamLM:
    torch.manual_seed(0)
    config = tiny_config(depth=name, depth_options=options, local_mixer=mixer, **changes)
    return ResStreamLM(config).to(dtype)


def tokens(model: ResStreamLM, length: int = 9) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (2, length),
                         generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------ 1. start at the baseline
@pytest.mark.parametrize("mixer", [None, "shortswa"])
@pytest.mark.parametrize("label,name,options", OPERATORS, ids=IDS)
@torch.no_grad()
def test_starts_at_the_baseline_as_declared(label, name, options, mixer):
    """Declared: equal to `standard` on shared weights at init (norm_eps 1e-12 in float64, for
    operators equal only up to the norms' eps). Not declared: measurably different."""
    model = operator_model(name, options, mixer, torch.float64, norm_eps=1e-12)
    ids = tokens(model)
    gap = (model(ids) - baseline_twin(model)(ids)).abs().max().item()
    if model.depth.starts_at_baseline:
        assert gap < 1e-7, f"{label} declares starts_at_baseline but is {gap:.2e} away"
    else:
        assert gap > 1e-4, f"{label} does not declare starts_at_baseline but is {gap:.2e} away"


@pytest.mark.parametrize("name", list_depth_operators())
def test_an_operator_that_may_not_start_at_the_baseline_says_why(name):
    """Convention: the module (or class) docstring has a sentence naming `starts_at_baseline`
    that explains when and why the operator is away from `standard` at init."""
    cls = DEPTH_OPERATORS.get(name)
    may_not = not cls.starts_at_baseline or "starts_at_baseline" in cls.option_metadata(cls.Options())
    if may_not:
        docs = (inspect.getmodule(cls).__doc__ or "") + (cls.__doc__ or "")
        assert "starts_at_baseline" in docs, (
            f"{name} may not start at the baseline; its module docstring must say why in a "
            "sentence naming starts_at_baseline")


# ------------------------------------------------------------------ 2. reads through the norm
def sublayer_inputs(model: ResStreamLM) -> tuple[list, list]:
    """Record the first argument of every sublayer call (the depth operator's read)."""
    seen, handles = [], []
    for block in model.blocks:
        for sublayer in block.sublayers():
            handles.append(sublayer.register_forward_pre_hook(
                lambda module, args: seen.append(args[0])))
    return seen, handles


def flat(read) -> list[torch.Tensor]:
    return list(read) if isinstance(read, QKVViews) else [read]


@pytest.mark.parametrize("mixer", [None] + list_local_mixers())
@pytest.mark.parametrize("label,name,options", OPERATORS, ids=IDS)
def test_every_read_passes_through_the_sublayer_norm(label, name, options, mixer):
    """With every sublayer's norm weight zero, every sublayer input is exactly zero: in a
    training forward, a cached prefill and one-token decode steps (their own fast paths)."""
    model = operator_model(name, options, mixer, local_window=4)
    perturb_parameters(model, scale=0.05)
    with torch.no_grad():
        for block in model.blocks:
            for sublayer in block.sublayers():
                sublayer.norm.weight.zero_()
    ids = tokens(model)
    seen, handles = sublayer_inputs(model)
    model(ids)  # autograd on: the training path
    with torch.no_grad():
        cache = model.new_cache(2)
        model(ids[:, :5], cache=cache)
        for t in range(5, 7):
            model(ids[:, t:t + 1], cache=cache)
    for handle in handles:
        handle.remove()
    n_sites = len(model.sites)
    assert len(seen) == 4 * n_sites
    largest = [max(x.abs().max().item() for x in flat(read)) for read in seen]
    if model.depth.reads_through_norm:
        bad = [model.sites[i % n_sites] for i, value in enumerate(largest) if value != 0]
        assert not bad, f"{label}: reads not through the sublayer norm at {bad[:3]}"
    else:  # declared: the reads bypass the norm, which the zero weights then show
        assert max(largest) > 0


# ------------------------------------------------------------------ 3. metadata, one way
@pytest.mark.parametrize("name", list_depth_operators())
def test_metadata_is_declared_one_way(name):
    cls = DEPTH_OPERATORS.get(name)
    for key in METADATA:
        owner = next(klass for klass in cls.__mro__ if key in vars(klass))
        value = vars(owner)[key]
        assert not hasattr(type(value), "__get__"), (
            f"{name}.{key} is a {type(value).__name__} on {owner.__name__}; allowed: a plain class "
            "attribute, with option-dependent values from option_metadata(options)")
    # the class attributes are the values at the default options
    assert cls.metadata() == {key: getattr(cls, key) for key in METADATA}


@pytest.mark.parametrize("label,name,options", OPERATORS, ids=IDS)
def test_instances_carry_their_options_metadata(label, name, options):
    model = operator_model(name, options)
    op = model.depth
    assert set(type(op).option_metadata(op.options)) <= set(METADATA)
    assert {key: getattr(op, key) for key in METADATA} == type(op).metadata(op.options)


# ------------------------------------------------------------------ 4. unknown slots
@pytest.mark.parametrize("name", list_local_mixers())
def test_a_slot_the_decoder_does_not_know_is_an_error(name, monkeypatch):
    cls = LOCAL_MIXERS.get(name)
    config = tiny_config(local_mixer=name)
    assert set(cls.slots(config, config.mixer_opts)) <= set(SLOTS)
    assert set(ResStreamLM(config).blocks[0].mixer_slots()) == set(cls.slots(config, config.mixer_opts))
    build = cls.build.__func__

    def build_with_a_typo(klass, config, layer, options):
        return {**build(klass, config, layer, options), "attn_inputs": nn.Identity()}

    monkeypatch.setattr(cls, "build", classmethod(build_with_a_typo))
    with pytest.raises(ValueError, match=f"local mixer '{name}' fills slot 'attn_inputs', which the "
                                         f"decoder does not know; allowed: {', '.join(SLOTS)}"):
        ResStreamLM(config)


# ------------------------------------------------------------------ 5. stacked mixers
PAIRS = list(itertools.permutations(list_local_mixers(), 2))


def stack_is_valid(names) -> bool:
    """At most one mixer with a sub-block (the only conflict at default options)."""
    fills = [set(LOCAL_MIXERS.get(n).slots(tiny_config(local_mixer=n), tiny_config(local_mixer=n).mixer_opts))
             for n in names]
    return sum("block" in slots for slots in fills) <= 1


@pytest.mark.parametrize("depth", ["standard", "mudd"])
@pytest.mark.parametrize("pair", PAIRS, ids=["+".join(p) for p in PAIRS])
def test_stacked_mixers_run_forward_and_backward(pair, depth):
    if not stack_is_valid(pair):
        with pytest.raises(UserError, match="at most one of them"):
            tiny_config(local_mixer=list(pair))
        return
    model = ResStreamLM(tiny_config(depth=depth, local_mixer=list(pair), n_layers=2))
    singles = [ResStreamLM(tiny_config(depth=depth, local_mixer=name, n_layers=2)) for name in pair]
    standard = ResStreamLM(tiny_config(depth=depth, n_layers=2))
    extra = sum(m.num_parameters() - standard.num_parameters() for m in singles)
    assert model.num_parameters() == standard.num_parameters() + extra
    perturb_parameters(model)
    ids = tokens(model, 10)
    logits = model(ids)
    assert logits.shape == (2, 10, 64) and logits.isfinite().all()
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"{pname} gets no gradient"
    model.parameter_groups(0.1)  # every mixer's no_weight_decay names its own modules


def test_stacked_mixers_in_one_slot_run_in_the_listed_order():
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    outputs = []
    for order in (["canon", "shortconv"], ["shortconv", "canon"]):
        torch.manual_seed(0)
        model = ResStreamLM(tiny_config(local_mixer=order, mixer_options={"canon": {"placements": "B"}}))
        chain = model.blocks[0].attn.qkv_mixer
        assert [m.residual for m in chain] == [name == "canon" for name in order]
        outputs.append(model(ids))
    assert not torch.allclose(*outputs)


@pytest.mark.parametrize("depth", ["standard", "mudd", "dca"])
@pytest.mark.parametrize("mixers,options", [
    (["shortswa", "canon"], {}),
    (["canon", "shortconv"], {"canon": {"activation": "silu"}}),  # two convs on q, k, v
])
@torch.no_grad()
def test_stacked_mixers_decode_like_the_full_forward(mixers, options, depth):
    torch.manual_seed(0)
    model = ResStreamLM(tiny_config(depth=depth, local_mixer=mixers, mixer_options=options,
                                    local_window=4)).eval()
    perturb_parameters(model, scale=0.05)
    ids = torch.randint(0, 64, (2, 14), generator=torch.Generator().manual_seed(1))
    full = model(ids)
    for sizes in ([5, 1], [1, 3, 6, 4]):
        torch.testing.assert_close(run_chunks(model, ids, sizes), full, atol=1e-5, rtol=0)


def test_stacked_config_round_trips(tmp_path):
    from resstream import hf

    config = tiny_config(local_mixer=["shortswa", "canon"],
                         mixer_options={"canon": {"placements": "AC", "init": "zero"}})
    assert config.local_mixers == ["shortswa", "canon"]
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert ModelConfig.from_json(config.to_json()) == config
    assert config.mixer_config("canon").mixer_opts.placements == "AC"
    assert config.mixer_config("shortswa").mixer_options == {}
    torch.manual_seed(0)
    model = ResStreamLM(config)
    perturb_parameters(model)
    hf.save_model(model, tmp_path)
    assert hf.read_model_config(tmp_path) == config
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        assert torch.equal(hf.load_model(tmp_path)(ids), model(ids))
    pytest.importorskip("transformers")
    assert hf.from_resstream(model).config.to_model_config() == config


def test_stacked_flops_are_the_sum_of_each_mixer():
    stacked = tiny_config(local_mixer=["shortswa", "canon"], mixer_options={"canon": {"placements": "AC"}})
    single = [tiny_config(local_mixer="shortswa"),
              tiny_config(local_mixer="canon", mixer_options={"placements": "AC"})]
    assert forward_macs_breakdown(stacked, 16)["local_mixer"] == sum(
        forward_macs_breakdown(c, 16)["local_mixer"] for c in single)


def test_a_list_of_one_mixer_is_the_single_mixer():
    ids = torch.randint(0, 64, (1, 8))
    torch.manual_seed(0)
    single = ResStreamLM(tiny_config(local_mixer="canon", mixer_options={"placements": "AD"}))
    torch.manual_seed(0)
    listed = ResStreamLM(tiny_config(local_mixer=["canon"], mixer_options={"canon": {"placements": "AD"}}))
    assert single.state_dict().keys() == listed.state_dict().keys()
    with torch.no_grad():
        assert torch.equal(single(ids), listed(ids))


@pytest.mark.parametrize("changes,message", [
    ({"local_mixer": ["canon", "canon"]}, "a non-empty list of distinct mixer names"),
    ({"local_mixer": []}, "a non-empty list of distinct mixer names"),
    ({"local_mixer": ["canon", "bigconv"]}, "unknown local mixer 'bigconv'; known: "),
    ({"local_mixer": ["canon", "shortconv"], "mixer_options": {"kernel": 3}},
     "'kernel' is not one of them"),
    ({"local_mixer": ["canon", "shortconv"], "mixer_options": {"canon": "AC"}},
     "mixer_options.canon='AC' is invalid"),
    ({"local_mixer": ["canon", "shortconv"], "mixer_options": {"canon": {"placements": "AE"}}},
     "mixer_options.placements='AE' is invalid"),
    ({"local_mixer": ["shortswa", "canon"], "mixer_options": {"shortswa": {"replace_attention": True}}},
     "shortswa removes global attention, where canon acts"),
])
def test_bad_stacks_are_one_line_errors(changes, message):
    with pytest.raises(UserError, match=message) as caught:
        tiny_config(**changes)
    assert "\n" not in str(caught.value)
