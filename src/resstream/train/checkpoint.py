"""Checkpoints without pickle: safetensors for tensors, JSON for everything else.

A checkpoint is a folder ``<run>/checkpoints/step_<8 digits>/`` holding

* ``model.safetensors``      the full (unsharded) model weights by parameter name; a tied
  parameter is stored once, under its first name (as `safetensors.torch.save_model` does);
* ``optimizer.safetensors``  every tensor of the optimizer state, keyed
  ``state.<parameter name>.<name>`` (format 2; format 1 keyed by the parameter's index in the
  optimizer, which breaks as soon as the parameter order changes, and is still read);
* ``trainer_state.json``     step, tokens seen, data position, RNG states (python, numpy, torch,
  cuda), the optimizer's non-tensor state and param groups, the model and train configs, and
  the sha256 of both safetensors files.

Both state dicts come from `torch.distributed.checkpoint.state_dict` (`gather_training_state`),
which gathers them whole from a DDP or FSDP2 run, so one format serves a single process, any
number of data-parallel processes, a resume on another number of processes and inference in one
process (`load_training_state` scatters them back).

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
FORMAT = 2  # 2: optimizer state keyed by parameter name; 1: by index
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

def gather_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer
                          ) -> tuple[dict[str, torch.Tensor], dict]:
    """Full model and optimizer state dicts on the CPU, keyed by parameter name, gathered from
    a plain, DDP or FSDP2 model. A collective under FSDP2: every rank calls it, and only rank 0
    receives the tensors (the others get empty dicts)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    options = StateDictOptions(full_state_dict=True, cpu_offload=distributed)
    return get_state_dict(model, optimizer, options=options)


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, state: dict[str, Any],
                    keep: int, gathered: tuple[dict, dict] | None = None) -> Path:
    """Write the checkpoint for `step` atomically and prune to the last `keep` checkpoints.

    `state` is the trainer's JSON-able state (step, tokens, configs, ...); RNG states, the
    optimizer's JSON part and file hashes are added here. `gathered`: the result of
    `gather_training_state`, when the caller gathered it already (a distributed run gathers on
    every rank, then rank 0 writes)."""
    model_state, optimizer_state = gathered or gather_training_state(model, optimizer)
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(root)
    final = checkpoint_path(run_dir, step)
    temporary = root / f".tmp-step_{step:08d}-{os.getpid()}"
    temporary.mkdir()
    tied = tied_parameter_names(model)
    save_file({name: tensor.detach().contiguous() for name, tensor in model_state.items()
               if name not in tied}, str(temporary / MODEL_FILE), metadata={"format": "pt"})
    optimizer_tensors, optimizer_json = flatten_optimizer_state(optimizer_state)
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


def tied_parameter_names(model: torch.nn.Module) -> dict[str, str]:
    """{later name: first name} of parameters registered under more than one name (a tied LM
    head), found by identity, so it holds for plain, DDP-wrapped and FSDP2 models alike."""
    from resstream.parallel.data_parallel import unwrap

    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, param in unwrap(model).named_parameters(remove_duplicate=False):
        if id(param) in first:
            tied[name] = first[id(param)]
        else:
            first[id(param)] = name
    return tied


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


def checkpoint_path(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of `step` lives (or will)."""
    return Path(run_dir) / CHECKPOINTS_DIR / f"step_{step:08d}"


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
    """The checkpoint's weights into a plain (single-process) model."""
    file = checkpoint.path / MODEL_FILE
    try:
        missing, unexpected = load_model(model, str(file), strict=False)
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"checkpoint file {str(file)!r} cannot be read: "
                              f"{_first_line(error)}") from None
    if missing or unexpected:
        raise CheckpointError(f"checkpoint file {str(file)!r} does not fit the model: missing "
                              f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")


def load_training_state(checkpoint: LoadedCheckpoint, model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer) -> None:
    """Weights and optimizer state from the checkpoint into a plain, DDP or FSDP2 model and its
    optimizer (every rank reads the files; `set_state_dict` keeps each rank's shard)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    model_state = _read_tensors(checkpoint.path / MODEL_FILE)
    for name, first in tied_parameter_names(model).items():
        if first in model_state:
            model_state.setdefault(name, model_state[first])
    optimizer_file = checkpoint.path / OPTIMIZER_FILE
    tensors, json_part = _read_tensors(optimizer_file), checkpoint.state["optimizer"]
    if int(checkpoint.state.get("format", 1)) < 2:
        tensors, json_part = _names_for_indices(tensors, json_part, optimizer, model)
    optimizer_state = unflatten_optimizer_state(tensors, json_part)
    try:
        set_state_dict(model, optimizer, model_state_dict=model_state,
                       optim_state_dict=optimizer_state,
                       options=StateDictOptions(full_state_dict=True))
    except (KeyError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"checkpoint {str(checkpoint.path)!r} does not fit the model and "
                              f"optimizer: {_first_line(error)}") from None


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"checkpoint file {str(file)!r} cannot be read: "
                              f"{_first_line(error)}") from None


def _parameter_names_in_order(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> list:
    """The optimizer's parameters' names, in the order a format-1 checkpoint numbered them."""
    from resstream.parallel.data_parallel import unwrap

    names = {id(param): name for name, param in unwrap(model).named_parameters()}
    return [names[id(param)] for group in optimizer.param_groups for param in group["params"]]


def _names_for_indices(tensors: dict, json_part: dict, optimizer, model) -> tuple[dict, dict]:
    """A format-1 optimizer state (keyed by index) keyed by parameter name instead."""
    order = _parameter_names_in_order(optimizer, model)
    renamed = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        renamed[f"state.{order[int(index)]}.{name}"] = value
    groups = [{**group, "params": [order[int(index)] for index in group["params"]]}
              for group in json_part["param_groups"]]
    scalars = {order[int(index)]: values for index, values in json_part.get("scalars", {}).items()}
    return renamed, {**json_part, "param_groups": groups, "scalars": scalars}


# ---------------------------------------------------------------------------- optimizer state

def flatten_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict keyed by parameter name (`get_state_dict`'s) into
    safetensors-ready tensors (``state.<parameter>.<name>``) and the JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param, param_state in state_dict["state"].items():
        for name, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"state.{param}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(param), {})[name] = value
    groups = [{key: (list(value) if isinstance(value, tuple) else value)
               for key, value in group.items()} for group in state_dict["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars,
                     "tuple_keys": sorted({k for g in state_dict["param_groups"]
                                           for k, v in g.items() if isinstance(v, tuple)})}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], json_part: dict) -> dict:
    """The inverse of `flatten_optimizer_state` (a state name never holds a dot; a parameter
    name does)."""
    state: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        param, name = key[len("state."):].rsplit(".", 1)
        state.setdefault(param, {})[name] = value
    for param, values in json_part.get("scalars", {}).items():
        state.setdefault(param, {}).update(values)
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
