"""`resstream demo` end to end at toy size: four variants, table, PNG, Markdown, JSON."""
from __future__ import annotations

import json

import pytest
import torch

from resstream.cli import main
from resstream.demo import DEMO_DEFAULTS, VARIANTS, new_demo_dir, parse_variants
from resstream.errors import UserError


# one torch thread per worker comes from conftest.py
pytestmark = pytest.mark.usefixtures("private_data_cache")


def test_tiny_demo_end_to_end(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("ROMEO:\nBut soft, what light through yonder window breaks?\n\n" * 150,
                      encoding="utf-8")
    out = tmp_path / "demo"
    rc = main(["demo", "--preset", "tiny", "--steps", "3", "--data", str(corpus), "--out",
               str(out), "--seq-len", "32", "--batch-size", "4", "--eval-every", "1",
               "--eval-tokens", "256", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("variant"))
    for column in ("val bpb", "params", "tokens/s", "wall time"):
        assert column in header
    for variant in VARIANTS:
        assert any(line.startswith(variant + " ") for line in printed.splitlines()), printed
        assert (out / variant / "metrics.jsonl").is_file()
    assert (out / "bpb_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.md").read_text()
    assert "| variant |" in summary and "nats per character" in summary
    results = json.loads((out / "results.json").read_text())
    assert [v["variant"] for v in results["variants"]] == list(VARIANTS)
    for variant in results["variants"]:
        assert len(variant["curve"]) == 4  # step 0 and each of the 3 steps
        assert 0 < variant["val_bpb"] < 9
    # Same data, seed and budget for every variant: identical token counts.
    assert len({v["tokens"] for v in results["variants"]}) == 1


def test_demo_never_reuses_a_folder(tmp_path):
    first = new_demo_dir(tmp_path)
    first.mkdir()
    assert new_demo_dir(tmp_path) != first


def test_variant_names_are_checked():
    assert parse_variants("ddl, baseline") == ["ddl", "baseline"]
    with pytest.raises(UserError, match="allowed: a comma-separated subset of baseline"):
        parse_variants("baseline,mystery")


def test_demo_defaults_use_the_small_preset_on_the_default_corpus():
    assert DEMO_DEFAULTS["preset"] == "small"
    assert DEMO_DEFAULTS["data"]["source"] == "shakespeare"
    assert DEMO_DEFAULTS["train"]["final_eval_tokens"] is None  # final bpb on all validation


def test_default_steps_shrink_to_fit_the_time_budget(monkeypatch, capsys):
    from types import SimpleNamespace

    import numpy as np

    from resstream import demo
    from resstream.cli import build_parser

    args = build_parser().parse_args(["demo"])
    configs = {variant: demo.demo_config(args, variant) for variant in VARIANTS}
    data = SimpleNamespace(val=np.zeros(128 * 1000 + 1, dtype=np.uint8))
    # 1 s per step for the four variants together, 10 us per evaluated token.
    monkeypatch.setattr(demo, "_time_variants",
                        lambda configs, data: ({name: 0.25 for name in configs}, 1e-5))
    assert demo.fit_steps_to_budget(configs, data, budget_seconds=3600) == 300
    # predicted(s) = 1.2 * (s + (s // 50 + 1) * 32768e-5 + 128000e-5):
    # 170 steps need 1.2 * 172.6 = 207.1 s, 160 steps 1.2 * 162.6 = 195.1 s.
    assert demo.fit_steps_to_budget(configs, data, budget_seconds=200) == 160
    assert "lowered from 300" in capsys.readouterr().out
    assert demo.fit_steps_to_budget(configs, data, budget_seconds=1) == demo.MIN_AUTO_STEPS


def test_one_thread_is_chosen_only_when_clearly_faster(monkeypatch, capsys):
    from resstream import demo

    torch.set_num_threads(2)  # conftest's autouse fixture restores the thread count
    timings = {1: 1.0, 2: 0.6}
    monkeypatch.setattr(demo, "_time_training_step",
                        lambda config, data, warmup, timed, give_up_after=None:
                        timings[torch.get_num_threads()])
    config = demo.demo_config(build_args(), "baseline")
    assert demo.choose_threads(config, data=None) == 2
    timings[2] = float("inf")  # two threads gave up: a busy machine
    assert demo.choose_threads(config, data=None) == 1
    assert "more than 3x slower" in capsys.readouterr().out


def build_args():
    from resstream.cli import build_parser

    return build_parser().parse_args(["demo", "--preset", "tiny"])
