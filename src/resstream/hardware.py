"""Whether this machine's CPU can run matrix products in a low-precision dtype.

Some virtual machines advertise AMX-BF16 without enabling it. oneDNN then executes an illegal
instruction and the process dies with SIGILL, which no exception handler can catch. So the first
low-precision CPU matmul of a process is tried in a child process, and a command that was asked
for that dtype refuses with a one-line error (the trainer falls back to float32 instead).
"""
from __future__ import annotations

import subprocess
import sys

import torch

from resstream.errors import UserError

WORKAROUND = "try ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16"
_PROBED: dict[torch.dtype, bool] = {}


def cpu_matmul_works(dtype: torch.dtype) -> bool:
    """Whether matrix products in `dtype` (directly and under autocast, with a backward pass)
    run on this CPU; float32 and float64 always do. Probed once per process and dtype."""
    if dtype in (torch.float32, torch.float64):
        return True
    if dtype not in _PROBED:
        name = str(dtype).replace("torch.", "")
        code = ("import torch\nimport torch.nn.functional as F\n"
                f"dtype = torch.{name}\n"
                "x = torch.randn(8, 32)\nw = torch.randn(64, 32, requires_grad=True)\n"
                "with torch.autocast('cpu', dtype=dtype):\n"
                "    F.linear(x, w).float().sum().backward()\n"
                "F.linear(x.to(dtype), w.detach().to(dtype))\n")
        try:
            probe = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
            _PROBED[dtype] = probe.returncode == 0
        except (OSError, subprocess.SubprocessError):
            _PROBED[dtype] = False
    return _PROBED[dtype]


def require_dtype_runs(dtype: torch.dtype, device: torch.device | str, flag: str) -> None:
    """Raise a UserError, instead of dying with SIGILL later, when `dtype` cannot run on this
    CPU (other devices are not probed)."""
    if torch.device(device).type == "cpu" and not cpu_matmul_works(dtype):
        name = str(dtype).replace("torch.", "")
        raise UserError(f"{flag}={name} crashes matrix products on this CPU (illegal instruction; "
                        f"{WORKAROUND}); allowed here: float32")


DEVICE_TYPES = ("cpu", "cuda", "mps")
DEVICE_SYNTAX = "auto, cpu, cuda, cuda:N, mps"


def parse_device(name: str, flag: str = "--device", must_exist: bool = True) -> torch.device:
    """A device value, the one parser of every entry point (--device, train.device): "auto"
    (cuda when available, else cpu) or cpu / cuda / cuda:N / mps. With must_exist=False only the
    syntax is checked (a config may name a GPU the machine reading it lacks)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name) if isinstance(name, str) else None
    except RuntimeError:
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise UserError(f"{flag}={name!r} is not a device; allowed: {DEVICE_SYNTAX}")
    if must_exist:
        _require_device_exists(device, name, flag)
    return device


def _require_device_exists(device: torch.device, name: str, flag: str) -> None:
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{flag}={name} is unavailable (no CUDA device); allowed: auto or cpu")
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            raise UserError(f"{flag}={name} is unavailable (this machine has {count} CUDA "
                            f"device(s)); allowed: cuda:0..cuda:{count - 1}, auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{flag}={name} is unavailable (MPS is not available); allowed: auto or cpu")
