"""The training loop: AdamW, warmup + cosine schedule, clipping, accumulation, evaluation in
bits per byte, JSONL metrics, atomic checkpoints and exact resume.

Run folder (``--out``, default ``runs/<name>``)::

    resstream_run.json  marker: {"kind": "resstream-train-run", "format": 1}; --overwrite and
                        --resume act only on folders that have it (see run_folder.py)
    config.json         resolved TrainConfig (preset, model overrides, data, optim, train)
    model_config.json   the resolved ModelConfig
    environment.json    python, torch, numpy, platform, threads, device, resstream version, git
                        commit and a sha256 of the package's source files (the code version)
    data_manifest.json  the data cache's manifest (source, byte counts, sha256, versions)
    metrics.jsonl       one JSON record per line: kind "train", "eval" or "final"
    checkpoints/step_NNNNNNNN/  see resstream.train.checkpoint
    tensorboard/        TensorBoard scalars, with train.log=tensorboard

Exact resume. Every random choice is a function of (seed, step): the batch for micro-batch m of
step s is drawn by ``numpy.random.default_rng([seed, s, m])``, so resuming needs no replay of the
data stream; weights, optimizer state and all RNG states come from the checkpoint. A run killed
at any point and resumed from its last checkpoint ends bitwise equal to an uninterrupted run on
the same machine and thread count (tested with SIGKILL in tests/test_train.py).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from resstream.data.cache import PreparedData, prepare_data
from resstream.data.tokenizer import get_tokenizer
from resstream.errors import UserError
from resstream.hardware import WORKAROUND, cpu_matmul_works, parse_device
from resstream.metrics import EvalResult, evaluate_bpb
from resstream.parallel import data_parallel as dp
from resstream.parallel import pipeline_training
from resstream.train import checkpoint as ckpt
from resstream.train import run_folder
from resstream.train.config import TrainConfig

CONFIG_FILE = "config.json"
MODEL_CONFIG_FILE = "model_config.json"
ENVIRONMENT_FILE = "environment.json"
DATA_MANIFEST_FILE = "data_manifest.json"
METRICS_FILE = "metrics.jsonl"
# What identifies the training data: the raw input's fingerprint and the token files' hashes.
DATA_IDENTITY_KEYS = ("source_fingerprint", "tokenizer", "train_sha256", "val_sha256")

# Keys that may change between a run and its resumption: they do not change the weights.
RESUMABLE_CHANGES = {
    "name", "data.cache_dir", "train.steps", "train.eval_every", "train.eval_tokens",
    "train.final_eval_tokens", "train.eval_batch_size", "train.log_every",
    "train.checkpoint_every", "train.keep_checkpoints", "train.compile", "train.threads",
    "train.progress", "train.log",
    # data and pipeline parallel: the same global batch and order whatever the engine, the
    # number of processes or the stages (a checkpoint is the full, gathered state)
    "parallel.dp", "parallel.timeout_s", "parallel.pp", "parallel.schedule",
    "parallel.microbatches",
}
# Evaluations of at least this many tokens get their own (transient) progress bar.
EVAL_PROGRESS_MIN_TOKENS = 100_000
# Test hook only: seconds to sleep after each step, so a test can SIGKILL a run mid-way.
SLOW_STEP_ENV = "RESSTREAM_TEST_STEP_SLEEP"


class NonFiniteLossError(UserError):
    """Training produced a NaN or infinite loss or gradient; the run stops before updating."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the run; the message says at which step and where its checkpoint is."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens: int
    final_eval: EvalResult | None
    evals: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    tokens_per_second: float = 0.0
    wall_seconds: float = 0.0
    num_parameters: int = 0


def default_run_name(config: TrainConfig) -> str:
    """runs/<name>: the config's name, else preset + depth operator (+ local mixer)."""
    if config.name:
        return config.name
    model = config.model
    parts = [config.preset, str(model.get("depth", "standard"))]
    mixer = model.get("local_mixer")
    if mixer:
        parts.append("+".join(map(str, mixer)) if isinstance(mixer, (list, tuple)) else str(mixer))
    return "-".join(parts)


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine decay from
    optim.lr to optim.min_lr at the last step."""
    optim, total = config.optim, config.train.steps
    if optim.warmup_steps and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    decay_steps = max(1, total - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / decay_steps)
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1.0 + math.cos(math.pi * progress))


def batch_for_step(tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, step: int,
                   micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) for one micro-batch: random windows drawn by a generator seeded with
    (seed, step, micro), so the data order needs no state to resume."""
    rng = np.random.default_rng([seed, step, micro])
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)
    windows = np.stack([np.asarray(tokens[s:s + seq_len + 1], dtype=np.int64) for s in starts])
    batch = torch.from_numpy(windows)
    return batch[:, :-1], batch[:, 1:]


class Trainer:
    """One training run. `Trainer(config, run_dir, ...).run()` trains and returns a TrainResult.

    `data` may be passed in to share prepared tokens between runs (`resstream compare` does);
    `progress_label` prefixes the progress bar; `log` receives one-line status messages."""

    def __init__(self, config: TrainConfig, run_dir: str | Path, resume: bool = False,
                 overwrite: bool = False, data: PreparedData | None = None,
                 progress_label: str | None = None, log: Callable[[str], None] | None = None,
                 argv: list[str] | None = None, init_like=None,
                 allow_data_change: bool = False):
        if resume and overwrite:
            raise UserError("--resume and --overwrite exclude each other; allowed: one of them")
        if allow_data_change and not resume:
            raise UserError("--allow-data-change is invalid without --resume; allowed: "
                            "--resume --allow-data-change")
        self.config = config
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.overwrite = overwrite
        self.allow_data_change = allow_data_change
        self.data_change: dict | None = None  # set when a resume continues on changed data
        self.interrupts = _InterruptGuard()  # active (handling SIGINT) only inside run()
        self.position = (0, 0)  # (step, tokens) of the last completed step
        self.tensorboard = None  # a SummaryWriter with train.log=tensorboard
        self.metrics_file = None  # metrics.jsonl, open while a run writes it (rank 0 only)
        self.dist = dp.Distributed()  # the process group, started by run() under torchrun
        self.pipeline = None  # this rank's stages, with parallel.pp > 1
        self.data = data
        self.progress_label = progress_label or self.run_dir.name
        self.log = log or (lambda message: print(message, file=sys.stderr))
        self.argv = argv
        # `resstream compare`: start every parameter shared with this reference ModelConfig
        # (same name and shape) from the reference's init for the same seed
        self.init_like = init_like
        self.train_clock = 0.0  # training seconds so far, evaluations excluded; survives resume
        self.model_config = config.model_config()
        self.seq_len = config.data.seq_len or self.model_config.max_seq_len
        if self.seq_len > self.model_config.max_seq_len:
            raise UserError(f"data.seq_len={self.seq_len} is invalid; allowed: at most "
                            f"model.max_seq_len={self.model_config.max_seq_len}")
        if config.parallel.pp > 1:
            pipeline_training.check_depth(config.parallel, self.model_config.n_layers)
        self._check_vocab(data.tokenizer if data is not None else get_tokenizer())

    # ------------------------------------------------------------------ setup
    def _check_vocab(self, tokenizer) -> None:
        """Every token id the tokenizer can produce must have an embedding row (else the first
        batch dies with an IndexError deep in nn.Embedding)."""
        vocab = self.model_config.vocab_size
        if vocab < tokenizer.vocab_size:
            raise UserError(f"model.vocab_size={vocab} is invalid; allowed: at least "
                            f"{tokenizer.vocab_size}, the vocabulary of the {tokenizer.name!r} "
                            "tokenizer")

    def _device(self) -> torch.device:
        return parse_device(self.config.train.device, "train.device")

    def _check_run_dir(self) -> bool:
        """Refuse a non-empty folder unless resuming or overwriting a resstream run (one with
        the marker file). Changes nothing; returns whether the folder holds anything."""
        run_dir = self.run_dir
        if run_dir.exists() and not run_dir.is_dir():
            raise UserError(f"run folder {str(run_dir)!r} is a file; allowed: a new or empty "
                            "folder")
        # a folder holding only the marker is empty: a run that failed before writing anything
        occupied = run_dir.is_dir() and any(child.name != run_folder.MARKER_FILE
                                            for child in run_dir.iterdir())
        if self.resume:
            if occupied:
                run_folder.require_run_folder(run_dir, "--resume")
            if not occupied or ckpt.latest_checkpoint(run_dir) is None:
                raise UserError(f"--resume: no checkpoint in {str(run_dir)!r}; allowed: a run "
                                "folder with checkpoints/ (or start without --resume)")
            return True
        if occupied and not self.overwrite:
            raise UserError(f"run folder {str(run_dir)!r} is not empty; allowed: --resume to "
                            "continue it, --overwrite to start over, or another --out")
        if occupied:
            run_folder.require_run_folder(run_dir, "--overwrite")
        return occupied

    def _prepare_run_dir(self) -> None:
        """After every check has passed: clear an overwritten run's own files and mark the
        folder as a run before anything else is written into it."""
        run_dir = self.run_dir
        if self._check_run_dir() and not self.resume:
            kept = run_folder.remove_own_files(run_dir)
            if kept:
                self.log(f"--overwrite: kept {len(kept)} entries that are not the run's own: "
                         f"{', '.join(kept[:4])}{', ...' if len(kept) > 4 else ''}")
        if not self.resume:
            run_dir.mkdir(parents=True, exist_ok=True)
            run_folder.write_marker(run_dir)

    def _check_resume_config(self) -> None:
        saved = _read_json_file(self.run_dir / CONFIG_FILE)
        allowed = RESUMABLE_CHANGES | ({"data.source"} if self.allow_data_change else set())
        differences = sorted(key for key in _diff_dotted(saved, self.config.to_dict())
                             if key not in allowed)
        if differences:
            hint = "" if self.allow_data_change else " (data.source with --allow-data-change)"
            raise UserError(f"--resume: the config differs from the run's {CONFIG_FILE} in "
                            f"{', '.join(differences)}; allowed changes: "
                            f"{', '.join(sorted(allowed))}{hint}")

    def _check_resume_data(self, data: PreparedData) -> None:
        """Refuse to continue a run on other data than it was trained on, unless
        --allow-data-change (then the change is recorded in environment.json's resumes)."""
        saved = _read_json_file(self.run_dir / DATA_MANIFEST_FILE)
        before, now = _data_identity(saved), _data_identity(data.manifest)
        if before == now:
            return
        changed = ", ".join(key for key in DATA_IDENTITY_KEYS if before[key] != now[key])
        if not self.allow_data_change:
            raise UserError(f"--resume: data {self.config.data.source!r} differs from the data "
                            f"the run was trained on (changed: {changed}; see {DATA_MANIFEST_FILE}"
                            "); allowed: the same data, or --allow-data-change to continue on it")
        self.data_change = {"changed": changed, "before": before, "after": now,
                            "source_before": saved.get("source"), "source_after": data.source}
        self.log(f"warning: resuming on changed data ({changed}; --allow-data-change)")

    def _load_data(self) -> PreparedData:
        data = self.data or prepare_data(self.config.data.source, self.config.data.cache_dir)
        need = self.seq_len + 1
        for split, tokens in (("training", data.train), ("validation", data.val)):
            if len(tokens) < need:
                raise UserError(f"data {self.config.data.source!r} is too short: its {split} "
                                f"text has {len(tokens)} tokens; allowed: at least one sequence "
                                f"(data.seq_len + 1 = {need} tokens)")
        return data

    def _build_optimizer(self, model: torch.nn.Module) -> torch.optim.AdamW:
        """AdamW; weight decay by parameter role (`ResStreamLM.parameter_groups`): matrices are
        decayed, except the ones the depth operator or local mixer declares exempt (identity- or
        constant-initialised mixing coefficients, gates, queries); 1-D parameters (norm gains,
        biases, scalars) never are. Models without `parameter_groups`: matrices only."""
        optim = self.config.optim
        if hasattr(model, "parameter_groups"):
            groups = model.parameter_groups(optim.weight_decay)
        else:
            decay, no_decay = [], []
            for _, param in sorted(model.named_parameters(), key=lambda item: item[0]):
                if param.requires_grad:
                    (decay if param.dim() >= 2 else no_decay).append(param)
            groups = [{"params": decay, "weight_decay": optim.weight_decay},
                      {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2),
                                 eps=optim.eps)

    # ------------------------------------------------------------------ run
    def run(self) -> TrainResult:
        """Train. Under torchrun (WORLD_SIZE > 1) every process runs this with its rank: the
        data-parallel engine of `parallel.dp` wraps the model (with `parallel.pp` > 1, this
        rank's pipeline stages: resstream.parallel.pipeline_training), each rank trains on its
        rows of the global batch, and rank 0 alone writes the run folder (resstream.parallel)."""
        parallel = self.config.parallel
        self.dist = dp.Distributed.from_environment(parallel.dp, parallel.timeout_s,
                                                    self._device(), parallel.pp)
        try:
            return self._run()
        except (dist_errors() if self.dist.enabled else ()) as error:
            raise dp.collective_error(error, self.dist, parallel.timeout_s) from None
        finally:
            self.dist.close()

    def _run(self) -> TrainResult:
        wall_start = time.perf_counter()
        train_cfg = self.config.train
        if train_cfg.threads:
            torch.set_num_threads(train_cfg.threads)
        device = self.dist.device(self._device())
        dp.check_batch_divides(self.config.data.batch_size, self.dist)
        if self.config.parallel.pp > 1:
            pipeline_training.check_microbatches(self.config.data.batch_size, self.dist,
                                                 self.config.parallel)
        if not self.dist.is_main:  # one voice: rank 0 logs, shows progress and writes files
            self.log = lambda message: None
            train_cfg.progress = False
        # before the run folder is touched: a missing package is an error, not a late surprise
        writer_cls = _tensorboard_writer_class() if train_cfg.log == "tensorboard" else None
        self._check_run_dir()  # every refusal before any work and before anything is deleted
        if self.resume:
            self._check_resume_config()
        if not self.dist.is_main:  # rank 0 prepares the data cache, the others then read it
            self.dist.barrier()
        data = self._load_data()
        if self.dist.is_main:
            self.dist.barrier()
        if self.resume:
            self._check_resume_data(data)
        self.dist.barrier()  # every rank has checked the folder before rank 0 changes it
        if self.dist.is_main:
            self._prepare_run_dir()
        self.data = data

        from resstream.model import ResStreamLM

        torch.manual_seed(train_cfg.seed)
        model = ResStreamLM(self.model_config).to(device)
        if self.init_like is not None and not self.resume:
            copy_shared_init(model, self.init_like, train_cfg.seed)
        if self.config.parallel.pp > 1:  # `model` stays the whole, unwrapped model
            self.pipeline = pipeline_training.PipelineTraining(
                model, self.dist, self.config.parallel, self.config.optim.grad_accum, device)
            optimizer = self.pipeline.stage_optimizer(self._build_optimizer(model))
            self.log(self.pipeline.layout)
            if train_cfg.compile:
                self.log("warning: train.compile is ignored with parallel.pp > 1 (the pipelining "
                         "engine runs the stages)")
        else:
            model = dp.parallelize(model, self.dist, device, self.seq_len)
            optimizer = self._build_optimizer(dp.unwrap(model))
        step, tokens_seen = 0, 0
        if self.resume:
            loaded = ckpt.read_checkpoint(ckpt.latest_checkpoint(self.run_dir))
            if self.pipeline is not None:
                self.pipeline.load_training_state(loaded, optimizer)
            else:
                ckpt.load_training_state(loaded, model, optimizer)
            ckpt.restore_rng_state(loaded.state["rng"])
            step, tokens_seen = loaded.step, int(loaded.state.get("tokens", 0))
            self.train_clock = float(loaded.state.get("train_seconds", 0.0))
            if step >= self.config.train.steps:
                raise UserError(f"--resume: {self.run_dir} already finished at step {step}; "
                                f"allowed: --steps larger than {step} to continue training")
            _truncate_metrics(self.run_dir / METRICS_FILE, step)
            self.log(f"resuming {self.run_dir} from step {step} ({loaded.path.name})")
        self.dist.barrier()  # rank 0 has prepared the folder
        if self.dist.is_main:
            self._write_run_files(data, model)
            self.metrics_file = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")
        if writer_cls is not None and self.dist.is_main:  # purge_step: drop the scalars of steps being redone
            self.tensorboard = writer_cls(log_dir=str(self.run_dir / run_folder.TENSORBOARD_DIR),
                                          purge_step=step if self.resume else None)
        self.position = (step, tokens_seen)
        try:
            with self.interrupts:
                return self._loop(model, optimizer, data, device, step, tokens_seen, wall_start)
        except KeyboardInterrupt:
            raise self._interrupted(model, optimizer) from None
        finally:
            if self.metrics_file is not None:
                self.metrics_file.close()
            if self.tensorboard is not None:
                self.tensorboard.close()

    def _interrupted(self, model, optimizer) -> TrainingInterrupted:
        """After Ctrl-C: a checkpoint of the last completed step (unless a second Ctrl-C cut a
        step short, leaving weights half-updated), and the one line that says so."""
        step, tokens = self.position
        latest = ckpt.latest_checkpoint(self.run_dir)
        if self.interrupts.aborted:
            where = f"last checkpoint: {latest}" if latest else "no checkpoint was written"
            return TrainingInterrupted(f"interrupted twice during step {step + 1}: stopped "
                                       f"without saving it ({where})")
        if latest is None or ckpt.read_checkpoint(latest, verify=False).step != step:
            latest = self._save(model, optimizer, step, tokens)
        return TrainingInterrupted(f"interrupted at step {step} of {self.config.train.steps}; "
                                   f"checkpoint: {latest}; continue with --resume")

    def _loop(self, model, optimizer, data, device, step, tokens_seen, wall_start) -> TrainResult:
        cfg = self.config
        train_cfg = cfg.train
        forward = self._maybe_compile(model, train_cfg.compile if self.pipeline is None else False)
        autocast_dtype = _autocast_dtype(train_cfg.precision, device, self.log)
        tokens_per_step = cfg.data.batch_size * self.seq_len * cfg.optim.grad_accum
        evals = _read_evals(self.run_dir / METRICS_FILE)
        sleep_per_step = float(os.environ.get(SLOW_STEP_ENV, "0") or 0)
        if step == 0 and train_cfg.eval_every > 0:
            evals.append(self._evaluate(model, data, device, autocast_dtype, step, tokens_seen,
                                        train_cfg.eval_tokens))
        progress = _progress_bar(train_cfg.steps, step, self.progress_label, train_cfg.progress)
        train_seconds, trained_tokens, last_loss = 0.0, 0, float("nan")
        final_eval = None
        try:
            while step < train_cfg.steps:
                started = time.perf_counter()
                lr = lr_at(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with self.interrupts.deferred():  # Ctrl-C lands between steps, never in one
                    loss, grad_norm, forward = self._train_step(model, forward, optimizer, data,
                                                                device, autocast_dtype, step)
                    step += 1
                    tokens_seen += tokens_per_step
                    self.position = (step, tokens_seen)
                trained_tokens += tokens_per_step
                step_seconds = time.perf_counter() - started
                train_seconds += step_seconds
                self.train_clock += step_seconds
                last_loss = loss
                tokens_per_s = trained_tokens / max(train_seconds, 1e-9)
                postfix = {"loss": f"{loss:.3f}", "tok/s": f"{tokens_per_s:,.0f}"}
                if evals:
                    postfix["val_bpb"] = f"{evals[-1]['val_bpb']:.3f}"
                progress.set_postfix(postfix, refresh=False)
                progress.update(1)
                if step % train_cfg.log_every == 0 or step == train_cfg.steps:
                    self._write_metrics({"kind": "train", "step": step, "tokens": tokens_seen,
                                         "loss": loss, "lr": lr, "grad_norm": grad_norm,
                                         "tokens_per_s": tokens_per_s,
                                         "elapsed_s": time.perf_counter() - wall_start})
                is_last = step == train_cfg.steps
                if is_last:
                    final_eval_record = self._evaluate(model, data, device, autocast_dtype, step,
                                                       tokens_seen, train_cfg.final_eval_tokens)
                    evals.append(final_eval_record)
                    final_eval = final_eval_record
                elif train_cfg.eval_every and step % train_cfg.eval_every == 0:
                    evals.append(self._evaluate(model, data, device, autocast_dtype, step,
                                                tokens_seen, train_cfg.eval_tokens))
                if is_last or (train_cfg.checkpoint_every
                               and step % train_cfg.checkpoint_every == 0):
                    self._save(model, optimizer, step, tokens_seen)
                if sleep_per_step:
                    time.sleep(sleep_per_step)
        finally:
            progress.close()
        result = TrainResult(
            run_dir=self.run_dir, step=step, tokens=tokens_seen,
            final_eval=_eval_result(final_eval) if final_eval else None, evals=evals,
            train_seconds=train_seconds,
            tokens_per_second=trained_tokens / train_seconds if train_seconds else 0.0,
            wall_seconds=time.perf_counter() - wall_start,
            num_parameters=_num_parameters(model))
        self._write_metrics({"kind": "final", "step": step, "tokens": tokens_seen,
                             "train_loss": last_loss,
                             "val_loss": final_eval["val_loss"] if final_eval else None,
                             "val_bpb": final_eval["val_bpb"] if final_eval else None,
                             "tokens_per_s": result.tokens_per_second,
                             "train_seconds": train_seconds, "wall_seconds": result.wall_seconds,
                             "num_parameters": result.num_parameters,
                             "compile": self.compile_outcome})
        return result

    def _maybe_compile(self, model: torch.nn.Module, mode: bool | str) -> Callable:
        """torch.compile(model) when train.compile is true or auto. Compilation happens at the
        first step, so a failure there goes through `_compile_failed` too."""
        self.compile_outcome = "off" if not mode else "compiled"
        if not mode:
            return model
        try:
            return torch.compile(model)
        except Exception as error:  # noqa: BLE001
            return self._compile_failed(model, error)

    def _compile_failed(self, model: torch.nn.Module, error: Exception) -> torch.nn.Module:
        """train.compile=true: the run ends with the compiler's first line. auto: eager, said in
        the log and in the final metrics record."""
        reason = _first_line(error)
        if self.config.train.compile is True:
            raise UserError(f"train.compile=true: torch.compile failed ({reason}); set "
                            f"train.compile=auto to fall back to eager, or false") from error
        self.log(f"warning: torch.compile failed ({reason}); running eagerly (train.compile=auto)")
        self.compile_outcome = f"eager fallback: {reason}"
        return model

    def _train_step(self, model, forward, optimizer, data, device, autocast_dtype, step):
        """One optimizer step over grad_accum micro-batches. Returns (mean loss, grad norm, the
        forward callable to use next; it becomes the eager model if compiling failed under
        train.compile=auto)."""
        cfg = self.config
        try:
            loss = self._accumulate(forward, optimizer, data, device, autocast_dtype, step)
        except Exception as error:  # noqa: BLE001 - compile failures have many types
            if forward is model or isinstance(error, UserError):
                raise
            forward = self._compile_failed(model, error)
            loss = self._accumulate(forward, optimizer, data, device, autocast_dtype, step)
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        if self.pipeline is not None:  # the global norm over every stage
            grad_norm = self.pipeline.clip_grad_norm_(clip)
        else:
            grad_norm = float(dp.full_norm(torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                                          clip)))
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            last = ckpt.latest_checkpoint(self.run_dir)
            where = f"last good checkpoint: {last}" if last else "no checkpoint was written yet"
            what = f"loss={loss}" if not math.isfinite(loss) else f"gradient norm={grad_norm}"
            advice = "a lower optim.lr"
            if cfg.train.precision != "fp32":
                advice += " or train.precision=fp32"
            message = (f"training stopped at step {step + 1}: {what} is not finite ({where}); "
                       f"try {advice}")
            self._write_metrics({"kind": "error", "step": step + 1, "message": message})
            raise NonFiniteLossError(message)
        optimizer.step()
        return loss, grad_norm, forward

    def _accumulate(self, forward, optimizer, data, device, autocast_dtype, step) -> float:
        cfg = self.config
        optimizer.zero_grad(set_to_none=True)
        accum = cfg.optim.grad_accum
        if self.pipeline is not None:  # every micro-batch in one schedule (pipeline_training)
            pairs = [self._rows(data, device, step, micro) for micro in range(accum)]
            return self.pipeline.step(torch.cat([i for i, _ in pairs]),
                                      torch.cat([t for _, t in pairs]),
                                      _autocast(device, autocast_dtype))
        total = 0.0
        for micro in range(accum):
            inputs, targets = self._rows(data, device, step, micro)
            with dp.gradient_sync(forward, sync=micro == accum - 1), \
                    _autocast(device, autocast_dtype):
                logits = forward(inputs)
                loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)),
                                       targets.reshape(-1))
                (loss / accum).backward()
            total += float(loss.detach())
        return self.dist.mean(total / accum)  # the global batch's loss on every rank

    def _rows(self, data, device, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of micro-batch `micro` of `step`: this rank's rows of the global
        batch under data parallel (all of it for one process)."""
        cfg = self.config
        inputs, targets = batch_for_step(data.train, self.seq_len, cfg.data.batch_size,
                                         cfg.train.seed, step, micro)
        return (dp.rank_rows(inputs, self.dist).to(device),
                dp.rank_rows(targets, self.dist).to(device))

    def _evaluate(self, model, data, device, autocast_dtype, step, tokens, budget) -> dict:
        n_tokens = len(data.val) if budget is None else min(budget, len(data.val))
        bar = None
        if self.config.train.progress and n_tokens >= EVAL_PROGRESS_MIN_TOKENS:
            bar = _progress_bar(None, 0, f"{self.progress_label} eval", True, unit="window",
                                leave=False)

        def on_batch(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        if self.pipeline is not None:
            # the unsplit model, refreshed from the stages, on every rank: the same numbers as
            # one process by construction (a forward-only schedule would need its own loss
            # bookkeeping), and no rank waits on another's evaluation
            self.pipeline.sync()
        try:
            # every rank evaluates the same windows (an FSDP2 forward is a collective)
            result = evaluate_bpb(_eval_model(model), data.val, self.seq_len,
                                  self.config.train.eval_batch_size, max_tokens=budget,
                                  device=device, autocast_dtype=autocast_dtype,
                                  on_batch=on_batch if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
        record = {"kind": "eval", "step": step, "tokens": tokens, "val_loss": result.loss,
                  "val_bpb": result.bpb, "eval_tokens": result.tokens,
                  "eval_bytes": result.bytes, "train_seconds": self.train_clock}
        self._write_metrics(record)
        return record

    def _save(self, model, optimizer, step: int, tokens: int) -> Path:
        state = {"tokens": tokens, "train_seconds": self.train_clock,
                 "data_position": {"seed": self.config.train.seed, "next_step": step,
                                   "rule": "numpy.random.default_rng([seed, step, micro])"},
                 "model_config": self.model_config.to_dict(),
                 "train_config": self.config.to_dict(),
                 "tokenizer": self.data.tokenizer.to_dict() if self.data else None,
                 "data": _data_identity(self.data.manifest) if self.data else None}
        if self.pipeline is not None:  # the stages' state gathered under the unsplit names
            gathered = self.pipeline.gather_training_state(optimizer)
        else:
            gathered = ckpt.gather_training_state(model, optimizer)  # a collective under FSDP2
        path = ckpt.checkpoint_path(self.run_dir, step)
        if self.dist.is_main:
            path = ckpt.save_checkpoint(self.run_dir, step, model, optimizer, state,
                                        self.config.train.keep_checkpoints, gathered)
        self.dist.barrier()  # no rank runs ahead of a checkpoint that is not yet complete
        return path

    # ------------------------------------------------------------------ run files
    def _write_run_files(self, data: PreparedData, model: torch.nn.Module) -> None:
        _write_json_file(self.run_dir / CONFIG_FILE, self.config.to_dict())
        _write_json_file(self.run_dir / MODEL_CONFIG_FILE, self.model_config.to_dict())
        _write_json_file(self.run_dir / DATA_MANIFEST_FILE, data.manifest)
        environment = environment_info()
        environment.update({"num_parameters": _num_parameters(model),
                            "argv": self.argv if self.argv is not None else sys.argv})
        if self.data_change is not None:  # --allow-data-change: the resume says what changed
            environment["data_changed"] = self.data_change
        path = self.run_dir / ENVIRONMENT_FILE
        if self.resume and path.is_file():  # keep the original; record each resumption
            original = _read_json_file(path)
            original.setdefault("resumes", []).append(environment)
            environment = original
        _write_json_file(path, environment)

    def _write_metrics(self, record: dict) -> None:
        if self.metrics_file is None:  # a data-parallel rank other than 0
            return
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()
        if self.tensorboard is not None:
            for key, tag in TENSORBOARD_SCALARS.get(record["kind"], {}).items():
                self.tensorboard.add_scalar(tag, record[key], global_step=record["step"])


# ---------------------------------------------------------------------- helpers

# metrics.jsonl record kind -> {field: TensorBoard tag}, with train.log=tensorboard
TENSORBOARD_SCALARS = {"train": {"loss": "train/loss", "lr": "train/lr"},
                       "eval": {"val_bpb": "val/bpb"}}


def _tensorboard_writer_class():
    """torch's SummaryWriter, or a one-line error naming the package to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("train.log='tensorboard' is unavailable (the tensorboard package is not "
                        "installed: pip install tensorboard); allowed: jsonl") from None
    return SummaryWriter


class _InterruptGuard:
    """Ctrl-C during a run. Outside a training step SIGINT raises KeyboardInterrupt as usual
    (evaluation and logging change no state a checkpoint holds); inside one it is held until
    the step has finished, so weights, optimizer and counters are never caught half-updated.
    A second Ctrl-C within the same step aborts it at once (`aborted`: that step is lost)."""

    def __init__(self):
        self.in_step = self.pending = self.aborted = False
        self._previous = None

    def __enter__(self) -> "_InterruptGuard":
        # only Python's own handler is replaced (signals work in the main thread only)
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.in_step and not self.pending:
            self.pending = True
            return
        self.aborted = self.in_step
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self):
        self.in_step = True
        try:
            yield
        finally:
            self.in_step = False
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt

def copy_shared_init(model: torch.nn.Module, reference_config, seed: int) -> None:
    """Copy into `model` the initial value of every parameter that a model of
    `reference_config` built with `seed` has under the same name and shape (embedding,
    attention, MLP, norms), so variants of a study start from the same weights wherever they
    agree, whatever they add and in whatever order their modules draw random numbers."""
    from resstream.model import ResStreamLM

    rng_state = torch.get_rng_state()
    torch.manual_seed(seed)
    reference = dict(ResStreamLM(reference_config).named_parameters())
    torch.set_rng_state(rng_state)
    with torch.no_grad():
        for name, param in model.named_parameters():
            source = reference.get(name)
            if source is not None and source.shape == param.shape:
                param.copy_(source.to(param.device, param.dtype))


def dist_errors() -> tuple[type[BaseException], ...]:
    """What a collective raises when a peer died or timed out (gloo reports a closed
    connection as a plain RuntimeError)."""
    return (torch.distributed.DistError, RuntimeError)


def _eval_model(model: torch.nn.Module) -> torch.nn.Module:
    """DDP evaluates its inner module (no gradient sync to set up); FSDP2 and plain models
    evaluate as they are."""
    return dp.unwrap(model) if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _autocast(device: torch.device, dtype: torch.dtype | None):
    """bf16 autocast for forward passes, or nothing for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _autocast_dtype(precision: str, device: torch.device, log) -> torch.dtype | None:
    """bf16 autocast dtype, or None for fp32. On a CPU whose bf16 matmuls crash the process
    (`resstream.hardware`), the run uses fp32."""
    if precision != "bf16":
        return None
    if device.type == "cpu" and not cpu_matmul_works(torch.bfloat16):
        log(f"warning: bf16 matrix products crash on this CPU ({WORKAROUND}); running in fp32")
        return None
    return torch.bfloat16


def _progress_bar(total: int | None, initial: int, label: str, enabled: bool,
                  unit: str = "step", leave: bool = True):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=label, unit=unit, dynamic_ncols=True,
                disable=not enabled, file=sys.stderr, mininterval=0.5, leave=leave)


def _num_parameters(model: torch.nn.Module) -> int:
    if hasattr(model, "num_parameters"):
        return int(model.num_parameters())
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _eval_result(record: dict) -> EvalResult:
    nats = record["val_loss"] * record["eval_tokens"]
    return EvalResult(loss=record["val_loss"], bpb=record["val_bpb"], tokens=record["eval_tokens"],
                      bytes=record["eval_bytes"], total_nats=nats)


def _read_evals(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [r for r in read_jsonl(path) if r.get("kind") == "eval"]


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file (none if it does not exist), skipping a line cut short."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    return records


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records written after the checkpoint being resumed from (they will be redone)."""
    if not path.exists():
        return
    kept = [r for r in read_jsonl(path) if r.get("step", 0) <= step and r.get("kind") != "final"]
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    os.replace(temporary, path)


def _diff_dotted(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(a) | set(b)):
        left, right = a.get(key), b.get(key)
        dotted = f"{prefix}{key}"
        if isinstance(left, dict) and isinstance(right, dict) and prefix == "":
            keys.extend(_diff_dotted(left, right, dotted + "."))
        elif left != right:
            keys.append(dotted)
    return keys


def _data_identity(manifest: dict) -> dict:
    """The fields of a data manifest that change whenever the training data does."""
    return {key: manifest.get(key) for key in DATA_IDENTITY_KEYS}



def _write_json_file(path: Path, data: Any) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n",
                         encoding="utf-8")
    os.replace(temporary, path)


def _read_json_file(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"run file {str(path)!r} cannot be read: {_first_line(error)}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def environment_info() -> dict[str, Any]:
    """Python, torch, platform and code version, for the run folder."""
    import resstream

    info = {
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "resstream_version": getattr(resstream, "__version__", "unknown"),
        "source_sha256": source_sha256(),
        "git": git_info(Path(resstream.__file__).resolve().parent),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
    return info


def source_sha256() -> str:
    """sha256 over the package's .py files (path + content): the code version without git."""
    import resstream

    root = Path(resstream.__file__).resolve().parent
    digest = hashlib.sha256()
    for file in sorted(root.rglob("*.py")):
        digest.update(file.relative_to(root).as_posix().encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def git_info(directory: Path) -> dict[str, Any] | None:
    """Commit and dirty flag of the git checkout holding `directory`, if there is one."""
    def run(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True,
                                 timeout=5)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = run("rev-parse", "HEAD")
    if commit is None:
        return None
    status = run("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status)}

