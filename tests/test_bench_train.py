"""`resstream bench train --quick`: our step beside the plain GPT, FLOPs counted by torch, the
two goal rows; the plain GPT is nanoGPT's block (pre-LN, causal attention, 4x GELU MLP)."""
import json

import torch

from resstream.bench.train import PlainGPT
from resstream.cli import main


def test_quick_run_reports_both_models_and_the_goals(capsys):
    assert main(["bench", "train", "--quick", "--format", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    ours, plain = result["rows"]
    assert ours["model"].startswith("standard") and plain["model"].startswith("plain GPT")
    for row in (ours, plain):
        assert row["step_ms"] > 0 and row["step_flops"] > 0 and 0 < row["gemm_fraction"]
    assert result["ratio"] == ours["step_ms"] / plain["step_ms"]


def test_plain_gpt_is_causal_and_has_nanogpts_parameter_count():
    model = PlainGPT(vocab=256, d=256, layers=6, heads=8, max_len=256)
    assert abs(sum(p.numel() for p in model.parameters()) - 4.85e6) < 0.01e6
    ids = torch.randint(0, 256, (1, 12))
    changed = ids.clone()
    changed[0, 8] = (ids[0, 8] + 1) % 256
    with torch.no_grad():
        assert torch.equal(model(ids)[0, :8], model(changed)[0, :8])
