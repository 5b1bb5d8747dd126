"""Pipeline parallel in `resstream train` (--parallel.pp) under torchrun (CPU, gloo): 2 stages
on 2 processes (GPipe and 1F1B) and 2 data-parallel replicas x 2 stages on 4 processes follow the
single-process loss, gradient norm and validation bpb (and so do 4 interleaved stages on 2
processes); a pipeline checkpoint resumes in one
process and loads for inference, and a one-process checkpoint resumes on 2 stages; bad values
fail with one line. Launches: tests/launching.py."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from launching import launch, train, write_macbeth

pytestmark = [pytest.mark.usefixtures("private_data_cache"), pytest.mark.timeout(300)]

DEPTHS = ["standard", "block_attnres"]  # a tied embedding; depth parameters on every stage
RESUMABLE = ["--steps", 6, "--train.checkpoint_every=2", "--train.keep_checkpoints=5"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_macbeth(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The 4-step one-process run with some model options, run once per module and options."""
    runs: dict[tuple, Path] = {}

    def get(corpus: Path, *model: str) -> Path:
        if model not in runs:
            run = tmp_path_factory.mktemp("single") / "run"
            code, _, err = train(corpus, run, 1, "--steps", 4, *model)
            assert code == 0, err
            runs[model] = run
        return runs[model]

    return get


def records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == kind]


def assert_same_run(run: Path, reference: Path) -> None:
    """The same loss and (clipped-by) gradient norm at every step, and the same final bpb."""
    steps, expected = records(run, "train"), records(reference, "train")
    assert [r["step"] for r in steps] == [r["step"] for r in expected]
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in steps] == pytest.approx([r[key] for r in expected],
                                                        rel=2e-5, abs=2e-5), key
    assert expected[-1]["loss"] < expected[0]["loss"]
    assert max(r["grad_norm"] for r in expected) > 1.0  # clipping acted
    assert records(run, "final")[-1]["val_bpb"] == pytest.approx(
        records(reference, "final")[-1]["val_bpb"], rel=2e-5)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("depth", DEPTHS)
def test_two_stages_follow_the_single_process_run(corpus, single, tmp_path, depth, schedule):
    run = tmp_path / "pp"
    code, out, err = train(corpus, run, 2, "--steps", 4, f"--model.depth={depth}",
                           "--parallel.pp=2", f"--parallel.schedule={schedule}")
    assert code == 0, err
    assert (f"pipeline parallel: 2 stages on 2 processes x 1 data-parallel replica(s), "
            f"schedule {schedule!r}, 4 micro-batches per step") in err
    assert out.count("done: 4 steps") == 1  # one voice
    assert_same_run(run, single(corpus, f"--model.depth={depth}"))


def test_interleaved_stages_follow_the_single_process_run(corpus, single, tmp_path):
    """4 layers in 4 stages, two per process: the depth state also crosses the boundaries
    between the two stages of one process."""
    model = ("--model.depth=block_attnres", "--model.n_layers=4")
    run = tmp_path / "interleaved"
    code, _, err = train(corpus, run, 2, "--steps", 4, *model, "--parallel.pp=2",
                         "--parallel.schedule=interleaved")
    assert code == 0, err
    assert "pipeline parallel: 4 stages on 2 processes" in err
    assert_same_run(run, single(corpus, *model))


@pytest.mark.parametrize("depth", DEPTHS)
def test_two_replicas_of_two_stages_follow_the_single_process_run(corpus, single, tmp_path,
                                                                 depth):
    run = tmp_path / "dp2pp2"
    code, out, err = train(corpus, run, 4, "--steps", 4, f"--model.depth={depth}",
                           "--parallel.pp=2", "--parallel.dp=ddp")
    assert code == 0, err
    assert "2 stages on 2 processes x 2 data-parallel replica(s)" in err
    assert out.count("done: 4 steps") == 1
    assert_same_run(run, single(corpus, f"--model.depth={depth}"))


def test_checkpoints_move_between_one_process_and_two_stages(corpus, tmp_path):
    """A 2-stage run's step-2 checkpoint resumes in one process, a one-process run's on 2
    stages: both end as the uninterrupted one-process run. The 2-stage step-6 checkpoint loads
    for inference with the one-process run's weights."""
    import torch

    from resstream.loading import load_for_inference

    straight, staged = tmp_path / "straight", tmp_path / "staged"
    code, _, err = train(corpus, straight, 1, *RESUMABLE)
    assert code == 0, err
    code, _, err = train(corpus, staged, 2, *RESUMABLE, "--parallel.pp=2")
    assert code == 0, err

    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_for_inference(str(staged))(ids),
                                   load_for_inference(str(straight))(ids), rtol=1e-4, atol=1e-4)

    moved = tmp_path / "moved"
    shutil.copytree(straight, moved)
    for run in (staged, moved):  # back to step 2, as after a crash
        for step in (4, 6):
            shutil.rmtree(run / "checkpoints" / f"step_{step:08d}")
    code, _, err = train(corpus, staged, 1, "--resume", *RESUMABLE, "--parallel.pp=1")
    assert code == 0, err
    assert "resuming" in err and "step 2" in err
    code, _, err = train(corpus, moved, 2, "--resume", *RESUMABLE, "--parallel.pp=2")
    assert code == 0, err
    for run in (staged, moved):
        assert [r["step"] for r in records(run, "train")] == [1, 2, 3, 4, 5, 6]
        assert_same_run(run, straight)


@pytest.mark.parametrize("bad, allowed", [
    ("--parallel.pp=0", "parallel.pp=0 is invalid; allowed: an integer >= 1"),
    ("--parallel.schedule=zero_bubble", "allowed: gpipe, 1f1b, interleaved"),
    ("--parallel.microbatches=0", "parallel.microbatches=0 is invalid; allowed: an integer >= 1"),
    ("--parallel.dp=fsdp --parallel.pp=2", "parallel.dp='fsdp' is invalid; allowed: ddp or none"),
    ("--parallel.pp=3", "parallel.pp=3 is invalid for model.n_layers=2"),
    ("--parallel.pp=2 --parallel.schedule=interleaved", "allowed: at most 1"),
    ("--parallel.pp=2", "parallel.pp=2 is invalid with WORLD_SIZE=1 processes; allowed: a "
                        "divisor of the number of processes"),
])
def test_bad_values_fail_with_one_line(corpus, tmp_path, bad, allowed):
    code, _, err = train(corpus, tmp_path / "bad", 1, "--steps", 1, *bad.split())
    assert code == 2, err
    assert allowed in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_micro_batches_must_divide_each_replicas_rows(corpus, tmp_path):
    code, _, err = train(corpus, tmp_path / "odd", 2, "--steps", 1, "--parallel.pp=2",
                         "--parallel.microbatches=3")
    assert code != 0
    assert ("parallel.microbatches=3 is invalid with 4 rows per data-parallel replica "
            "(data.batch_size=4 / 1); allowed: a divisor of 4") in err
    assert err.count("resstream train: error:") == 2 and "resstream/" not in err
