"""`resstream bench attention --quick`: a row for every size x variant, the same-function variants
agree with chunked, ratios are time / chunked time, and bad flags are one-line errors."""
from __future__ import annotations

import json

import pytest

from resstream.bench.attention import QUICK_SIZES
from resstream.cli import main

VARIANTS = ("chunked", "reference", "flex", "sdpa_causal", "sdpa_band_mask", "local_attention")


def run_json(capsys, *flags):
    assert main(["bench", "attention", "--quick", "--no-flex", "--format", "json", *flags]) == 0
    return json.loads(capsys.readouterr().out)


def test_bench_attention_quick(capsys):
    result = run_json(capsys)
    rows = {(r["n"], r["variant"]): r for r in result["rows"]}
    assert set(rows) == {(n, name) for n in QUICK_SIZES for name in VARIANTS}
    for n in QUICK_SIZES:
        chunked = rows[n, "chunked"]
        for name in ("chunked", "reference", "sdpa_causal", "sdpa_band_mask"):
            row = rows[n, name]
            assert row["fwd"]["min_ms"] > 0 and row["fwd_bwd"]["min_ms"] > 0, name
            assert row["fwd_bwd_speedup_of_chunked"] == pytest.approx(
                row["fwd_bwd"]["min_ms"] / chunked["fwd_bwd"]["min_ms"])
        assert chunked["fwd_speedup_of_chunked"] == 1.0
        # the same function: reference, SDPA with the band mask and the package (window_size w-1)
        for name in ("reference", "sdpa_band_mask"):
            assert rows[n, name]["max_diff"] < 1e-5, name
        assert rows[n, "sdpa_causal"]["max_diff"] is None  # full causal is a different function
        assert rows[n, "flex"]["fwd"] is None and "--no-flex" in rows[n, "flex"]["note"]
        package = rows[n, "local_attention"]
        if "not installed" not in package["note"]:
            assert package["max_diff"] < 1e-5
    goals = {g["goal"]: g for g in result["goals"]}
    assert any("8x faster than sdpa_causal" in g for g in goals)
    assert any("2x faster than local_attention" in g for g in goals)
    same = next(g for name, g in goals.items() if "same-function" in name)
    assert same["met"] is True


def test_bench_attention_skips_dense_reference_over_memory_limit(capsys):
    result = run_json(capsys, "--dense-limit-gb", "0")
    for row in result["rows"]:
        if row["variant"] == "reference":
            assert row["fwd"] is None and "dense-limit-gb" in row["note"]


def test_bench_attention_markdown_table(capsys):
    assert main(["bench", "attention", "--quick", "--no-flex"]) == 0
    out = capsys.readouterr().out
    assert "| N " in out and "chunked speed-up fwd+bwd" in out and "sdpa_band_mask" in out


@pytest.mark.parametrize("flags, message", [
    (["--sizes", "12,x"], "--sizes"),
    (["--sizes", "0"], "--sizes"),
    (["--window", "0"], "--window"),
    (["--repeats", "0"], "--repeats"),
])
def test_bench_attention_bad_flags(capsys, flags, message):
    assert main(["bench", "attention", "--no-flex", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
