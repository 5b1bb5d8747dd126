"""`resstream bench decode --quick`: the table is produced for every configuration, and the
memory columns obey the cache formulas (measured from the cache tensors)."""
from __future__ import annotations

import json

from resstream.bench.decode import CONFIGS
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


def test_bench_decode_rejects_unknown_configs(capsys):
    assert main(["bench", "decode", "--quick", "--configs", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
