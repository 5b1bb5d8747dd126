"""Every shell command of README.md and docs/*.md runs, as written, at a tiny budget.

The commands of every ```bash / ```sh / ```shell / ```console block are extracted (trailing
`# comments` stripped, `\\` continuations joined, `$ ` prompts removed; in a console block only
the `$ ` lines are commands) and run with bash, one test each, in file order, in one temporary
working directory per document (so `resstream train ... --out runs/my-run` runs before
`resstream generate --checkpoint runs/my-run`). That directory holds a copy of the repository's
`configs/` and `examples/`, as the repository root does. The environment sets
RESSTREAM_SMOKE=1 (resstream.smoke: the commands cap their own steps, repeats, sizes and
tokens; the text is never edited),
RESSTREAM_DATA_CACHE to a cache of the test's own, one torch thread and the venv's bin/ first on
PATH. Each command must exit 0, or the code its comment documents ("# ... exits 2 ...").

`make` lines: `make test` would run this suite again, so only `make -n test` is checked; for
`make demo`, `make -n demo` must succeed and its last line (the demo command) is run in the
working directory. Any other command must be in ALLOWED (with the reason it cannot run here),
so a new kind of command in the docs fails this test until it is handled.

Under pytest-xdist a worker may receive a command without the ones before it: it first replays
the earlier commands of that document in its own working directory.
"""
from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGUAGES = ("bash", "sh", "shell", "console")
VENV_BIN = Path(sys.executable).parent
COMMAND_TIMEOUT_S = 400  # per command: a smoke-mode study takes about 30 s alone, minutes when
# the machine is loaded (seen: over 120 s with two trainings on both cores)
MAKE_TIMEOUT_S = 30

# Commands that cannot run here, each with the reason. Keys are commands exactly as extracted.
# An entry no document contains any more fails test_allow_list_is_current.
ALLOWED: dict[str, str] = {}

# make targets: "dry" = only `make -n TARGET` is checked; "run" = `make -n TARGET` is checked and
# the last command it prints is run.
MAKE_TARGETS = {"test": "dry", "demo": "run"}

_FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
_EXIT_CODE = re.compile(r"\bexits?\s+(?:with\s+)?(?:(?:exit\s+)?code\s+)?(\d+)\b")


@dataclass(frozen=True)
class Command:
    doc: str  # path relative to the repository root
    index: int  # position among the document's commands
    text: str  # the command as run
    expected: int = 0  # the documented exit code

    @property
    def id(self) -> str:
        return f"{self.doc}#{self.index}: {self.text}"


def split_comment(line: str) -> tuple[str, str]:
    """(code, comment) of one shell line: the comment starts at an unquoted '#' that begins a
    word."""
    quote, index = None, 0
    while index < len(line):
        char = line[index]
        if quote == "'":
            quote = None if char == "'" else quote
        elif char == "\\":
            index += 1  # the next character is escaped (also inside double quotes)
        elif quote == '"':
            quote = None if char == '"' else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index].rstrip(), line[index + 1:].strip()
        index += 1
    return line.rstrip(), ""


def block_commands(language: str, body: str) -> list[tuple[str, int]]:
    """The (command, expected exit code) pairs of one fenced block."""
    commands, pending, comments = [], None, []
    for raw in body.splitlines():
        line = raw.strip()
        if pending is None:
            if language == "console" and not line.startswith("$ "):
                continue  # output shown in a console block
            if line.startswith("$ "):
                line = line[2:].strip()
        code, comment = split_comment(line)
        if comment:
            comments.append(comment)
        continued = code.endswith("\\")
        code = code[:-1].rstrip() if continued else code
        pending = code if pending is None else f"{pending} {code.strip()}".strip()
        if continued:
            continue
        if pending:
            codes = [int(m.group(1)) for c in comments for m in _EXIT_CODE.finditer(c)]
            commands.append((pending, codes[-1] if codes else 0))
        pending, comments = None, []
    if pending:
        commands.append((pending, 0))
    return commands


def doc_commands(path: Path) -> list[Command]:
    commands = []
    for match in _FENCE.finditer(path.read_text(encoding="utf-8")):
        language, body = match.group(1).lower(), match.group(2)
        if language not in SHELL_LANGUAGES:
            continue
        for text, expected in block_commands(language, body):
            commands.append(Command(str(path.relative_to(ROOT)), len(commands), text, expected))
    return commands


ALL_COMMANDS = {doc: doc_commands(doc) for doc in DOCS}
COMMANDS = [command for commands in ALL_COMMANDS.values() for command in commands]


# ------------------------------------------------------------------------------- running

def _environment(data_cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(RESSTREAM_SMOKE="1", RESSTREAM_DATA_CACHE=str(data_cache),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}")
    env.pop("PYTEST_XDIST_WORKER", None)
    return env


def _run(text: str, cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["bash", "-c", text], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"`{text}` did not finish within {timeout:.0f} s (in {cwd}); output so far:\n"
                    f"{_tail(error.stdout)}\n{_tail(error.stderr)}")


def _tail(text, limit: int = 3000) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    text = text or ""
    return text if len(text) <= limit else "...\n" + text[-limit:]


def _check(result: subprocess.CompletedProcess, text: str, expected: int, what: str = "") -> None:
    if result.returncode != expected:
        pytest.fail(f"{what}`{text}` exited {result.returncode} (documented: {expected})\n"
                    f"--- stdout\n{_tail(result.stdout)}\n--- stderr\n{_tail(result.stderr)}")


@functools.lru_cache(maxsize=None)
def _compare_available() -> bool:
    """Whether `resstream compare` exists (it replaces `resstream demo`)."""
    result = subprocess.run([str(VENV_BIN / "resstream"), "compare", "--help"], capture_output=True,
                            text=True, timeout=COMMAND_TIMEOUT_S, env=_environment(Path(tempfile.gettempdir())),
                            stdin=subprocess.DEVNULL)
    return result.returncode == 0


def _xfail_if_compare_missing(text: str) -> None:
    words = shlex.split(text)
    # `resstream report DIR` reads what `resstream compare` wrote
    if len(words) >= 2 and Path(words[0]).name == "resstream" and words[1] in ("compare", "report") \
            and not _compare_available():
        pytest.xfail("compare command not yet available")


def _make_command(text: str, cwd: Path, env: dict) -> str | None:
    """For a `make TARGET` line: check `make -n TARGET` and return the command to run (None: none)."""
    words = shlex.split(text)
    targets = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
    variables = [w for w in words[1:] if "=" in w and not w.startswith("-")]
    if len(targets) != 1 or targets[0] not in MAKE_TARGETS:
        pytest.fail(f"`{text}`: no rule in tests/test_doc_commands.py for this make target; "
                    f"handled: {', '.join(MAKE_TARGETS)} (add it to MAKE_TARGETS or ALLOWED)")
    dry = ["make", "-C", str(ROOT), "-n", *variables, targets[0]]
    result = subprocess.run(dry, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=MAKE_TIMEOUT_S, stdin=subprocess.DEVNULL)
    _check(result, shlex.join(dry), 0)
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip()
             and not line.startswith("make")]
    assert lines, f"`{shlex.join(dry)}` prints no command"
    if MAKE_TARGETS[targets[0]] == "dry":
        return None
    # the recipe's last line, with the venv's programs (relative to the Makefile) made absolute
    program, *rest = shlex.split(lines[-1])
    if "/" in program and not Path(program).is_absolute():
        program = str(ROOT / program)
    return shlex.join([program, *rest])


def run_command(command: Command, cwd: Path, data_cache: Path) -> None:
    env = _environment(data_cache)
    words = shlex.split(command.text)
    text = command.text
    if words[0] == "make":
        text = _make_command(command.text, cwd, env)
        if text is None:
            return
    elif command.text in ALLOWED:
        pytest.skip(f"allow-listed: {ALLOWED[command.text]}")
    elif not (words[0] == "resstream" or words[:3] in (["python", "-m", "resstream"],
                                                       ["python3", "-m", "resstream"])
              or _is_torchrun_of_resstream(words)):
        pytest.fail(f"`{command.text}` ({command.doc}) is a kind of command this test does not "
                    "know how to run: handle it in tests/test_doc_commands.py or add it to "
                    "ALLOWED with the reason it cannot run here")
    _xfail_if_compare_missing(text)
    _check(_run(text, cwd, env, COMMAND_TIMEOUT_S), text, command.expected)


def _is_torchrun_of_resstream(words: list[str]) -> bool:
    """`torchrun ... -m resstream ...` or `torchrun ... examples/NAME.py` (docs/distributed.md):
    run as written, on CPU with gloo."""
    return words[0] == "torchrun" and any(
        words[i:i + 2] == ["-m", "resstream"]
        or (words[i].startswith("examples/") and (ROOT / words[i]).is_file())
        for i in range(len(words)))


@dataclass
class _Workdir:
    path: Path
    done: int = 0  # commands of the document run so far in this process


_WORKDIRS: dict[str, _Workdir] = {}


def _workdir(doc: str, factory) -> _Workdir:
    if doc not in _WORKDIRS:
        path = factory.mktemp(re.sub(r"\W", "_", doc))
        for shipped in ("configs", "examples"):
            if (ROOT / shipped).is_dir():
                shutil.copytree(ROOT / shipped, path / shipped)
        _WORKDIRS[doc] = _Workdir(path)
    return _WORKDIRS[doc]


@pytest.mark.timeout(900)  # a worker that gets a late command alone replays the earlier ones
@pytest.mark.parametrize("command", COMMANDS, ids=[c.id for c in COMMANDS])
def test_documented_command_runs(command, tmp_path, tmp_path_factory):
    workdir = _workdir(command.doc, tmp_path_factory)
    earlier = ALL_COMMANDS[ROOT / command.doc]
    while workdir.done < command.index:  # replay what this process has not run yet (xdist)
        previous = earlier[workdir.done]
        workdir.done += 1
        try:
            run_command(previous, workdir.path, tmp_path / f"data_cache_{previous.index}")
        except BaseException:  # noqa: BLE001 - its own test reports it; go on with this one
            pass
    workdir.done = command.index + 1
    run_command(command, workdir.path, tmp_path / "data_cache")


# ------------------------------------------------------------------------------- the extraction

def test_every_document_with_a_shell_block_has_commands():
    assert len(COMMANDS) >= 10, [c.id for c in COMMANDS]
    assert any(c.doc == "README.md" for c in COMMANDS)


def test_allow_list_is_current():
    texts = {c.text for c in COMMANDS}
    assert not set(ALLOWED) - texts, "ALLOWED names commands no document contains any more"


def test_extraction_handles_prompts_comments_continuations_and_exit_codes():
    body = ("# a comment line\n"
            "resstream train --out runs/a   # trains\n"
            "$ resstream bench decode \\\n"
            "    --contexts 16,32 \\\n"
            "    --threads 1   # continued\n"
            "resstream generate --prompt \"a # not a comment\"\n"
            "resstream train --bad   # exits 2: one line on stderr\n")
    assert block_commands("bash", body) == [
        ("resstream train --out runs/a", 0),
        ("resstream bench decode --contexts 16,32 --threads 1", 0),
        ('resstream generate --prompt "a # not a comment"', 0),
        ("resstream train --bad", 2)]
    console = "$ resstream presets\npreset  layers\ntiny    2\n$ resstream duality  # fast\n"
    assert block_commands("console", console) == [("resstream presets", 0),
                                                  ("resstream duality", 0)]
    assert split_comment("echo 'a # b' # c") == ("echo 'a # b'", "c")
    assert split_comment("echo a#b") == ("echo a#b", "")


# ------------------------------------------------------------------------------- smoke mode

def test_smoke_mode_caps_training_and_a_resume_still_extends(monkeypatch, tmp_path):
    import json

    from resstream.cli import build_parser
    from resstream.train.commands import build_train_config
    from resstream.train.run_folder import write_marker
    from resstream.train.trainer import CONFIG_FILE

    parse = build_parser().parse_args
    argv = ["train", "--preset", "tiny", "--steps", "1000", "--out", str(tmp_path / "run")]
    monkeypatch.delenv("RESSTREAM_SMOKE", raising=False)
    assert build_train_config(parse(argv))[0].train.steps == 1000
    monkeypatch.setenv("RESSTREAM_SMOKE", "1")
    config, run_dir = build_train_config(parse(argv))
    loop = config.train
    assert (loop.steps, loop.eval_tokens, loop.final_eval_tokens) == (2, 512, 512)
    assert loop.eval_every <= 2
    run_dir.mkdir()
    write_marker(run_dir)
    (run_dir / CONFIG_FILE).write_text(json.dumps(config.to_dict()))
    resumed = ["train", "--out", str(run_dir), "--resume"]
    assert build_train_config(parse(resumed))[0].train.steps == 2  # nothing more to do
    assert build_train_config(parse(resumed + ["--steps", "2000"]))[0].train.steps == 4


def test_smoke_args_sets_a_benchmarks_quick_shapes(monkeypatch, capsys):
    import argparse

    from resstream.smoke import smoke_args

    args = argparse.Namespace(quick=False, no_flex=False)
    monkeypatch.delenv("RESSTREAM_SMOKE", raising=False)
    smoke_args(args, "bench attention", quick=True, no_flex=True)
    assert (args.quick, args.no_flex) == (False, False)
    monkeypatch.setenv("RESSTREAM_SMOKE", "1")
    smoke_args(args, "bench attention", quick=True, no_flex=True)
    assert (args.quick, args.no_flex) == (True, True)
    assert "--quick, --no-flex" in capsys.readouterr().err
