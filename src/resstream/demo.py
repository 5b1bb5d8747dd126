"""`resstream demo`: four residual-stream variants of one preset, trained on the same data.

The variants differ only in the residual stream (same preset, seed, data order, token budget):

* ``baseline``   standard residual addition;
* ``shortswa``   Algorithm 1 of the paper: a sequence-axis ShortSWA sub-block (window 64) before
  global attention in every block;
* ``depth_swa``  the paper's depth-wise ShortSWA read over the last 4 layer states;
* ``ddl``        Deep Delta Learning's shortcut.

Each is trained by the ordinary trainer into ``<run>/<variant>/`` (a complete run folder), then
the demo prints a table (validation bits per byte on the whole held-out validation text,
parameters, training tokens/s, wall time) and writes ``results.json``, ``bpb_curve.png``
(validation bpb against training tokens, one line per variant) and ``summary.md``.
The default budget is sized to finish in about 12 minutes on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from resstream.errors import UserError

VARIANTS: dict[str, dict] = {
    "baseline": {"depth": "standard"},
    "shortswa": {"local_mixer": "shortswa", "local_window": 64},
    "depth_swa": {"depth": "depth_swa", "depth_window": 4},
    "ddl": {"depth": "ddl"},
}
VARIANT_TITLES = {
    "baseline": "standard residual (baseline)",
    "shortswa": "Algorithm 1: sequence ShortSWA (w=64) + attention",
    "depth_swa": "depth-wise ShortSWA read (K=4)",
    "ddl": "Deep Delta Learning shortcut",
}

# The demo's training recipe (also shipped as configs/shakespeare-small.yaml). Sized by timing
# the `small` preset on the 2-core CPU this project is tested on; see docs/training.md.
DEMO_DEFAULTS = {
    "preset": "small",
    "data": {"source": "shakespeare", "seq_len": 128, "batch_size": 16},
    "optim": {"lr": 3.0e-3, "min_lr": 3.0e-4, "warmup_steps": 30, "weight_decay": 0.1,
              "grad_clip": 1.0},
    "train": {"steps": 300, "seed": 0, "eval_every": 50, "eval_tokens": 32768,
              "final_eval_tokens": None, "eval_batch_size": 32, "log_every": 10,
              "checkpoint_every": 0, "keep_checkpoints": 1},
}

# Without --steps, the demo times a few steps of every variant first and lowers the step count
# if the whole demo would otherwise overrun this budget (minutes): a slow or busy machine gets a
# shorter demo instead of a late one. The same step count is used for every variant.
DEFAULT_TIME_BUDGET_MIN = 12.0
MIN_AUTO_STEPS = 20
# Real runs were measured up to ~25% slower than the timing run predicts (which repeats one
# batch and skips clipping, logging and data loading); predictions are scaled by this factor.
TIMING_SAFETY = 1.2

# nanoGPT's CPU recipe for shakespeare_char (README: 4 layers, width 128, context 64, batch 12,
# 2000 iterations) reaches a validation loss of about 1.88 nats per character. Orientation only:
# different corpus (tiny-shakespeare, 65-character vocabulary), different split.
NANOGPT_CPU_VAL_NATS_PER_CHAR = 1.88


@dataclass
class VariantResult:
    variant: str
    val_bpb: float
    val_loss: float
    parameters: int
    tokens_per_second: float
    wall_seconds: float
    tokens: int
    curve: list[tuple[int, float]]


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="train the four residual-stream variants and compare bits per byte",
        description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default=DEMO_DEFAULTS["preset"])
    parser.add_argument("--data", default=DEMO_DEFAULTS["data"]["source"],
                        help="'shakespeare' (default), a .txt file or folder, or hf:NAME")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"optimizer steps per variant (default: "
                             f"{DEMO_DEFAULTS['train']['steps']}, "
                             "fewer if a short timing run predicts the time budget would be "
                             "exceeded; an explicit value is used as given)")
    parser.add_argument("--time-budget", type=float, default=DEFAULT_TIME_BUDGET_MIN,
                        metavar="MINUTES", help="wall-time budget that the default number of "
                                                "steps is fitted to (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=DEMO_DEFAULTS["data"]["batch_size"])
    parser.add_argument("--seq-len", type=int, default=DEMO_DEFAULTS["data"]["seq_len"])
    parser.add_argument("--seed", type=int, default=DEMO_DEFAULTS["train"]["seed"])
    parser.add_argument("--eval-every", type=int, default=DEMO_DEFAULTS["train"]["eval_every"])
    parser.add_argument("--eval-tokens", type=int, default=DEMO_DEFAULTS["train"]["eval_tokens"],
                        help="validation tokens per periodic evaluation (evenly spread windows)")
    parser.add_argument("--final-eval-tokens", type=int, default=None,
                        help="validation tokens of the final evaluation (default: all)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {', '.join(VARIANTS)}")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice, one per core, unless "
                             "a quick timing shows 1 thread is faster, as on a busy machine)")
    parser.add_argument("--out", help="run folder (default: runs/demo-<timestamp>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run_demo)


def parse_variants(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown or not names:
        raise UserError(f"--variants {text!r} is invalid; allowed: a comma-separated subset of "
                        f"{', '.join(VARIANTS)}")
    return list(dict.fromkeys(names))


def demo_config(args: argparse.Namespace, variant: str):
    """The TrainConfig of one variant: DEMO_DEFAULTS, the flags, the variant's model keys."""
    from resstream.train.config import TrainConfig

    values = json.loads(json.dumps(DEMO_DEFAULTS))
    values["preset"] = args.preset
    values["name"] = variant
    values["model"] = dict(VARIANTS[variant])
    values["data"].update(source=args.data, seq_len=args.seq_len, batch_size=args.batch_size)
    steps = args.steps if args.steps is not None else DEMO_DEFAULTS["train"]["steps"]
    values["train"].update(steps=steps, seed=args.seed, eval_every=args.eval_every,
                           eval_tokens=args.eval_tokens, final_eval_tokens=args.final_eval_tokens,
                           progress=not args.no_progress, threads=args.threads)
    return TrainConfig.from_dict(values)


def new_demo_dir(root: Path = Path("runs")) -> Path:
    """runs/demo-YYYYmmdd-HHMMSS, with a numeric suffix if that exists: never reuses a folder."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate = root / f"demo-{stamp}"
    suffix = 1
    while candidate.exists():
        suffix += 1
        candidate = root / f"demo-{stamp}-{suffix}"
    return candidate


def run_demo(args: argparse.Namespace) -> int:
    import torch

    from resstream.data.cache import prepare_data
    from resstream.presets import get_preset
    from resstream.train.trainer import Trainer

    started = time.perf_counter()
    variants = parse_variants(args.variants)
    get_preset(args.preset)
    configs = {variant: demo_config(args, variant) for variant in variants}
    out = Path(args.out) if args.out else new_demo_dir()
    if out.exists() and any(out.iterdir()):
        raise UserError(f"demo folder {str(out)!r} is not empty; allowed: a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    first = configs[variants[0]]
    print(f"resstream demo: {len(variants)} variants of preset {args.preset!r}, seed "
          f"{args.seed}, data {args.data!r}; run folder {out}", flush=True)
    data = prepare_data(args.data, first.data.cache_dir)
    print(f"data: {data.train_bytes:,} training bytes, {data.val_bytes:,} validation bytes "
          f"({'cached' if data.from_cache else 'prepared'} in {data.directory})", flush=True)
    threads = args.threads or choose_threads(first, data)
    torch.set_num_threads(threads)  # before timing, so the timing matches the runs
    configs = {name: config.with_overrides({"train.threads": threads})
               for name, config in configs.items()}
    step_seconds: dict[str, float] = {}  # timed step per variant, the slowdown reference
    if args.steps is None:
        steps = fit_steps_to_budget(configs, data, args.time_budget * 60.0
                                    - (time.perf_counter() - started), step_seconds)
        configs = {name: config.with_overrides({"train.steps": steps})
                   for name, config in configs.items()}
        first = configs[variants[0]]
    print(f"budget: {first.train.steps} steps x {first.data.batch_size} x {first.seq_len} tokens "
          f"per variant ({first.train.steps * first.data.batch_size * first.seq_len:,} tokens)",
          flush=True)
    results = []
    for index, variant in enumerate(variants, start=1):
        trainer = Trainer(configs[variant], out / variant, data=data,
                          progress_label=f"[{index}/{len(variants)}] {variant}",
                          adaptive_threads=args.threads is None,
                          reference_step_seconds=step_seconds.get(variant))
        results.append(_variant_result(variant, trainer.run()))
    table = format_table(results)
    print()
    print(table)
    write_outputs(out, results, configs, args, time.perf_counter() - started)
    print(f"\nwrote {out / 'summary.md'}, {out / 'bpb_curve.png'}, {out / 'results.json'}")
    return 0


def fit_steps_to_budget(configs: dict, data, budget_seconds: float,
                        step_seconds: dict | None = None) -> int:
    """The default step count, lowered (in tens, to at least MIN_AUTO_STEPS) if timing each
    variant (3 training steps and one evaluation batch, after warm-up) predicts that training
    plus evaluation would overrun `budget_seconds`."""
    default = next(iter(configs.values())).train.steps
    per_variant, seconds_per_eval_token = _time_variants(configs, data)
    if step_seconds is not None:
        step_seconds.update(per_variant)
    seconds_per_step = sum(per_variant.values())
    first = next(iter(configs.values()))
    eval_every = first.train.eval_every or default
    seq_len = first.seq_len
    full_val = ((len(data.val) - 1) // seq_len) * seq_len
    final_tokens = min(full_val, first.train.final_eval_tokens or full_val)
    periodic_tokens = min(full_val, first.train.eval_tokens or full_val)

    def predicted(steps: int) -> float:
        evals = steps // eval_every + 1  # step 0 and every eval_every steps
        eval_tokens = evals * periodic_tokens + final_tokens
        return TIMING_SAFETY * (steps * seconds_per_step + eval_tokens * seconds_per_eval_token)

    steps = default
    while steps > MIN_AUTO_STEPS and predicted(steps) > budget_seconds:
        steps -= 10
    steps = max(steps, MIN_AUTO_STEPS)
    note = "" if steps == default else f"; lowered from {default} to fit"
    print(f"timing: {seconds_per_step:.2f} s per step for all variants together, predicted "
          f"{predicted(steps) / 60:.1f} min for {steps} steps (budget "
          f"{budget_seconds / 60:.1f} min{note})", flush=True)
    return steps


def choose_threads(config, data) -> int:
    """torch's default thread count, or 1 if one thread trains clearly faster. On a machine
    whose cores are busy with other work, every multi-threaded kernel waits for its slowest
    thread, which can make two threads many times slower than one."""
    import torch

    default = torch.get_num_threads()
    if default <= 1:
        return 1
    torch.set_num_threads(1)
    seconds = {1: _time_training_step(config, data, warmup=1, timed=2)}
    torch.set_num_threads(default)
    # A pathological slowdown shows at once: stop timing after 3x the one-thread time.
    seconds[default] = _time_training_step(config, data, warmup=1, timed=2,
                                           give_up_after=9 * seconds[1])
    best = 1 if seconds[1] < 0.9 * seconds[default] else default
    slow = "more than 3x slower" if seconds[default] == float("inf") else \
        f"{seconds[default]:.2f} s/step"
    print(f"threads: {best} ({default} threads: {slow}, 1 thread: {seconds[1]:.2f} s/step, "
          f"{config.name})", flush=True)
    return best


def _time_variants(configs: dict, data) -> tuple[dict[str, float], float]:
    """({variant: seconds per training step}, seconds per evaluated token summed over
    variants), timed after warm-up steps so that first-call costs are left out."""
    step_seconds, eval_total = {}, 0.0
    for name, config in configs.items():
        model = _timing_model(config)
        step_seconds[name] = _time_training_step(config, data, warmup=2, timed=3, model=model)
        eval_total += _time_eval_token(model, config, data)
    return step_seconds, eval_total


def _timing_model(config):
    import torch

    from resstream.model import ResStreamLM

    rng_state = torch.get_rng_state()
    model = ResStreamLM(config.model_config())
    torch.set_rng_state(rng_state)  # timing must not change the runs
    return model


def _time_training_step(config, data, warmup: int, timed: int, model=None,
                        give_up_after: float | None = None) -> float:
    """Mean wall seconds of `timed` AdamW steps of `config` after `warmup` untimed ones; inf
    if all the steps together take longer than `give_up_after` seconds."""
    import torch
    import torch.nn.functional as F

    from resstream.train.trainer import batch_for_step

    model = model if model is not None else _timing_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    inputs, targets = batch_for_step(data.train, config.seq_len, config.data.batch_size,
                                     config.train.seed, 0, 0)
    first = started = time.perf_counter()
    for index in range(warmup + timed):
        if index == warmup:
            started = time.perf_counter()
        loss = F.cross_entropy(model(inputs).reshape(-1, model.config.vocab_size),
                               targets.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if give_up_after is not None and time.perf_counter() - first > give_up_after:
            return float("inf")
    return (time.perf_counter() - started) / timed


def _time_eval_token(model, config, data) -> float:
    """Wall seconds per token of an evaluation forward pass (after one warm-up pass)."""
    import torch

    from resstream.train.trainer import batch_for_step

    inputs, _ = batch_for_step(data.train, config.seq_len, config.train.eval_batch_size,
                               config.train.seed, 0, 0)
    model.eval()
    with torch.no_grad():
        model(inputs)
        started = time.perf_counter()
        model(inputs)
    return (time.perf_counter() - started) / inputs.numel()


def _variant_result(variant: str, result) -> VariantResult:
    final = result.final_eval
    curve = [(int(e["tokens"]), float(e["val_bpb"])) for e in result.evals]
    return VariantResult(variant=variant, val_bpb=final.bpb, val_loss=final.loss,
                         parameters=result.num_parameters,
                         tokens_per_second=result.tokens_per_second,
                         wall_seconds=result.wall_seconds, tokens=result.tokens, curve=curve)


def format_table(results: list[VariantResult]) -> str:
    header = ("variant", "val bpb", "params", "tokens/s", "wall time")
    rows = [(r.variant, f"{r.val_bpb:.4f}", f"{r.parameters / 1e6:.3f}M",
             f"{r.tokens_per_second:,.0f}", _duration(r.wall_seconds)) for r in results]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    aligned = [row[0].ljust(widths[0]) + "  " + "  ".join(cell.rjust(width) for cell, width in
                                                          zip(row[1:], widths[1:]))
               for row in [header, *rows]]
    return "\n".join(aligned)


def write_outputs(out: Path, results: list[VariantResult], configs: dict, args,
                  total_seconds: float) -> None:
    payload = {
        "variants": [r.__dict__ for r in results],
        "configs": {name: config.to_dict() for name, config in configs.items()},
        "total_wall_seconds": total_seconds,
        "argv": sys.argv,
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    plot_curves(results, out / "bpb_curve.png")
    (out / "summary.md").write_text(summary_markdown(results, configs, total_seconds),
                                    encoding="utf-8")


def plot_curves(results: list[VariantResult], path: Path) -> None:
    """Validation bpb against training tokens, one line per variant (Agg backend: no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5), dpi=120)
    for result in results:
        tokens, bpb = zip(*result.curve) if result.curve else ((), ())
        axis.plot(tokens, bpb, marker="o", markersize=3, label=result.variant)
    finals = [r.val_bpb for r in results]
    later = [b for r in results for t, b in r.curve[1:]] or finals
    if later:  # zoom on training progress; the untrained point (8 bpb) would flatten the plot
        low, high = min(later + finals), max(later + finals)
        axis.set_ylim(low - 0.05 * (high - low + 1e-3), high + 0.1 * (high - low + 1e-3))
    axis.set_xlabel("training tokens")
    axis.set_ylabel("validation bits per byte")
    axis.set_title("Validation bpb by residual-stream variant")
    axis.grid(True, alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def summary_markdown(results: list[VariantResult], configs: dict, total_seconds: float) -> str:
    first = next(iter(configs.values()))
    lines = [
        "# resstream demo",
        "",
        f"Preset `{first.preset}`, data `{first.data.source}`, seed {first.train.seed}, "
        f"{first.train.steps} steps of {first.data.batch_size} x {first.seq_len} tokens "
        f"({results[0].tokens:,} training tokens per variant), same data order for every "
        f"variant. Total wall time {_duration(total_seconds)}"
        f"{f' with {first.train.threads} torch thread(s)' if first.train.threads else ''}.",
        "",
        "| variant | what changes | val bpb | params | tokens/s | wall time |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r.variant} | {VARIANT_TITLES[r.variant]} | {r.val_bpb:.4f} | "
                     f"{r.parameters:,} | {r.tokens_per_second:,.0f} | "
                     f"{_duration(r.wall_seconds)} |")
    nanogpt_bpb = NANOGPT_CPU_VAL_NATS_PER_CHAR / 0.6931471805599453
    lines += [
        "",
        f"Validation bpb: bits per byte on {_validation_words(first)}, in fixed "
        "non-overlapping windows, never random batches; see `docs/training.md`.",
        "",
        f"For orientation only: nanoGPT's CPU Shakespeare recipe (4 layers, width 128, 2000 "
        f"iterations) reaches about {NANOGPT_CPU_VAL_NATS_PER_CHAR} nats per character "
        f"(~{nanogpt_bpb:.2f} bits per character) on tiny-shakespeare; corpora, splits and "
        "vocabularies differ.",
        "",
        "One seed and a short budget: differences of a few hundredths of a bit are within "
        "run-to-run noise.",
        "",
        "![validation bpb](bpb_curve.png)",
        "",
    ]
    return "\n".join(lines)


def _validation_words(config) -> str:
    budget = config.train.final_eval_tokens
    what = ("the held-out plays (whole plays never seen in training)"
            if config.data.source == "shakespeare" else "the held-out validation text")
    if budget is None:
        return f"all of {what}"
    return f"{budget:,} tokens of {what} (evenly spread windows)"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"
