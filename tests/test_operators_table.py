"""`resstream operators`: one row per registered operator and mixer, parameter counts equal to
sum(p.numel()) of models built on CPU, JSON output, option overrides and one-line errors."""
import json

import pytest

from resstream.cli import main
from resstream.model import ResStreamLM
from resstream.registry import list_depth_operators, list_local_mixers
from resstream.testing import tiny_config

TINY_FLAGS = ["--d-model", "32", "--n-layers", "3", "--n-heads", "4", "--set", "vocab_size=64",
              "--set", "max_seq_len=64", "--set", "mlp_hidden=48", "--set", "n_kv_heads=2",
              "--set", "local_window=4"]


def run_cli(capsys, *flags):
    code = main(["operators", *TINY_FLAGS, *flags])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def cpu_params(**changes):
    return sum(p.numel() for p in ResStreamLM(tiny_config(**changes)).parameters())


@pytest.fixture(scope="module")
def json_table():
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(["operators", *TINY_FLAGS, "--format", "json"]) == 0
    return json.loads(buffer.getvalue())


def test_markdown_has_a_row_per_registered_operator_and_mixer(capsys):
    code, out, _ = run_cli(capsys)
    assert code == 0
    first_cells = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")]
    for name in list_depth_operators() + list_local_mixers():
        assert first_cells.count(name) == 1, name


def test_operator_parameter_counts_match_built_models(json_table):
    rows = {row["operator"]: row for row in json_table["operators"]}
    assert sorted(rows) == list_depth_operators()
    standard = cpu_params()
    assert json_table["config"]["standard_params"] == standard
    for name, row in rows.items():
        assert "error" not in row, (name, row.get("error"))
        assert row["params"] == cpu_params(depth=name), name  # defaults: depth_window None
        assert row["params_added"] == row["params"] - standard
    assert rows["standard"]["params_added"] == 0 and rows["standard"]["pipeline_vectors"] == 1


def test_mixer_parameter_counts_and_decode_state_match_built_models(json_table):
    rows = {row["mixer"]: row for row in json_table["mixers"]}
    assert sorted(rows) == list_local_mixers()
    for name, row in rows.items():
        model = ResStreamLM(tiny_config(local_mixer=name))
        assert row["params"] == sum(p.numel() for p in model.parameters()), name
        cache = model.new_cache(1)
        kv = sum(e.k.numel() + e.v.numel() for k, e in cache.entries.items() if k.endswith(".attn"))
        assert row["decode_state_values"] == sum(t.numel() for t in cache.tensors()) - kv, name
    assert rows["shortconv"]["slots"] == ["qkv"]
    assert rows["canon"]["slots"] == ["attn_input", "qkv", "mlp_input", "mlp_hidden"]


def test_option_override_and_depth_window(capsys):
    code, out, _ = run_cli(capsys, "--format", "json", "--option", "ddl.value_dim=2",
                           "--option", "canon.placements=AC", "--depth-window", "2")
    table = json.loads(out)
    rows = {row["operator"]: row for row in table["operators"]}
    assert rows["ddl"]["options"] == {"value_dim": 2}
    assert rows["ddl"]["params"] == cpu_params(depth="ddl", depth_options={"value_dim": 2})
    assert rows["ddl"]["depth_state_vectors"] == 2
    mixers = {row["mixer"]: row for row in table["mixers"]}
    assert mixers["canon"]["slots"] == ["attn_input", "mlp_input"]
    for row in table["operators"]:
        assert row["depth_window"] == (2 if row["operator"] == "depth_swa" else None)


@pytest.mark.parametrize("flags,message", [(["--set", "colour=3"], "colour"),
                                           (["--set", "depth=ddl"], "--option"),
                                           (["--option", "nosuch.x=1"], "nosuch"),
                                           (["--option", "ddl.value_dim"], "KEY=VALUE")])
def test_bad_flags_give_one_line_errors(capsys, flags, message):
    code, _, err = run_cli(capsys, *flags)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_vertical_says_its_form_is_not_from_the_paper(capsys, json_table):
    """Vertical Attention's paper text could not be found: the table says so under the rows."""
    code, out, _ = run_cli(capsys)
    assert code == 0
    notes = out.split("Notes:", 1)[1].split("Sequence-axis local mixers:", 1)[0]
    assert "`vertical`: the paper's text could not be found" in notes
    vertical = next(r for r in json_table["operators"] if r["operator"] == "vertical")
    assert "not from the paper" in vertical["source_note"]


def test_graph_break_column_counts_what_dynamo_reports():
    """--graph-breaks: each row's training / decode graph breaks, as resstream.compile_check
    measures them (here a subset of rows: tracing every operator takes a minute or two)."""
    from resstream.compile_check import training_graph_breaks
    from resstream.config import ModelConfig
    from resstream.operators_table import add_graph_breaks, build_table, to_markdown

    table = build_table(ModelConfig(d_model=32, n_layers=2, n_heads=4))
    table["operators"] = [r for r in table["operators"] if r["operator"] in ("standard", "hyper")]
    table["mixers"] = [r for r in table["mixers"] if r["mixer"] == "canon"]
    add_graph_breaks(table, {"hyper": {"dynamic": False}})
    rows = {r["operator"]: r["graph_breaks"] for r in table["operators"]}
    assert rows["standard"] == {"train": 0, "decode": 0}
    hyper = training_graph_breaks("hyper", depth_options={"dynamic": False}).count
    assert rows["hyper"]["train"] == hyper
    assert table["mixers"][0]["graph_breaks"] == {"train": 0, "decode": 0}
    text = to_markdown(table)
    assert text.count("graph breaks (train / decode)") == 2 and "| 0 / 0 " in text
