"""Generation: sampling, determinism, cache vs no cache, prompts of different lengths, stop
sequences, streaming, bad input, and the `resstream generate` command."""
from __future__ import annotations

import pytest
import torch

from resstream import ResStreamLM
from resstream.cli import main as cli_main
from resstream.errors import UserError
from resstream.generation import sample_next
from resstream.hf import save_model
from resstream.testing import perturb_parameters, tiny_config

CONFIGS = {
    "baseline": dict(),
    "shortswa": dict(local_mixer="shortswa"),
    "shortswa-only": dict(local_mixer="shortswa", mixer_options={"replace_attention": True}),
    "canon": dict(local_mixer="canon"),
    "ddl-shortconv": dict(depth="ddl", local_mixer="shortconv"),
}


def build(**changes) -> ResStreamLM:
    torch.manual_seed(0)
    model = ResStreamLM(tiny_config(**changes)).eval()
    perturb_parameters(model, scale=0.3)  # peaky logits: greedy choices are far from ties
    return model


def prompts(lengths, seed=1, vocab=64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_generation_equals_uncached(name):
    model = build(**CONFIGS[name])
    ids = torch.stack(prompts([9, 9]))
    greedy = model.generate(ids, 12, temperature=0, return_dict=True)
    assert greedy.tokens == model.generate(ids, 12, temperature=0, use_cache=False, return_dict=True).tokens
    sampled = model.generate(ids, 12, 1.0, None, 0.95, 7, return_dict=True)
    uncached = model.generate(ids, 12, 1.0, None, 0.95, 7, use_cache=False, return_dict=True)
    assert sampled.tokens == uncached.tokens
    assert all(len(t) == 12 for t in greedy.tokens)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_rows_of_different_lengths_equal_generating_each_row_alone(name):
    model = build(**CONFIGS[name])
    rows = prompts([3, 11, 6])
    batched = model.generate(rows, 8, temperature=0, prefill_chunk=2, return_dict=True)
    for i, row in enumerate(rows):
        alone = model.generate(row[None], 8, temperature=0, return_dict=True)
        assert batched.tokens[i] == alone.tokens[0], f"row {i}"
        assert batched.prompts[i] == row.tolist()
        assert batched.sequences()[i] == row.tolist() + alone.tokens[0]


def test_sampling_is_deterministic_for_a_fixed_seed():
    model = build()
    ids = torch.stack(prompts([5, 5]))
    first = model.generate(ids, 20, temperature=1.0, seed=123, return_dict=True)
    assert first.tokens == model.generate(ids, 20, temperature=1.0, seed=123, return_dict=True).tokens
    assert first.tokens != model.generate(ids, 20, temperature=1.0, seed=124, return_dict=True).tokens
    # top_k=1 and a tiny top_p both reduce sampling to greedy
    greedy = model.generate(ids, 10, temperature=0, return_dict=True).tokens
    assert model.generate(ids, 10, temperature=1.0, top_k=1, seed=5, return_dict=True).tokens == greedy
    assert model.generate(ids, 10, temperature=1.0, top_p=1e-6, seed=5, return_dict=True).tokens == greedy


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, top_p=0.75, generator=g).tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, top_p=0.85, generator=g).tolist()) == {0, 1, 2}
    assert set(sample_next(logits, 1.0, top_p=0.5, generator=g).tolist()) == {0}
    full = sample_next(logits, 1.0, generator=g)
    assert set(full.tolist()) == {0, 1, 2, 3}
    assert abs((full == 0).float().mean().item() - 0.5) < 0.05  # draws follow the probabilities
    hot = sample_next(logits, 0.25, generator=g)  # low temperature sharpens towards the argmax
    assert (hot == 0).float().mean().item() > 0.85


def test_stop_sequence_ends_each_row_and_streaming_reports_every_token():
    model = build()
    rows = prompts([4, 7])
    free = model.generate(rows, 16, temperature=0, return_dict=True).tokens
    stop = free[0][5:7]
    first = next(i for i in range(len(free[0]) - 1) if free[0][i:i + 2] == stop)
    streamed = []
    out = model.generate(rows, 16, temperature=0, stop=bytes(stop),
                         on_token=lambda row, token: streamed.append((row, token)), return_dict=True)
    assert out.tokens[0] == free[0][:first + 2] and out.stopped[0]
    if not any(free[1][i:i + 2] == stop for i in range(15)):
        assert out.tokens[1] == free[1] and not out.stopped[1]
    for row in (0, 1):
        assert [t for r, t in streamed if r == row] == out.tokens[row]
    assert model.generate(rows, 0, return_dict=True).tokens == [[], []]


def test_shortswa_only_stack_generates_past_max_seq_len():
    model = build(local_mixer="shortswa", mixer_options={"replace_attention": True}, max_seq_len=16)
    ids = prompts([20])[0][None]  # the prompt alone is longer than max_seq_len
    out = model.generate(ids, 10, temperature=0, return_dict=True)
    assert out.tokens == model.generate(ids, 10, temperature=0, use_cache=False, return_dict=True).tokens


def test_bad_input_gives_clear_errors():
    model = build(max_seq_len=16)
    ok = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(UserError, match="cannot slide"):
        model.generate(torch.zeros(1, 17, dtype=torch.long), 1)
    with pytest.raises(UserError, match="max_new_tokens <= 12"):
        model.generate(ok, 13)
    with pytest.raises(UserError, match="empty"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 4)
    with pytest.raises(UserError, match="empty"):
        model.generate([[1, 2], []], 4)
    with pytest.raises(UserError, match="no prompt"):
        model.generate([], 4)
    with pytest.raises(UserError, match="max_new_tokens"):
        model.generate(ok, -1)
    with pytest.raises(UserError, match="different dtypes"):
        model.generate([torch.zeros(3, dtype=torch.long), torch.zeros(2, dtype=torch.int32)], 2)
    with pytest.raises(UserError, match="different devices"):
        model.generate([torch.zeros(3, dtype=torch.long), torch.zeros(2, dtype=torch.long, device="meta")], 2)
    with pytest.raises(UserError, match="model's device"):
        model.generate(torch.zeros(1, 3, dtype=torch.long, device="meta"), 2)
    with pytest.raises(UserError, match="integer dtype"):
        model.generate(torch.zeros(1, 3), 2)
    with pytest.raises(UserError, match="outside 0..63"):
        model.generate(torch.full((1, 3), 64), 2)
    for bad in (dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(UserError):
            model.generate(ok, 2, **bad)
    with pytest.raises(UserError, match="stop"):
        model.generate(ok, 2, stop=b"")


def test_generate_command_streams_the_continuation(tmp_path, capsys):
    model = build(vocab_size=256)
    save_model(model, tmp_path / "ckpt")
    code = cli_main(["generate", "--checkpoint", str(tmp_path / "ckpt"), "--prompt", "ab",
                     "--max-new-tokens", "6", "--temperature", "0"])
    assert code == 0
    expected = model.generate(torch.tensor([[97, 98]]), 6, temperature=0, return_dict=True).tokens[0]
    text = capsys.readouterr().out
    assert text == "ab" + bytes(expected).decode("utf-8", errors="replace") + "\n"
    assert cli_main(["generate", "--checkpoint", str(tmp_path / "missing"), "--prompt", "a"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_generate_command_reads_a_training_run(tmp_path, capsys):
    from resstream.train.checkpoint import save_checkpoint

    model = build(vocab_size=256)
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path / "run", 3, model, optimizer, {"model_config": model.config.to_dict()}, keep=1)
    assert cli_main(["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "x",
                     "--max-new-tokens", "4", "--temperature", "0"]) == 0
    expected = model.generate(torch.tensor([[120]]), 4, temperature=0, return_dict=True).tokens[0]
    assert capsys.readouterr().out == "x" + bytes(expected).decode("utf-8", errors="replace") + "\n"


# ---------------------------------------------------------------------------------- the tensor
def test_generate_returns_prompt_plus_new_tokens_as_a_right_padded_tensor():
    model = build()
    rows = prompts([3, 9, 5])
    record = model.generate(rows, 6, temperature=0, return_dict=True)
    out = model.generate(rows, 6, temperature=0)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.long
    assert out.shape == (3, 9 + 6) and record.lengths == [3 + 6, 9 + 6, 5 + 6]
    for i, length in enumerate(record.lengths):
        assert out[i, :length].tolist() == record.sequences()[i]
        assert (out[i, length:] == 0).all()  # the default pad_token_id
    padded = model.generate(rows, 6, temperature=0, pad_token_id=-1)
    assert (padded[0, 9:] == -1).all() and torch.equal(padded[1], out[1])
    assert torch.equal(record.tensor(pad_token_id=-1), padded)
    one = model.generate(rows[0], 4, temperature=0)  # a [T] prompt gives one row
    assert one.shape == (1, 3 + 4) and torch.equal(one[0, :3], rows[0])
    with pytest.raises(UserError, match="pad_token_id"):
        model.generate(rows, 2, pad_token_id=0.5)


def test_a_row_that_stops_early_is_padded_and_its_length_says_where():
    model = build()
    rows = prompts([4, 7])
    free = model.generate(rows, 12, temperature=0, return_dict=True).tokens
    record = model.generate(rows, 12, temperature=0, stop=free[0][:2], return_dict=True)
    out = record.tensor(pad_token_id=-5)
    assert record.stopped[0] and record.lengths[0] == 4 + 2
    assert out[0, 4 + 2:].eq(-5).all() and out[0, :6].tolist() == rows[0].tolist() + free[0][:2]


def test_crop_context_generates_past_max_seq_len_with_global_attention():
    model = build(max_seq_len=16)
    ids = prompts([5])[0][None]
    with pytest.raises(UserError, match="crop_context"):
        model.generate(ids, 30, temperature=0)
    long = model.generate(ids, 30, temperature=0, crop_context=True, return_dict=True)
    short = model.generate(ids, 11, temperature=0, return_dict=True)  # fills the context exactly
    assert len(long.tokens[0]) == 30 and long.tokens[0][:11] == short.tokens[0]
    uncached = model.generate(ids, 30, temperature=0, crop_context=True, use_cache=False)
    assert uncached.shape == (1, 35) and uncached[0, :16].tolist() == short.sequences()[0]


# ---------------------------------------------------------------------------------- no padding mask
def test_there_is_no_padding_mask_to_pass():
    import dataclasses
    import inspect
    from pathlib import Path

    from resstream.cache import ForwardContext

    assert "key_padding_mask" not in inspect.signature(ResStreamLM.forward).parameters
    assert "key_padding_mask" not in {f.name for f in dataclasses.fields(ForwardContext)}
    source = Path(__file__).resolve().parents[1] / "src" / "resstream"
    users = [str(p) for p in source.rglob("*.py") if "key_padding_mask" in p.read_text()]
    assert users == []  # a mask no operator honours everywhere would give silently wrong output


# ---------------------------------------------------------------------------------- imports
def test_generation_imports_without_a_cycle_in_a_fresh_interpreter():
    import ast
    import subprocess
    import sys
    from pathlib import Path

    for order in ("resstream.generation", "resstream.hf, resstream.generation",
                  "resstream.loading, resstream.generation", "resstream.model, resstream.loading"):
        done = subprocess.run([sys.executable, "-c", f"import {order}"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    source = Path(__file__).resolve().parents[1] / "src" / "resstream"
    assert not (source / "train" / "sampling.py").exists()  # the second sampler is gone

    def top_level_imports(path: Path) -> set[str]:
        tree = ast.parse(path.read_text())
        return {node.module for node in tree.body if isinstance(node, ast.ImportFrom)} | {
            alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names}

    # generation must not pull in the model (model imports generation lazily, in generate())
    assert not top_level_imports(source / "generation.py") & {
        "resstream.model", "resstream.hf", "resstream.loading", "resstream.train.sampling"}
    assert "resstream.generation" not in top_level_imports(source / "model.py")
