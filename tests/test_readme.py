"""Every README snippet runs: ```python blocks are executed in order in one namespace; each
`resstream ...` line of a ```bash block parses with the real CLI (flags and subcommands exist),
and the cheap ones (marked `# runs in tests`) are executed."""
import re
import shlex
from pathlib import Path

import pytest

from resstream.cli import build_parser, main

README = Path(__file__).resolve().parents[1] / "README.md"
DOCS = sorted((README.parent / "docs").glob("*.md"))


def blocks(language: str, path: Path = README) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(), flags=re.S)


def cli_lines() -> list[str]:
    lines = []
    for block in blocks("bash"):
        for line in block.splitlines():
            line = line.split("  #")[0].strip() if "# runs in tests" not in line else line.strip()
            if line.startswith("resstream "):
                lines.append(line)
    return lines


def test_readme_has_the_two_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text


def test_python_snippets_run():
    snippets = blocks("python")
    assert snippets, "README has no python snippet"
    namespace: dict = {}
    for snippet in snippets:
        exec(compile(snippet, str(README), "exec"), namespace)  # noqa: S102 - our own README


@pytest.mark.parametrize("line", cli_lines())
def test_cli_snippets_parse_and_cheap_ones_run(line, tmp_path, monkeypatch):
    runs = "# runs in tests" in line
    argv = shlex.split(line.split("#")[0])[1:]
    build_parser().parse_args(argv)
    if runs:
        monkeypatch.chdir(tmp_path)
        assert main(argv) == 0


def shipped_example(snippet: str) -> Path | None:
    """The repository file a snippet shows, when its first line names one (`# examples/x.py:
    ...`): such a script runs under torchrun, from the doc's bash block (test_doc_commands)."""
    match = re.match(r"# (examples/[\w.]+\.py)\b", snippet)
    return README.parent / match.group(1) if match else None


@pytest.mark.parametrize("doc", [d for d in DOCS if blocks("python", d)], ids=lambda d: d.name)
def test_python_snippets_in_docs_run(doc, tmp_path, monkeypatch):
    """The docs' ```python blocks run in order in one namespace (in a scratch directory, since
    some save files); a block that shows a shipped example is that file, character for
    character."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for snippet in blocks("python", doc):
        example = shipped_example(snippet)
        if example is not None:
            assert example.is_file() and example.read_text() == snippet, example
            continue
        exec(compile(snippet, str(doc), "exec"), namespace)  # noqa: S102 - our own docs
