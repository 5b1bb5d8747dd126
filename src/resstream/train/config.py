"""Training configuration: dataclasses, loaded from YAML or JSON as data, overridden from the
command line with `--section.key=value`.

A config file has up to seven top-level keys::

    preset: small            # model shape, see `resstream presets`
    name: my-run             # run name; the default run folder is runs/<name>
    model: {depth: ddl}      # ModelConfig fields applied on top of the preset
    data: {source: shakespeare, seq_len: 128, batch_size: 32}
    optim: {lr: 2.0e-3, warmup_steps: 50}
    train: {steps: 1000, seed: 0, eval_every: 100}
    parallel: {dp: ddp, pp: 2}  # under torchrun: data and pipeline parallel (docs/distributed.md)

Files are parsed with `yaml.safe_load` / `json.loads` and never executed. Every key is checked:
an unknown key is an error that lists the valid keys of its section, and every value is checked
against its field's type (strings such as "3e-4" are accepted for numbers, since YAML 1.1 reads
`3e-4` without a dot as a string).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from resstream.coerce import coerce, coerce_fields, coerce_instance, require
from resstream.errors import UserError

PRECISIONS = ("fp32", "bf16")
LOGGERS = ("jsonl", "tensorboard")  # metrics.jsonl is always written


@dataclass
class DataConfig:
    """Where tokens come from and how batches are cut."""

    source: str = "shakespeare"  # 'shakespeare', a .txt file or folder, or hf:NAME[:CONFIG]
    seq_len: int | None = None  # None: the model's max_seq_len
    batch_size: int = 32  # sequences per micro-batch
    cache_dir: str | None = None  # None: $RESSTREAM_DATA_CACHE or ./data_cache

    def validate(self) -> None:
        coerce_instance(self, "data.")  # also built directly in Python, skipping from_dict
        require(isinstance(self.source, str) and self.source.strip() != "", "data.source",
                 self.source, "'shakespeare', a .txt file or folder, or hf:NAME[:CONFIG]")
        if self.seq_len is not None:
            require(self.seq_len >= 1, "data.seq_len", self.seq_len, "an integer >= 1 or null")
        require(self.batch_size >= 1, "data.batch_size", self.batch_size, "an integer >= 1")


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to `min_lr`."""

    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1  # applied to matrices (>= 2-D parameters) only
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    grad_accum: int = 1  # micro-batches per optimizer step

    def validate(self) -> None:
        coerce_instance(self, "optim.")  # types, and every float finite
        require(math.isfinite(self.lr) and self.lr > 0, "optim.lr", self.lr, "a number > 0")
        require(math.isfinite(self.min_lr) and 0 <= self.min_lr <= self.lr, "optim.min_lr",
                 self.min_lr, f"a number in [0, optim.lr={self.lr}]")
        require(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps,
                 "an integer >= 0")
        require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "a number >= 0")
        require(0 <= self.beta1 < 1, "optim.beta1", self.beta1, "a number in [0, 1)")
        require(0 <= self.beta2 < 1, "optim.beta2", self.beta2, "a number in [0, 1)")
        require(self.eps > 0, "optim.eps", self.eps, "a number > 0")
        require(self.grad_clip >= 0, "optim.grad_clip", self.grad_clip,
                 "a number >= 0 (0: no clipping)")
        require(self.grad_accum >= 1, "optim.grad_accum", self.grad_accum, "an integer >= 1")


@dataclass
class LoopConfig:
    """Length of the run, evaluation, logging, checkpoints and execution options."""

    steps: int = 1000  # optimizer steps
    seed: int = 0  # model init, data order and every random number of the run
    eval_every: int = 100  # evaluate every N steps (and always at the end); 0: only at the end
    eval_tokens: int | None = 65536  # validation budget per periodic evaluation; None: all
    final_eval_tokens: int | None = None  # budget of the final evaluation; None: all
    eval_batch_size: int = 16
    log_every: int = 10  # write a train record to metrics.jsonl every N steps
    checkpoint_every: int = 500  # 0: only the final checkpoint
    keep_checkpoints: int = 3  # keep the last K checkpoints
    precision: str = "fp32"  # 'bf16' runs forward passes under bf16 autocast
    # torch.compile the model: true fails the run if compiling fails; "auto" falls back to eager
    # and says so in the log and in metrics.jsonl's final record
    compile: bool | str = False
    device: str = "auto"  # auto: cuda if available, else cpu
    threads: int | None = None  # torch CPU threads; None: torch's default
    progress: bool = True  # show a progress bar
    log: str = "jsonl"  # "tensorboard": also write TensorBoard scalars (needs tensorboard)

    def validate(self) -> None:
        coerce_instance(self, "train.")
        require(self.steps >= 1, "train.steps", self.steps, "an integer >= 1")
        require(self.seed >= 0, "train.seed", self.seed, "an integer >= 0")
        require(self.eval_every >= 0, "train.eval_every", self.eval_every,
                 "an integer >= 0 (0: only at the end)")
        for name in ("eval_tokens", "final_eval_tokens"):
            value = getattr(self, name)
            if value is not None:
                require(value >= 1, f"train.{name}", value, "an integer >= 1 or null (all)")
        require(self.eval_batch_size >= 1, "train.eval_batch_size", self.eval_batch_size,
                 "an integer >= 1")
        require(self.log_every >= 1, "train.log_every", self.log_every, "an integer >= 1")
        require(self.checkpoint_every >= 0, "train.checkpoint_every", self.checkpoint_every,
                 "an integer >= 0 (0: only the final checkpoint)")
        require(self.keep_checkpoints >= 1, "train.keep_checkpoints", self.keep_checkpoints,
                 "an integer >= 1")
        require(self.precision in PRECISIONS, "train.precision", self.precision,
                 ", ".join(PRECISIONS))
        require(self.log in LOGGERS, "train.log", self.log, ", ".join(LOGGERS))
        require(self.compile in (True, False, "auto"), "train.compile", self.compile,
                "true, false or auto")
        from resstream.hardware import parse_device

        # syntax only: the device must exist when the run starts, not where the config is read
        parse_device(self.device, "train.device", must_exist=False)
        if self.threads is not None:
            # more threads than cores only slows down, and huge counts crash OpenMP (SIGSEGV)
            cores = os.cpu_count() or 1
            require(1 <= self.threads <= cores, "train.threads", self.threads,
                    f"an integer in 1..{cores} (this machine's logical cores) or null")


DATA_PARALLEL = ("none", "ddp", "fsdp")


@dataclass
class ParallelConfig:
    """How a run launched by `torchrun` spreads over its processes (docs/distributed.md).

    A single-process run ignores this section except for checking it. Under torchrun, `dp`
    picks the data-parallel engine: "ddp" (DistributedDataParallel) or "fsdp" (FSDP2
    `fully_shard`); "none" with several data-parallel ranks is refused. `pp` > 1 splits the
    model into pipeline stages over `pp` processes (a 2-D mesh: WORLD_SIZE / pp data-parallel
    replicas of the pipeline), run by `schedule` over `microbatches` micro-batches per
    accumulated batch. The global batch and the data order are those of the single-process
    run with the same config, whatever the layout."""

    dp: str = "ddp"  # "none" | "ddp" | "fsdp"
    timeout_s: float = 300.0  # a collective that waits longer ends every process with an error
    pp: int = 1  # pipeline degree: processes per pipeline; 1: no pipeline
    schedule: str = "1f1b"  # "gpipe" | "1f1b" | "interleaved" (two stages per process)
    microbatches: int | None = None  # pipeline micro-batches per batch; None: parallel.pp

    def validate(self) -> None:
        from resstream.parallel.pipeline import SCHEDULES

        coerce_instance(self, "parallel.")
        require(self.dp in DATA_PARALLEL, "parallel.dp", self.dp, ", ".join(DATA_PARALLEL))
        require(math.isfinite(self.timeout_s) and self.timeout_s > 0, "parallel.timeout_s",
                self.timeout_s, "a number of seconds > 0")
        require(self.pp >= 1, "parallel.pp", self.pp, "an integer >= 1 (1: no pipeline)")
        require(self.schedule in SCHEDULES, "parallel.schedule", self.schedule,
                ", ".join(SCHEDULES))
        if self.microbatches is not None:
            require(self.microbatches >= 1, "parallel.microbatches", self.microbatches,
                    "an integer >= 1 or null (parallel.pp)")
        # FSDP2 on stage modules is not wired up (each stage would need its own fully_shard)
        require(self.pp == 1 or self.dp != "fsdp", "parallel.dp", self.dp,
                f"ddp or none with parallel.pp={self.pp} (FSDP2 is not composed with "
                "pipeline stages)")

    @property
    def n_microbatches(self) -> int:
        return self.microbatches or self.pp


SECTIONS = {"data": DataConfig, "optim": OptimConfig, "train": LoopConfig,
            "parallel": ParallelConfig}
TOP_LEVEL_KEYS = ("preset", "name", "model", "data", "optim", "train", "parallel")


@dataclass
class TrainConfig:
    """Everything that determines a training run (the run folder is given separately)."""

    preset: str = "small"
    name: str | None = None
    model: dict = field(default_factory=dict)  # ModelConfig fields over the preset
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "TrainConfig":
        """Build from plain data, checking every key and coercing every value."""
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise UserError(f"config must be a mapping of sections; got {type(values).__name__}")
        unknown = sorted(set(values) - set(TOP_LEVEL_KEYS))
        if unknown:
            raise UserError(f"unknown config key(s) {', '.join(unknown)}; valid keys: "
                            f"{', '.join(TOP_LEVEL_KEYS)}")
        config = cls()
        if "preset" in values:
            config.preset = coerce(values["preset"], str, "preset")
        if "name" in values:
            config.name = coerce(values["name"], str | None, "name")
        if "model" in values:
            config.model = _model_section(values["model"])
        for section, section_cls in SECTIONS.items():
            if section in values:
                setattr(config, section, _build_section(section, section_cls, values[section]))
        config.validate()
        return config

    def validate(self) -> None:
        require(isinstance(self.preset, str) and self.preset != "", "preset", self.preset,
                 "a preset name (see `resstream presets`)")
        for section in SECTIONS:
            getattr(self, section).validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_overrides(self, overrides: dict[str, Any]) -> "TrainConfig":
        """A copy with dotted-key overrides applied, e.g. {"optim.lr": "3e-4"}."""
        values = self.to_dict()
        for key, value in overrides.items():
            set_dotted(values, key, value)
        return TrainConfig.from_dict(values)

    def model_config(self):
        """The resolved ModelConfig: the preset, then the `model` overrides, then a context at
        least as long as the training sequences."""
        from resstream.presets import get_preset

        config = get_preset(self.preset).config(**self.model)
        seq_len = self.data.seq_len
        if seq_len is not None and seq_len > config.max_seq_len and "max_seq_len" not in self.model:
            config = config.replace(max_seq_len=seq_len)
        return config

    @property
    def seq_len(self) -> int:
        return self.data.seq_len or int(self.model_config().max_seq_len)


# -------------------------------------------------------------------- loading

def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON config file as plain data (never executed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist; allowed: a .yaml, "
                                ".yml or .json file")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else "syntax error"
        raise UserError(f"config file {str(path)!r} is not valid "
                        f"{'JSON' if path.suffix == '.json' else 'YAML'}: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {str(path)!r} must hold a mapping of sections "
                        f"({', '.join(TOP_LEVEL_KEYS)}); got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """'--optim.lr=3e-4' or 'optim.lr=3e-4' -> ('optim.lr', 0.0003-as-YAML-data).

    The value is read with yaml.safe_load (so `null`, `true`, `[0, 1]`, `{a: 1}` work) and
    coerced to the field's type later."""
    body = text[2:] if text.startswith("--") else text
    if "=" not in body:
        raise UserError(f"override {text!r} has no value; allowed: --section.key=value")
    key, raw = body.split("=", 1)
    key = key.strip().replace("-", "_")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML: keep the text, the field's type decides
    return key, value


def set_dotted(values: dict[str, Any], key: str, value: Any) -> None:
    """Set values['a']['b'] = value for key 'a.b', rejecting unknown keys."""
    parts = key.split(".")
    if parts[0] not in TOP_LEVEL_KEYS:
        raise UserError(f"unknown config key {key!r}; valid keys: preset, name, model.KEY, "
                        "data.KEY, optim.KEY, train.KEY, parallel.KEY")
    if len(parts) == 1:
        values[key] = value
        return
    section = parts[0]
    if section in SECTIONS:
        valid = [f.name for f in dataclasses.fields(SECTIONS[section])]
        if len(parts) != 2 or parts[1] not in valid:
            raise UserError(f"unknown config key {key!r}; valid keys in {section}: "
                            f"{', '.join(valid)}")
    elif section == "model":
        valid = _model_field_names()
        if parts[1] not in valid:
            raise UserError(f"unknown config key {key!r}; valid keys in model: "
                            f"{', '.join(valid)}")
    else:
        raise UserError(f"config key {key!r} is invalid; {section} takes a value, not keys")
    target = values.setdefault(section, {})
    for part in parts[1:-1]:  # model.depth_options.foo=1
        if not isinstance(target.get(part), dict):
            target[part] = {}
        target = target[part]
    target[parts[-1]] = value


# -------------------------------------------------------------------- helpers

def _build_section(section: str, section_cls: type, values: Any):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise UserError(f"config section {section!r} must be a mapping; got "
                        f"{type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(section_cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UserError(f"unknown config key(s) {', '.join(f'{section}.{k}' for k in unknown)}; "
                        f"valid keys in {section}: {', '.join(fields)}")
    return section_cls(**coerce_fields(section_cls, values, f"{section}."))


def _model_field_names() -> list[str]:
    from resstream.config import ModelConfig

    return ModelConfig.field_names()


def _model_section(values: Any) -> dict[str, Any]:
    """Check model overrides against ModelConfig's fields and coerce them to its types."""
    from resstream.config import ModelConfig

    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"config section 'model' must be a mapping; got {type(values).__name__}")
    valid = ModelConfig.field_names()
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise UserError(f"unknown config key(s) {', '.join(f'model.{k}' for k in unknown)}; "
                        f"valid keys in model: {', '.join(valid)}")
    return coerce_fields(ModelConfig, values, "model.")
