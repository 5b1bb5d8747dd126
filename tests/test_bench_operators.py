"""`resstream bench operators --quick`: the smoke run prints a table with standard and one other
operator, ratios against standard, and the goal column; JSON output parses."""
import json

from resstream.bench.operators import GOALS, VARIANTS, variant_options
from resstream.cli import main
from resstream.registry import list_depth_operators


def test_quick_run_prints_the_table(capsys):
    assert main(["bench", "operators", "--quick", "--operators", "ddl"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert {"operator", "standard", "ddl"} <= set(rows)
    assert "1.00x" in rows["standard"]
    assert "<= 1.10x" in rows["ddl"]  # the goal of DDL with d_v = 1
    assert "value_dim=1" in rows["ddl"]


def test_quick_json_has_ratios(capsys):
    assert main(["bench", "operators", "--quick", "--format", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    names = [row["operator"] for row in result["rows"]]
    assert names[0] == "standard" and len(names) == 2 and names[1] in list_depth_operators()
    for row in result["rows"]:
        assert row["step_ms"] > 0 and row["saved_activation_bytes"] > 0
    assert result["rows"][0]["time_ratio"] == 1.0 and result["rows"][0]["memory_ratio"] == 1.0


def test_variant_options_follow_the_goals_and_user_overrides():
    options, notes = variant_options("ddl", {})
    assert options == VARIANTS["ddl"] and notes == ""
    options, _ = variant_options("ddl", {"value_dim": 4})
    assert options == {"value_dim": 4}
    assert set(GOALS) >= set(VARIANTS)


def test_bad_operator_is_a_one_line_error(capsys):
    assert main(["bench", "operators", "--quick", "--operators", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "nosuch" in err and len(err.strip().splitlines()) == 1


def test_quick_compile_adds_compiled_columns(capsys):
    """--compile: a compiled step beside the eager one, its ratio to compiled standard, the
    compile time and dynamo's graph-break count (a process-wide counter: in the full suite,
    other tests' compilations in the same worker can add to it, so only its presence is
    checked here; tests/test_compile.py and test_operators_table.py hold the counts to 0)."""
    import torch

    torch._dynamo.reset()
    assert main(["bench", "operators", "--quick", "--operators", "layerscale", "--compile",
                 "--format", "json"]) == 0
    rows = {r["operator"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    for row in rows.values():
        assert row["compiled_step_ms"] > 0 and row["compile_seconds"] > 0
        assert isinstance(row["graph_breaks"], int) and row["graph_breaks"] >= 0
        assert row["compile_speedup"] == row["step_ms"] / row["compiled_step_ms"]
    assert rows["standard"]["compiled_ratio"] == 1.0
