"""`resstream generate` / `resstream sample` (one command, two names) on every folder resstream
writes: a training run folder (its newest checkpoint), one checkpoint folder, and a Hugging Face
save folder; plus the one-line errors."""
from __future__ import annotations

import random

import pytest
import torch

from resstream.cli import main
from resstream.hf import save_model
from resstream.loading import load_for_inference

pytestmark = pytest.mark.usefixtures("private_data_cache")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny model trained for 2 steps by `resstream train` (context 64) on a small corpus."""
    root = tmp_path_factory.mktemp("generate-cli")
    words = "to be or not that is the question whether tis nobler in the mind".split()
    rng = random.Random(0)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(800)))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RESSTREAM_DATA_CACHE", str(root / "data_cache"))
        code = main(["train", "--preset", "tiny", "--no-progress", "--data", str(corpus),
                     "--out", str(root / "run"), "--steps", "2", "--data.seq_len=32",
                     "--data.batch_size=4", "--train.eval_tokens=512",
                     "--train.final_eval_tokens=512", "--train.threads=1"])
    assert code == 0
    return root / "run"


def generated(capsys, *args) -> str:
    assert main([str(a) for a in args]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def expected_text(model, prompt: str, n: int) -> str:
    ids = torch.tensor([list(prompt.encode())])
    out = model.generate(ids, n, temperature=0, crop_context=True)
    return bytes(out[0].tolist()).decode("utf-8", errors="replace") + "\n"


def test_generate_reads_a_run_folder_a_checkpoint_folder_and_a_hf_folder(run_dir, tmp_path, capsys):
    import resstream.hf as rhf

    model = load_for_inference(run_dir)
    checkpoint = sorted((run_dir / "checkpoints").iterdir())[-1]
    save_model(model, tmp_path / "saved")
    pytest.importorskip("transformers")
    rhf.from_resstream(model).save_pretrained(tmp_path / "pretrained")
    # the README's command: 200 new tokens from a model with a 64-token context
    want = expected_text(model, "ROMEO:", 200)
    for folder in (run_dir, checkpoint, checkpoint / "model.safetensors", tmp_path / "saved",
                   tmp_path / "pretrained"):
        text = generated(capsys, "generate", "--checkpoint", folder, "--prompt", "ROMEO:",
                         "--max-new-tokens", 200, "--temperature", 0)
        assert text == want, folder


def test_sample_is_generate_under_another_name(run_dir, capsys):
    common = ["--prompt", "HAMLET:", "--max-new-tokens", 40, "--temperature", 1.0, "--seed", 3]
    via_generate = generated(capsys, "generate", "--checkpoint", run_dir, *common)
    assert generated(capsys, "sample", run_dir, *common) == via_generate  # positional, as before
    assert generated(capsys, "sample", "--checkpoint", run_dir, *common) == via_generate
    assert generated(capsys, "generate", run_dir, *common) == via_generate
    assert via_generate.startswith("HAMLET:")
    other_seed = generated(capsys, "sample", run_dir, *common[:-1], 4)
    assert other_seed != via_generate
    # no prompt: starts from a newline that is not printed; --top-k 0 means no top-k filter
    assert len(generated(capsys, "sample", run_dir, "--max-new-tokens", 5, "--top-k", 0)) >= 1


def test_bad_checkpoints_give_one_line_errors(run_dir, tmp_path, capsys):
    cases = [(["generate", "--checkpoint", tmp_path / "missing"], "does not exist"),
             (["sample", tmp_path / "missing"], "does not exist"),
             (["generate", "--prompt", "a"], "no checkpoint given"),
             (["sample", run_dir, "--checkpoint", run_dir], "both CHECKPOINT and --checkpoint"),
             (["generate", "--checkpoint", tmp_path], "holds no saved model")]
    for args, message in cases:
        assert main([str(a) for a in args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
