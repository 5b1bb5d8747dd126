"""`resstream demo` is `resstream compare demo`: a fixed budget, the same steps on every
machine, never lowered unless --time-budget is given."""
from __future__ import annotations

from resstream.cli import build_parser
from resstream.compare import runner
from resstream.compare.study import load_study


def test_demo_is_the_demo_study(tmp_path):
    args = build_parser().parse_args(["demo", "--out", str(tmp_path / "x")])
    assert args.study == "demo" and args.time_budget is None


def test_demo_budget_is_fixed_and_equal_for_every_variant(tmp_path):
    study = load_study("demo")
    plan = runner.plan_study(study, tmp_path)
    assert {config.train.steps for config in plan.configs.values()} == {160}
    assert len(plan.runs) == 4 * 3
    assert all(config.train.eval_every * runner.EVAL_POINTS >= 160 // 2
               for config in plan.configs.values())
    assert plan.time_budget_note is None
