"""One loader for inference (`resstream generate` / `sample`, scripts): a model from any of the
three folders resstream writes.

* a Hugging Face save folder (`resstream.hf.save_model` or HF `save_pretrained`): config.json
  holding the ModelConfig + *.safetensors;
* a training run folder (`resstream train --out DIR`): its newest checkpoints/step_NNNNNNNN;
* one checkpoint folder (trainer_state.json + model.safetensors), or a file inside one.

A run folder holds a config.json too (the *training* config), so the kind of folder is decided
by the files that only that kind writes, never by config.json alone.

This module imports the model and the HF layout; `resstream.generation` imports it only inside
its command, so that generation -> loading -> hf -> model never closes an import cycle.
"""
from __future__ import annotations

from pathlib import Path

import torch

from resstream.errors import UserError

ALLOWED = ("a Hugging Face save folder (config.json + *.safetensors), a training run folder "
           "or one of its checkpoints/step_NNNNNNNN folders")


def load_for_inference(path: str | Path, device: str | torch.device = "cpu",
                       dtype: torch.dtype | None = None):
    """The `ResStreamLM` saved at `path` (see the module docstring), in eval mode."""
    folder = _folder(path)
    kind = folder_kind(folder)
    if kind == "hf":
        from resstream.hf import load_model

        model = load_model(folder, device=device)
    else:
        model = _load_training_checkpoint(folder, device)
    model = model if dtype is None else model.to(dtype)
    return model.eval()


def _folder(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; allowed: {ALLOWED}")
    return path.parent if path.is_file() else path


def folder_kind(folder: Path) -> str:
    """The kind of saved folder, "checkpoint", "run" or "hf" (a one-line UserError if none)."""
    from resstream.train import checkpoint as ckpt
    from resstream.train.run_folder import MARKER_FILE, describe_contents

    if (folder / ckpt.STATE_FILE).is_file():
        return "checkpoint"
    if (folder / MARKER_FILE).is_file() or (folder / ckpt.CHECKPOINTS_DIR).is_dir():
        return "run"
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return "hf"
    raise UserError(f"{str(folder)!r} holds no saved model (found: {describe_contents(folder)}); "
                    f"allowed: {ALLOWED}")


def _load_training_checkpoint(folder: Path, device):
    """A run folder's newest checkpoint, or one checkpoint folder (hashes verified)."""
    from resstream.config import ModelConfig
    from resstream.model import ResStreamLM
    from resstream.train import checkpoint as ckpt

    loaded = ckpt.read_checkpoint(folder, verify=True)
    model = ResStreamLM(ModelConfig.from_dict(loaded.state["model_config"]))
    ckpt.load_model_weights(loaded, model)
    return model.to(device)
