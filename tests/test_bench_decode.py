"""`resstream bench decode --quick`: the table is produced for every configuration, and the
memory columns obey the cache formulas (measured from the cache tensors)."""
from __future__ import annotations

import json
import random
import statistics

import pytest

from resstream.bench.decode import CONFIGS, DEFAULT_DEPTH_GOAL, DEPTH_GOALS
from resstream.bench.timing import median_interval, paired_ratios
from resstream.cli import main
from resstream.registry import list_depth_operators


def test_bench_decode_quick(capsys):
    assert main(["bench", "decode", "--quick", "--format", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = {(r["config"], r.get("context")): r for r in result["rows"]}
    contexts = sorted({c for _, c in rows if c is not None})
    assert len(contexts) == 2
    known = set(list_depth_operators())
    for name, changes in CONFIGS.items():
        if changes.get("depth", "standard") in known:
            assert all((name, c) in rows for c in contexts), name
            assert all(rows[name, c]["decode_ms"] > 0 for c in contexts)
        else:
            assert "error" in rows[name, None]
    lo, hi = contexts
    base_lo, base_hi = rows["baseline", lo], rows["baseline", hi]
    # global attention: bytes grow with the context, exactly as 2 L c d_kv b
    assert base_lo["cache_bytes"] == base_lo["cache_formula_bytes"]
    assert base_hi["cache_bytes"] * lo == base_lo["cache_bytes"] * hi
    # ShortSWA-only: constant in the context and equal to 2 L w d_kv b
    swa_lo, swa_hi = rows["shortswa_only", lo], rows["shortswa_only", hi]
    assert swa_lo["cache_bytes"] == swa_hi["cache_bytes"] == swa_lo["cache_formula_bytes"]
    assert swa_hi["cache_ratio"] < swa_lo["cache_ratio"] < 1
    # the standard residual carries exactly one d-vector per token between sublayers
    assert base_lo["depth_state_bytes_per_token"] == base_lo["depth_state_formula_bytes"] == 32 * 4
    assert rows["attnres", lo]["depth_state_bytes_per_token"] > base_lo["depth_state_bytes_per_token"]
    assert result["recompute"]["full_forward_ms"] > 0
    assert any("20x" in g["goal"] for g in result["goals"])
    # the growth with context: each model at both contexts, interleaved in one loop
    growth = {g["config"]: g for g in result["growth"]}
    assert set(growth) == {"baseline", "shortswa_only"}
    assert all((g["from"], g["to"]) == (lo, hi) and g["ratio_ci"][0] <= g["ratio"] <= g["ratio_ci"][1]
               for g in growth.values())
    [goal] = [g for g in result["goals"] if g["goal"].startswith("shortswa_only latency")]
    assert goal["value"].startswith(f"{growth['shortswa_only']['ratio']:.3f}x")
    # the depth operators' latency goals are judged on the paired ratio
    for name in ("depth_swa", "block_attnres", "attnres", "ddl", "hyper"):
        [goal] = [g for g in result["goals"] if g["goal"].startswith(f"{name} ")]
        ratio = rows[name, lo]["paired_ratio"]
        limit = DEPTH_GOALS.get(name, DEFAULT_DEPTH_GOAL)
        assert goal["value"].startswith(f"{ratio:.3f}x") and goal["met"] == (ratio <= limit)


def test_bench_decode_takes_any_registered_depth_operator(capsys):
    """Operators outside CONFIGS run by name; their measured depth state is their formula."""
    names = ["rezero", "layerscale", "laurel", "post_ln", "deepnorm", "peri_ln", "ln_scaling",
             "orthogonal", "frac"]
    assert main(["bench", "decode", "--quick", "--format", "json", "--configs", ",".join(names)]) == 0
    rows = {r["config"]: r for r in json.loads(capsys.readouterr().out)["rows"] if "context" in r}
    assert {"baseline", *names} <= set(rows)
    for name in names:
        assert rows[name]["decode_ms"] > 0
        assert rows[name]["depth_state_bytes_per_token"] == rows[name]["depth_state_formula_bytes"]


def test_bench_decode_rejects_unknown_configs(capsys):
    assert main(["bench", "decode", "--quick", "--configs", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_paired_ratio_cancels_what_slows_both_and_ignores_lucky_minima():
    baseline = [1.0, 2.0, 2.0, 2.0, 2.0]  # one lucky baseline sample
    other = [2.2, 2.2, 2.2, 2.2, 2.2]
    assert min(other) / min(baseline) == pytest.approx(2.2)
    assert statistics.median(paired_ratios(other, baseline)) == pytest.approx(1.1)
    drift = [1.0, 3.0, 1.5, 5.0]  # the machine slows down and recovers: both scale alike
    assert paired_ratios([1.05 * t for t in drift], drift) == pytest.approx([1.05] * 4)


def test_median_interval_holds_the_median_and_narrows_with_more_repeats():
    rng = random.Random(1)
    few = [1.05 + rng.gauss(0, 0.03) for _ in range(15)]
    many = [1.05 + rng.gauss(0, 0.03) for _ in range(240)]
    (low_few, high_few), (low_many, high_many) = median_interval(few), median_interval(many)
    assert low_few <= statistics.median(few) <= high_few
    assert low_many <= 1.05 <= high_many
    assert high_many - low_many < (high_few - low_few) / 2
    assert median_interval(few) == median_interval(few)  # seeded: the same table twice


def test_bench_decode_quick_compile(capsys):
    """--compile: eager and compiled one-token steps side by side at the goals' context, and the
    compiled baseline goal in the goal table."""
    assert main(["bench", "decode", "--quick", "--compile", "--configs", "baseline",
                 "--format", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    compiled = result["compiled"]
    assert compiled["context"] == 16
    (row,) = compiled["rows"]
    assert row["config"] == "baseline" and row["compiled_ms"] > 0 and row["compile_s"] > 0
    assert row["speedup"] == row["eager_ms"] / row["compiled_ms"]
    assert any(g["goal"].startswith("compiled baseline decode") for g in result["goals"])
