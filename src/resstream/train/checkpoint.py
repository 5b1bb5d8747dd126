"""Checkpoints without pickle: safetensors for tensors, JSON for everything else.

A checkpoint is a folder ``<run>/checkpoints/step_<8 digits>/`` holding

* ``model.safetensors``      the model weights (`safetensors.torch.save_model`, so tied
  embeddings are stored once);
* ``optimizer.safetensors``  every tensor of the optimizer state, keyed ``state.<param>.<name>``;
* ``trainer_state.json``     step, tokens seen, data position, RNG states (python, numpy, torch,
  cuda), the optimizer's non-tensor state and param groups, the model and train configs, and
  the sha256 of both safetensors files.

Writes are atomic: the folder is written under a temporary name, flushed, and renamed into place,
so a run killed at any moment leaves only complete checkpoints (a half-written temporary folder
is ignored and cleaned up on the next save). Only the last K checkpoints are kept.

Loading checks that every file exists, parses, and matches its recorded sha256; anything else
raises :class:`CheckpointError` naming the file. A damaged checkpoint is never skipped silently.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from resstream.errors import UserError

CHECKPOINTS_DIR = "checkpoints"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
FORMAT = 1
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message names the offending file."""


@dataclass
class LoadedCheckpoint:
    path: Path
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])


# ---------------------------------------------------------------------------- save

def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, state: dict[str, Any],
                    keep: int) -> Path:
    """Write the checkpoint for `step` atomically and prune to the last `keep` checkpoints.

    `state` is the trainer's JSON-able state (step, tokens, configs, ...); RNG states, the
    optimizer's JSON part and file hashes are added here."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(root)
    final = root / f"step_{step:08d}"
    temporary = root / f".tmp-step_{step:08d}-{os.getpid()}"
    temporary.mkdir()
    save_model(model, str(temporary / MODEL_FILE))
    optimizer_tensors, optimizer_json = flatten_optimizer_state(optimizer.state_dict())
    save_file(optimizer_tensors, str(temporary / OPTIMIZER_FILE))
    full_state = {
        **state,
        "format": FORMAT,
        "step": int(step),
        "rng": capture_rng_state(),
        "optimizer": optimizer_json,
        "sha256": {name: _sha256_file(temporary / name) for name in (MODEL_FILE, OPTIMIZER_FILE)},
    }
    _write_json(temporary / STATE_FILE, full_state)
    for name in (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE):
        _fsync_file(temporary / name)
    if final.exists():  # the same step saved again (e.g. a resumed run's final step)
        shutil.rmtree(final)
    os.replace(temporary, final)
    _fsync_dir(root)
    prune_checkpoints(root, keep)
    return final


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the `keep` newest checkpoints under `root`."""
    for old in list_checkpoints(root.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def _remove_stale_temporaries(root: Path) -> None:
    for leftover in root.glob(".tmp-step_*"):
        shutil.rmtree(leftover, ignore_errors=True)


# ---------------------------------------------------------------------------- load

def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a run folder (its latest checkpoint), a checkpoint folder, or a
    file inside one."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {str(path)!r} does not exist; allowed: a run "
                                "folder, a checkpoint folder or a file inside one")
    if path.is_file():
        path = path.parent
    if (path / STATE_FILE).exists() or (path / MODEL_FILE).exists():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"no checkpoint found in {str(path)!r} (expected "
                              f"{CHECKPOINTS_DIR}/step_NNNNNNNN/{STATE_FILE})")
    return latest


def read_checkpoint(path: str | Path, verify: bool = True) -> LoadedCheckpoint:
    """Parse trainer_state.json and check both safetensors files against their sha256."""
    folder = resolve_checkpoint(path)
    state_path = folder / STATE_FILE
    state = _read_json(state_path)
    for key in ("step", "sha256", "model_config"):
        if key not in state:
            raise CheckpointError(f"checkpoint file {str(state_path)!r} is corrupt: missing "
                                  f"{key!r}")
    if verify:
        for name in (MODEL_FILE, OPTIMIZER_FILE):
            file = folder / name
            if not file.is_file():
                raise CheckpointError(f"checkpoint file {str(file)!r} is missing")
            expected = state["sha256"].get(name)
            if _sha256_file(file) != expected:
                raise CheckpointError(f"checkpoint file {str(file)!r} is corrupt or truncated "
                                      "(sha256 does not match trainer_state.json)")
    return LoadedCheckpoint(folder, state)


def load_model_weights(checkpoint: LoadedCheckpoint, model: torch.nn.Module) -> None:
    file = checkpoint.path / MODEL_FILE
    try:
        missing, unexpected = load_model(model, str(file), strict=False)
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"checkpoint file {str(file)!r} cannot be read: "
                              f"{_first_line(error)}") from None
    if missing or unexpected:
        raise CheckpointError(f"checkpoint file {str(file)!r} does not fit the model: missing "
                              f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")


def load_optimizer_state(checkpoint: LoadedCheckpoint, optimizer: torch.optim.Optimizer) -> None:
    file = checkpoint.path / OPTIMIZER_FILE
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"checkpoint file {str(file)!r} cannot be read: "
                              f"{_first_line(error)}") from None
    try:
        optimizer.load_state_dict(unflatten_optimizer_state(tensors, checkpoint.state["optimizer"]))
    except (KeyError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"checkpoint file {str(file)!r} does not fit the optimizer: "
                              f"{_first_line(error)}") from None


# ---------------------------------------------------------------------------- optimizer state

def flatten_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into safetensors-ready tensors and JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, param_state in state_dict["state"].items():
        for name, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"state.{param_id}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(param_id), {})[name] = value
    groups = [{key: (list(value) if isinstance(value, tuple) else value)
               for key, value in group.items()} for group in state_dict["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars,
                     "tuple_keys": sorted({k for g in state_dict["param_groups"]
                                           for k, v in g.items() if isinstance(v, tuple)})}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], json_part: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, param_id, name = key.split(".", 2)
        state.setdefault(int(param_id), {})[name] = value
    for param_id, values in json_part.get("scalars", {}).items():
        state.setdefault(int(param_id), {}).update(values)
    tuple_keys = set(json_part.get("tuple_keys", []))
    groups = [{key: (tuple(value) if key in tuple_keys else value) for key, value in group.items()}
              for group in json_part["param_groups"]]
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------------- RNG state

def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) generator states as JSON-able data."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": {"name": np_state[0], "keys": np_state[1].tolist(), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["name"], np.array(numpy_state["keys"], dtype=np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"],
                         numpy_state["cached_gaussian"]))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


# ---------------------------------------------------------------------------- files

def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {str(path)!r} is missing") from None
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"checkpoint file {str(path)!r} cannot be read: "
                              f"{_first_line(error)}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"checkpoint file {str(path)!r} is corrupt or truncated "
                              f"(invalid JSON: {error.msg} at line {error.lineno})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint file {str(path)!r} is corrupt: not a JSON object")
    return data


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
