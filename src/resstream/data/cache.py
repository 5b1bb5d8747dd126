"""Prepared-data cache: token files read through `np.memmap`, described by a JSON manifest.

Layout, one folder per source under the cache root (``$RESSTREAM_DATA_CACHE`` or
``./data_cache``)::

    data_cache/<source-slug>-<hash of the source spec>/
        train.bin      flat token ids (dtype from the manifest; uint8 for the byte tokenizer)
        val.bin
        manifest.json  source, fingerprint of the raw input, byte and token counts, sha256 of
                       both token files, tokenizer, resstream and source-package versions

The cache is used only if the manifest matches everything that determines its content: the
source's fingerprint (sha256 over file names and raw bytes, so any edit, addition, removal or
rename invalidates it), the tokenizer, the cache format and the resstream version, and both
token files still hash to the recorded sha256. Otherwise the text is prepared again and the
files are rewritten atomically (temporary name, then rename; the manifest last).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from resstream.data.text import load_source, source_fingerprint
from resstream.data.tokenizer import ByteTokenizer, get_tokenizer

CACHE_FORMAT = 1  # bump when the conversion or file layout changes
CACHE_ENV = "RESSTREAM_DATA_CACHE"
DEFAULT_CACHE_DIR = "data_cache"


@dataclass
class PreparedData:
    """Memory-mapped train and validation tokens of one source."""

    source: str
    train: np.ndarray
    val: np.ndarray
    manifest: dict
    directory: Path
    tokenizer: ByteTokenizer
    from_cache: bool

    @property
    def train_bytes(self) -> int:
        return int(self.manifest["train_bytes"])

    @property
    def val_bytes(self) -> int:
        return int(self.manifest["val_bytes"])


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR)


def prepare_data(source: str, cache_dir: str | Path | None = None, tokenizer: str = "bytes",
                 rebuild: bool = False) -> PreparedData:
    """Tokens of `source`, from the cache when it is still valid, else prepared and cached."""
    tok = get_tokenizer(tokenizer)
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    folder = root / cache_folder_name(source)
    fingerprint = source_fingerprint(source)  # None for hf: (must load to know)
    if not rebuild and fingerprint is not None:
        cached = _open_if_valid(folder, source, fingerprint, tok)
        if cached is not None:
            return cached
    text_source = load_source(source)
    if not rebuild and fingerprint is None:
        cached = _open_if_valid(folder, source, text_source.fingerprint, tok)
        if cached is not None:
            return cached
    train = tok.encode(text_source.train_text)
    val = tok.encode(text_source.val_text)
    manifest = {
        "format": CACHE_FORMAT,
        "source": source,
        "source_fingerprint": text_source.fingerprint,
        "provenance": text_source.provenance,
        "tokenizer": tok.to_dict(),
        "train_bytes": len(text_source.train_text.encode("utf-8")),
        "val_bytes": len(text_source.val_text.encode("utf-8")),
        "train_tokens": int(train.size),
        "val_tokens": int(val.size),
        "train_sha256": _sha256(train.tobytes()),
        "val_sha256": _sha256(val.tobytes()),
        "resstream_version": _resstream_version(),
    }
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes(folder / "train.bin", train.tobytes())
    _atomic_write_bytes(folder / "val.bin", val.tobytes())
    # The manifest goes last: a crash before this leaves no manifest that vouches for the files.
    _atomic_write_bytes(folder / "manifest.json",
                        (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return _open(folder, source, manifest, tok, from_cache=False)


def cache_folder_name(source: str) -> str:
    """Readable, collision-free folder name for a source spec (local paths made absolute)."""
    key = source.strip()
    if key != "shakespeare" and not key.startswith("hf:"):
        key = str(Path(key).expanduser().resolve())
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(key.rstrip("/")).name or key).strip("-")[:40]
    return f"{slug or 'data'}-{_sha256(key.encode('utf-8'))[:12]}"


def _open_if_valid(folder: Path, source: str, fingerprint: str,
                   tok: ByteTokenizer) -> PreparedData | None:
    manifest_path = folder / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    expected = {"format": CACHE_FORMAT, "source_fingerprint": fingerprint,
                "tokenizer": tok.to_dict(), "resstream_version": _resstream_version()}
    if any(manifest.get(key) != value for key, value in expected.items()):
        return None
    for split in ("train", "val"):
        try:
            digest = _sha256((folder / f"{split}.bin").read_bytes())
        except OSError:
            return None
        if digest != manifest.get(f"{split}_sha256"):
            return None
    return _open(folder, source, manifest, tok, from_cache=True)


def _open(folder: Path, source: str, manifest: dict, tok: ByteTokenizer,
          from_cache: bool) -> PreparedData:
    arrays = [_memmap(folder / f"{split}.bin", tok.dtype) for split in ("train", "val")]
    return PreparedData(source, arrays[0], arrays[1], manifest, folder, tok, from_cache)


def _memmap(path: Path, dtype) -> np.ndarray:
    # np.memmap refuses empty files; an empty split is a plain empty array.
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _resstream_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("resstream")
    except PackageNotFoundError:  # running from a source tree without installing
        return "unknown"
