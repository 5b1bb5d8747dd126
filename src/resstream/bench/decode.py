"""`resstream bench decode`: per-token decode latency, decode-cache bytes and the depth state of
an in-flight token, for the baseline, the two ShortSWA configurations and several depth
operators, at several context lengths, measured side by side in one run with ratios to the
baseline.

Configurations (all with the same shape; operators with their default options):
  baseline       standard residual, global attention only
  alg1_shortswa  Algorithm 1: ShortSWA sub-block (window w) before global attention
  shortswa_only  ShortSWA replaces global attention ([ShortSWA, MLP] blocks): bounded state
  depth_swa, block_attnres, attnres, ddl, hyper   depth operators on the baseline block
Configurations whose operator is not registered are listed as such. `--configs` also takes the
name of any registered depth operator (with its default options on the baseline block).

What is measured, per context length c (capped at max_seq_len - 1):
  * decode ms/token: one cached forward of one token per sequence at position c. The cache is
    allocated for c + 1 positions and filled with random values up to length c (the cost of a
    decode step does not depend on what the cache holds), and reset to length c before every
    step. Steps of all configurations are interleaved (repeat r rotates their order), so a
    slow phase of a shared machine hits every configuration alike; each repeat starts with one
    untimed step, so a configuration is timed in steady state (its weights and cache as warm as
    when it decodes alone: on a CPU with a large last-level cache, the step after another
    configuration streamed its 16k-token KV cache would otherwise start cold). We report the
    minimum over repeats (the cost without interference from other processes, which only ever
    add time) and the median next to it, and two ratios to the baseline: of the minima, and
    paired (the median over repeats of a configuration's time over the baseline's time in the
    same repeat, moments apart) with its 95% bootstrap interval. On a shared machine the paired
    ratio varies least between runs (drifts in memory bandwidth scale both and cancel; a
    minimum depends on one lucky sample of each), so the latency goals of the depth operators
    use it.
  * cache bytes: `ModelCache.nbytes()` of a cache holding c tokens (the bytes of every cache
    tensor, measured), next to the formula 2 L c d_kv b for global attention plus 2 L w d_kv b
    for ShortSWA (b = bytes per element); cross-token state of other modules (ShortConv, Canon,
    DDL's TC/EC) is in the measured value only.
  * depth state per in-flight token: the largest total size of the tensors the depth operator
    carries between sublayers (its `state`, walked recursively, parameters excluded) during
    one decode step, for 2 sequences minus for 1 (what a forward holds once, whatever the
    batch, such as pseudo-queries folded from the parameters, cancels), next to the
    operator's own formula depth_state_values() x b (its d-vectors, depth_state_vectors() x d,
    plus any per-token scalars beside them).
  * recompute: the baseline's full forward over c = 1024 tokens without a cache, i.e. what one
    new token costs without incremental decoding.
  * growth: for the baseline and the ShortSWA-only stack, the per-token latency at the longest
    context over that at 1024, with the two contexts interleaved in one loop (paired median
    and its 95% interval). The table's rows come from one loop per context, each beside the
    other configurations' caches of that context (up to 512 MiB each), so a ratio of two rows
    also compares two phases of the run; the growth goal uses this measurement instead.
Goals (docs/design.md, decision 8): shortswa_only's per-token latency grows <= 10% from 1024
to 16384 while the baseline's grows; cached decoding >= 20x faster than recomputing at 1024 (baseline); depth
operators <= 15% over the baseline at 1024 (block_attnres <= 5%).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
from typing import Any

import torch

from resstream.bench.timing import (format_table, paired_ratio, print_result, seconds_per_call,
                                    set_threads)
from resstream.config import ModelConfig
from resstream.errors import UserError
from resstream.hardware import parse_device, require_dtype_runs
from resstream.registry import DEPTH_OPERATORS
from resstream.smoke import smoke_args

CONFIGS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "alg1_shortswa": {"local_mixer": "shortswa"},
    "shortswa_only": {"local_mixer": "shortswa", "mixer_options": {"replace_attention": True}},
    "depth_swa": {"depth": "depth_swa"},
    "block_attnres": {"depth": "block_attnres"},
    "attnres": {"depth": "attnres"},
    "ddl": {"depth": "ddl"},
    "hyper": {"depth": "hyper"},
}
CONTEXTS = (256, 1024, 4096, 16384)
GROWTH_CONFIGS = ("baseline", "shortswa_only")  # latency growth with context, measured paired
DEPTH_GOALS = {"block_attnres": 1.05}  # others: 1.15
DEFAULT_DEPTH_GOAL = 1.15


@dataclasses.dataclass
class Variant:
    name: str
    changes: dict
    model: Any = None
    error: str | None = None
    times: dict = dataclasses.field(default_factory=dict)  # context -> list of seconds per token
    cache_bytes: dict = dataclasses.field(default_factory=dict)
    cache_formula: dict = dataclasses.field(default_factory=dict)
    state_bytes: int | None = None
    state_formula: int | None = None


# ---------------------------------------------------------------------------------- measurement
def config_changes(name: str) -> dict[str, Any]:
    """The model-config changes of a configuration: CONFIGS, else a registered depth operator."""
    return CONFIGS[name] if name in CONFIGS else {"depth": name}


def build_variants(base: ModelConfig, names: list[str], device, dtype) -> list[Variant]:
    from resstream.model import ResStreamLM

    variants = []
    for name in names:
        variant = Variant(name, config_changes(name))
        try:
            torch.manual_seed(0)
            variant.model = ResStreamLM(base.replace(**variant.changes)).to(device, dtype).eval()
        except UserError as error:
            variant.error = str(error).splitlines()[0]
        variants.append(variant)
    return variants


def cache_formula(model, context: int, batch: int) -> tuple[int, str]:
    """Bytes of the global-attention KV caches plus the ShortSWA rolling buffers, from shapes."""
    from resstream.mixers.shortswa import ShortSWABlock
    from resstream.model import Attention

    b = model.embed.weight.element_size()
    total, parts = 0, []
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    if attns:
        d_kv = attns[0].n_kv_heads * attns[0].head_dim
        total += len(attns) * 2 * context * d_kv * b * batch
        parts.append(f"2*{len(attns)}*{context}*{d_kv}*{b}")
    swas = [m for m in model.modules() if isinstance(m, ShortSWABlock)]
    if swas:
        att = swas[0].attention
        d_kv = att.n_kv_heads * att.head_dim
        total += len(swas) * 2 * swas[0].window * d_kv * b * batch
        parts.append(f"2*{len(swas)}*{swas[0].window}*{d_kv}*{b}")
    return total, " + ".join(parts) or "0"


def filled_cache(model, batch: int, context: int):
    """A cache with room for context + 1 positions, holding `context` random positions."""
    cache = model.new_cache(batch, context + 1)
    generator = torch.Generator(device="cpu").manual_seed(0)
    for tensor in cache.tensors():
        tensor.copy_(torch.randn(tensor.shape, generator=generator).to(tensor.dtype))
    cache.length = context
    return cache


def _tensor_storages(obj, found: dict, skip: set, seen: set) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.data_ptr() not in skip:
            found[storage.data_ptr()] = storage.nbytes()
    elif isinstance(obj, dict):
        for value in obj.values():
            _tensor_storages(value, found, skip, seen)
    elif isinstance(obj, (list, tuple, set)):
        for value in obj:
            _tensor_storages(value, found, skip, seen)
    elif dataclasses.is_dataclass(obj) or hasattr(obj, "__dict__"):
        if isinstance(obj, torch.nn.Module):
            return
        for value in vars(obj).values():
            _tensor_storages(value, found, skip, seen)


def depth_state_peak_bytes(model, batch: int, device) -> int:
    """Largest total size of the depth operator's state between sublayers during one decode
    step of `batch` sequences (one token each, at position 0 of a fresh cache)."""
    op = model.depth
    cache = model.new_cache(batch, 1)
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    skip |= {t.untyped_storage().data_ptr() for t in cache.tensors()}
    peak = [0]

    def record(state):
        found: dict = {}
        _tensor_storages(state, found, skip, set())
        peak[0] = max(peak[0], sum(found.values()))
        return state

    original_init, original_write = op.init_state, op.write
    op.init_state = lambda x0, ctx: record(original_init(x0, ctx))
    op.write = lambda state, site, out, ctx: record(original_write(state, site, out, ctx))
    try:
        with torch.no_grad():
            model(torch.zeros(batch, 1, dtype=torch.long, device=device), cache=cache)
    finally:
        del op.init_state, op.write
    return peak[0]


def depth_state_bytes_per_token(model, device) -> int:
    """Depth state per in-flight token: the peak state of a 2-sequence decode step minus that
    of a 1-sequence step, so what a forward keeps once whatever the batch (e.g. pseudo-queries
    folded from the parameters) cancels and only what scales with tokens remains."""
    return depth_state_peak_bytes(model, 2, device) - depth_state_peak_bytes(model, 1, device)


def time_steps(model, token: torch.Tensor, cache, context: int, steps: int, warm: int = 1) -> float:
    """Seconds per decode step at position `context` (mean over `steps` steps), after `warm`
    untimed steps that bring this model's weights and cache back into the CPU caches."""
    def step():
        cache.length = context
        model(token, cache=cache)

    for _ in range(warm):
        step()
    return seconds_per_call(step, number=steps)


@torch.no_grad()
def run_benchmark(base: ModelConfig, names: list[str], contexts: list[int], batch: int,
                  repeats: int, steps: int, device, dtype, compile: bool = False) -> dict:
    variants = build_variants(base, names, device, dtype)
    ready = [v for v in variants if v.error is None]
    token = torch.randint(0, base.vocab_size, (batch, 1), device=device)
    for context in contexts:
        caches = {v.name: filled_cache(v.model, batch, context) for v in ready}
        for v in ready:
            v.cache_bytes[context] = v.model.new_cache(batch, context).nbytes()
            v.cache_formula[context] = cache_formula(v.model, context, batch)
            time_steps(v.model, token, caches[v.name], context, 2)  # warm-up
            v.times[context] = []
        for r in range(repeats):
            shift = r % len(ready)
            for v in ready[shift:] + ready[:shift]:
                v.times[context].append(time_steps(v.model, token, caches[v.name], context, steps))
        del caches
    for v in ready:
        v.state_bytes = depth_state_bytes_per_token(v.model, device)
        v.state_formula = v.model.depth.depth_state_values() * v.model.embed.weight.element_size()
    recompute = measure_recompute(ready, base, contexts, repeats, device)
    result = summarize(variants, base, contexts, batch, repeats, steps, device, dtype, recompute)
    result["growth"] = [measure_growth(v, goal_contexts(contexts), batch, repeats, steps, token)
                        for v in ready if v.name in GROWTH_CONFIGS and len(contexts) > 1]
    if compile:
        result["compiled"] = measure_compiled(ready, goal_contexts(contexts)[0], batch, repeats,
                                              steps, token)
    result["goals"] = check_goals(result, contexts)
    return result


COMPILED_BASELINE_GOAL = 1.5  # compiled baseline decode at least this much faster than eager


def measure_compiled(ready: list[Variant], context: int, batch: int, repeats: int, steps: int,
                     token: torch.Tensor) -> dict:
    """--compile: every configuration's one-token step compiled (resstream.compiled_decode,
    once per cache size, so at one context: the goals' context), timed interleaved with its
    eager step. Per configuration: eager and compiled ms/token (minima), eager/compiled, and
    the compiled step's paired ratio to the compiled baseline."""
    from resstream.compiled_decode import compiled_decode_step

    eager, compiled, compile_s = {}, {}, {}
    caches = {v.name: filled_cache(v.model, batch, context) for v in ready}
    for v in ready:
        step = compiled_decode_step(v.model)
        compile_s[v.name] = seconds_per_call(lambda: time_steps(step, token, caches[v.name],
                                                                context, 1, warm=0))
        eager[v.name], compiled[v.name] = [], []
    for r in range(repeats):
        shift = r % len(ready)
        for v in ready[shift:] + ready[:shift]:
            cache = caches[v.name]
            eager[v.name].append(time_steps(v.model, token, cache, context, steps))
            compiled[v.name].append(time_steps(compiled_decode_step(v.model), token, cache,
                                               context, steps))
    reference = compiled.get("baseline")
    rows = [{"config": v.name, "eager_ms": 1000 * min(eager[v.name]),
             "compiled_ms": 1000 * min(compiled[v.name]),
             "speedup": min(eager[v.name]) / min(compiled[v.name]),
             "compile_s": compile_s[v.name],
             **paired_columns(compiled[v.name], reference)} for v in ready]
    return {"context": context, "rows": rows}


def goal_contexts(contexts: list[int]) -> tuple[int, int]:
    """The contexts the goals compare: 1024 (else the shortest) and the longest."""
    return (1024 if 1024 in contexts else contexts[0]), contexts[-1]


def measure_growth(variant: Variant, pair: tuple[int, int], batch: int, repeats: int,
                   steps: int, token: torch.Tensor) -> dict:
    """One model's per-token latency at the longer context over the shorter, the two contexts
    interleaved (each repeat times both, moments apart; paired median and its 95% interval).
    The main loop runs context by context, beside the other configurations' caches (up to
    512 MiB each), so the ratio of its rows mixes two phases of the run; this does not."""
    low, high = pair
    caches = {c: filled_cache(variant.model, batch, c) for c in pair}
    times: dict[int, list] = {low: [], high: []}
    for r in range(repeats):
        for c in (pair if r % 2 == 0 else pair[::-1]):
            times[c].append(time_steps(variant.model, token, caches[c], c, steps))
    ratio, interval = paired_ratio(times[high], times[low])
    return {"config": variant.name, "from": low, "to": high, "ratio": ratio, "ratio_ci": interval}


def measure_recompute(ready: list[Variant], base, contexts, repeats, device) -> dict | None:
    baseline = next((v for v in ready if v.name == "baseline"), None)
    context = 1024 if 1024 in contexts else contexts[-1]
    if baseline is None:
        return None
    ids = torch.randint(0, base.vocab_size, (1, context), device=device)
    baseline.model(ids)  # warm-up
    times = [seconds_per_call(lambda: baseline.model(ids)) for _ in range(max(3, repeats // 4))]
    return {"context": context, "full_forward_ms": 1000 * min(times),
            "full_forward_median_ms": 1000 * statistics.median(times)}


# ---------------------------------------------------------------------------------- report
def summarize(variants, base, contexts, batch, repeats, steps, device, dtype, recompute) -> dict:
    ref = next((v for v in variants if v.name == "baseline" and v.error is None), None)
    rows = []
    for v in variants:
        if v.error is not None:
            rows.append({"config": v.name, "error": v.error})
            continue
        for c in contexts:
            ms = 1000 * min(v.times[c])
            ref_ms = 1000 * min(ref.times[c]) if ref else None
            formula_bytes, formula = v.cache_formula[c]
            rows.append({
                "config": v.name, "context": c, "decode_ms": ms,
                "decode_median_ms": 1000 * statistics.median(v.times[c]),
                "latency_ratio": ms / ref_ms if ref_ms else None,
                **paired_columns(v.times[c], ref.times[c] if ref else None),
                "cache_bytes": v.cache_bytes[c], "cache_formula_bytes": formula_bytes,
                "cache_formula": formula,
                "cache_ratio": v.cache_bytes[c] / ref.cache_bytes[c] if ref else None,
                "depth_state_bytes_per_token": v.state_bytes,
                "depth_state_formula_bytes": v.state_formula})
    setup = {"d_model": base.d_model, "n_layers": base.n_layers, "n_heads": base.n_heads,
             "local_window": base.local_window, "max_seq_len": base.max_seq_len, "batch": batch,
             "repeats": repeats, "steps_per_repeat": steps, "device": str(device),
             "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
             "torch": torch.__version__}
    return {"setup": setup, "rows": rows, "recompute": recompute}


def paired_columns(times: list[float], reference: list[float] | None) -> dict:
    """The paired ratio to the baseline (median over repeats) and its 95% bootstrap interval."""
    ratio, interval = paired_ratio(times, reference) if reference is not None else (None, None)
    return {"paired_ratio": ratio, "paired_ratio_ci": interval}


def _row(result, name, context) -> dict | None:
    for row in result["rows"]:
        if row["config"] == name and row.get("context") == context:
            return row
    return None


def _ms(result, name, context):
    row = _row(result, name, context)
    return None if row is None else row["decode_ms"]


def check_goals(result: dict, contexts: list[int]) -> list[dict]:
    goals = []
    mid, top = goal_contexts(contexts)
    growth = {g["config"]: g for g in result.get("growth", [])}
    if {"shortswa_only", "baseline"} <= set(growth) and top > mid:
        swa, base = growth["shortswa_only"], growth["baseline"]
        low, high = swa["ratio_ci"]
        goals.append({"goal": f"shortswa_only latency {mid} -> {top} grows <= 10% (baseline grows; "
                              "paired)",
                      "value": f"{swa['ratio']:.3f}x (95% CI {low:.3f}-{high:.3f}; baseline "
                               f"{base['ratio']:.2f}x)",
                      "met": swa["ratio"] <= 1.10 and base["ratio"] > swa["ratio"]})
    rec = result.get("recompute")
    decode = _ms(result, "baseline", rec["context"]) if rec else None
    if rec and decode:
        speedup = rec["full_forward_ms"] / decode
        goals.append({"goal": f"baseline cached decode >= 20x faster than recompute at {rec['context']}",
                      "value": f"{speedup:.0f}x ({rec['full_forward_ms']:.1f} ms vs {decode:.2f} ms)",
                      "met": speedup >= 20})
    for name in ("depth_swa", "block_attnres", "attnres", "ddl", "hyper"):
        row = _row(result, name, mid)
        if row is None or row["paired_ratio"] is None:
            continue
        limit = DEPTH_GOALS.get(name, DEFAULT_DEPTH_GOAL)
        ratio, (low, high) = row["paired_ratio"], row["paired_ratio_ci"]
        goals.append({"goal": f"{name} decode latency at {mid} <= {limit:.2f}x baseline (paired)",
                      "value": f"{ratio:.3f}x (95% CI {low:.3f}-{high:.3f}; ratio of minima "
                               f"{row['latency_ratio']:.3f}x)",
                      "met": ratio <= limit})
    return goals + compiled_goals(result.get("compiled"))


def compiled_goals(compiled: dict | None) -> list[dict]:
    if not compiled:
        return []
    rows = {r["config"]: r for r in compiled["rows"]}
    goals, context = [], compiled["context"]
    if "baseline" in rows:
        speedup = rows["baseline"]["speedup"]
        goals.append({"goal": f"compiled baseline decode >= {COMPILED_BASELINE_GOAL}x faster than "
                              f"eager at {context}",
                      "value": f"{speedup:.2f}x", "met": speedup >= COMPILED_BASELINE_GOAL})
    for name in ("depth_swa", "block_attnres", "attnres", "ddl", "hyper"):
        row = rows.get(name)
        if row is None or row["paired_ratio"] is None:
            continue
        limit = DEPTH_GOALS.get(name, DEFAULT_DEPTH_GOAL)
        goals.append({"goal": f"{name} compiled decode at {context} <= {limit:.2f}x compiled "
                              "baseline (paired)",
                      "value": f"{row['paired_ratio']:.3f}x", "met": row["paired_ratio"] <= limit})
    return goals


def _with_interval(row: dict) -> str:
    low, high = row["paired_ratio_ci"]
    return f"{row['paired_ratio']:.3f} ({low:.3f}-{high:.3f})"


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def to_markdown(result: dict) -> str:
    s = result["setup"]
    lines = [f"Decode, {s['n_layers']} layers x d={s['d_model']} ({s['n_heads']} heads), ShortSWA "
             f"w={s['local_window']}, batch {s['batch']}, {s['device']} {s['dtype']} "
             f"({s['threads']} threads), min (median) of {s['repeats']} interleaved repeats x "
             f"{s['steps_per_repeat']} steps; ratios vs baseline at the same context.", ""]
    headers = ["config", "context", "decode ms/token min (median)", "x baseline (min)",
               "x baseline (paired, 95% CI)", "cache MiB (measured)",
               "cache MiB (formula)", "formula (2*layers*positions*d_kv*bytes)", "cache x baseline",
               "depth state B/token (measured)", "(formula)"]
    rows, skipped = [], []
    for r in result["rows"]:
        if "error" in r:
            skipped.append(f"not run: {r['config']} ({r['error'].split(';')[0]})")
            continue
        rows.append([r["config"], r["context"], f"{r['decode_ms']:.2f} ({r['decode_median_ms']:.2f})",
                     f"{r['latency_ratio']:.3f}", _with_interval(r),
                     _mib(r["cache_bytes"]), _mib(r["cache_formula_bytes"]), r["cache_formula"],
                     f"{r['cache_ratio']:.3f}", r["depth_state_bytes_per_token"],
                     r["depth_state_formula_bytes"]])
    lines.append(format_table(headers, rows))
    lines += skipped
    rec = result.get("recompute")
    if rec:
        lines += ["", f"recompute: baseline full forward over {rec['context']} tokens (no cache): "
                      f"{rec['full_forward_ms']:.1f} ms per new token"]
    for g in result.get("growth", []):
        low, high = g["ratio_ci"]
        lines.append(f"growth: {g['config']} per-token latency at {g['to']} over {g['from']} "
                     f"(the two contexts interleaved, paired): {g['ratio']:.3f}x "
                     f"(95% CI {low:.3f}-{high:.3f})")
    compiled = result.get("compiled")
    if compiled:
        lines += ["", f"Compiled decode (torch.compile of the one-token step, "
                      f"resstream.compiled_decode) at context {compiled['context']}; ratios of "
                      "minima, and paired against the compiled baseline:", "",
                  format_table(["config", "eager ms/token", "compiled ms/token", "eager/compiled",
                                "x compiled baseline (paired, 95% CI)", "compile s"],
                               [[r["config"], f"{r['eager_ms']:.2f}", f"{r['compiled_ms']:.2f}",
                                 f"{r['speedup']:.2f}x", _with_interval(r),
                                 f"{r['compile_s']:.1f}"] for r in compiled["rows"]])]
    if result["goals"]:
        lines += ["", format_table(["goal", "measured", "met"],
                                   [[g["goal"], g["value"], "yes" if g["met"] else "NO"]
                                    for g in result["goals"]])]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- CLI
def parse_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UserError(f"--{what} is empty; allowed: a comma-separated list")
    return items


def run(args: argparse.Namespace) -> int:
    smoke_args(args, "bench decode", quick=True)  # RESSTREAM_SMOKE: seconds
    if args.quick:
        shape = dict(d_model=32, n_layers=2, n_heads=2, local_window=8, max_seq_len=64)
        contexts, repeats, steps = [16, 48], 2, 1
    else:
        shape = dict(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                     local_window=args.window, max_seq_len=args.max_seq_len)
        contexts = [int(c) for c in parse_list(args.contexts, "contexts")]
        repeats, steps = args.repeats, args.steps
    if repeats < 1 or steps < 1 or args.batch_size < 1:
        raise UserError("--repeats, --steps and --batch-size must be integers >= 1")
    if any(c < 1 for c in contexts):
        raise UserError(f"--contexts={contexts} is invalid; allowed: positive integers")
    names = parse_list(args.configs, "configs") if args.configs else list(CONFIGS)
    allowed = list(CONFIGS) + [n for n in DEPTH_OPERATORS.names() if n not in CONFIGS and n != "standard"]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise UserError(f"--configs names unknown configuration(s) {', '.join(unknown)}; "
                        f"allowed: {', '.join(allowed)}")
    if "baseline" not in names:
        names = ["baseline"] + names
    # contexts are capped so that one more token still fits (max_seq_len for global attention)
    contexts = sorted({min(c, shape["max_seq_len"] - 1) for c in contexts})
    set_threads(args.threads)
    device = parse_device(args.device)
    dtype = getattr(torch, args.dtype)
    require_dtype_runs(dtype, device, "--dtype")
    base = ModelConfig(vocab_size=256, **shape)
    result = run_benchmark(base, names, contexts, args.batch_size, repeats, steps, device, dtype,
                           args.compile)
    print_result(result, args.format, to_markdown)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("decode", help="decode latency, cache bytes and depth state per token",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default=",".join(str(c) for c in CONTEXTS),
                        help="comma-separated context lengths (capped at max_seq_len - 1)")
    parser.add_argument("--configs", default=None,
                        help=f"comma-separated subset of {', '.join(CONFIGS)}, or any registered "
                             "depth operator's name")
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--n-layers", type=int, default=8)
    parser.add_argument("--n-heads", type=int, default=8)
    parser.add_argument("--window", type=int, default=128, help="ShortSWA window w")
    parser.add_argument("--max-seq-len", type=int, default=16385)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=60,
                        help="interleaved repeats (min, median, paired ratio)")
    parser.add_argument("--steps", type=int, default=2, help="decode steps per repeat")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--format", choices=("markdown", "json"), default="markdown")
    parser.add_argument("--compile", action="store_true",
                        help="also time every configuration's compiled one-token step at the "
                             "goals' context (1024, else the shortest), eager beside compiled")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny shapes, 2 contexts")
    parser.set_defaults(func=run)
