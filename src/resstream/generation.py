"""Text generation with the decode cache: sampling, batched prompts of different lengths, stop
sequences, and the `resstream generate` command (streams text as it is produced; `resstream
sample` is the same command under its older name). There is one sampler: this one.

`generate` returns what Hugging Face and nanoGPT users expect, a LongTensor [B, T] of prompt +
new tokens; rows of different lengths are right-padded with `pad_token_id` (default 0), and
`return_dict=True` gives the `Generation` record instead (per-row prompts, new tokens, lengths,
stop flags).

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
from typing import Callable, Sequence

import torch
from torch import Tensor

from resstream.errors import UserError
from resstream.hardware import parse_device, require_dtype_runs


@dataclass
class Generation:
    """Result of `generate(..., return_dict=True)`: per row, the prompt, the new tokens (a stop
    sequence that ended the row is included), and whether the row stopped on a stop sequence."""

    prompts: list[list[int]]
    tokens: list[list[int]]
    stopped: list[bool]
    device: torch.device | None = None  # where `tensor()` puts its result (None: the CPU)

    def sequences(self) -> list[list[int]]:
        """Per row: prompt + new tokens."""
        return [p + t for p, t in zip(self.prompts, self.tokens)]

    @property
    def lengths(self) -> list[int]:
        """Per row: the number of real tokens (prompt + new) in that row of `tensor()`."""
        return [len(p) + len(t) for p, t in zip(self.prompts, self.tokens)]

    def tensor(self, pad_token_id: int = 0) -> Tensor:
        """[B, max(lengths)] LongTensor of prompt + new tokens, right-padded with pad_token_id."""
        rows = self.sequences()
        out = torch.full((len(rows), max(self.lengths)), pad_token_id, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        return out if self.device is None else out.to(self.device)


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


def _check_sampling(max_new_tokens, temperature, top_k, top_p, prefill_chunk, pad_token_id=0) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise UserError(f"max_new_tokens={max_new_tokens!r} is invalid; allowed: an integer >= 0")
    # NaN passes `< 0` and poisons every probability (torch.multinomial then raises)
    if not isinstance(temperature, (int, float)) or not 0 <= temperature < float("inf"):
        raise UserError(f"temperature={temperature!r} is invalid; allowed: a finite number >= 0 (0 = greedy)")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise UserError(f"top_k={top_k!r} is invalid; allowed: null or an integer >= 1")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise UserError(f"top_p={top_p!r} is invalid; allowed: null or a number in (0, 1]")
    if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 1):
        raise UserError(f"prefill_chunk={prefill_chunk!r} is invalid; allowed: null or an integer >= 1")
    if not isinstance(pad_token_id, int) or isinstance(pad_token_id, bool):
        raise UserError(f"pad_token_id={pad_token_id!r} is invalid; allowed: an integer")


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
def _check_length(model, longest_prompt: int, max_new_tokens: int, crop_context: bool) -> None:
    limit = model.config.max_seq_len
    if model.can_slide:
        return
    if longest_prompt > limit:
        raise UserError(f"prompt of {longest_prompt} tokens exceeds max_seq_len={limit} and this model "
                        "has global attention, so it cannot slide; allowed: prompts of at most "
                        f"{limit} tokens")
    if longest_prompt + max_new_tokens > limit and not crop_context:
        raise UserError(f"prompt ({longest_prompt} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                        f"max_seq_len={limit}; allowed: max_new_tokens <= {limit - longest_prompt}, "
                        "or crop_context=True")


def generate(model, input_ids, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None, *,
             stop=None, use_cache: bool = True, prefill_chunk: int | None = None,
             on_token: Callable[[int, int], None] | None = None, crop_context: bool = False,
             pad_token_id: int = 0, return_dict: bool = False,
             compile: bool = False) -> Tensor | Generation:
    """Continue each prompt by up to `max_new_tokens` tokens.

    Returns a LongTensor [B, T] on the model's device: each row is its prompt + new tokens (a
    [T] prompt gives B = 1), rows shorter than the longest (different prompt lengths, or a row
    that ended on a stop sequence) right-padded with `pad_token_id` (default 0, which is also a
    real token id: use the per-row lengths to tell padding from tokens). return_dict=True returns
    the `Generation` record instead: `.prompts`, `.tokens` (new tokens), `.stopped`,
    `.lengths` (per row) and `.tensor(pad_token_id)` (the tensor above).

    input_ids: a [T] or [B, T] integer tensor, or a list of prompts of different lengths (lists
    of ints or 1-D tensors), on the model's device. stop: bytes / str (UTF-8) / token ids, or a
    list of them; a row ends when its new tokens end with one. use_cache=False recomputes the
    full forward at every step (a reference for the cached path). prefill_chunk: feed the common
    prompt prefix in chunks of this many tokens (exact for every mixer; bounds prefill memory).
    on_token(row, token) is called for every new token as soon as it is chosen (streaming).
    crop_context=True lets a model with global attention generate past max_seq_len, as
    nanoGPT's sampler does: when the context is full it continues from its last
    max_seq_len // 2 tokens (re-read into a fresh cache; without the cache, the last
    max_seq_len tokens at every step). Models that can slide never need it.
    compile=True runs the one-token decode steps through torch.compile, compiled once per model
    (resstream.compiled_decode); the prompt is read eagerly.
    """
    _check_sampling(max_new_tokens, temperature, top_k, top_p, prefill_chunk, pad_token_id)
    stops = _stop_sequences(stop)
    device = model.embed.weight.device
    rows = _rows(input_ids, device)
    _check_prompts(model, rows, device)
    lengths = [int(r.numel()) for r in rows]
    _check_length(model, max(lengths), max_new_tokens, crop_context)
    prompts = [r.tolist() for r in rows]
    result = Generation(prompts, [[] for _ in rows], [False] * len(rows), device)
    if max_new_tokens > 0:
        generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
        step = model
        if compile and use_cache:
            from resstream.compiled_decode import compiled_decode_step

            step = compiled_decode_step(model)
        _run(model, rows, lengths, max_new_tokens, result, stops, use_cache, prefill_chunk,
             on_token, lambda logits: sample_next(logits, temperature, top_k, top_p, generator),
             step)
    return result if return_dict else result.tensor(pad_token_id)


def _run(model, *loop_args) -> None:
    """The decode loop in eval mode without autograd (the caller's mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _decode_loop(model, *loop_args)
    finally:
        model.train(was_training)


def _decode_loop(model, rows, lengths, max_new_tokens, result, stops, use_cache, prefill_chunk,
                 on_token, sample, step) -> None:
    batch, shortest = len(rows), min(lengths)
    total = max(lengths) + max_new_tokens
    device = rows[0].device
    tokens = torch.zeros(batch, total, dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        tokens[i, :lengths[i]] = row.long()
    in_prompt_until = torch.tensor(lengths, device=device)
    # a model that cannot slide never holds more than max_seq_len tokens (crop_context re-reads)
    cache_len = total if model.can_slide else min(total, model.config.max_seq_len)
    cache = model.new_cache(batch, cache_len) if use_cache else None

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
        logits, cache = _next_logits(model, tokens[:, :position + 1], cache, step)


def _next_logits(model, seen: Tensor, cache, step):
    """(logits, cache) after the tokens `seen` [B, t], whose last one is new (`step`: the model,
    or its compiled one-token step). A model that cannot slide and has a full context (only
    reached with crop_context) continues from its last max_seq_len // 2 tokens in a fresh cache,
    or (no cache) from its last max_seq_len tokens."""
    limit = model.config.max_seq_len
    if cache is None:
        return model(seen if model.can_slide else seen[:, -limit:]), None
    if cache.length < cache.max_len:
        return step(seen[:, -1:], cache=cache), cache
    cache = model.new_cache(cache.batch_size, cache.max_len)
    return model(seen[:, -max(1, limit // 2):], cache=cache), cache


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
    """`resstream generate` and its older name `resstream sample`: one parser, one sampler."""
    for name, extra in (("generate", "."), ("sample", " (the same command as `generate`).")):
        parser = subparsers.add_parser(
            name, help="sample text from a saved model, streaming it as it is produced",
            description="Sample a continuation of --prompt from a saved model (byte-level "
                        "tokens), printing the text as it is produced" + extra)
        _add_arguments(parser)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    where = ("a run folder (its newest checkpoint), a checkpoint folder "
             "(checkpoints/step_NNNNNNNN) or a Hugging Face save folder")
    parser.add_argument("checkpoint_path", nargs="?", metavar="CHECKPOINT",
                        help=f"{where} (or give it as --checkpoint)")
    parser.add_argument("--checkpoint", help=where)
    parser.add_argument("--prompt", default="", help="the text to continue (default: none)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None, help="0 or unset: no top-k filter")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=None,
                        help="stop when the generated text ends with this string (repeatable)")
    parser.add_argument("--no-cache", action="store_true",
                        help="recompute the full forward at every step (slow; for checking)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the one-token decode step (compiled once; worth it "
                             "for long generations)")
    parser.set_defaults(func=_run_cli)


def _checkpoint_argument(args: argparse.Namespace) -> str:
    given = [p for p in (args.checkpoint_path, args.checkpoint) if p is not None]
    if len(given) != 1:
        what = "no checkpoint" if not given else "both CHECKPOINT and --checkpoint"
        raise UserError(f"{what} given; allowed: exactly one, as CHECKPOINT or --checkpoint")
    return given[0]


def _run_cli(args: argparse.Namespace) -> int:
    from resstream.data.tokenizer import get_tokenizer
    from resstream.loading import load_for_inference
    from resstream.smoke import smoke_cap

    path = _checkpoint_argument(args)
    device, dtype = parse_device(args.device), getattr(torch, args.dtype)
    require_dtype_runs(dtype, device, "--dtype")
    model = load_for_inference(path, device=device, dtype=dtype)
    tokenizer = get_tokenizer("bytes")
    if model.config.vocab_size < tokenizer.vocab_size:
        raise UserError(f"the checkpoint's vocab_size={model.config.vocab_size} is smaller than the "
                        f"byte tokenizer's {tokenizer.vocab_size}; allowed: a byte-level model")
    # an empty prompt starts from a newline, which is not printed (what `sample` always did)
    prompt = torch.as_tensor(tokenizer.encode(args.prompt or "\n"), dtype=torch.long, device=device)
    out, stream, finish = _text_stream()
    out.write(args.prompt)
    out.flush()
    model.generate(prompt, smoke_cap(args.max_new_tokens, 8, "--max-new-tokens"),
                   args.temperature, args.top_k or None, args.top_p, args.seed, stop=args.stop,
                   use_cache=not args.no_cache, on_token=stream, crop_context=True,
                   compile=args.compile)
    finish()
    return 0


def _text_stream():
    """(stdout, on_token, finish): bytes decoded incrementally as UTF-8 (invalid bytes show as
    U+FFFD), written as soon as they form text."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = sys.stdout

    def on_token(row: int, token: int) -> None:
        text = decoder.decode(bytes([token & 0xFF])) if token < 256 else ""
        if text:
            out.write(text)
            out.flush()

    def finish() -> None:
        out.write(decoder.decode(b"", final=True) + "\n")
        out.flush()

    return out, on_token, finish
