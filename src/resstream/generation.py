"""Text generation with the decode cache: sampling, batched prompts of different lengths, stop
sequences, and the `resstream generate` command (streams text as it is produced).

Batched prompts of different lengths use **per-row lengths, no padding**: all rows share one
cache and one position counter. The common prefix (the shortest prompt's length) is prefilled
in one call; from there on every step feeds one token per row, which is the row's next prompt
token while the row is still inside its prompt and its sampled token afterwards. No row ever has
a padding token in its history, so every depth operator and local mixer is exact without masks
(each row's tokens equal generating that row alone, greedily), at the price of feeding the
prompt tails token by token. Stop sequences and `max_new_tokens` count per row.

Sampling: temperature 0 is greedy (argmax); otherwise logits / temperature, then top-k, then
top-p (nucleus: the smallest set of tokens whose probability reaches p), then one draw from a
`torch.Generator` seeded with `seed` (a fixed seed gives the same tokens on the same device).
"""
from __future__ import annotations

import argparse
import codecs
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from resstream.errors import UserError
from resstream.hardware import parse_device, require_dtype_runs


@dataclass
class Generation:
    """Result of `generate`: per row, the prompt, the new tokens (a stop sequence that ended the
    row is included), and whether the row stopped on a stop sequence."""

    prompts: list[list[int]]
    tokens: list[list[int]]
    stopped: list[bool]

    def sequences(self) -> list[list[int]]:
        return [p + t for p, t in zip(self.prompts, self.tokens)]


# ---------------------------------------------------------------------------------- validation
def _rows(input_ids, device: torch.device) -> list[Tensor]:
    """Prompts as a list of 1-D tensors: a [T] or [B, T] tensor, or a list of sequences (lists
    of ints are put on `device`)."""
    if isinstance(input_ids, Tensor):
        if input_ids.dim() == 1:
            return [input_ids]
        if input_ids.dim() == 2:
            return list(input_ids.unbind(0))
        raise UserError(f"input_ids must be [tokens] or [batch, tokens]; got shape {tuple(input_ids.shape)}")
    if isinstance(input_ids, (str, bytes)) or not isinstance(input_ids, Sequence):
        raise UserError(f"input_ids must be a tensor or a list of token sequences; got {type(input_ids).__name__}")
    if len(input_ids) > 0 and all(isinstance(t, int) for t in input_ids):
        input_ids = [input_ids]  # one prompt given as a flat list of ints
    rows = []
    for i, row in enumerate(input_ids):
        if isinstance(row, Tensor):
            if row.dim() != 1:
                raise UserError(f"prompt {i} must be 1-D; got shape {tuple(row.shape)}")
            rows.append(row)
        elif isinstance(row, Sequence) and all(isinstance(t, int) for t in row):
            rows.append(torch.tensor(list(row), dtype=torch.long, device=device))
        else:
            raise UserError(f"prompt {i} must be a 1-D tensor or a list of ints; got {type(row).__name__}")
    return rows


def _check_prompts(model, rows: list[Tensor], device: torch.device) -> None:
    if not rows:
        raise UserError("input_ids holds no prompt; allowed: at least one prompt of at least 1 token")
    devices = {str(r.device) for r in rows}
    dtypes = {str(r.dtype) for r in rows}
    if len(devices) > 1:
        raise UserError(f"prompts are on different devices ({', '.join(sorted(devices))}); "
                        "allowed: every prompt on the model's device")
    if len(dtypes) > 1:
        raise UserError(f"prompts have different dtypes ({', '.join(sorted(dtypes))}); "
                        "allowed: one integer dtype for all prompts")
    if rows[0].device != device:
        raise UserError(f"input_ids are on {rows[0].device} but the model is on {device}; "
                        "allowed: input_ids on the model's device")
    if rows[0].dtype.is_floating_point or rows[0].dtype.is_complex or rows[0].dtype == torch.bool:
        raise UserError(f"input_ids have dtype {rows[0].dtype}; allowed: an integer dtype (token ids)")
    vocab = model.config.vocab_size
    for i, row in enumerate(rows):
        if row.numel() == 0:
            raise UserError(f"prompt {i} is empty; allowed: at least 1 token")
        if int(row.min()) < 0 or int(row.max()) >= vocab:
            raise UserError(f"prompt {i} has token ids outside 0..{vocab - 1}")


def _check_sampling(max_new_tokens, temperature, top_k, top_p, prefill_chunk) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise UserError(f"max_new_tokens={max_new_tokens!r} is invalid; allowed: an integer >= 0")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise UserError(f"temperature={temperature!r} is invalid; allowed: a number >= 0 (0 = greedy)")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise UserError(f"top_k={top_k!r} is invalid; allowed: null or an integer >= 1")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise UserError(f"top_p={top_p!r} is invalid; allowed: null or a number in (0, 1]")
    if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 1):
        raise UserError(f"prefill_chunk={prefill_chunk!r} is invalid; allowed: null or an integer >= 1")


def _stop_sequences(stop) -> list[tuple[int, ...]]:
    """A stop sequence (bytes, str as UTF-8, or token ids) or a list of them."""
    if stop is None:
        return []
    if isinstance(stop, (str, bytes)) or (isinstance(stop, Sequence) and stop and all(isinstance(t, int) for t in stop)):
        stop = [stop]
    sequences = []
    for item in stop:
        seq = tuple(item.encode("utf-8") if isinstance(item, str) else item)
        if not seq or not all(isinstance(t, int) for t in seq):
            raise UserError(f"stop={item!r} is invalid; allowed: non-empty bytes, str or token ids")
        sequences.append(seq)
    return sequences


# ---------------------------------------------------------------------------------- sampling
def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """One token per row from logits [B, V]: greedy when temperature == 0."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked before it already reach top_p (the first is kept)
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------------------- generate
def _check_length(model, longest_prompt: int, max_new_tokens: int) -> None:
    limit = model.config.max_seq_len
    if model.can_slide:
        return
    if longest_prompt > limit:
        raise UserError(f"prompt of {longest_prompt} tokens exceeds max_seq_len={limit} and this model "
                        "has global attention, so it cannot slide; allowed: prompts of at most "
                        f"{limit} tokens")
    if longest_prompt + max_new_tokens > limit:
        raise UserError(f"prompt ({longest_prompt} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                        f"max_seq_len={limit}; allowed: max_new_tokens <= {limit - longest_prompt}")


def generate(model, input_ids, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None, *,
             stop=None, use_cache: bool = True, prefill_chunk: int | None = None,
             on_token: Callable[[int, int], None] | None = None) -> Generation:
    """Continue each prompt by up to `max_new_tokens` tokens.

    input_ids: a [T] or [B, T] integer tensor, or a list of prompts of different lengths (lists
    of ints or 1-D tensors), on the model's device. stop: bytes / str (UTF-8) / token ids, or a
    list of them; a row ends when its new tokens end with one. use_cache=False recomputes the
    full forward at every step (a reference for the cached path). prefill_chunk: feed the common
    prompt prefix in chunks of this many tokens (exact for every mixer; bounds prefill memory).
    on_token(row, token) is called for every new token as soon as it is chosen (streaming).
    """
    _check_sampling(max_new_tokens, temperature, top_k, top_p, prefill_chunk)
    stops = _stop_sequences(stop)
    device = model.embed.weight.device
    rows = _rows(input_ids, device)
    _check_prompts(model, rows, device)
    lengths = [int(r.numel()) for r in rows]
    _check_length(model, max(lengths), max_new_tokens)
    prompts = [r.tolist() for r in rows]
    result = Generation(prompts, [[] for _ in rows], [False] * len(rows))
    if max_new_tokens == 0:
        return result
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _decode_loop(model, rows, lengths, max_new_tokens, result, stops, use_cache,
                         prefill_chunk, on_token, lambda logits: sample_next(
                             logits, temperature, top_k, top_p, generator))
    finally:
        model.train(was_training)
    return result


def _decode_loop(model, rows, lengths, max_new_tokens, result, stops, use_cache, prefill_chunk,
                 on_token, sample) -> None:
    batch, shortest = len(rows), min(lengths)
    total = max(lengths) + max_new_tokens
    device = rows[0].device
    tokens = torch.zeros(batch, total, dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        tokens[i, :lengths[i]] = row.long()
    in_prompt_until = torch.tensor(lengths, device=device)
    cache = model.new_cache(batch, total) if use_cache else None

    logits = _prefill(model, tokens[:, :shortest], cache, prefill_chunk)
    active = [True] * batch
    for position in range(shortest, total):
        sampled = sample(logits[:, -1])
        in_prompt = position < in_prompt_until
        step_tokens = torch.where(in_prompt, tokens[:, position], sampled)
        tokens[:, position] = step_tokens
        for i in _rows_generating(in_prompt, active):
            token = int(step_tokens[i])
            result.tokens[i].append(token)
            if on_token is not None:
                on_token(i, token)
            if _ends_with_stop(result.tokens[i], stops):
                result.stopped[i] = True
            if result.stopped[i] or len(result.tokens[i]) >= max_new_tokens:
                active[i] = False
        if not any(active):
            return
        if cache is not None:
            logits = model(step_tokens[:, None], cache=cache)
        else:
            logits = model(tokens[:, :position + 1])


def _prefill(model, prefix: Tensor, cache, chunk: int | None) -> Tensor:
    if cache is None or chunk is None:
        return model(prefix, cache=cache)
    logits = None
    for start in range(0, prefix.shape[1], chunk):
        logits = model(prefix[:, start:start + chunk], cache=cache)
    return logits


def _rows_generating(in_prompt: Tensor, active: list[bool]) -> list[int]:
    flags = in_prompt.tolist()
    return [i for i, (prompt, on) in enumerate(zip(flags, active)) if on and not prompt]


def _ends_with_stop(generated: list[int], stops: list[tuple[int, ...]]) -> bool:
    return any(len(generated) >= len(s) and tuple(generated[-len(s):]) == s for s in stops)


# ---------------------------------------------------------------------------------- CLI
def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate", help="sample text from a checkpoint, streaming it as it is produced",
        description="Sample a continuation of --prompt from a saved model (byte-level tokens), "
                    "printing the text as it is produced.")
    parser.add_argument("--checkpoint", required=True,
                        help="a saved model directory (config.json + safetensors), or a training "
                             "run folder / checkpoint folder (its latest checkpoint)")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=None,
                        help="stop when the generated text ends with this string (repeatable)")
    parser.add_argument("--no-cache", action="store_true",
                        help="recompute the full forward at every step (slow; for checking)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.set_defaults(func=_run_cli)


def load_checkpoint(path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None):
    """A model from a directory saved by `resstream.hf.save_model` / HF `save_pretrained`
    (config.json + safetensors), or from a training run / checkpoint folder
    (`resstream.train`: trainer_state.json + model.safetensors; its latest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; allowed: a saved model "
                                "directory, a training run folder or one of its checkpoints")
    if (path / "config.json").is_file():
        from resstream.hf import load_model

        model = load_model(path, device=device)
    else:
        from resstream.train.sampling import load_model_from_checkpoint

        model, _ = load_model_from_checkpoint(path, device=device)
    return model if dtype is None else model.to(dtype)


def _run_cli(args: argparse.Namespace) -> int:
    from resstream.data.tokenizer import get_tokenizer

    device, dtype = parse_device(args.device), getattr(torch, args.dtype)
    require_dtype_runs(dtype, device, "--dtype")
    model = load_checkpoint(args.checkpoint, device=device, dtype=dtype)
    tokenizer = get_tokenizer("bytes")
    if model.config.vocab_size < tokenizer.vocab_size:
        raise UserError(f"the checkpoint's vocab_size={model.config.vocab_size} is smaller than the "
                        f"byte tokenizer's {tokenizer.vocab_size}; allowed: a byte-level model")
    prompt = torch.as_tensor(tokenizer.encode(args.prompt), dtype=torch.long, device=args.device)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = sys.stdout

    def stream(row: int, token: int) -> None:
        text = decoder.decode(bytes([token & 0xFF])) if token < 256 else ""
        if text:
            out.write(text)
            out.flush()

    out.write(args.prompt)
    out.flush()
    model.generate(prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                   stop=args.stop, use_cache=not args.no_cache, on_token=stream)
    out.write(decoder.decode(b"", final=True) + "\n")
    out.flush()
    return 0
