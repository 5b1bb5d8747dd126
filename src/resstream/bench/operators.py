"""`resstream bench operators`: training-step time and memory of every registered depth-axis
residual operator relative to `standard`, measured side by side in one run.

Model: 12 blocks, width 256, 8 heads, T = 256 tokens, batch 4 (flags change all of these).
One training step = forward + cross-entropy + backward + AdamW step. Every variant is built
and warmed up first; then the timed steps are interleaved (repeat r runs every variant once, in
an order rotated by r), so a slow phase of a shared machine hits all variants alike. We report
the median step time and its ratio to standard's median, and the fastest step (and its ratio),
which is less sensitive to other load on a shared machine. On a busy CPU, `--threads 1` avoids
the large slowdowns of oversubscribed intra-op threads.

Memory, what is measured:
  * "saved activations" (any device): bytes of the distinct tensor storages autograd saves for
    the backward pass during one forward + loss, collected with
    torch.autograd.graph.saved_tensors_hooks, excluding parameter storages. This is the
    activation memory a training step holds at the start of backward -- the quantity depth
    aggregators increase. Transient buffers inside backward and the optimiser are not included.
  * "CUDA peak step" (CUDA only): torch.cuda.max_memory_allocated during one step, minus the
    bytes allocated before it (parameters and AdamW state excluded; activations, gradients and
    temporaries included).

Variants: each operator runs with its default options except the ones the goals refer to,
listed in VARIANTS (DenseFormer 4x5, hyper-connections with 4 streams, DDL with d_v = 1);
`--option NAME.KEY=VALUE` overrides. The goal column (step-time ratio) applies only to the
variant named there. Operators added by other modules appear automatically (registry).

`--compile` adds a torch.compile'd copy of every variant (the same module and optimizer, so the
same weights), timed in the same interleaved repeats: its step time, its ratio to compiled
standard (the goals apply to it too), the eager/compiled speed-up, the compile time (the first
compiled step) and the graph breaks dynamo reports while compiling it (0 is the goal). The
compiled standard step should be at least 1.3x faster than the eager one.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from typing import Any

import torch
import torch.nn.functional as F

from resstream.bench.timing import format_table, print_result, seconds_per_call, set_threads
from resstream.config import ModelConfig
from resstream.errors import UserError
from resstream.hardware import parse_device
from resstream.registry import DEPTH_OPERATORS
from resstream.smoke import smoke_args

# operator -> options of the benchmarked variant
VARIANTS: dict[str, dict[str, Any]] = {
    "denseformer": {"dilation": 4, "period": 5},
    "hyper": {"streams": 4},
    "ddl": {"value_dim": 1},
}
# operator -> the step-time ratio the variant above should stay within (docs/design.md, decision 8)
GOALS: dict[str, float] = {"block_attnres": 1.10, "ddl": 1.10, "denseformer": 1.10,
                           "attnres": 1.25, "mudd": 1.25, "hyper": 1.30}


@dataclasses.dataclass
class Variant:
    operator: str
    options: dict
    notes: str = ""
    model: Any = None
    optimizer: Any = None
    times: list = dataclasses.field(default_factory=list)
    saved_bytes: int | None = None
    cuda_peak: int | None = None
    error: str | None = None
    compiled: Any = None  # torch.compile(model), with --compile
    compiled_times: list = dataclasses.field(default_factory=list)
    compile_seconds: float | None = None
    graph_breaks: int | None = None
    compile_error: str | None = None


def variant_options(name: str, overrides: dict) -> tuple[dict, str]:
    """Options of the benchmarked variant: VARIANTS[name] (keys the operator does not have are
    dropped and named in the notes), then the user's overrides."""
    cls = DEPTH_OPERATORS.get(name)
    fields = {f.name for f in dataclasses.fields(cls.Options)}
    preset = VARIANTS.get(name, {})
    options = {k: v for k, v in preset.items() if k in fields}
    missing = sorted(set(preset) - fields)
    notes = f"no option {', '.join(missing)}: defaults" if missing else ""
    options.update(overrides)
    return options, notes


def goal_applies(variant: Variant, overrides: dict) -> bool:
    return variant.operator in GOALS and not overrides and not variant.notes


def saved_activation_bytes(model, ids: torch.Tensor, targets: torch.Tensor) -> int:
    """Bytes of distinct non-parameter storages saved for backward by one forward + loss."""
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten())
    del loss
    return sum(storages.values())


COMPILED_BASELINE_GOAL = 1.3  # compiled standard step at least this much faster than eager


def training_step(variant: Variant, ids: torch.Tensor, targets: torch.Tensor,
                  compiled: bool = False) -> None:
    variant.optimizer.zero_grad(set_to_none=True)
    model = variant.compiled if compiled else variant.model
    loss = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten())
    loss.backward()
    variant.optimizer.step()


def progress(message: str) -> None:
    print(f"[bench operators] {message}", file=sys.stderr, flush=True)


def timed_step(variant: Variant, ids, targets, device, compiled: bool = False) -> float:
    return seconds_per_call(lambda: training_step(variant, ids, targets, compiled))


def cuda_peak_step_bytes(variant: Variant, ids, targets, device) -> int:
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    training_step(variant, ids, targets)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def build_variants(base: ModelConfig, names: list[str], overrides: dict[str, dict], device,
                   depth_window: int | None = None, lr: float = 1e-4) -> list[Variant]:
    """Models and AdamW optimisers of every variant; `depth_window` goes only to operators that
    use one. A variant whose options do not fit the config keeps its error and is skipped."""
    from resstream.model import ResStreamLM

    variants = []
    for name in names:
        options, notes = variant_options(name, overrides.get(name, {}))
        variant = Variant(name, options, notes)
        try:
            cls = DEPTH_OPERATORS.get(name)
            config = base.replace(depth=name, depth_options=options,
                                  depth_window=depth_window if cls.uses_depth_window else None)
            torch.manual_seed(0)
            variant.model = ResStreamLM(config).to(device)
            variant.optimizer = torch.optim.AdamW(variant.model.parameters(), lr=lr)
        except UserError as error:
            variant.error = str(error)
        variants.append(variant)
    return variants


def compile_variant(variant: Variant, ids, targets, device) -> None:
    """torch.compile the variant's model; the first compiled step (compilation included) is
    its compile time, and dynamo's graph-break counter over it its graph breaks."""
    from torch._dynamo.utils import counters

    before = sum(counters["graph_break"].values())
    # every variant is another model instance through the same forward code: without a higher
    # limit dynamo would stop recompiling after 8 variants and silently run the rest eagerly
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    variant.compiled = torch.compile(variant.model)
    try:
        variant.compile_seconds = timed_step(variant, ids, targets, device, compiled=True)
        timed_step(variant, ids, targets, device, compiled=True)  # a second, settled warm-up
    except Exception as error:  # noqa: BLE001 - a compile failure is a result of the bench
        variant.compiled, variant.compile_error = None, str(error).strip().splitlines()[0]
        return
    variant.graph_breaks = sum(counters["graph_break"].values()) - before


def run_benchmark(base: ModelConfig, names: list[str], overrides: dict[str, dict], batch_size: int,
                  seq_len: int, repeats: int, device: torch.device,
                  depth_window: int | None = None, compile: bool = False) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.vocab_size, (batch_size, seq_len), generator=generator).to(device)
    targets = torch.randint(0, base.vocab_size, (batch_size, seq_len), generator=generator).to(device)
    variants = build_variants(base, names, overrides, device, depth_window)
    ready = [v for v in variants if v.error is None]
    for variant in ready:  # warm-up (also creates the AdamW state), then memory
        progress(f"warm-up {variant.operator}: {timed_step(variant, ids, targets, device):.2f} s")
        variant.saved_bytes = saved_activation_bytes(variant.model, ids, targets)
        if device.type == "cuda":
            variant.cuda_peak = cuda_peak_step_bytes(variant, ids, targets, device)
        if compile:
            compile_variant(variant, ids, targets, device)
            progress(f"compiled {variant.operator}: " + (
                f"{variant.compile_seconds:.1f} s, {variant.graph_breaks} graph break(s)"
                if variant.compile_error is None else f"failed ({variant.compile_error})"))
    for r in range(repeats):
        shift = r % max(1, len(ready))
        for variant in ready[shift:] + ready[:shift]:
            variant.times.append(timed_step(variant, ids, targets, device))
            if variant.compiled is not None:
                variant.compiled_times.append(timed_step(variant, ids, targets, device, True))
        progress(f"repeat {r + 1}/{repeats} done")
    return summarize(variants, overrides, base, batch_size, seq_len, repeats, device)


def summarize(variants: list[Variant], overrides, base, batch_size, seq_len, repeats, device) -> dict:
    reference = next((v for v in variants if v.operator == "standard" and v.error is None), None)
    ref_time = statistics.median(reference.times) if reference else None
    rows = []
    for v in variants:
        row: dict[str, Any] = {"operator": v.operator, "options": v.options, "notes": v.notes}
        if v.error is not None:
            rows.append({**row, "error": v.error})
            continue
        median, best = statistics.median(v.times), min(v.times)
        row.update({"step_ms": 1000 * median, "time_ratio": median / ref_time if ref_time else None,
                    "best_step_ms": 1000 * best,
                    "best_ratio": best / min(reference.times) if reference else None,
                    "saved_activation_bytes": v.saved_bytes,
                    "memory_ratio": v.saved_bytes / reference.saved_bytes if reference else None,
                    "goal": GOALS.get(v.operator) if goal_applies(v, overrides.get(v.operator)) else None})
        if v.cuda_peak is not None:
            row["cuda_peak_step_bytes"] = v.cuda_peak
            row["cuda_peak_ratio"] = v.cuda_peak / reference.cuda_peak if reference else None
        row["goal_met"] = None if row["goal"] is None or row["time_ratio"] is None \
            else row["time_ratio"] <= row["goal"]
        row.update(_compiled_columns(v, reference, row["goal"]))
        rows.append(row)
    setup = {"d_model": base.d_model, "n_layers": base.n_layers, "n_heads": base.n_heads,
             "seq_len": seq_len, "batch_size": batch_size, "repeats": repeats, "device": str(device),
             "threads": torch.get_num_threads(), "torch": torch.__version__}
    return {"setup": setup, "rows": rows}


def _compiled_columns(variant: Variant, reference: Variant | None, goal: float | None) -> dict:
    """--compile: the compiled step, its ratio to compiled standard, the eager/compiled speed-up."""
    if variant.compile_error is not None:
        return {"compile_error": variant.compile_error}
    if not variant.compiled_times:
        return {}
    median = statistics.median(variant.compiled_times)
    ref = statistics.median(reference.compiled_times) if reference and reference.compiled_times \
        else None
    ratio = median / ref if ref else None
    return {"compiled_step_ms": 1000 * median, "compiled_ratio": ratio,
            "compile_speedup": statistics.median(variant.times) / median,
            "compile_seconds": variant.compile_seconds, "graph_breaks": variant.graph_breaks,
            "compiled_goal_met": None if goal is None or ratio is None else ratio <= goal}


def _options_text(row) -> str:
    text = ", ".join(f"{k}={v}" for k, v in row["options"].items()) or "defaults"
    return f"{text} ({row['notes']})" if row["notes"] else text


def to_markdown(result: dict) -> str:
    s = result["setup"]
    lines = [f"Training step (forward + backward + AdamW), {s['n_layers']} layers x d={s['d_model']}, "
             f"T={s['seq_len']}, batch {s['batch_size']}, {s['device']} ({s['threads']} threads), "
             f"median of {s['repeats']} interleaved repeats; ratios vs standard.", ""]
    cuda = any("cuda_peak_step_bytes" in r for r in result["rows"])
    headers = ["operator", "variant", "step ms", "time ratio", "goal", "min ms (ratio)",
               "saved activations MB", "memory ratio"]
    if cuda:
        headers += ["CUDA peak step MB", "CUDA peak ratio"]
    compiled = any("compiled_step_ms" in r or "compile_error" in r for r in result["rows"])
    if compiled:
        headers += ["compiled ms", "compiled ratio", "eager/compiled", "compile s", "graph breaks"]
    rows = []
    for r in result["rows"]:
        if "error" in r:
            rows.append([r["operator"], _options_text(r), f"n/a: {r['error']}"] + [""] * (len(headers) - 3))
            continue
        goal = "" if r["goal"] is None else f"<= {r['goal']:.2f}x " + ("met" if r["goal_met"] else "MISSED")
        row = [r["operator"], _options_text(r), f"{r['step_ms']:.1f}", _ratio(r["time_ratio"]), goal,
               f"{r['best_step_ms']:.1f} ({_ratio(r['best_ratio'])})",
               f"{r['saved_activation_bytes'] / 2**20:.1f}", _ratio(r["memory_ratio"])]
        if cuda:
            row += [f"{r['cuda_peak_step_bytes'] / 2**20:.1f}", _ratio(r["cuda_peak_ratio"])]
        if compiled:
            row += _compiled_cells(r)
        rows.append(row)
    lines.append(format_table(headers, rows))
    if compiled:
        lines += ["", _compiled_baseline_line(result["rows"])]
    lines += ["", "step ms: median step time; min: fastest step (less sensitive to a busy machine); "
              "goal: bound on the median time ratio of the variant shown; saved activations: distinct "
              "non-parameter storages autograd keeps for backward (saved_tensors_hooks)."]
    return "\n".join(lines)


def _compiled_cells(row: dict) -> list[str]:
    if "compile_error" in row:
        return [f"failed: {row['compile_error']}", "", "", "", ""]
    goal = "" if row["compiled_goal_met"] is None else \
        (" met" if row["compiled_goal_met"] else " MISSED")
    return [f"{row['compiled_step_ms']:.1f}", _ratio(row["compiled_ratio"]) + goal,
            _ratio(row["compile_speedup"]), f"{row['compile_seconds']:.1f}",
            str(row["graph_breaks"])]


def _compiled_baseline_line(rows: list[dict]) -> str:
    standard = next((r for r in rows if r["operator"] == "standard"), {})
    speedup = standard.get("compile_speedup")
    if speedup is None:
        return "compiled standard: not measured (compilation failed)"
    met = "met" if speedup >= COMPILED_BASELINE_GOAL else "MISSED"
    return (f"compiled standard step: {speedup:.2f}x faster than eager (goal >= "
            f"{COMPILED_BASELINE_GOAL}x: {met}); compiled ratio: vs compiled standard, with the "
            "operator's goal; graph breaks: dynamo's count while compiling (goal 0)")


def _ratio(value) -> str:
    return "" if value is None else f"{value:.2f}x"


def parse_overrides(items: list[str]) -> dict[str, dict]:
    from resstream.operators_table import parse_assignment

    overrides: dict[str, dict] = {}
    for item in items:
        key, value = parse_assignment(item, "--option")
        name, dot, field_name = key.partition(".")
        if not dot or not field_name:
            raise UserError(f"--option {item!r} is invalid; allowed: NAME.KEY=VALUE, e.g. hyper.streams=4")
        overrides.setdefault(name, {})[field_name] = value
    return overrides


def choose_operators(requested: str | None, quick: bool) -> list[str]:
    known = DEPTH_OPERATORS.names()
    if requested:
        names = [n.strip() for n in requested.split(",") if n.strip()]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise UserError(f"--operators names unknown operator(s) {', '.join(unknown)}; known: {', '.join(known)}")
    elif quick:
        names = [next(n for n in known if n != "standard")] if len(known) > 1 else []
    else:
        names = known
    return ["standard"] + [n for n in names if n != "standard"]


def run(args: argparse.Namespace) -> int:
    smoke_args(args, "bench operators", quick=True)  # RESSTREAM_SMOKE: seconds
    if args.quick:
        shape = dict(d_model=32, n_layers=2, n_heads=2, seq_len=16, batch_size=2, repeats=2)
    else:
        shape = dict(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                     seq_len=args.seq_len, batch_size=args.batch_size, repeats=args.repeats)
    for key in ("batch_size", "seq_len", "repeats"):
        if shape[key] < 1:
            raise UserError(f"--{key.replace('_', '-')}={shape[key]} is invalid; allowed: an integer >= 1")
    set_threads(args.threads)
    device = parse_device(args.device)
    overrides = parse_overrides(args.option)
    names = choose_operators(args.operators, args.quick)
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise UserError(f"--option names operator(s) not benchmarked: {', '.join(unknown)}; allowed: {', '.join(names)}")
    base = ModelConfig(vocab_size=256, d_model=shape["d_model"], n_layers=shape["n_layers"],
                       n_heads=shape["n_heads"], max_seq_len=shape["seq_len"])
    result = run_benchmark(base, names, overrides, shape["batch_size"], shape["seq_len"],
                           shape["repeats"], device, args.depth_window, args.compile)
    print_result(result, args.format, to_markdown)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("operators", help="training-step time and memory of every depth operator",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-layers", type=int, default=12)
    parser.add_argument("--n-heads", type=int, default=8)
    parser.add_argument("--depth-window", type=int, default=None,
                        help="K for operators with a depth window (default: full depth)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant (median)")
    parser.add_argument("--operators", default=None, help="comma-separated subset (standard is always run)")
    parser.add_argument("--option", action="append", default=[], metavar="NAME.KEY=VALUE",
                        help="override an option of one operator's benchmarked variant")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--format", choices=("markdown", "json"), default="markdown")
    parser.add_argument("--compile", action="store_true",
                        help="also time a torch.compile'd step of every variant (eager and "
                             "compiled columns side by side, graph breaks, compile time)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: tiny shapes, standard and one other operator, 2 repeats")
    parser.set_defaults(func=run)
