"""Weight decay by parameter role: no identity-, one-hot- or constant-initialised parameter (A_r = I,
DCA's b = 1, zero-init gates, DenseFormer's alphas, ...) sits in the trainer's decayed group, for
every registered depth operator and local mixer (with the options that create extra parameters),
while ordinary projection matrices are decayed."""
from types import SimpleNamespace

import pytest
import torch

from resstream.model import ResStreamLM
from resstream.registry import list_depth_operators, list_local_mixers
from resstream.testing import tiny_config
from resstream.train.config import OptimConfig
from resstream.train.trainer import Trainer

# options that create (or re-initialise) parameters beyond each operator's defaults
DEPTH_OPTIONS = {
    "depth_swa": [{"mode": "replace"}, {"shared": False}, {"granularity": "sublayer"}],
    "elc_bert": [{"variant": "weighted_output"}, {"variant": "base"}],
    "denseformer": [{"dilation": 2, "period": 2}],
    "vertical": [{"init_adjacent_logit": 1.0, "keep_residual": True}],
    "dca": [{"grn": "v1"}, {"grn": "v2"}, {"grn": "v3", "gate_norm": True, "k": 1},
            {"separate_norms": True}],
    "mudd": [{"separate_norms": False}, {"form": "prepost"}, {"dynamic": False}],
    "block_attnres": [{"block_size": 2}],
    "delta_attnres": [{"gate": "alpha", "granularity": "block"}, {"query_init": "normal"}],
    "hyper": [{"dynamic": False}],
    "mhc": [{"init": "zero"}, {"parameterisation": "lite"}, {"parameterisation": "kron"}],
    "frac": [{"dynamic": False}],
    "rezero": [{"norm": False}],
    "layerscale": [{"init": 1e-6}],
    "value_residual": [{"learnable": True}],
    "deepnorm": [{"init": "scale"}, {"init": "none"}],
    "peri_ln": [{"embedding_norm": True, "output_init": 0.5}],
    "ln_scaling": [{"scaled_init": True}],
    "laurel": [{"variant": "rw_lr_pa"}, {"variant": "pa", "rw_weights": "none"},
               {"variant": "lr", "granularity": "block"}],
    "ddl": [{"value_dim": 2}, {"value_dim": 2, "compressor": "tc", "expander": "ec", "beta_gate": "mlp"},
            {"value_dim": 2, "init": "code", "value": "code"},
            {"value_dim": 2, "compressor": "tc", "expander": "ec", "init": "code", "beta_gate": "mlp"},
            {"compressor": "tc", "compressor_init": "average"}, {"value_dim": 2, "weight_decay": False}],
}
MIXER_OPTIONS = {
    "shortswa": [{"kv_heads": 2}, {"replace_attention": True}],
    "shortconv": [{"init": "identity", "bias": True}],
    "canon": [{"init": "zero", "bias": True}, {"init": "uniform", "placements": "BD"}],
}


def depth_cases():
    return [(name, options) for name in list_depth_operators()
            for options in [{}] + DEPTH_OPTIONS.get(name, [])]


def mixer_cases():
    return [(name, options) for name in list_local_mixers()
            for options in [{}] + MIXER_OPTIONS.get(name, [])]


def structured_init(tensor: torch.Tensor) -> bool:
    """Whether a freshly initialised tensor is an identity, one-hot, all-ones, all-zeros or
    other constant pattern: a handful of distinct values (random inits have ~one per entry)."""
    if tensor.numel() == 1:
        return True
    return torch.unique(tensor.detach()).numel() <= min(3, tensor.numel() - 1)


def decay_groups(model: ResStreamLM) -> tuple[set[str], set[str]]:
    """(decayed names, undecayed names) of the optimizer the trainer builds for `model`."""
    trainer = SimpleNamespace(config=SimpleNamespace(optim=OptimConfig()))
    optimizer = Trainer._build_optimizer(trainer, model)
    names = {id(p): name for name, p in model.named_parameters()}
    decayed, undecayed = set(), set()
    for group in optimizer.param_groups:
        target = decayed if group["weight_decay"] > 0 else undecayed
        target.update(names[id(p)] for p in group["params"])
    return decayed, undecayed


def check_roles(model: ResStreamLM) -> set[str]:
    decayed, undecayed = decay_groups(model)
    all_names = {name for name, _ in model.named_parameters()}
    assert decayed | undecayed == all_names and not decayed & undecayed
    structured = {name for name, p in model.named_parameters() if structured_init(p)}
    assert not structured & decayed, f"identity/constant-initialised but decayed: {sorted(structured & decayed)}"
    return decayed


def ordinary_matrices(decayed: set[str]) -> None:
    for name in ("embed.weight", "blocks.0.mlp.gate_proj.weight", "blocks.0.mlp.down_proj.weight"):
        assert name in decayed, name


def test_structured_init_detector():
    assert structured_init(torch.eye(4)) and structured_init(2 * torch.eye(3))
    assert structured_init(torch.ones(8)) and structured_init(torch.zeros(5, 4))
    assert structured_init(torch.full((6, 2), 0.5)) and structured_init(torch.tensor(0.01))
    one_hot_rows = torch.zeros(4, 16)
    one_hot_rows[0] = 1.0  # ShortConv's identity taps
    assert structured_init(one_hot_rows)
    assert not structured_init(torch.randn(16, 8)) and not structured_init(torch.randn(2))


@pytest.mark.parametrize("name,options", depth_cases(), ids=lambda v: str(v))
def test_depth_operator_parameters_by_role(name, options):
    torch.manual_seed(0)
    model = ResStreamLM(tiny_config(depth=name, depth_options=options))
    decayed = check_roles(model)
    ordinary_matrices(decayed)
    for name_ in ("blocks.0.attn.q_proj.weight", "blocks.0.attn.k_proj.weight",
                  "blocks.0.attn.v_proj.weight", "blocks.1.attn.o_proj.weight"):
        assert name_ in decayed, name_
    assert model.depth.no_weight_decay() <= {n for n, _ in model.depth.named_parameters()}


@pytest.mark.parametrize("name,options", mixer_cases(), ids=lambda v: str(v))
def test_local_mixer_parameters_by_role(name, options):
    torch.manual_seed(0)
    model = ResStreamLM(tiny_config(local_mixer=name, mixer_options=options))
    ordinary_matrices(check_roles(model))


def test_ordinary_projections_of_operators_and_mixers_are_decayed():
    decayed = check_roles(ResStreamLM(tiny_config(depth="depth_swa")))
    assert {"depth.attention.0.q_proj.weight", "depth.attention.0.k_proj.weight",
            "depth.attention.0.v_proj.weight"} <= decayed
    assert "depth.attention.0.o_proj.weight" not in decayed  # zero-init injection gate
    decayed = check_roles(ResStreamLM(tiny_config(depth="ddl", depth_options={"value_dim": 2})))
    assert "depth.values.0.weight" in decayed and "depth.gates.0.out.weight" not in decayed
    # DDL's init="code" (the released code's random gate weights and compressor taps): decayed
    # as the code decays every >= 2-D weight; `weight_decay=False`: no DDL parameter is
    decayed = check_roles(ResStreamLM(tiny_config(depth="ddl", depth_options={"value_dim": 2, "init": "code"})))
    assert {"depth.values.0.weight", "depth.gates.0.out.weight", "depth.compressors.layer0.weight",
            "depth.compressors.final.weight"} <= decayed
    assert not {"depth.compressors.layer0.read", "depth.gates.0.out.bias", "depth.values.0.bias"} & decayed
    for options in ({"weight_decay": False}, {"value_dim": 2, "init": "code", "weight_decay": False}):
        decayed = check_roles(ResStreamLM(tiny_config(depth="ddl", depth_options=options)))
        assert not any(n.startswith("depth.") for n in decayed), options
    decayed = check_roles(ResStreamLM(tiny_config(local_mixer="shortswa")))
    assert {f"blocks.0.mix.attention.{p}_proj.weight" for p in "qkvo"} <= decayed
    decayed = check_roles(ResStreamLM(tiny_config(local_mixer="shortconv")))
    assert "blocks.0.attn.qkv_mixer.weight" in decayed  # random (Conv1d default) taps
    decayed = check_roles(ResStreamLM(tiny_config(depth="hyper")))
    assert not any(n.startswith("depth.") for n in decayed)


def test_parameter_groups_match_the_trainer_and_tied_head():
    model = ResStreamLM(tiny_config(depth="hyper", local_mixer="canon"))
    groups = model.parameter_groups(0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    decayed, undecayed = decay_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in groups[0]["params"]} == decayed
    assert {names[id(p)] for p in groups[1]["params"]} == undecayed
    assert model.no_weight_decay_names() == undecayed
    assert "lm_head.weight" not in decayed | undecayed  # tied: it is embed.weight
