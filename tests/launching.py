"""Launching `resstream` under torchrun (CPU, gloo) from the distributed tests.

Every launch runs in its own session with a timeout; whatever happens, the session is killed at
the end, so no process outlives its test."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from resstream.data.text import markdown_to_text, shakespeare_play_files

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
# tiny model, 2 micro-batches per step (exercises no_sync / deferred gradient reduction, and
# under pipeline parallel two accumulated micro-batches in one schedule)
FAST = ["--preset", "tiny", "--no-progress", "--data.seq_len=32", "--data.batch_size=4",
        "--optim.grad_accum=2", "--optim.warmup_steps=0", "--optim.lr=3e-3",
        "--train.log_every=1", "--train.eval_every=0",
        "--train.eval_tokens=512", "--train.final_eval_tokens=512", "--train.threads=1"]


def write_macbeth(directory: Path) -> Path:
    """One play as plain text: a small corpus every launch reads."""
    plays = {f.name: f for f in shakespeare_play_files()}
    path = directory / "macbeth.txt"
    path.write_text(markdown_to_text(plays["macbeth.md"].read_text(encoding="utf-8")),
                    encoding="utf-8")
    return path


def worker_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def launch(args: list, nproc: int, extra_env: dict | None = None) -> subprocess.Popen:
    """`resstream ARGS` in one process, or under torchrun with `nproc` processes."""
    command = ([*TORCHRUN, "--nproc-per-node", str(nproc), "-m", "resstream"] if nproc > 1
               else [sys.executable, "-m", "resstream"])
    return subprocess.Popen([*command, *map(str, args)], env={**worker_env(), **(extra_env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        kill_session(process)
    return process.returncode, out, err


def kill_session(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def train(corpus, out, nproc=1, *extra) -> tuple[int, str, str]:
    return finish(launch(["train", "--data", corpus, "--out", out, *FAST, *extra], nproc))
