"""resstream.hardware: the low-precision CPU probe (a crash becomes a one-line error, not SIGILL)
and --device parsing, as the commands that take them see it."""
from __future__ import annotations

import pytest
import torch

from resstream import hardware
from resstream.cli import main
from resstream.errors import UserError
from resstream.hf import save_model
from resstream.model import ResStreamLM
from resstream.testing import tiny_config


def test_float32_needs_no_probe_and_the_probe_result_is_cached(monkeypatch):
    def no_subprocess(*args, **kwargs):
        raise AssertionError("float32 must not be probed")

    monkeypatch.setattr(hardware.subprocess, "run", no_subprocess)
    assert hardware.cpu_matmul_works(torch.float32) and hardware.cpu_matmul_works(torch.float64)
    monkeypatch.setitem(hardware._PROBED, torch.bfloat16, False)
    assert not hardware.cpu_matmul_works(torch.bfloat16)  # cached: no child process


def test_the_probe_reports_a_crashing_child_as_unsupported(monkeypatch):
    class Died:
        returncode = -4  # SIGILL

    monkeypatch.setattr(hardware, "_PROBED", {})
    monkeypatch.setattr(hardware.subprocess, "run", lambda *a, **k: Died())
    assert not hardware.cpu_matmul_works(torch.float16)
    with pytest.raises(UserError, match="--dtype=float16 crashes .*allowed here: float32"):
        hardware.require_dtype_runs(torch.float16, "cpu", "--dtype")
    hardware.require_dtype_runs(torch.float16, "meta", "--dtype")  # only CPUs are probed


def test_commands_refuse_a_dtype_this_cpu_cannot_run(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(hardware._PROBED, torch.bfloat16, False)
    save_model(ResStreamLM(tiny_config(vocab_size=256)), tmp_path / "ckpt")
    assert main(["generate", "--checkpoint", str(tmp_path / "ckpt"), "--prompt", "a",
                 "--dtype", "bfloat16"]) == 2
    assert "--dtype=bfloat16 crashes matrix products on this CPU" in capsys.readouterr().err
    assert main(["bench", "decode", "--quick", "--dtype", "bfloat16", "--device", "cpu"]) == 2
    assert "--dtype=bfloat16" in capsys.readouterr().err


def test_device_flags_are_checked(capsys, tmp_path):
    assert hardware.parse_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="'gpu0' is not a device"):
        hardware.parse_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            hardware.parse_device("cuda:0")
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "a", "--device", "gpu0"]) == 2
    assert "--device='gpu0' is not a device" in capsys.readouterr().err


def test_training_falls_back_to_float32_where_bf16_crashes(monkeypatch):
    from resstream.train.trainer import _autocast_dtype

    logged = []
    monkeypatch.setitem(hardware._PROBED, torch.bfloat16, False)
    assert _autocast_dtype("bf16", torch.device("cpu"), logged.append) is None
    assert "crash on this CPU" in logged[0] and hardware.WORKAROUND in logged[0]
    monkeypatch.setitem(hardware._PROBED, torch.bfloat16, True)
    assert _autocast_dtype("bf16", torch.device("cpu"), logged.append) is torch.bfloat16
    assert _autocast_dtype("fp32", torch.device("cpu"), logged.append) is None and len(logged) == 1
