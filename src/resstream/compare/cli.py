"""`resstream compare STUDY [--out DIR] [--resume]`, `resstream report DIR` and `resstream demo`.

    resstream compare demo                      a shipped study (see `resstream compare --list`)
    resstream compare my-study.yaml --out runs/my-study
    resstream compare my-study.yaml --out runs/my-study --resume   finish an interrupted study
    resstream report runs/my-study              report.md and figures again, from results.json
    resstream demo                              the same as `resstream compare demo`
    torchrun --nproc-per-node 2 -m resstream compare my-study.yaml --out runs/my-study --dp ddp
                                                every run data-parallel over 2 processes

The number of steps of every run follows from the study's budget alone, so a study gives the
same numbers on every machine; only its wall time differs. The predicted time is printed before
training. `--time-budget MINUTES` lowers every variant's steps by one factor when the
prediction exceeds it, and the report says so at its top; without it the budget is never
changed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from resstream.compare import runner
from resstream.compare.report import read_results, write_report
from resstream.compare.study import Study, load_study, shipped_studies
from resstream.errors import UserError
from resstream.smoke import smoke_cap, smoke_mode


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare", help="run a study: variants x seeds on one budget, then a report",
        description=__doc__.split("\n\n")[0], epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", nargs="?", help="a study YAML file or a shipped study name")
    _add_run_flags(parser)
    parser.add_argument("--list", action="store_true", help="list the shipped studies")
    parser.set_defaults(func=run_compare)
    demo = subparsers.add_parser("demo", help="the main job: `resstream compare demo`")
    _add_run_flags(demo)
    demo.set_defaults(func=run_compare, study="demo", list=False)
    report = subparsers.add_parser("report", help="write a study's report.md and figures again "
                                                  "from its results.json (no training)")
    report.add_argument("dir", help="a study folder written by `resstream compare`")
    report.set_defaults(func=run_report)


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", help="study folder (default: runs/<study>-<time>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the study in --out: finished runs are kept, a "
                             "half-finished run resumes from its checkpoint")
    parser.add_argument("--time-budget", type=float, metavar="MINUTES",
                        help="lower every run's steps by one factor if the predicted time "
                             "exceeds this (the report says so); default: never lower")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--dp", choices=("none", "ddp", "fsdp"), default="none",
                        help="under torchrun: every run data-parallel with this engine (train's "
                             "parallel.dp; same global batch and order, so the same study)")


def _epilog() -> str:
    try:
        return "shipped studies: " + ", ".join(shipped_studies())
    except OSError:
        return ""


def run_compare(args: argparse.Namespace) -> int:
    if args.list:
        for name in shipped_studies():
            print(f"{name:14s} {load_study(name).description.strip().splitlines()[0]}")
        return 0
    if not args.study:
        raise UserError("compare: no study given; allowed: a study YAML file or one of "
                        f"{', '.join(shipped_studies())}")
    study = load_study(args.study)
    _check_flags(args)
    if smoke_mode() and len(study.seeds) > 2:  # two seeds still exercise the paired statistics
        study.seeds = study.seeds[:smoke_cap(len(study.seeds), 2, "seeds")]
    out = Path(args.out) if args.out else _new_folder(study.name)
    group = _process_group(args, study)
    try:
        return _run_study(args, study, out, group)
    finally:
        group.close()


def _run_study(args: argparse.Namespace, study: Study, out: Path, group) -> int:
    """Under torchrun every process runs every run (the trainer gives each rank its rows of the
    batch); rank 0 alone writes the study folder and, once training is done, measures the
    systems costs and writes the report while the other ranks exit."""
    _check_folder(out, study, args.resume)
    group.barrier()  # every rank has checked the folder before rank 0 writes in it
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    saved = _saved_plan(out) if args.resume else None
    plan = runner.plan_study(study, out, step_scale=saved["step_scale"] if saved else 1.0)
    if saved:  # the budget the study started with, lowered or not
        plan.time_budget_note = saved["time_budget"]
    if args.no_progress:
        plan = _without_progress(plan)
    first = next(iter(plan.configs.values()))
    data = _prepare_data(first, group)
    # smoke mode times nothing: its prediction would cost as much as its runs; under torchrun
    # one rank's timing alone would keep the others waiting
    predicted = 0.0 if smoke_mode() or group.enabled else predict_seconds(plan, data)
    say = runner.log_to_stderr if group.is_main else (lambda message: None)
    say(f"study {study.name!r}: {len(plan.configs)} variants x {len(study.seeds)} seeds = "
        f"{len(plan.runs)} runs into {out}; " + (
            f"{group.world_size} processes, parallel.dp={args.dp}" if group.enabled else
            f"predicted time about {predicted / 60:.1f} min with {torch.get_num_threads()} "
            "thread(s)"))
    if saved is None:
        plan = _apply_time_budget(plan, args, predicted, out, say)
    if group.is_main:
        out.mkdir(parents=True, exist_ok=True)
        _write_or_check_plan(out, plan, study, args.resume)
    group.barrier()
    if group.enabled:  # not part of plan.json: the engine does not change what is computed
        for run in plan.runs:
            run.config = run.config.with_overrides({"parallel.dp": args.dp})
    runner.execute_runs(plan, data, say)
    group.close()
    if not group.is_main:
        return 0
    results = runner.collect_results(plan, data, say)
    runner.write_json(out / runner.RESULTS_FILE, results)
    path = write_report(out, results)
    print(_summary_text(results))
    print(f"\nwrote {path}, {out / runner.RESULTS_FILE} and {out / 'figures'}/")
    return 0


def _process_group(args: argparse.Namespace, study: Study):
    """The study's process group under torchrun (shared by all its runs), else a disabled one."""
    from resstream.hardware import parse_device
    from resstream.parallel.data_parallel import Distributed
    from resstream.train.config import ParallelConfig

    device = parse_device(study.config.get("train", {}).get("device", "auto"), must_exist=False)
    timeout_s = study.config.get("parallel", {}).get("timeout_s", ParallelConfig.timeout_s)
    return Distributed.from_environment(args.dp, float(timeout_s), device)


def _prepare_data(config, group):
    """The prepared corpus; under torchrun rank 0 prepares the cache first, then the others
    read it (no two processes write one cache)."""
    from resstream.data.cache import prepare_data

    if not group.is_main:
        group.barrier()
    data = prepare_data(config.data.source, config.data.cache_dir)
    if group.is_main:
        group.barrier()
    return data


def run_report(args: argparse.Namespace) -> int:
    out = Path(args.dir)
    path = write_report(out, read_results(out))
    print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------------------- checks

def _check_flags(args: argparse.Namespace) -> None:
    if args.time_budget is not None and not (args.time_budget > 0):
        raise UserError(f"--time-budget={args.time_budget} is invalid; allowed: minutes > 0")
    if args.threads is not None:
        import os

        cores = os.cpu_count() or 1
        if not 1 <= args.threads <= cores:
            raise UserError(f"--threads={args.threads} is invalid; allowed: 1..{cores} (this "
                            "machine's logical cores)")
    if args.resume and not args.out:
        raise UserError("--resume needs --out; allowed: --out DIR of the study to continue")
    if _world_size() > 1:  # every process must name the same folder and plan the same runs
        if not args.out:
            raise UserError("compare under torchrun needs --out; allowed: --out DIR, the same "
                            "for every process")
        if args.time_budget is not None:
            raise UserError(f"--time-budget={args.time_budget} is invalid under torchrun; "
                            "allowed: a single-process study (every process must plan the "
                            "same steps)")


def _world_size() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def _check_folder(out: Path, study: Study, resume: bool) -> None:
    """A new or empty folder, or with --resume one holding this very study."""
    if out.exists() and not out.is_dir():
        raise UserError(f"study folder {str(out)!r} is a file; allowed: a new or empty folder")
    occupied = out.is_dir() and any(out.iterdir())
    saved = out / runner.STUDY_FILE
    if not resume:
        if occupied:
            raise UserError(f"study folder {str(out)!r} is not empty; allowed: a new or empty "
                            "folder, or --resume to continue the study in it")
        return
    if not saved.is_file():
        raise UserError(f"--resume: {str(out)!r} holds no {runner.STUDY_FILE}; allowed: a "
                        "folder written by `resstream compare`")
    if saved.read_text(encoding="utf-8") != study.source_text:
        raise UserError(f"--resume: the study differs from {str(saved)!r}; allowed: the same "
                        "study file that started the folder")


def _saved_plan(out: Path) -> dict | None:
    """plan.json of a study folder being resumed (None before its first run started)."""
    path = out / runner.PLAN_FILE
    if not path.is_file():
        return None
    saved = json.loads(path.read_text(encoding="utf-8"))
    saved.setdefault("step_scale", 1.0)
    return saved


def _write_or_check_plan(out: Path, plan: runner.Plan, study: Study, resume: bool) -> None:
    plan_path = out / runner.PLAN_FILE
    if resume and plan_path.is_file():
        saved = json.loads(plan_path.read_text(encoding="utf-8"))
        if saved != _comparable(plan.to_dict()):
            raise UserError(f"--resume: the resolved runs differ from {str(plan_path)!r} "
                            "(another resstream version or --time-budget?); allowed: the "
                            "settings that started the study")
        return
    (out / runner.STUDY_FILE).write_text(study.source_text, encoding="utf-8")
    runner.write_json(plan_path, _comparable(plan.to_dict()))


def _comparable(data: dict) -> dict:
    """The plan as it reads back from JSON, without settings that may change on resume."""
    data = json.loads(json.dumps(data))
    for config in data["variants"].values():
        config["train"].pop("progress", None)
        config["train"].pop("threads", None)
    return data


def _new_folder(name: str, root: Path = Path("runs")) -> Path:
    """runs/<study>-YYYYmmdd-HHMMSS, with a numeric suffix if that exists: never reuses one."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, suffix = root / f"{name}-{stamp}", 1
    while candidate.exists():
        suffix += 1
        candidate = root / f"{name}-{stamp}-{suffix}"
    return candidate


def _without_progress(plan: runner.Plan) -> runner.Plan:
    for run in plan.runs:
        run.config = run.config.with_overrides({"train.progress": False})
    return plan


# ---------------------------------------------------------------------------- time

def predict_seconds(plan: runner.Plan, data) -> float:
    """Predicted training + evaluation time of the runs still to do, from a short timing of
    each variant (1 warm-up and 2 timed steps, one evaluation batch)."""
    from resstream.compare.timing import time_eval_token, time_training_step

    total = 0.0
    for name, config in plan.configs.items():
        todo = [r for r in plan.runs if r.variant == name and runner.run_status(r) != "done"]
        if not todo:
            continue
        step = time_training_step(config, data, warmup=1, timed=2)
        per_token = time_eval_token(config, data)
        evals = config.train.steps // max(1, config.train.eval_every or config.train.steps)
        eval_tokens = (evals * min(config.train.eval_tokens or len(data.val), len(data.val))
                       + min(config.train.final_eval_tokens or len(data.val), len(data.val)))
        total += len(todo) * (config.train.steps * step + eval_tokens * per_token)
    return total


def _apply_time_budget(plan: runner.Plan, args, predicted: float, out: Path, say) -> runner.Plan:
    if args.time_budget is None or predicted <= args.time_budget * 60:
        return plan
    scale = args.time_budget * 60 / predicted
    lowered = runner.plan_study(plan.study, out, step_scale=scale)
    if args.no_progress:
        lowered = _without_progress(lowered)
    first_name = next(iter(plan.configs))
    note = (f"--time-budget {args.time_budget:g} min: the predicted {predicted / 60:.1f} min "
            f"exceeded it, so every variant's steps were scaled by {scale:.3f} (e.g. "
            f"{first_name}: {plan.configs[first_name].train.steps} -> "
            f"{lowered.configs[first_name].train.steps} steps); numbers are not comparable to "
            "the full study")
    say(f"warning: {note}")
    lowered.time_budget_note = note
    return lowered


def _summary_text(results: dict) -> str:
    lines = [f"{'variant':16s} {'val bpb':>8s} {'95% CI':>19s} {'delta':>8s}  verdict"]
    for name, entry in results["variants"].items():
        ci, delta = entry["val_bpb_ci95"], entry["delta_vs_baseline"]
        interval = f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "-"
        change = f"{delta['mean']:+.4f}" if delta else "base"
        verdict = delta["verdict"] if delta else "(baseline)"
        lines.append(f"{name:16s} {entry['val_bpb_mean']:8.4f} {interval:>19s} {change:>8s}  "
                     f"{verdict}")
    return "\n".join(lines)
