"""Trainer, configs, checkpoints, exact resume and the train/sample/presets commands."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from resstream.cli import main
from resstream.data.text import load_source, markdown_to_text, shakespeare_play_files
from resstream.errors import UserError
from resstream.train import checkpoint as ckpt
from resstream.train.config import TrainConfig, load_config_file, parse_override
from resstream.train.trainer import Trainer, batch_for_step, lr_at

REPO = Path(__file__).resolve().parents[1]
# Small, fast settings shared by the CLI runs below (tiny preset, 1 thread for determinism).
FAST = ["--preset", "tiny", "--no-progress", "--data.seq_len=32", "--data.batch_size=4",
        "--train.eval_tokens=512", "--train.final_eval_tokens=512", "--train.threads=1"]


# one torch thread per worker comes from conftest.py
pytestmark = pytest.mark.usefixtures("private_data_cache")


@pytest.fixture(scope="module")
def corpus_slice(tmp_path_factory) -> Path:
    """Two real plays from the default corpus (about 280 kB) as a local .txt file."""
    plays = {f.name: f for f in shakespeare_play_files()}
    text = "".join(markdown_to_text(plays[name].read_text(encoding="utf-8"))
                   for name in ("hamlet.md", "macbeth.md"))
    path = tmp_path_factory.mktemp("corpus") / "slice.txt"
    path.write_text(text, encoding="utf-8")
    return path


def run_cli(*args: str) -> int:
    return main([str(a) for a in args])


# ---------------------------------------------------------------------------- config

def test_config_rejects_unknown_keys_listing_valid_ones():
    with pytest.raises(UserError, match=r"unknown config key\(s\) optimizer; valid keys: preset"):
        TrainConfig.from_dict({"optimizer": {}})
    with pytest.raises(UserError, match=r"optim\.lrr; valid keys in optim: lr, min_lr"):
        TrainConfig.from_dict({"optim": {"lrr": 1}})
    with pytest.raises(UserError, match=r"model\.depht.*valid keys in model: vocab_size"):
        TrainConfig.from_dict({"model": {"depht": "ddl"}})
    with pytest.raises(UserError, match=r"unknown config key 'train\.stepz'; valid keys in train"):
        TrainConfig().with_overrides({"train.stepz": 3})


def test_overrides_are_typed_data():
    assert parse_override("--optim.lr=3e-4") == ("optim.lr", "3e-4")  # YAML 1.1 reads a string
    config = TrainConfig().with_overrides(dict([parse_override("--optim.lr=3e-4"),
                                                parse_override("train.compile=true"),
                                                parse_override("--data.seq_len=null"),
                                                parse_override("--model.depth=ddl")]))
    assert config.optim.lr == pytest.approx(3e-4)
    assert config.train.compile is True and config.data.seq_len is None
    assert config.model == {"depth": "ddl"}
    with pytest.raises(UserError, match=r"optim\.lr='fast' is invalid; allowed: a finite number"):
        TrainConfig().with_overrides({"optim.lr": "fast"})
    with pytest.raises(UserError, match=r"optim\.lr=-0\.1 is invalid; allowed: a number > 0"):
        TrainConfig().with_overrides({"optim.lr": -0.1})


def test_config_files_are_parsed_as_data(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("preset: tiny\noptim: {lr: 1e-3}\ntrain: {steps: 7}\n")
    config = TrainConfig.from_dict(load_config_file(yaml_file))
    assert config.optim.lr == pytest.approx(1e-3) and config.train.steps == 7
    json_file = tmp_path / "run.json"
    json_file.write_text(json.dumps({"model": {"depth": "ddl"}, "data": {"batch_size": 3}}))
    assert TrainConfig.from_dict(load_config_file(json_file)).data.batch_size == 3
    evil = tmp_path / "evil.yaml"
    evil.write_text("preset: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(UserError, match="is not valid YAML"):
        load_config_file(evil)


def test_schedule_and_data_order_are_functions_of_step():
    config = TrainConfig.from_dict({"optim": {"lr": 1.0, "min_lr": 0.1, "warmup_steps": 10},
                                    "train": {"steps": 110}})
    assert lr_at(0, config) == pytest.approx(0.1)
    assert lr_at(9, config) == pytest.approx(1.0)
    assert lr_at(60, config) == pytest.approx(0.55)
    assert lr_at(110, config) == pytest.approx(0.1)
    tokens = np.arange(1000, dtype=np.uint8)
    a = batch_for_step(tokens, 16, 4, seed=0, step=5, micro=0)
    b = batch_for_step(tokens, 16, 4, seed=0, step=5, micro=0)
    c = batch_for_step(tokens, 16, 4, seed=0, step=6, micro=0)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    assert torch.equal(a[0][:, 1:], a[1][:, :-1])  # targets are inputs shifted by one


# ---------------------------------------------------------------------------- user errors

def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("case", ["missing", "empty", "latin1", "short", "unknown_key",
                                  "negative_lr", "negative_steps", "preset", "config_key"])
def test_bad_input_is_one_line_and_exit_code_2(case, tmp_path, capsys, corpus_slice):
    data = str(corpus_slice)
    extra: list[str] = []
    expect = ""
    if case == "missing":
        data, expect = str(tmp_path / "nope.txt"), "does not exist"
    elif case == "empty":
        (tmp_path / "empty.txt").write_text("")
        data, expect = str(tmp_path / "empty.txt"), "is empty"
    elif case == "latin1":
        (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1") * 100)
        data, expect = str(tmp_path / "latin1.txt"), "not valid UTF-8"
    elif case == "short":
        (tmp_path / "short.txt").write_text("To be, or not to be.\n" * 3)
        data, expect = str(tmp_path / "short.txt"), "too short"
    elif case == "unknown_key":
        extra, expect = ["--optim.lrr=1"], "valid keys in optim: lr"
    elif case == "negative_lr":
        extra, expect = ["--optim.lr=-1e-3"], "optim.lr=-0.001 is invalid"
    elif case == "negative_steps":
        extra, expect = ["--steps", "-5"], "train.steps=-5 is invalid"
    elif case == "preset":
        extra, expect = ["--preset", "huge"], "preset 'huge' not found; available presets: tiny"
    elif case == "config_key":
        bad = tmp_path / "bad.yaml"
        bad.write_text("trian: {steps: 3}\n")
        extra, expect = ["--config", str(bad)], "unknown config key(s) trian"
    rc = run_cli("train", *FAST, "--data", data, "--out", tmp_path / "run", "--steps", 2, *extra)
    assert rc == 2
    err = _one_line_error(capsys)
    assert err.startswith("resstream train: error: ") and expect in err


def test_run_folder_is_protected(tmp_path, capsys, corpus_slice):
    out = tmp_path / "run"
    args = ["train", *FAST, "--data", corpus_slice, "--out", out, "--steps", 2]
    assert run_cli(*args) == 0
    assert run_cli(*args) == 2
    assert "is not empty; allowed: --resume" in _one_line_error(capsys)
    assert run_cli(*args, "--overwrite") == 0
    stranger = tmp_path / "not_a_run"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("precious")
    assert run_cli("train", *FAST, "--data", corpus_slice, "--out", stranger, "--steps", 2,
                   "--overwrite") == 2
    assert "does not look like a resstream run folder" in _one_line_error(capsys)
    assert (stranger / "notes.txt").exists()


# ---------------------------------------------------------------------------- training

def test_baseline_learns(corpus_slice, tmp_path):
    """The tiny baseline on two plays: from ~8.0 bpb (uniform) to at most 4.6 bpb in 150 steps
    (deterministic seed), i.e. a drop of at least 3.3 bits, and below the ~4.77-bit unigram
    entropy of the validation text, so it has learned more than byte frequencies."""
    config = TrainConfig.from_dict({
        "preset": "tiny", "data": {"source": str(corpus_slice), "seq_len": 64, "batch_size": 16},
        "optim": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 10},
        "train": {"steps": 150, "seed": 0, "eval_every": 150, "eval_tokens": 8192,
                  "final_eval_tokens": 8192, "checkpoint_every": 0, "progress": False}})
    result = Trainer(config, tmp_path / "run").run()
    initial, final = result.evals[0]["val_bpb"], result.final_eval.bpb
    val = np.frombuffer(load_source(str(corpus_slice)).val_text.encode(), dtype=np.uint8)
    counts = np.bincount(val, minlength=256)
    probs = counts[counts > 0] / counts.sum()
    unigram_bits = float(-(probs * np.log2(probs)).sum())
    assert initial > 7.9
    assert final <= 4.6, f"val bpb {initial:.3f} -> {final:.3f}"
    assert final < unigram_bits - 0.1
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert {"train", "eval", "final"} <= {r["kind"] for r in records}
    environment = json.loads((tmp_path / "run" / "environment.json").read_text())
    for key in ("python", "torch", "platform", "resstream_version", "source_sha256"):
        assert environment[key]


def _train_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "resstream", "train", *FAST, "--data", str(data), "--out",
            str(out), "--steps", "12", "--seed", "3", "--train.checkpoint_every=4",
            "--train.eval_every=4", *extra]


def _subprocess_env(tmp_path: Path, slow: bool) -> dict:
    env = {**os.environ, "RESSTREAM_DATA_CACHE": str(tmp_path / "data_cache"),
           "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    if slow:  # 8 s between the first checkpoint and the end: room for a loaded machine to signal
        env["RESSTREAM_TEST_STEP_SLEEP"] = "1.0"
    return env


def _start_reference_and_victim(corpus, tmp_path, straight, victim_dir):
    """Start an uninterrupted run into `straight` and a slowed one into `victim_dir`; return
    both processes once the slowed run has written its first checkpoint (step 4)."""
    reference = subprocess.Popen(_train_cmd(corpus, straight), cwd=tmp_path,
                                 env=_subprocess_env(tmp_path, slow=False),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # Ctrl-C as from a shell: SIGINT at its default, whatever an earlier test in this worker
    # left (an ignored SIGINT is inherited and Python then keeps ignoring it)
    victim = subprocess.Popen(_train_cmd(corpus, victim_dir), cwd=tmp_path,
                              env=_subprocess_env(tmp_path, slow=True),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first_checkpoint = victim_dir / "checkpoints" / "step_00000004"
    deadline = time.monotonic() + 120
    while not first_checkpoint.exists():
        assert victim.poll() is None, victim.communicate()[1].decode()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    return reference, victim


def test_sigkill_and_resume_is_bitwise_exact(corpus_slice, tmp_path):
    """Kill a run with SIGKILL after its first checkpoint, resume it, and compare the final
    weights and optimizer state with an uninterrupted run of the same seed, bit for bit."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    reference, victim = _start_reference_and_victim(corpus_slice, tmp_path, straight, killed)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    assert ckpt.latest_checkpoint(killed).name in ("step_00000004", "step_00000008")

    resumed = subprocess.run(_train_cmd(corpus_slice, killed, "--resume"), cwd=tmp_path,
                             env=_subprocess_env(tmp_path, slow=False), capture_output=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    assert b"resuming" in resumed.stderr
    _, reference_err = reference.communicate(timeout=300)
    assert reference.returncode == 0, reference_err.decode()[-2000:]

    final = "checkpoints/step_00000012"
    for name in (ckpt.MODEL_FILE, ckpt.OPTIMIZER_FILE):
        expected, actual = load_file(straight / final / name), load_file(killed / final / name)
        assert expected.keys() == actual.keys()
        for key in expected:
            assert torch.equal(expected[key], actual[key]), f"{name}:{key} differs"
    finals = [json.loads(line) for line in (killed / "metrics.jsonl").open()
              if '"final"' in line]
    reference_final = [json.loads(line) for line in (straight / "metrics.jsonl").open()
                       if '"final"' in line]
    assert len(finals) == 1 and finals[0]["val_bpb"] == reference_final[0]["val_bpb"]


def test_checkpoint_round_trip_and_corruption(corpus_slice, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("train", *FAST, "--data", corpus_slice, "--out", out, "--steps", 4,
                   "--train.checkpoint_every=2", "--train.keep_checkpoints=1") == 0
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_00000004"]  # keep last K
    loaded = ckpt.read_checkpoint(out)
    assert loaded.step == 4 and loaded.state["data_position"]["next_step"] == 4
    assert set(loaded.state["rng"]) >= {"python", "numpy", "torch"}

    # Resuming a finished run asks for more steps instead of silently doing nothing.
    assert run_cli("train", *FAST, "--data", corpus_slice, "--out", out, "--steps", 4,
                   "--resume") == 2
    assert "already finished at step 4" in _one_line_error(capsys)

    model_file = out / "checkpoints" / "step_00000004" / ckpt.MODEL_FILE
    model_file.write_bytes(model_file.read_bytes()[:100])  # truncate
    assert run_cli("train", *FAST, "--data", corpus_slice, "--out", out, "--steps", 6,
                   "--resume") == 2
    err = _one_line_error(capsys)
    assert str(model_file) in err and "corrupt or truncated" in err

    state_file = model_file.with_name(ckpt.STATE_FILE)
    state_file.write_text(state_file.read_text()[:50])
    with pytest.raises(ckpt.CheckpointError, match=f"{state_file}.*invalid JSON"):
        ckpt.read_checkpoint(out)


def test_non_finite_loss_stops_with_last_good_checkpoint(corpus_slice, tmp_path, capsys):
    out = tmp_path / "run"
    rc = run_cli("train", *FAST, "--data", corpus_slice, "--out", out, "--steps", 10,
                 "--optim.lr=1e30", "--optim.warmup_steps=0", "--train.checkpoint_every=1",
                 "--train.eval_every=0")
    assert rc == 2
    err = _one_line_error(capsys)
    assert "is not finite" in err and "last good checkpoint" in err
    last = ckpt.latest_checkpoint(out)
    assert last is not None and str(last) in err
    ckpt.read_checkpoint(last)  # intact: hashes verify
    records = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert records[-1]["kind"] == "error"


def test_sample_and_presets_commands(corpus_slice, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("train", *FAST, "--data", corpus_slice, "--out", out, "--steps", 2) == 0
    capsys.readouterr()
    assert run_cli("sample", out, "--prompt", "HAMLET:", "--max-new-tokens", 20) == 0
    text = capsys.readouterr().out
    assert text.startswith("HAMLET:")
    assert run_cli("sample", tmp_path / "missing") == 2
    assert "does not exist" in _one_line_error(capsys)
    assert run_cli("presets") == 0
    table = capsys.readouterr().out
    for name in ("tiny", "small", "base"):
        assert f"\n{name} " in table


def _broken_compile(model, **kwargs):
    def fail(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")
    return fail


def _compile_config(corpus_slice, mode):
    return TrainConfig.from_dict({
        "preset": "tiny", "data": {"source": str(corpus_slice), "seq_len": 32, "batch_size": 2},
        "train": {"steps": 2, "compile": mode, "eval_tokens": 64, "final_eval_tokens": 64,
                  "progress": False}})


def test_compile_auto_falls_back_to_eager_and_says_so(corpus_slice, tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "compile", _broken_compile)
    messages: list[str] = []
    run = tmp_path / "run"
    result = Trainer(_compile_config(corpus_slice, "auto"), run, log=messages.append).run()
    assert result.step == 2
    assert any("torch.compile failed (no C++ compiler found); running eagerly" in m
               for m in messages)
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["kind"] == "final" and final["compile"] == "eager fallback: no C++ compiler found"


def test_compile_true_fails_loudly_when_compiling_fails(corpus_slice, tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "compile", _broken_compile)
    with pytest.raises(UserError, match=r"^train.compile=true: torch.compile failed \(no C\+\+ "
                                        r"compiler found\); set train.compile=auto"):
        Trainer(_compile_config(corpus_slice, True), tmp_path / "run", log=lambda m: None).run()


def test_commands_in_docs_parse():
    import re
    import shlex

    from resstream.cli import build_parser

    docs = (REPO / "docs" / "training.md").read_text(encoding="utf-8")
    lines = [line.split("  #")[0].strip()
             for block in re.findall(r"```bash\n(.*?)```", docs, flags=re.S)
             for line in block.splitlines() if line.strip().startswith("resstream ")]
    assert len(lines) >= 5
    for line in lines:
        build_parser().parse_args(shlex.split(line)[1:])


def test_ctrl_c_stops_with_a_checkpoint_and_resume_matches_an_uninterrupted_run(corpus_slice,
                                                                               tmp_path):
    """SIGINT mid-run: one line on stderr naming the checkpoint of the last completed step,
    exit code 130; --resume from it ends bitwise equal to a run that was never interrupted."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    reference, victim = _start_reference_and_victim(corpus_slice, tmp_path, straight, stopped)
    victim.send_signal(signal.SIGINT)
    _, err = victim.communicate(timeout=120)
    assert victim.returncode == 130, err.decode()[-2000:]
    line = err.decode().strip().splitlines()[-1]
    assert line.startswith("resstream train: interrupted at step ") and "--resume" in line
    step = int(line.split("interrupted at step ")[1].split()[0])
    assert 4 <= step < 12
    saved = ckpt.latest_checkpoint(stopped)
    assert saved.name == f"step_{step:08d}" and str(saved) in line
    ckpt.read_checkpoint(saved)  # complete: both hashes verify

    resumed = subprocess.run(_train_cmd(corpus_slice, stopped, "--resume"), cwd=tmp_path,
                             env=_subprocess_env(tmp_path, slow=False), capture_output=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    assert f"from step {step}".encode() in resumed.stderr
    _, reference_err = reference.communicate(timeout=300)
    assert reference.returncode == 0, reference_err.decode()[-2000:]
    final = "checkpoints/step_00000012"
    for name in (ckpt.MODEL_FILE, ckpt.OPTIMIZER_FILE):
        expected, actual = load_file(straight / final / name), load_file(stopped / final / name)
        for key in expected:
            assert torch.equal(expected[key], actual[key]), f"{name}:{key} differs"


def test_tensorboard_logging_mirrors_the_metrics(corpus_slice, tmp_path, monkeypatch):
    """train.log=tensorboard writes train/loss, train/lr and val/bpb through torch's
    SummaryWriter (faked here: tensorboard is not a dependency); without the package, the run
    refuses with one line before touching --out."""
    import types

    calls: list = []

    class FakeWriter:
        def __init__(self, log_dir, purge_step=None):
            calls.append(("init", log_dir))

        def add_scalar(self, tag, value, global_step):
            calls.append((tag, global_step, value))

        def close(self):
            calls.append(("close",))

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    config = TrainConfig.from_dict({
        "preset": "tiny", "data": {"source": str(corpus_slice), "seq_len": 32, "batch_size": 2},
        "train": {"steps": 2, "log": "tensorboard", "log_every": 1, "eval_every": 1,
                  "eval_tokens": 64, "final_eval_tokens": 64, "progress": False}})
    Trainer(config, tmp_path / "run").run()
    assert calls[0] == ("init", str(tmp_path / "run" / "tensorboard")) and calls[-1] == ("close",)
    tags = {(call[0], call[1]) for call in calls[1:-1]}
    assert {("train/loss", 1), ("train/lr", 2), ("val/bpb", 0), ("val/bpb", 2)} <= tags
    assert (tmp_path / "run" / "metrics.jsonl").stat().st_size > 0  # JSONL is always written

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # not installed
    with pytest.raises(UserError, match="pip install tensorboard"):
        Trainer(config, tmp_path / "other").run()
    assert not (tmp_path / "other").exists()
