"""`resstream bench attention`: the backends of `resstream.ops.local_attention` next to full causal
SDPA, SDPA with a dense band mask and the `local-attention` package, timed side by side in one run.

For each sequence length N (batch B, H heads of dimension D, one window w), on random float32
q, k, v [B, H, N, D]:
  * forward: one call under torch.no_grad() (inference);
  * forward+backward: one call with gradients, then backward of a fixed random output gradient
    into q, k and v.
Variants:
  chunked          local_attention(..., backend="chunked")  (the CPU training path)
  reference        local_attention(..., backend="reference"): dense band mask, N x N scores;
                   skipped where its estimated memory (3 score matrices) exceeds --dense-limit-gb
  flex             local_attention(..., backend="flex"), compiled; forward only on CPU (flex has
                   no CPU backward); compile time is excluded (one untimed warm-up call) and
                   reported separately; --no-flex skips it
  sdpa_causal      F.scaled_dot_product_attention(is_causal=True): full causal attention, the
                   cost without a window (a different function, so no "same" check)
  sdpa_band_mask   SDPA with a boolean [N, N] band mask: the same function the usual way
  local_attention  lucidrains' `local-attention` package with the same window semantics:
                   LocalAttention(window_size=w-1, causal=True, look_backward=1,
                   exact_windowsize=True, autopad=True) attends to distance <= w-1, i.e. w keys
                   (needs w >= 2; skipped if the package is not installed)
Repeats are interleaved (repeat r times every variant once, in turn), so a slow phase of a shared
machine hits every variant alike; we report the minimum over repeats (interference from other
processes only ever adds time; ratios and goals use it) and the median next to it. The header
gives the 1-min load average: on a 2-core machine where another process keeps one core busy,
2-thread runs of code made of many small ops (chunked) wait on their second thread at every op;
--threads 1 measures the kernels without that effect. Each variant's
forward output is compared with chunked's ("max |diff|"), so the table also shows they compute
the same function.

Goals (docs/design.md, decision 8): at the largest N, chunked forward+backward >= 8x faster
than full causal SDPA and >= 2x faster than `local-attention`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
from typing import Callable

import torch
import torch.nn.functional as F

from resstream.bench.timing import format_table, print_result, seconds_per_call, set_threads
from resstream.errors import UserError
from resstream.hardware import parse_device
from resstream.ops import local_attention, local_attention_mask
from resstream.ops.local_attention import _flex_available
from resstream.smoke import smoke_args

SIZES = (1024, 4096, 16384)
QUICK_SIZES = (64, 200)
GOALS = {"sdpa_causal": 8.0, "local_attention": 2.0}  # chunked fwd+bwd speed-up at the largest N
SAME_FUNCTION_TOLERANCE = 1e-4  # float32 max |diff| of forward outputs against chunked


@dataclasses.dataclass
class Variant:
    name: str
    forward: Callable | None  # (q, k, v) -> out, or None when skipped
    backward: bool = True  # whether forward+backward is timed
    note: str = ""
    same_function: bool = True
    times: dict = dataclasses.field(default_factory=lambda: {"fwd": [], "fwd_bwd": []})
    max_diff: float | None = None
    compile_s: float | None = None


def _package_variant(window: int) -> Variant:
    try:
        from local_attention import LocalAttention
    except ImportError:
        return Variant("local_attention", None, note="package not installed")
    if window < 2:
        return Variant("local_attention", None, note="needs window >= 2 (its window_size = w - 1)")
    module = LocalAttention(window_size=window - 1, causal=True, look_backward=1,
                            exact_windowsize=True, autopad=True, dropout=0.0,
                            use_rotary_pos_emb=False)
    return Variant("local_attention", lambda q, k, v: module(q, k, v))


def build_variants(n: int, args, elem_bytes: int, device) -> list[Variant]:
    window, scores = args.window, args.batch * args.heads * n * n
    dense_gb = 3 * scores * elem_bytes / 2**30
    variants = [Variant("chunked", lambda q, k, v: local_attention(q, k, v, window, "chunked"))]
    if dense_gb <= args.dense_limit_gb:
        variants.append(Variant("reference", lambda q, k, v: local_attention(q, k, v, window, "reference")))
    else:
        variants.append(Variant("reference", None, note=f"skipped: ~{dense_gb:.0f} GB of scores "
                                                        f"> --dense-limit-gb {args.dense_limit_gb:g}"))
    if args.no_flex:
        variants.append(Variant("flex", None, note="skipped (--no-flex)"))
    elif not _flex_available():
        variants.append(Variant("flex", None, note="flex_attention not available"))
    else:
        cpu = device.type == "cpu"
        variants.append(Variant("flex", lambda q, k, v: local_attention(q, k, v, window, "flex"),
                                backward=not cpu, note="forward only (no CPU backward)" if cpu else ""))
    sdpa = F.scaled_dot_product_attention
    variants.append(Variant("sdpa_causal", lambda q, k, v: sdpa(q, k, v, is_causal=True),
                            note="full causal: no window", same_function=False))
    band = local_attention_mask(n, n, window, device)
    variants.append(Variant("sdpa_band_mask", lambda q, k, v: sdpa(q, k, v, attn_mask=band)))
    variants.append(_package_variant(window))
    return variants


def _run_size(n: int, args, device, dtype) -> list[Variant]:
    shape = (args.batch, args.heads, n, args.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device=device, dtype=dtype)
    variants = build_variants(n, args, torch.finfo(dtype).bits // 8, device)
    ready = [var for var in variants if var.forward is not None]

    def forward(var):
        with torch.no_grad():
            return var.forward(q, k, v)

    def forward_backward(var):
        q.grad = k.grad = v.grad = None
        var.forward(q, k, v).backward(grad)

    with torch.no_grad():
        expected = ready[0].forward(q, k, v)  # chunked
    for var in ready:
        outputs = []  # the warm-up (it compiles flex), then checked against chunked
        warm_up = seconds_per_call(lambda: outputs.append(forward(var)))
        out = outputs[0]
        if var.name == "flex":
            var.compile_s = warm_up
        if var.same_function:
            var.max_diff = (out.float() - expected.float()).abs().max().item()
    for _ in range(args.repeats):
        for var in ready:
            var.times["fwd"].append(seconds_per_call(lambda: forward(var)))
            if var.backward:
                var.times["fwd_bwd"].append(seconds_per_call(lambda: forward_backward(var)))
    return variants


def _stats(seconds: list[float]) -> dict | None:
    if not seconds:
        return None
    return {"min_ms": min(seconds) * 1e3, "median_ms": statistics.median(seconds) * 1e3}


def summarize(results: dict[int, list[Variant]], args, device) -> dict:
    rows = []
    for n, variants in results.items():
        chunked = {m: _stats(variants[0].times[m]) for m in ("fwd", "fwd_bwd")}
        for var in variants:
            row = {"n": n, "variant": var.name, "note": var.note, "max_diff": var.max_diff,
                   "compile_s": var.compile_s}
            for mode in ("fwd", "fwd_bwd"):
                stats = _stats(var.times[mode])
                row[mode] = stats
                row[f"{mode}_speedup_of_chunked"] = (
                    stats["min_ms"] / chunked[mode]["min_ms"] if stats and chunked[mode] else None)
            rows.append(row)
    result = {"device": str(device), "threads": torch.get_num_threads(), "window": args.window,
              "load_average_1min": {"start": args.load_start, "end": _load()},
              "heads": args.heads, "head_dim": args.head_dim, "batch": args.batch,
              "repeats": args.repeats, "rows": rows}
    result["goals"] = check_goals(rows, max(results))
    return result


def check_goals(rows: list[dict], n: int) -> list[dict]:
    goals = []
    by_name = {r["variant"]: r for r in rows if r["n"] == n}
    for name, target in GOALS.items():
        speedup = by_name.get(name, {}).get("fwd_bwd_speedup_of_chunked")
        goals.append({"goal": f"N={n}: chunked fwd+bwd >= {target:g}x faster than {name}",
                      "value": None if speedup is None else round(speedup, 2),
                      "met": speedup is not None and speedup >= target})
    same = [r for r in rows if r["max_diff"] is not None]
    worst = max((r["max_diff"] for r in same), default=0.0)
    goals.append({"goal": f"every same-function variant within {SAME_FUNCTION_TOLERANCE:g} of chunked",
                  "value": f"{worst:.1e}", "met": worst <= SAME_FUNCTION_TOLERANCE})
    return goals


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _loads(result: dict) -> str:
    load = result["load_average_1min"]
    return f"{load['start']} at start, {load['end']} at end"


def _cell(stats: dict | None) -> str:
    return "-" if stats is None else f"{stats['min_ms']:.1f} ({stats['median_ms']:.1f})"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def to_markdown(result: dict) -> str:
    lines = [f"local attention, window {result['window']}, B={result['batch']}, H={result['heads']}, "
             f"D={result['head_dim']}, {result['device']}, {result['threads']} thread(s), "
             f"min (median) of {result['repeats']} interleaved repeats; speed-up = variant time / "
             f"chunked time; 1-min load average {_loads(result)} (other processes on the machine "
             f"slow down multi-threaded runs of many small ops most)", ""]
    headers = ["N", "variant", "fwd ms", "fwd+bwd ms", "chunked speed-up fwd",
               "chunked speed-up fwd+bwd", "max |diff| vs chunked", "note"]
    rows = []
    for r in result["rows"]:
        diff = "-" if r["max_diff"] is None else f"{r['max_diff']:.1e}"
        note = r["note"] + (f"; compile {r['compile_s']:.1f} s" if r["compile_s"] is not None else "")
        rows.append([r["n"], r["variant"], _cell(r["fwd"]), _cell(r["fwd_bwd"]),
                     _ratio(r["fwd_speedup_of_chunked"]), _ratio(r["fwd_bwd_speedup_of_chunked"]),
                     diff, note.strip("; ")])
    lines.append(format_table(headers, rows))
    lines += ["", format_table(["goal", "measured", "met"],
                               [[g["goal"], g["value"], "yes" if g["met"] else "NO"]
                                for g in result["goals"]])]
    return "\n".join(lines)


def _positive(args, *names: str) -> None:
    for name in names:
        value = getattr(args, name.replace("-", "_"))
        if value < 1:
            raise UserError(f"--{name}={value} is invalid; allowed: an integer >= 1")


def run(args: argparse.Namespace) -> int:
    smoke_args(args, "bench attention", quick=True, no_flex=True)  # RESSTREAM_SMOKE: seconds
    if args.quick:
        sizes, args.window, args.heads, args.head_dim, args.repeats = list(QUICK_SIZES), 16, 2, 8, 2
    else:
        try:
            sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
        except ValueError:
            raise UserError(f"--sizes={args.sizes!r} is invalid; allowed: comma-separated integers") from None
        if not sizes or min(sizes) < 1:
            raise UserError(f"--sizes={args.sizes!r} is invalid; allowed: comma-separated integers >= 1")
    _positive(args, "window", "heads", "head-dim", "batch", "repeats")
    set_threads(args.threads)
    device = parse_device(args.device)
    torch.manual_seed(0)
    args.load_start = _load()
    results = {n: _run_size(n, args, device, torch.float32) for n in sorted(set(sizes))}
    result = summarize(results, args, device)
    print_result(result, args.format, to_markdown)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("attention", help="local-attention backends vs SDPA and local-attention",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(str(n) for n in SIZES),
                        help="comma-separated sequence lengths N")
    parser.add_argument("--window", type=int, default=128, help="window w (keys, the current one included)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (min, median)")
    parser.add_argument("--dense-limit-gb", type=float, default=4.0,
                        help="skip the reference backend above this estimated score memory")
    parser.add_argument("--no-flex", action="store_true", help="skip the flex backend (compiles per size)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--format", choices=("markdown", "json"), default="markdown")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, 2 repeats")
    parser.set_defaults(func=run)
