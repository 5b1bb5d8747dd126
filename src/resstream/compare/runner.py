"""Running a study: plan every (variant, seed) run, train each with the ordinary trainer into
its own run folder, measure each variant's systems costs, and collect `results.json`.

Fairness, as implemented here:
* one prepared corpus, one tokenizer and one data order per seed index for every variant (the
  trainer draws micro-batch m of step s from numpy.random.default_rng([seed, s, m]));
* one budget: `tokens` and `steps` give every variant the same number of steps of the same
  batch; `flops` gives each variant the steps its own training FLOPs per token allow
  (`resstream.flops`), so costlier variants see fewer tokens;
* the same initialisation per seed index: every parameter a variant shares with the baseline
  (same name and shape: embedding, attention, MLP, norms) starts from the baseline's values for
  that seed, whatever else the variant adds and in whatever order its modules are built;
* optional parameter matching (`match`): a variant's MLP (or d_model) is widened until its
  parameter count is within 2% of the named variant's, and the report says what changed.

Layout of a study folder::

    study.yaml              the exact study file
    plan.json               the resolved runs (configs, steps), checked again on --resume
    runs/<variant>/seed-<s>/  ordinary `resstream train` run folders
    results.json            every number of the report (see compare/report.py)
    report.md, figures/     written by compare/report.py from results.json alone
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from resstream.compare import stats
from resstream.compare.study import Study
from resstream.errors import UserError
from resstream.smoke import smoke_cap, smoke_mode
from resstream.train.config import TrainConfig
from resstream.train.trainer import read_jsonl

RESULTS_FILE = "results.json"
PLAN_FILE = "plan.json"
STUDY_FILE = "study.yaml"
RUNS_DIR = "runs"
FORMAT = 1
# Defaults a study gets unless its config says otherwise: enough evaluation points for a curve
# (at least 10 per run), a fixed validation budget, a resumable checkpoint every quarter.
EVAL_POINTS = 12
DEFAULT_TRAIN = {"final_eval_tokens": 131072, "eval_tokens": 16384, "keep_checkpoints": 1,
                 "progress": True}
ROUTING_WINDOWS = 8  # validation windows the routing weights are averaged over


@dataclass
class PlannedRun:
    variant: str
    seed: int
    config: TrainConfig
    run_dir: Path

    @property
    def label(self) -> str:
        return f"{self.variant} seed {self.seed}"


@dataclass
class Plan:
    study: Study
    out: Path
    configs: dict[str, TrainConfig]  # per variant, seed 0 of the study's seeds
    matches: dict[str, str]  # variant -> what parameter matching changed
    runs: list[PlannedRun]
    step_scale: float = 1.0  # < 1 when --time-budget lowered every variant's steps
    time_budget_note: str | None = None

    def to_dict(self) -> dict:
        return {"format": FORMAT, "study": self.study.name,
                "variants": {name: config.to_dict() for name, config in self.configs.items()},
                "matches": self.matches, "seeds": self.study.seeds,
                "step_scale": self.step_scale, "time_budget": self.time_budget_note}


# ---------------------------------------------------------------------------- planning

def tokens_per_step(config: TrainConfig) -> int:
    return config.data.batch_size * config.seq_len * config.optim.grad_accum


def steps_for_budget(study: Study, config: TrainConfig) -> int:
    """Optimizer steps that spend the study's budget with `config`."""
    per_step = tokens_per_step(config)
    if study.budget_kind == "steps":
        return int(study.budget_value)
    if study.budget_kind == "tokens":
        return max(1, round(study.budget_value / per_step))
    from resstream.flops import training_flops_per_token

    per_token = training_flops_per_token(config.model_config(), config.seq_len)
    return max(1, math.floor(study.budget_value / (per_token * per_step)))


def plan_study(study: Study, out: Path, step_scale: float = 1.0) -> Plan:
    """Resolve every variant's config (matching, budget, evaluation schedule) and the runs."""
    base = {name: _variant_values(study, study.variant(name)) for name in _names(study)}
    matches = _apply_matches(study, base)
    configs = {}
    for name, values in base.items():
        config = TrainConfig.from_dict(values)
        steps = max(1, int(steps_for_budget(study, config) * step_scale))
        steps = smoke_cap(steps, 2, f"{name}: training steps")
        configs[name] = config.with_overrides(_schedule(config, values, steps))
    runs = [PlannedRun(name, seed, configs[name].with_overrides({"train.seed": seed}),
                       out / RUNS_DIR / name / f"seed-{seed}")
            for seed in study.seeds for name in configs]
    return Plan(study, out, configs, matches, runs, step_scale)


def _names(study: Study) -> list[str]:
    return [v.name for v in study.variants]


def _variant_values(study: Study, variant) -> dict:
    """The variant's train config as plain data, with the study's evaluation defaults."""
    values = study.train_values(variant)
    for key in ("source", "cache_dir"):
        if key in (variant.overrides.get("data") or {}):
            raise UserError(f"variants.{variant.name}.data.{key} is invalid: every variant "
                            "trains on the same data; allowed: set data in the shared config")
    train = values.setdefault("train", {})
    for key, value in DEFAULT_TRAIN.items():
        train.setdefault(key, value)
    if smoke_mode():
        train["eval_tokens"] = smoke_cap(train.get("eval_tokens"), 256, "eval tokens")
        train["final_eval_tokens"] = smoke_cap(train.get("final_eval_tokens"), 256,
                                               "final eval tokens")
    return values


def _schedule(config: TrainConfig, values: dict, steps: int) -> dict:
    """Steps, then an evaluation schedule with EVAL_POINTS points and checkpoints for resume,
    unless the study's config sets them."""
    train = values.get("train", {})
    overrides = {"train.steps": steps}
    if "eval_every" not in train:
        overrides["train.eval_every"] = max(1, steps // EVAL_POINTS)
    if "checkpoint_every" not in train:
        overrides["train.checkpoint_every"] = max(1, steps // 4)
    if "log_every" not in train:
        overrides["train.log_every"] = max(1, min(10, steps // EVAL_POINTS))
    warmup = config.optim.warmup_steps
    if warmup >= steps:  # a tiny budget: keep a real decay phase
        overrides["optim.warmup_steps"] = steps // 4
    return overrides


def _apply_matches(study: Study, base: dict[str, dict]) -> dict[str, str]:
    """Widen every variant with `match` to the named variant's parameter count (in place)."""
    described = {}
    for variant in study.variants:
        if variant.match is None:
            continue
        from resstream.param_match import count_parameters, match_parameters

        target_config = TrainConfig.from_dict(base[variant.match.params]).model_config()
        config = TrainConfig.from_dict(base[variant.name]).model_config()
        matched, description = match_parameters(config, count_parameters(target_config),
                                                widen=variant.match.widen)
        changed = {key: value for key, value in matched.to_dict().items()
                   if config.to_dict()[key] != value}
        base[variant.name].setdefault("model", {}).update(changed)
        described[variant.name] = f"{description} (matched to {variant.match.params})"
    return described


# ---------------------------------------------------------------------------- running

def run_status(run: PlannedRun) -> str:
    """'done' (a final record), 'partial' (a checkpoint to resume from), or 'new'."""
    from resstream.train import checkpoint as ckpt
    from resstream.train.trainer import METRICS_FILE

    metrics = run.run_dir / METRICS_FILE
    if metrics.is_file() and any(r.get("kind") == "final" for r in read_jsonl(metrics)):
        return "done"
    if ckpt.latest_checkpoint(run.run_dir) is not None:
        return "partial"
    return "new"


def execute_runs(plan: Plan, data, log: Callable[[str], None]) -> None:
    """Train every run that is not finished, in seed-major order, with a study progress line."""
    from resstream.train.trainer import Trainer

    started, trained = time.perf_counter(), 0
    todo = [run for run in plan.runs if run_status(run) != "done"]
    done = len(plan.runs) - len(todo)
    if done:
        log(f"study: {done} of {len(plan.runs)} runs already finished; resuming the rest")
    baseline_config = plan.configs[plan.study.baseline].model_config()
    for run in todo:
        status = run_status(run)
        index = plan.runs.index(run) + 1
        eta = _eta(time.perf_counter() - started, trained, len(todo))
        log(f"study {plan.study.name}: run {index}/{len(plan.runs)} ({run.label}); "
            f"{done} done{eta}")
        trainer = Trainer(run.config, run.run_dir, resume=status == "partial",
                          overwrite=status == "new" and run.run_dir.exists(), data=data,
                          progress_label=f"[{index}/{len(plan.runs)}] {run.label}", log=log,
                          init_like=baseline_config)
        trainer.run()
        trained += 1
        done += 1
    log(f"study {plan.study.name}: all {len(plan.runs)} runs finished")


def _eta(elapsed: float, trained: int, total: int) -> str:
    if not trained:
        return ""
    remaining = round(elapsed / trained * (total - trained))
    return f", about {remaining // 60}m{remaining % 60:02d}s left"


# ---------------------------------------------------------------------------- collecting

def collect_results(plan: Plan, data, log: Callable[[str], None]) -> dict:
    """results.json's content: per-seed finals and curves from the run folders, statistics,
    systems costs and routing weights."""
    study = plan.study
    names = list(plan.configs)
    per_variant = {name: _variant_runs(plan, name) for name in names}
    finals = {name: [run["val_bpb"] for run in runs] for name, runs in per_variant.items()}
    differences = stats.compare_to_baseline(finals, study.baseline)
    variants = {}
    for name in names:
        config = plan.configs[name]
        summary = stats.summarize(finals[name])
        entry = {
            "title": study.variant(name).title,
            "config": config.to_dict(),
            "model_config": config.model_config().to_dict(),
            "match": plan.matches.get(name),
            "steps": config.train.steps,
            "tokens": per_variant[name][0]["tokens"],
            "seeds": study.seeds,
            "val_bpb": finals[name],
            "val_bpb_mean": summary.mean,
            "val_bpb_std": summary.std,
            "val_bpb_ci95": list(summary.ci95) if summary.ci95 else None,
            "delta_vs_baseline": _difference_json(differences.get(name)),
            "runs": per_variant[name],
        }
        variants[name] = entry
    log("study: measuring systems costs (training memory, decode latency, cache)")
    for name in names:
        variants[name]["systems"] = measure_variant_systems(plan, name, data, per_variant)
    _add_ratios(variants, study.baseline)
    log("study: reading routing weights from the trained models")
    for name in names:
        variants[name]["routing"] = routing_of_variant(plan, name, data)
    return {
        "format": FORMAT,
        "study": {"name": study.name, "description": study.description,
                  "preset": study.preset, "seeds": study.seeds,
                  "budget": {study.budget_kind: study.budget_value},
                  "baseline": study.baseline, "file": study.source_text},
        "baseline": study.baseline,
        "seeds": study.seeds,
        "alpha": stats.ALPHA,
        "time_budget": plan.time_budget_note,
        "smoke": smoke_mode(),
        "data": _data_summary(plan, data),
        "environment": training_environment(plan),
        "variants": variants,
    }


def training_environment(plan: Plan) -> dict:
    """The environment and code version that trained the study: the first run's record
    (`environment.json`, written when it started), not the process collecting the results."""
    from resstream.train.trainer import ENVIRONMENT_FILE, environment_info

    path = plan.runs[0].run_dir / ENVIRONMENT_FILE
    if not path.is_file():
        return environment_info()
    recorded = json.loads(path.read_text(encoding="utf-8"))
    recorded.pop("resumes", None)
    recorded.pop("argv", None)
    return recorded


def _variant_runs(plan: Plan, name: str) -> list[dict]:
    from resstream.train.trainer import METRICS_FILE

    runs = []
    for run in (r for r in plan.runs if r.variant == name):
        records = read_jsonl(run.run_dir / METRICS_FILE)
        final = next((r for r in reversed(records) if r.get("kind") == "final"), None)
        if final is None:
            raise UserError(f"run {str(run.run_dir)!r} has no final record; allowed: a finished "
                            "run (resume the study with --resume)")
        curve = [[r["step"], r["tokens"], r.get("train_seconds"), r["val_bpb"],
                  r["eval_tokens"]] for r in records if r.get("kind") == "eval"]
        runs.append({"seed": run.seed, "run_dir": str(run.run_dir.relative_to(plan.out)),
                     "val_bpb": final["val_bpb"], "val_loss": final["val_loss"],
                     "tokens": final["tokens"], "num_parameters": final["num_parameters"],
                     "tokens_per_s": final["tokens_per_s"],
                     "train_seconds": final["train_seconds"], "curve": curve})
    return runs


def _difference_json(difference) -> dict | None:
    if difference is None:
        return None
    return {"mean": difference.mean, "ci95": list(difference.ci95) if difference.ci95 else None,
            "p_value": difference.p_value, "p_holm": difference.p_holm,
            "significant": difference.significant, "verdict": stats.verdict(difference)}


def _data_summary(plan: Plan, data) -> dict:
    first = next(iter(plan.configs.values()))
    return {"source": first.data.source, "train_tokens": int(len(data.train)),
            "val_tokens": int(len(data.val)), "seq_len": first.seq_len,
            "batch_size": first.data.batch_size,
            "manifest_sha256": data.manifest.get("sha256") if isinstance(data.manifest, dict)
            else None}


# ---------------------------------------------------------------------------- systems

def measure_variant_systems(plan: Plan, name: str, data, per_variant: dict) -> dict:
    """Parameters, FLOPs, throughput, training activation memory, decode latency, cache bytes
    and the state that crosses a pipeline-stage boundary, for one variant."""
    from resstream.bench.operators import saved_activation_bytes
    from resstream.flops import training_flops_per_token
    from resstream.model import ResStreamLM
    from resstream.train.trainer import batch_for_step

    config = plan.configs[name]
    model_config = config.model_config()
    torch.manual_seed(0)
    model = ResStreamLM(model_config)
    inputs, targets = batch_for_step(data.train, config.seq_len, config.data.batch_size, 0, 0, 0)
    runs = per_variant[name]
    layer = max(0, model_config.n_layers // 2 - 1)  # a boundary in the middle of the stack
    formula, vectors = model.depth.pipeline_payload(layer)
    return {
        "parameters": model.num_parameters(),
        "flops_per_token": training_flops_per_token(model_config, config.seq_len),
        "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in runs),
        "train_activation_bytes": saved_activation_bytes(model, inputs, targets),
        "decode": measure_decode(model, plan.study, model_config),
        "pipeline_boundary_layer": layer,
        "pipeline_state_formula": formula,
        "pipeline_state_vectors": vectors,
        "pipeline_state_bytes_per_token": vectors * model_config.d_model * 4,
    }


def decode_contexts(study: Study, model_config) -> list[int]:
    if study.decode_contexts:
        return [min(c, model_config.max_seq_len - 1) for c in study.decode_contexts]
    longest = model_config.max_seq_len - 1
    return sorted({max(1, model_config.max_seq_len // 4), longest})


@torch.inference_mode()
def measure_decode(model, study: Study, model_config) -> list[dict]:
    """Per-token latency of a cached decode step (batch 1, median of 5 repeats of
    `decode_steps` steps) and the cache bytes held, at each decode context."""
    from resstream.bench.decode import filled_cache, time_steps

    model.eval()
    steps = smoke_cap(study.decode_steps, 2, "decode steps")
    token = torch.zeros(1, 1, dtype=torch.long)
    rows = []
    for context in decode_contexts(study, model_config):
        cache = filled_cache(model, 1, context)
        repeats = smoke_cap(5, 1, "decode repeats")
        times = [time_steps(model, token, cache, context, steps) for _ in range(repeats)]
        rows.append({"context": context, "ms_per_token": 1e3 * statistics.median(times),
                     "cache_bytes": cache_bytes_at(model, context)})
    return rows


def cache_bytes_at(model, context: int) -> int:
    """Bytes of a decode cache holding exactly `context` tokens (measured on a cache sized to
    them: KV caches, rolling windows, convolution and depth histories)."""
    return model.new_cache(1, context).nbytes()


def _add_ratios(variants: dict, baseline: str) -> None:
    reference = variants[baseline]["systems"]
    for entry in variants.values():
        systems = entry["systems"]
        systems["tokens_per_s_ratio"] = systems["tokens_per_s"] / reference["tokens_per_s"]
        systems["train_activation_ratio"] = (systems["train_activation_bytes"]
                                             / reference["train_activation_bytes"])
        for row, base_row in zip(systems["decode"], reference["decode"]):
            row["latency_ratio"] = row["ms_per_token"] / base_row["ms_per_token"]


# ---------------------------------------------------------------------------- routing

def routing_of_variant(plan: Plan, name: str, data) -> dict:
    """The depth operator's routing weights (`ResStreamLM.depth_routing`) of the variant's
    trained model for the first seed, over ROUTING_WINDOWS evenly spaced validation windows,
    in JSON form."""
    from resstream.model import ResStreamLM
    from resstream.routing import routing_to_json
    from resstream.train import checkpoint as ckpt

    run = next(r for r in plan.runs if r.variant == name)
    model = ResStreamLM(plan.configs[name].model_config())
    loaded = ckpt.read_checkpoint(ckpt.latest_checkpoint(run.run_dir))
    ckpt.load_model_weights(loaded, model)
    seq_len = plan.configs[name].seq_len
    span = max(1, len(data.val) - seq_len)
    starts = [i * span // ROUTING_WINDOWS for i in range(ROUTING_WINDOWS)]
    windows = torch.stack([torch.as_tensor(data.val[s:s + seq_len].astype("int64"))
                           for s in starts])
    return routing_to_json(model.depth_routing(windows))


# ---------------------------------------------------------------------------- helpers

def write_json(path: Path, data) -> None:
    """Atomic JSON write (temporary file, then rename)."""
    temporary = path.with_name(path.name + f".tmp-{os.getpid()}")
    temporary.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
