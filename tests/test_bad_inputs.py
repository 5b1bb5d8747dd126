"""Bad input of every kind a new user can give: config fields, option values, data paths, output
folders, checkpoints, generation arguments and API calls. Each gives ONE line naming the value
and what is allowed (exit code 2 on the command line, a UserError in Python), never a
traceback, and never costs an earlier run any of its files."""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from resstream.cli import main
from resstream.config import ModelConfig
from resstream.errors import UserError
from resstream.train.config import LoopConfig, OptimConfig, TrainConfig

pytestmark = pytest.mark.usefixtures("private_data_cache")

# A one-step tiny run; evaluation and checkpoints as small as they go.
BASE = ["--preset", "tiny", "--steps", "1", "--no-progress", "--data.seq_len=32",
        "--data.batch_size=2", "--train.eval_every=0", "--train.eval_tokens=64",
        "--train.final_eval_tokens=64", "--train.threads=1"]
NO_CUDA = not torch.cuda.is_available()


def _tensorboard_installed() -> bool:
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    lines = [f"line {i}: to be, or not to be, that is the question {i * 7 % 13}.\n"
             for i in range(300)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("".join(lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, corpus) -> Path:
    """A complete one-step run folder (copied before a case may touch it)."""
    root = tmp_path_factory.mktemp("finished")
    out = root / "run"
    assert main(["train", *BASE, "--data", str(corpus), "--out", str(out),
                 f"--data.cache_dir={root / 'cache'}"]) == 0
    return out


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    from resstream.hf import save_model
    from resstream.model import ResStreamLM
    from resstream.testing import tiny_config

    path = tmp_path_factory.mktemp("saved") / "model"
    save_model(ResStreamLM(tiny_config(vocab_size=256)), path)
    return path


def snapshot(folder: Path) -> dict[str, str]:
    """Every file below `folder` with the sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------- set-ups
# Each returns (argv after "resstream", a folder whose files must survive, or None).

def train(*extra):
    def build(tmp, corpus, run):
        return ["train", *BASE, "--data", str(corpus), "--out", str(tmp / "new"), *extra], None
    return build


def train_data(make):
    """A run on the data file or folder that make(tmp) creates."""
    def build(tmp, corpus, run):
        return ["train", *BASE, "--data", str(make(tmp)), "--out", str(tmp / "new")], None
    return build


def into(make_folder, *extra):
    """A run into an existing folder that make_folder(tmp, run) prepares."""
    def build(tmp, corpus, run):
        folder = make_folder(tmp, run)
        return ["train", *BASE, "--data", str(corpus), "--out", str(folder), *extra], folder
    return build


def generate(*extra, checkpoint=None):
    def build(tmp, corpus, run):
        target = checkpoint(tmp, run) if checkpoint else tmp.parent / "saved"
        return ["generate", "--checkpoint", str(target), "--prompt", "to be", *extra], None
    return build


def _file(name, data: bytes):
    def make(tmp):
        (tmp / name).write_bytes(data)
        return tmp / name
    return make


def _empty_folder(tmp):
    (tmp / "no_text").mkdir()
    (tmp / "no_text" / "notes.md").write_text("not a .txt file")
    return tmp / "no_text"


def copy_run(tmp, run):
    shutil.copytree(run, tmp / "run")
    return tmp / "run"


def hf_folder(tmp, run):
    """What a Hugging Face model folder looks like: config.json and weights, no marker."""
    folder = tmp / "hf_model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "tokenizer.json").write_text("{}")
    return folder


def legacy_folder(tmp, run):
    """A folder with config.json and metrics.jsonl, which used to be enough to be deleted."""
    folder = tmp / "looks_like_a_run"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "metrics.jsonl").write_text("")
    (folder / "thesis.tex").write_text("years of work")
    return folder


def foreign_marker(tmp, run):
    folder = copy_run(tmp, run)
    (folder / "resstream_run.json").write_text('{"kind": "something-else", "format": 1}')
    return folder


def a_file(tmp, run):
    (tmp / "out.txt").write_text("a file, not a folder")
    return tmp / "out.txt"


def stranger(tmp, run):
    folder = tmp / "stranger"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    return folder


def changed_data(tmp, run):
    """A run whose training text (a copy, at the path its config names) gained a line."""
    folder = copy_run(tmp, run)
    config = json.loads((folder / "config.json").read_text())
    copy = tmp / "corpus.txt"
    copy.write_text(Path(config["data"]["source"]).read_text() + "one more line\n")
    config["data"]["source"] = str(copy)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def resume_changed_data(tmp, corpus, run):
    folder = changed_data(tmp, run)
    return ["train", "--out", str(folder), "--resume", "--steps", "3", "--no-progress"], folder


def truncated_weights(tmp, run):
    folder = copy_run(tmp, run)
    weights = next(folder.glob("checkpoints/step_*/model.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    return folder


def broken_state(tmp, run):
    folder = copy_run(tmp, run)
    state = next(folder.glob("checkpoints/step_*/trainer_state.json"))
    state.write_text(state.read_text()[:40])
    return folder


def no_checkpoints(tmp, run):
    folder = copy_run(tmp, run)
    shutil.rmtree(folder / "checkpoints")
    return folder


def config_file(text):
    def make(tmp):
        (tmp / "run.yaml").write_text(text)
        return tmp / "run.yaml"
    return make


def with_config(make, *extra):
    def build(tmp, corpus, run):
        return ["train", "--config", str(make(tmp)), *BASE, "--data", str(corpus),
                "--out", str(tmp / "new"), *extra], None
    return build


CLI_CASES = {
    # ---- item 1: vocabulary
    "vocab_below_tokenizer": (train("--model.vocab_size=100"),
                              "model.vocab_size=100 is invalid; allowed: at least 256"),
    # ---- item 2: float fields finite and in range
    "init_std_negative": (train("--model.init_std=-1"),
                          "init_std=-1.0 is invalid; allowed: a finite number > 0"),
    "eps_infinite": (train("--optim.eps=.inf"), "optim.eps=inf is invalid; allowed: a finite"),
    "rope_theta_infinite": (train("--model.rope_theta=.inf"), "rope_theta=inf is invalid"),
    "lr_nan": (train("--optim.lr=.nan"), "optim.lr=nan is invalid; allowed: a finite number"),
    "weight_decay_nan": (train("--optim.weight_decay=.nan"), "optim.weight_decay=nan"),
    "grad_clip_infinite": (train("--optim.grad_clip=.inf"), "optim.grad_clip=inf is invalid"),
    "norm_eps_nan": (train("--model.norm_eps=.nan"), "norm_eps=nan is invalid"),
    "norm_eps_too_big": (train("--model.norm_eps=2"), "norm_eps=2.0 is invalid; allowed: a"),
    "beta1_one": (train("--optim.beta1=1"), "optim.beta1=1.0 is invalid; allowed: a number in"),
    "min_lr_above_lr": (train("--optim.min_lr=1"), "optim.min_lr=1.0 is invalid"),
    "grad_clip_negative": (train("--optim.grad_clip=-1"), "optim.grad_clip=-1.0 is invalid"),
    "option_float_nan": (train("--model.depth=ddl", "--model.depth_options.beta_init=.nan"),
                         "depth_options[ddl].beta_init=nan is invalid; allowed: a finite"),
    "option_float_infinite": (train("--model.depth=vertical",
                                    "--model.depth_options.init_adjacent_logit=-.inf"),
                              "depth_options[vertical].init_adjacent_logit=-inf is invalid"),
    "option_float_text": (train("--model.depth=ddl", "--model.depth_options.beta_init=big"),
                          "depth_options[ddl].beta_init='big' is invalid; allowed: a finite"),
    # ---- item 3: threads
    "threads_huge": (train("--train.threads=100000"),
                     "train.threads=100000 is invalid; allowed: an integer in 1.."),
    "threads_zero": (train("--train.threads=0"), "train.threads=0 is invalid"),
    # ---- item 7: devices
    "device_not_a_device": (train("--train.device=gpu"),
                            "train.device='gpu' is not a device; allowed: auto, cpu, cuda, cuda:N"),
    "device_type_meta": (train("--train.device=meta"), "train.device='meta' is not a device"),
    "device_missing": (train("--train.device=cuda:99"), "train.device=cuda:99 is unavailable"),
    # ---- item 9: logging
    "log_unknown": (train("--train.log=wandb"),
                    "train.log='wandb' is invalid; allowed: jsonl, tensorboard"),
    # ---- other config fields
    "precision": (train("--train.precision=fp16"), "train.precision='fp16' is invalid"),
    "compile_not_bool": (train("--train.compile=maybe"),
                         "train.compile='maybe' is invalid; allowed: true, false or auto"),
    "steps_zero": (train("--steps", "0"), "train.steps=0 is invalid; allowed: an integer >= 1"),
    "steps_fraction": (train("--train.steps=1.5"), "train.steps=1.5 is invalid; allowed: an"),
    "seed_negative": (train("--train.seed=-1"), "train.seed=-1 is invalid"),
    "eval_every_negative": (train("--train.eval_every=-1"), "train.eval_every=-1 is invalid"),
    "batch_size_zero": (train("--data.batch_size=0"), "data.batch_size=0 is invalid"),
    "seq_len_above_context": (train("--data.seq_len=64", "--model.max_seq_len=32"),
                              "data.seq_len=64 is invalid; allowed: at most model.max_seq_len=32"),
    "unknown_key": (train("--optim.lrr=1"), "unknown config key 'optim.lrr'; valid keys in optim"),
    "number_not_number": (train("--optim.lr=fast"), "optim.lr='fast' is invalid; allowed: a"),
    "unknown_depth": (train("--model.depth=nope"), "nope"),
    "unknown_option": (train("--model.depth=hyper", "--model.depth_options.streamz=2"),
                       "depth_options[hyper]: unknown option(s) streamz; valid options"),
    "option_int_fraction": (train("--model.depth=hyper", "--model.depth_options.streams=2.5"),
                            "depth_options[hyper].streams=2.5 is invalid; allowed: an integer"),
    "mixer_option": (train("--model.local_mixer=canon", "--model.mixer_options.placements=AE"),
                     "mixer_options.placements='AE' is invalid"),
    "heads_not_divisor": (train("--model.n_heads=3"), "d_model=32 is invalid; allowed: a multiple"),
    "preset": (train("--preset", "huge"), "preset 'huge' not found"),
    "config_missing": (train("--config", "/nonexistent/run.yaml"), "does not exist"),
    "config_not_yaml": (with_config(config_file("optim: {lr: [1, 2\n")), "is not valid YAML"),
    "config_unknown_section": (with_config(config_file("trian: {steps: 3}\n")),
                               "unknown config key(s) trian"),
    "config_yaml_string_nan": (with_config(config_file("optim: {eps: .nan}\n")),
                               "optim.eps=nan is invalid"),
    # ---- data paths
    "data_missing": (train_data(lambda tmp: tmp / "missing.txt"), "does not exist"),
    "data_empty": (train_data(_file("empty.txt", b"")), "is empty"),
    "data_not_utf8": (train_data(_file("latin1.txt", "caf\xe9\n".encode("latin-1") * 50)),
                      "not valid UTF-8"),
    "data_too_short": (train_data(_file("short.txt", b"To be.\n" * 3)), "too short"),
    "data_folder_without_text": (train_data(_empty_folder), "no_text"),
    # ---- output folders (item 5) and resume (items 4, 5)
    "overwrite_hf_model_folder": (into(hf_folder, "--overwrite"),
                                  "does not look like a resstream run folder (no "
                                  "resstream_run.json; found: config.json, model.safetensors"),
    "overwrite_config_and_metrics_only": (into(legacy_folder, "--overwrite"),
                                          "--overwrite refused"),
    "overwrite_foreign_marker": (into(foreign_marker, "--overwrite"),
                                 "resstream_run.json has kind='something-else'"),
    "out_not_empty": (into(copy_run), "is not empty; allowed: --resume to continue it"),
    "out_is_a_file": (into(a_file), "is a file; allowed: a new or empty folder"),
    "resume_hf_model_folder": (into(hf_folder, "--resume"), "--resume refused"),
    "resume_stranger": (into(stranger, "--resume"), "found: notes.txt"),
    "resume_without_checkpoints": (into(no_checkpoints, "--resume", "--steps", "3"),
                                   "--resume: no checkpoint in"),
    "resume_and_overwrite": (into(copy_run, "--resume", "--overwrite"),
                             "--resume and --overwrite exclude each other"),
    "resume_finished": (into(copy_run, "--resume"), "already finished at step 1"),
    "resume_config_changed": (into(copy_run, "--resume", "--steps", "3", "--optim.lr=1e-3"),
                              "the config differs from the run's config.json in optim.lr"),
    "resume_data_changed": (resume_changed_data,
                            "differs from the data the run was trained on"),
    "allow_data_change_alone": (into(copy_run, "--overwrite", "--allow-data-change"),
                                "--allow-data-change is invalid without --resume"),
    # ---- checkpoints
    "resume_truncated_weights": (into(truncated_weights, "--resume", "--steps", "3"),
                                 "corrupt or truncated"),
    "resume_broken_state": (into(broken_state, "--resume", "--steps", "3"), "invalid JSON"),
    "generate_missing_checkpoint": (generate(checkpoint=lambda tmp, run: tmp / "nope"),
                                    "does not exist"),
    "generate_broken_checkpoint": (generate(checkpoint=broken_state), "invalid JSON"),
    # ---- generation arguments
    "temperature_negative": (generate("--temperature", "-1"), "temperature=-1.0 is invalid"),
    "temperature_nan": (generate("--temperature", "nan"),
                        "temperature=nan is invalid; allowed: a finite number >= 0"),
    "top_p_above_one": (generate("--top-p", "2"), "top_p=2.0 is invalid; allowed: null or a"),
    "top_k_negative": (generate("--top-k", "-1"), "top_k=-1 is invalid"),
    "max_new_tokens_negative": (generate("--max-new-tokens", "-1"), "max_new_tokens=-1 is"),
    "generate_device": (generate("--device", "gpu0"), "--device='gpu0' is not a device"),
    "generate_device_missing": (generate("--device", "cuda:99"), "--device=cuda:99 is unavail"),
}
if not _tensorboard_installed():
    CLI_CASES["tensorboard_missing"] = (train("--train.log=tensorboard"),
                                        "pip install tensorboard")


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_bad_input_is_one_line_exit_2_and_loses_nothing(case, tmp_path, capsys, corpus,
                                                            finished_run, saved_model):
    build, expected = CLI_CASES[case]
    if case == "device_missing" and not NO_CUDA and torch.cuda.device_count() > 99:
        pytest.skip("this machine has 100 GPUs")
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(saved_model, tmp_path / "saved")
    argv, protected = build(work, corpus, finished_run)
    before = snapshot(protected) if protected is not None and protected.is_dir() else None
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"resstream {argv[0]}: error: ") and expected in err, err
    assert not (work / "new").exists(), "a refused run must not leave a run folder behind"
    if before is not None:
        assert snapshot(protected) == before, "an earlier run or foreign folder was changed"


# ---------------------------------------------------------------------------- the Python API

def _model(vocab_size: int = 256):
    from resstream.model import ResStreamLM
    from resstream.testing import tiny_config

    return ResStreamLM(tiny_config(vocab_size=vocab_size))


API_CASES = {
    "token_id_too_large": (lambda: _model()(torch.tensor([[1, 300]])),
                           "token id 300, outside the vocabulary; allowed: 0..255"),
    "token_id_negative": (lambda: _model()(torch.tensor([[-1, 2]])), "token id -1"),
    "token_ids_float": (lambda: _model()(torch.tensor([[1.0, 2.0]])),
                        "dtype torch.float32; allowed: torch.long or torch.int32"),
    "model_init_std": (lambda: ModelConfig(init_std=-1), "init_std=-1.0 is invalid"),
    "model_rope_theta": (lambda: ModelConfig(rope_theta=math.inf), "rope_theta=inf is invalid"),
    "model_wrong_type": (lambda: ModelConfig(n_layers="four"), "n_layers='four' is invalid"),
    "model_from_dict_nan": (lambda: ModelConfig.from_dict({"norm_eps": "nan"}),
                            "norm_eps='nan' is invalid"),
    "option_float_infinite": (lambda: ModelConfig(depth="ddl",
                                                  depth_options={"beta_init": math.inf}),
                              "beta_init=inf is invalid"),
    "train_config_eps": (lambda: TrainConfig.from_dict({"optim": {"eps": math.inf}}),
                         "optim.eps=inf is invalid"),
    "optim_built_directly": (lambda: OptimConfig(eps=math.nan).validate(),
                             "optim.eps=nan is invalid"),
    "loop_threads": (lambda: LoopConfig(threads=10 ** 6).validate(), "train.threads=1000000"),
    "loop_device_syntax": (lambda: LoopConfig(device="cuda:x").validate(),
                           "train.device='cuda:x' is not a device"),
    "generate_temperature": (lambda: _model().generate(torch.tensor([1, 2]), 2,
                                                       temperature=math.nan),
                             "temperature=nan is invalid"),
    "generate_token_ids": (lambda: _model().generate(torch.tensor([1, 999]), 2),
                           "outside 0..255"),
    "parse_device": (lambda: __import__("resstream.hardware").hardware.parse_device("tpu"),
                     "--device='tpu' is not a device"),
}


@pytest.mark.parametrize("case", list(API_CASES))
def test_api_bad_input_is_a_one_line_user_error(case):
    call, expected = API_CASES[case]
    with pytest.raises(UserError) as raised:
        call()
    message = str(raised.value)
    assert "\n" not in message and expected in message, message


# ---------------------------------------------------------------------------- what is allowed

def test_one_coercion_for_every_section(tmp_path):
    """YAML reads `5e-1` as a string: every section, model options included, takes it as the
    number it is (options used to reject it as 'wrong type')."""
    path = tmp_path / "run.yaml"
    path.write_text("optim: {lr: 5e-1, min_lr: 1e-2}\n"
                    "model: {depth: ddl, rope_theta: 5e+3, depth_options: {beta_init: 5e-1}}\n")
    from resstream.train.config import load_config_file

    config = TrainConfig.from_dict(load_config_file(path))
    assert config.optim.lr == 0.5
    model = config.model_config()
    assert model.rope_theta == 5000.0 and model.depth_opts.beta_init == 0.5


def test_device_syntax_is_checked_at_config_time_existence_at_run_time():
    assert LoopConfig(device="cuda:1").validate() is None  # any machine may read this config
    assert TrainConfig.from_dict({"train": {"device": "cuda:3"}}).train.device == "cuda:3"


def test_overwrite_deletes_only_the_runs_own_files(tmp_path, capsys, corpus, finished_run):
    run = copy_run(tmp_path, finished_run)
    (run / "notes.txt").write_text("mine")
    (run / "checkpoints" / "README").write_text("inside an own folder: goes with it")
    assert main(["train", *BASE, "--data", str(corpus), "--out", str(run), "--overwrite"]) == 0
    assert (run / "notes.txt").read_text() == "mine"
    assert "kept 1 entries that are not the run's own: notes.txt" in capsys.readouterr().err
    marker = json.loads((run / "resstream_run.json").read_text())
    assert marker["kind"] == "resstream-train-run" and marker["format"] == 1


def test_resume_on_changed_data_with_allow_data_change_is_recorded(tmp_path, finished_run):
    run = changed_data(tmp_path, finished_run)
    assert main(["train", "--out", str(run), "--resume", "--steps", "2", "--no-progress",
                 "--allow-data-change"]) == 0
    resumes = json.loads((run / "environment.json").read_text())["resumes"]
    assert "source_fingerprint" in resumes[-1]["data_changed"]["changed"]
