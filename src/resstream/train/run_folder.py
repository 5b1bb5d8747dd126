"""What makes a folder a resstream training run, and which of its files the run owns.

The trainer writes a marker file, ``resstream_run.json`` ({"kind": "resstream-train-run",
"format": 1, ...}), into every run folder before anything else. `--overwrite` and `--resume`
act only on folders that hold it: ``config.json`` or ``metrics.jsonl`` alone prove nothing (a
Hugging Face model folder has a config.json). `--overwrite` then deletes only the files a run
writes (`OWN_ENTRIES`); anything else in the folder is left where it is.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from resstream.errors import UserError

MARKER_FILE = "resstream_run.json"
KIND = "resstream-train-run"
FORMAT = 1
TENSORBOARD_DIR = "tensorboard"
# Everything a run writes at its top level (the names match trainer.py and checkpoint.py).
OWN_ENTRIES = (MARKER_FILE, "config.json", "model_config.json", "environment.json",
               "data_manifest.json", "metrics.jsonl", "checkpoints", TENSORBOARD_DIR)


def write_marker(run_dir: Path) -> None:
    """Mark `run_dir` as a run folder (kept as is if it already is one: resumed runs)."""
    path = Path(run_dir) / MARKER_FILE
    if path.is_file():
        return
    from resstream.data.cache import _resstream_version

    marker = {"kind": KIND, "format": FORMAT, "resstream_version": _resstream_version(),
              "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def marker_problem(run_dir: Path) -> str | None:
    """None if `run_dir` holds a valid marker, else what is wrong, in a few words."""
    path = Path(run_dir) / MARKER_FILE
    if not path.is_file():
        return f"no {MARKER_FILE}; found: {describe_contents(run_dir)}"
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"{MARKER_FILE} is not valid JSON"
    if not isinstance(marker, dict) or marker.get("kind") != KIND:
        kind = marker.get("kind") if isinstance(marker, dict) else None
        return f"{MARKER_FILE} has kind={kind!r}, not {KIND!r}"
    if not isinstance(marker.get("format"), int) or marker["format"] > FORMAT:
        return (f"{MARKER_FILE} has format={marker.get('format')!r}, newer than this "
                f"resstream's {FORMAT}")
    return None


def require_run_folder(run_dir: Path, flag: str) -> None:
    """Refuse (one line) to resume or overwrite a folder that is not a resstream run."""
    problem = marker_problem(run_dir)
    if problem is not None:
        raise UserError(f"{flag} refused: {str(run_dir)!r} does not look like a resstream run "
                        f"folder ({problem}); allowed: a folder written by `resstream train`, "
                        "or a new or empty --out")


def describe_contents(folder: Path, limit: int = 4) -> str:
    """The first few entries of a folder, sorted, for error messages."""
    if not Path(folder).is_dir():
        return "nothing (no such folder)"
    names = sorted(child.name + ("/" if child.is_dir() else "") for child in Path(folder).iterdir())
    shown = ", ".join(names[:limit])
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return (shown + more) or "nothing"


def remove_own_files(run_dir: Path) -> list[str]:
    """Delete what a run wrote into `run_dir` (its OWN_ENTRIES and their temporaries); return
    the names of the entries it left because they are not the run's."""
    own = set(OWN_ENTRIES) | {name + ".tmp" for name in OWN_ENTRIES}
    kept = []
    # the marker goes last: a folder left half-cleared by a kill is still recognisably a run
    for child in sorted(Path(run_dir).iterdir(), key=lambda c: (c.name == MARKER_FILE, c.name)):
        if child.name not in own:
            kept.append(child.name)
        elif child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    return kept


def is_run_folder(run_dir: Path) -> bool:
    return marker_problem(run_dir) is None
