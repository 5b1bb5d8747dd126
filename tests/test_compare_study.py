"""Study files: the public schema parses; every bad field gives one line naming it, exit code 2
on the CLI, and nothing is written."""
from __future__ import annotations

import pytest

from resstream.cli import main
from resstream.compare.study import load_study, parse_study, shipped_studies
from resstream.errors import UserError
from resstream.registry import DEPTH_OPERATORS, LOCAL_MIXERS

GOOD = """
name: my-study
preset: tiny
seeds: [0, 1, 2]
budget: {tokens: 2000000}
config:
  data: {source: shakespeare, seq_len: 32, batch_size: 4}
  optim: {lr: 3.0e-3}
  train: {eval_every: 25}
baseline: baseline
variants:
  baseline: {}
  ddl: {model: {depth: ddl}}
  shortswa: {model: {local_mixer: shortswa, local_window: 16}}
"""


def test_the_documented_schema_parses():
    study = parse_study(GOOD)
    assert study.name == "my-study" and study.seeds == [0, 1, 2]
    assert (study.budget_kind, study.budget_value) == ("tokens", 2e6)
    assert [v.name for v in study.variants] == ["baseline", "ddl", "shortswa"]
    values = study.train_values(study.variant("shortswa"))
    assert values["model"] == {"local_mixer": "shortswa", "local_window": 16}
    assert values["data"]["seq_len"] == 32 and values["optim"]["lr"] == 3.0e-3


def test_baseline_defaults_to_the_first_variant_and_yaml_strings_are_numbers():
    study = parse_study(GOOD.replace("baseline: baseline\n", "").replace("2000000", "2e6"))
    assert study.baseline == "baseline" and study.budget_value == 2e6


@pytest.mark.parametrize("name", shipped_studies())
def test_shipped_studies_load(name):
    study = load_study(name)
    assert len(study.seeds) >= 3, "a paired test over fewer seeds cannot separate anything"


def test_design_space_covers_every_registered_operator_and_mixer():
    study = load_study("design-space")
    depths = {v.overrides.get("model", {}).get("depth") for v in study.variants}
    mixers = {v.overrides.get("model", {}).get("local_mixer") for v in study.variants}
    assert set(DEPTH_OPERATORS.names()) - {"standard"} <= depths
    assert set(LOCAL_MIXERS.names()) <= mixers


BAD = {
    "unknown top key": (GOOD + "colour: blue\n", "colour"),
    "unknown variant key": (GOOD.replace("ddl: {model:", "ddl: {modle:"), "modle"),
    "unknown config section": (GOOD.replace("  optim:", "  optimizer:"), "optimizer"),
    "unknown operator": (GOOD.replace("depth: ddl", "depth: nope"), "nope"),
    "unknown model key": (GOOD.replace("depth: ddl", "depht: ddl"), "depht"),
    "bad model value": (GOOD.replace("local_window: 16", "local_window: -1"), "local_window"),
    "empty variants": (GOOD.split("variants:")[0] + "variants: {}\n", "variants"),
    "duplicate variant": (GOOD + "  ddl: {}\n", "duplicate key 'ddl'"),
    "baseline not a variant": (GOOD.replace("baseline: baseline", "baseline: nobody"),
                               "nobody"),
    "seeds empty": (GOOD.replace("[0, 1, 2]", "[]"), "seeds"),
    "seeds negative": (GOOD.replace("[0, 1, 2]", "[0, -1]"), "seeds"),
    "seeds repeated": (GOOD.replace("[0, 1, 2]", "[1, 1]"), "repeats"),
    "budget missing": (GOOD.replace("budget: {tokens: 2000000}\n", ""), "budget"),
    "budget zero": (GOOD.replace("tokens: 2000000", "tokens: 0"), "budget.tokens"),
    "budget negative": (GOOD.replace("tokens: 2000000", "flops: -5"), "budget.flops"),
    "budget two kinds": (GOOD.replace("{tokens: 2000000}", "{tokens: 5, steps: 5}"), "budget"),
    "budget unknown kind": (GOOD.replace("tokens: 2000000", "hours: 2"), "budget"),
    "budget fractional steps": (GOOD.replace("tokens: 2000000", "steps: 2.5"), "budget.steps"),
    "budget infinite": (GOOD.replace("tokens: 2000000", "tokens: .inf"), "budget.tokens"),
    "python tag": (GOOD.replace("name: my-study", "name: !!python/name:os.system ''"), "tag"),
    "standard tag": (GOOD.replace("name: my-study", "name: !!str my-study"), "tag"),
    "custom tag": (GOOD.replace("preset: tiny", "preset: !env tiny"), "tag"),
    "seed set by config": (GOOD.replace("eval_every: 25", "eval_every: 25, seed: 3"),
                           "train.seed"),
    "steps set by variant": (GOOD.replace("ddl: {model: {depth: ddl}}",
                                          "ddl: {model: {depth: ddl}, train: {steps: 9}}"),
                             "train.steps"),
    "match unknown variant": (GOOD + "match: {params: ghost}\n", "ghost"),
    "match bad widen": (GOOD + "match: {params: ddl, widen: heads}\n", "widen"),
    "unknown preset": (GOOD.replace("preset: tiny", "preset: huge"), "huge"),
    "not a mapping": ("- a\n- b\n", "mapping"),
    "invalid yaml": ("name: [unclosed\n", "YAML"),
    "variant name with slash": (GOOD.replace("  ddl: {model", "  a/b: {model"), "a/b"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_study_is_one_line_naming_the_field(case):
    text, needle = BAD[case]
    with pytest.raises(UserError) as raised:
        parse_study(text)
    message = str(raised.value)
    assert needle in message and "\n" not in message


@pytest.mark.parametrize("case", ["unknown operator", "duplicate variant", "budget zero",
                                  "python tag"])
def test_bad_study_on_the_cli_exits_2_and_writes_nothing(case, tmp_path, capsys):
    study = tmp_path / "study.yaml"
    study.write_text(BAD[case][0], encoding="utf-8")
    out = tmp_path / "out"
    assert main(["compare", str(study), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("resstream compare: error:")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]


def test_unknown_study_name_lists_the_shipped_ones(capsys):
    assert main(["compare", "no-such-study"]) == 2
    err = capsys.readouterr().err
    assert "demo" in err and "paper" in err and "design-space" in err
