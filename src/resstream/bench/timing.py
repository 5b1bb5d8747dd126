"""Timing helpers shared by the benchmarks: one timed measurement, paired ratios, tables."""
from __future__ import annotations

import json
import random
import statistics
from typing import Callable

import torch
from torch.utils.benchmark.utils.timer import timer as clock

from resstream.errors import UserError


def seconds_per_call(fn: Callable[[], object], number: int = 1) -> float:
    """Mean wall seconds per call of `fn` over `number` back-to-back calls, read from the clock
    of torch.utils.benchmark (which synchronises the accelerator before reading the time, so
    queued GPU work is counted). One measurement, no warm-up calls of its own (Timer.timeit
    would add two, which hides a compile in the first call): the benchmarks warm up and
    interleave their variants themselves, so that a slow phase of a shared machine hits every
    variant alike."""
    start = clock()
    for _ in range(number):
        fn()
    return (clock() - start) / number


def paired_ratios(times: list[float], reference: list[float]) -> list[float]:
    """Per repeat, a variant's time over the reference's time in the same repeat. The two ran
    moments apart, so a slow phase of a shared machine scales both and cancels."""
    return [t / r for t, r in zip(times, reference, strict=True)]


def paired_ratio(times: list[float], reference: list[float]) -> tuple[float, tuple[float, float]]:
    """The median of `paired_ratios` and its 95% bootstrap interval."""
    ratios = paired_ratios(times, reference)
    return statistics.median(ratios), median_interval(ratios)


def median_interval(values: list[float], level: float = 0.95, resamples: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the median of `values` (resampling the repeats)."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values)))
                     for _ in range(resamples))
    tail = (1 - level) / 2
    return medians[int(tail * resamples)], medians[min(resamples - 1, int((1 - tail) * resamples))]


def set_threads(threads: int | None) -> None:
    """The benchmarks' --threads flag: None keeps torch's default."""
    if threads is None:
        return
    if threads < 1:
        raise UserError(f"--threads={threads} is invalid; allowed: an integer >= 1")
    torch.set_num_threads(threads)


def print_result(result: dict, fmt: str, to_markdown: Callable[[dict], str]) -> None:
    """The benchmarks' --format flag: the result as JSON, or as Markdown tables."""
    print(json.dumps(result, indent=2) if fmt == "json" else to_markdown(result))


def format_table(headers: list[str], rows: list[list[object]]) -> str:
    """A plain aligned text table (also valid Markdown)."""
    cells = [[str(c) for c in row] for row in [headers] + rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
