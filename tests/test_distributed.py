"""Data parallel training under torchrun (CPU, gloo, 2 processes): DDP and FSDP2 follow the
single-process loss trajectory, checkpoints resume on another number of processes, a killed
rank or a NaN on one rank ends the whole run, and bad launches fail with one line.

Launches (each in its own session, killed at the end of its test): tests/launching.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from launching import (FAST, TORCHRUN, finish, kill_session, launch, train, worker_env,
                       write_macbeth)

pytestmark = [pytest.mark.usefixtures("private_data_cache"), pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_macbeth(tmp_path_factory.mktemp("corpus"))


def losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def final_bpb(run: Path) -> float:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "final"][-1]["val_bpb"]


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_processes_follow_the_single_process_loss(corpus, tmp_path, engine):
    """The same global batch split over 2 ranks: the loss trajectory of one process (float32
    tolerance), rank 0 alone writes, and the checkpoint loads in one process for inference."""
    args = ["--steps", 4, "--model.depth=block_attnres"]
    code, _, err = train(corpus, tmp_path / "one", 1, *args)
    assert code == 0, err
    code, out, err = train(corpus, tmp_path / engine, 2, *args, f"--parallel.dp={engine}")
    assert code == 0, err
    assert out.count("done: 4 steps") == 1  # one voice
    single, parallel = losses(tmp_path / "one"), losses(tmp_path / engine)
    assert len(single) == len(parallel) == 4
    assert parallel == pytest.approx(single, rel=2e-5, abs=2e-5)
    assert single[-1] < single[0]
    assert final_bpb(tmp_path / engine) == pytest.approx(final_bpb(tmp_path / "one"), rel=2e-5)

    import torch

    from resstream.hf import load_model
    from resstream.loading import load_for_inference

    model = load_for_inference(str(tmp_path / engine))
    assert model.config.depth == "block_attnres"
    code, out, err = finish(launch(["export", tmp_path / engine, "--out", tmp_path / "export"], 1))
    assert code == 0, err
    exported = load_model(tmp_path / "export").eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids), model(ids), rtol=0, atol=0)


def test_killed_rank_ends_the_run_and_it_resumes_on_another_world_size(corpus, tmp_path):
    """SIGKILL one rank mid-run: every process exits non-zero within the timeout; the last
    checkpoint resumes in one process and the run ends as an uninterrupted one does."""
    args = ["--steps", 6, "--train.checkpoint_every=2", "--parallel.timeout_s=60"]
    code, _, err = train(corpus, tmp_path / "straight", 1, *args)
    assert code == 0, err

    victim = tmp_path / "victim"
    process = launch(["train", "--data", corpus, "--out", victim, *FAST, *args], 2,
                     {"RESSTREAM_TEST_STEP_SLEEP": "1.0"})
    try:
        deadline = time.monotonic() + 200
        while not (victim / "checkpoints" / "step_00000002").is_dir():
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "no checkpoint within 200 s"
            time.sleep(0.2)
        workers = _workers(process.pid)
        assert len(workers) == 2, workers
        started = time.monotonic()
        os.kill(workers[1], signal.SIGKILL)
        code, _, err = finish(process, timeout=120)
        assert code != 0
        assert time.monotonic() - started < 120
        assert not any(_alive(pid) for pid in workers)
    finally:
        kill_session(process)

    code, out, err = finish(launch(["train", "--data", corpus, "--out", victim, "--resume",
                                    *FAST, *args], 1))
    assert code == 0, err
    assert "resuming" in err
    assert final_bpb(victim) == pytest.approx(final_bpb(tmp_path / "straight"), rel=2e-5)


# Run by torchrun in the NaN test: rank 1 alone computes a NaN loss from its third
# micro-batch on (one bad shard of data, a broken kernel on one device), then the normal CLI.
POISON_RANK_1 = """
import os, sys
import torch
import torch.nn.functional as F
from resstream.cli import main

if os.environ["RANK"] == "1":
    calls, cross_entropy = [0], F.cross_entropy

    def poisoned(*args, **kwargs):
        calls[0] += 1
        loss = cross_entropy(*args, **kwargs)
        return loss * float("nan") if calls[0] >= 3 else loss

    F.cross_entropy = poisoned
sys.exit(main(sys.argv[1:]))
"""


def test_a_nan_on_one_rank_ends_every_rank_and_the_last_checkpoint_resumes(corpus, tmp_path):
    """A NaN on rank 1 only (from step 2, grad_accum=2): the loss and gradient are reduced over
    ranks, so every rank sees it and stops with the same line and a non-zero exit; the step-1
    checkpoint is intact and resumes in one process."""
    script = tmp_path / "poison.py"
    script.write_text(POISON_RANK_1, encoding="utf-8")
    run = tmp_path / "nan"
    args = ["train", "--data", corpus, "--out", run, *FAST, "--steps", 4,
            "--train.checkpoint_every=1", "--parallel.timeout_s=60"]
    process = subprocess.Popen([*TORCHRUN, "--nproc-per-node", "2", str(script), *map(str, args)],
                               env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    started = time.monotonic()
    code, _, err = finish(process, timeout=180)
    assert code != 0
    assert time.monotonic() - started < 180
    assert err.count("resstream train: error: training stopped at step 2: loss=nan is not "
                     "finite (last good checkpoint: ") == 2, err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001"]

    code, _, err = finish(launch(["train", "--data", corpus, "--out", run, "--resume", *FAST,
                                  "--steps", 4, "--train.checkpoint_every=1"], 1))
    assert code == 0, err
    assert [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"] == [1, 2, 3, 4]


def test_bad_launches_fail_with_one_line(corpus, tmp_path):
    code, _, err = train(corpus, tmp_path / "odd", 2, "--steps", 2, "--data.batch_size=3")
    assert code != 0
    assert "data.batch_size=3 is invalid with 2 processes; allowed: a multiple" in err
    code, _, err = train(corpus, tmp_path / "none", 2, "--steps", 2, "--parallel.dp=none")
    assert code != 0
    assert "parallel.dp='none' is invalid with WORLD_SIZE=2 processes" in err
    # each worker says one line; torchrun's agent then reports the failed workers itself
    assert err.count("resstream train: error:") == 2 and "resstream/" not in err
    for bad, allowed in (("--parallel.dp=zero3", "allowed: none, ddp, fsdp"),
                         ("--parallel.timeout_s=0", "allowed: a number of seconds > 0")):
        code, _, err = train(corpus, tmp_path / "bad", 1, "--steps", 1, bad)
        assert code == 2 and allowed in err and len(err.strip().splitlines()) == 1


def test_a_rank_whose_peers_never_come_fails_within_the_timeout(corpus, tmp_path):
    """Rank 0 of 2 started by hand (no torchrun, no rank 1): the rendezvous gives up after
    parallel.timeout_s with one line, and nothing is written."""
    port = _free_port()
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    started = time.monotonic()
    process = launch(["train", "--data", corpus, "--out", tmp_path / "alone", *FAST, "--steps", 2,
                      "--parallel.timeout_s=5"], 1, env)
    code, _, err = finish(process, timeout=120)
    assert code == 2, err
    assert "rank 0: cannot join the process group of 2 processes within parallel.timeout_s=5" in err
    assert len(err.strip().splitlines()) == 1
    assert time.monotonic() - started < 90
    assert not (tmp_path / "alone").exists()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _workers(agent_pid: int) -> list[int]:
    """The worker processes torchrun's agent started (its children), by /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == agent_pid:
                children.append(int(entry.name))
    return sorted(children)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


STUDY = """
name: dp-study
preset: tiny
seeds: [0, 1]
budget: {{steps: 3}}
config:
  data: {{source: {corpus}, seq_len: 32, batch_size: 4}}
  optim: {{lr: 3.0e-3, warmup_steps: 0, grad_accum: 2}}
  train: {{eval_every: 0, eval_tokens: 256, final_eval_tokens: 256, eval_batch_size: 4,
          threads: 1}}
variants:
  baseline: {{}}
  hyper: {{model: {{depth: hyper}}}}
systems: {{decode_contexts: [8], decode_steps: 1}}
"""


def test_a_study_runs_its_variants_data_parallel(corpus, tmp_path):
    """`resstream compare` under torchrun: every run is data-parallel, the numbers are the
    single-process study's, rank 0 alone writes the report, and no process is left."""
    study = tmp_path / "study.yaml"
    study.write_text(STUDY.format(corpus=corpus), encoding="utf-8")
    common = ["compare", study, "--no-progress"]
    code, _, err = finish(launch([*common, "--out", tmp_path / "one"], 1))
    assert code == 0, err
    code, out, err = finish(launch([*common, "--out", tmp_path / "two", "--dp", "ddp"], 2))
    assert code == 0, err
    assert out.count("wrote ") == 1 and "2 processes, parallel.dp=ddp" in err
    single, parallel = (json.loads((tmp_path / name / "results.json").read_text())["variants"]
                        for name in ("one", "two"))
    for variant in ("baseline", "hyper"):
        assert parallel[variant]["val_bpb"] == pytest.approx(single[variant]["val_bpb"], rel=2e-5)
        run = tmp_path / "two" / "runs" / variant / "seed-0"
        assert json.loads((run / "config.json").read_text())["parallel"]["dp"] == "ddp"
    assert (tmp_path / "two" / "report.md").is_file()
    # the plan is the engine-free one: the same study resumes in one process
    code, _, err = finish(launch([*common, "--out", tmp_path / "two", "--resume"], 1))
    assert code == 0, err
    code, _, err = finish(launch([*common, "--out", tmp_path / "three", "--time-budget", 5,
                                  "--dp", "ddp"], 2))
    assert code != 0 and err.count("--time-budget=5.0 is invalid under torchrun") == 2
    assert not (tmp_path / "three").exists()
