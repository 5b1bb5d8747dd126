"""CLI subcommands `train` and `presets` (`sample`, an alias of `generate`: resstream.generation).

    resstream train [--config FILE] [--preset NAME] [--data SOURCE] [--out DIR] [--steps N]
                    [--seed N] [--resume | --overwrite] [--no-progress] [--SECTION.KEY=VALUE ...]
    resstream presets
    resstream export RUN --out DIR
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from pathlib import Path

from resstream.train.config import (
    SECTIONS,
    TrainConfig,
    load_config_file,
    parse_override,
)

# --section.key=value (or --section.key value); unknown sections are rejected by the config code.
_OVERRIDE = re.compile(r"^--[A-Za-z_][A-Za-z0-9_-]*\.[A-Za-z0-9_.-]+(=.*)?$", re.DOTALL)


def register(subparsers) -> None:
    _register_train(subparsers)
    _register_presets(subparsers)
    _register_export(subparsers)


# ---------------------------------------------------------------------------- train

def _register_train(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train a model on text (bits per byte on held-out text)",
        description="Train a model. Settings come from the defaults, then --config, then the "
                    "flags below, then --SECTION.KEY=VALUE overrides (e.g. --model.depth=ddl "
                    "--optim.lr=1e-3 --train.eval_every=50).",
        epilog=_override_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML or JSON config file (read as data)")
    parser.add_argument("--preset", help="model preset (see `resstream presets`)")
    parser.add_argument("--data", help="'shakespeare' (default), a .txt file or folder, or "
                                       "hf:NAME[:CONFIG]")
    parser.add_argument("--out", help="run folder (default runs/<name>)")
    parser.add_argument("--steps", type=int, help="optimizer steps")
    parser.add_argument("--seed", type=int, help="seed of init, data order and sampling")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the run in --out (only a folder written by resstream "
                             "train, and only the run's own files) and start over")
    parser.add_argument("--allow-data-change", action="store_true",
                        help="with --resume: continue even though the training data changed "
                             "(recorded in environment.json)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_train, overrides=[])
    _accept_dotted_overrides(parser)


def _accept_dotted_overrides(parser: argparse.ArgumentParser) -> None:
    """Let `parser` take any number of --section.key=value options into `args.overrides`.

    argparse cannot declare open-ended option names, so the dotted options are taken out of the
    argument list before argparse sees it; unknown keys are then rejected by the config code
    with the list of valid keys (a one-line error, exit code 2)."""
    original = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        overrides, rest = [], []
        index = 0
        while index < len(args):
            arg = args[index]
            if arg == "--":
                rest.extend(args[index:])
                break
            if _OVERRIDE.match(arg):
                if "=" not in arg and index + 1 < len(args):  # --optim.lr 1e-3
                    arg = f"{arg}={args[index + 1]}"
                    index += 1
                overrides.append(arg)
            else:
                rest.append(arg)
            index += 1
        namespace, extras = original(rest, namespace)
        namespace.overrides = list(getattr(namespace, "overrides", []) or []) + overrides
        return namespace, extras

    parser.parse_known_args = parse_known_args


def _override_help() -> str:
    lines = ["overrides (--SECTION.KEY=VALUE; values are read as YAML):"]
    for section, cls in SECTIONS.items():
        names = ", ".join(f.name for f in dataclasses.fields(cls))
        lines.append(f"  {section}: {names}")
    lines.append("  model: any ModelConfig field (depth, local_mixer, d_model, n_layers, ...)")
    return "\n".join(lines)


def build_train_config(args: argparse.Namespace) -> tuple[TrainConfig, Path]:
    """Resolve defaults -> config file (or, with --resume and no --config, the run's saved
    config) -> flags -> overrides. Returns the config and the run folder."""
    from resstream.train.run_folder import is_run_folder
    from resstream.train.trainer import CONFIG_FILE

    base = load_config_file(args.config) if args.config else {}
    config, run_dir = _apply_command_line(base, args)
    saved = run_dir / CONFIG_FILE
    # only a run's own config.json (the marker says so; an HF model folder has one too)
    if args.resume and not args.config and saved.is_file() and is_run_folder(run_dir):
        config, _ = _apply_command_line(load_config_file(saved), args)
    return _smoke_caps(config, saved if args.resume else None), run_dir


def _smoke_caps(config: TrainConfig, resumed: Path | None) -> TrainConfig:
    """In smoke mode (RESSTREAM_SMOKE, resstream.smoke) a tiny budget: 2 steps (2 more than the
    resumed run's, so that `--resume --steps N` still extends it), 512 evaluation tokens; applied
    here so that the run's saved config says what ran."""
    from resstream.smoke import smoke_cap, smoke_mode

    if not smoke_mode():
        return config
    loop = config.train
    before = 0
    if resumed is not None and resumed.is_file():
        before = int(load_config_file(resumed).get("train", {}).get("steps", 0))
    loop.steps = smoke_cap(loop.steps, before + 2, "train.steps")
    loop.eval_every = smoke_cap(loop.eval_every, 2, "train.eval_every")
    loop.eval_tokens = smoke_cap(loop.eval_tokens, 512, "train.eval_tokens")
    loop.final_eval_tokens = smoke_cap(loop.final_eval_tokens, 512, "train.final_eval_tokens")
    config.validate()
    return config


def _apply_command_line(base: dict, args: argparse.Namespace) -> tuple[TrainConfig, Path]:
    from resstream.train.trainer import default_run_name

    flags = {"preset": args.preset, "data.source": args.data, "train.steps": args.steps,
             "train.seed": args.seed}
    if getattr(args, "no_progress", False):
        flags["train.progress"] = False
    overrides = {key: value for key, value in flags.items() if value is not None}
    for text in args.overrides:
        key, value = parse_override(text)
        overrides[key] = value
    config = TrainConfig.from_dict(base).with_overrides(overrides)
    run_dir = Path(args.out) if args.out else Path("runs") / default_run_name(config)
    return config, run_dir


def run_train(args: argparse.Namespace) -> int:
    from resstream.presets import get_preset
    from resstream.train.trainer import Trainer

    config, run_dir = build_train_config(args)
    get_preset(config.preset)  # unknown preset: one-line error before any work
    trainer = Trainer(config, run_dir, resume=args.resume, overwrite=args.overwrite,
                      allow_data_change=args.allow_data_change)
    result = trainer.run()
    if int(os.environ.get("RANK", "0") or 0) != 0:  # torchrun: rank 0 speaks for the run
        return 0
    final = result.final_eval
    summary = f"done: {result.step} steps, {result.tokens:,} tokens"
    if final is not None:
        summary += f", val loss {final.loss:.4f} nats/token, val bpb {final.bpb:.4f}"
    print(summary)
    print(f"run folder: {run_dir}")
    return 0


# ---------------------------------------------------------------------------- presets

def _register_presets(subparsers) -> None:
    parser = subparsers.add_parser("presets", help="list the named model presets")
    parser.set_defaults(func=run_presets)


def run_presets(args: argparse.Namespace) -> int:
    print(format_presets_table())
    return 0


def format_presets_table() -> str:
    import torch

    from resstream.model import ResStreamLM
    from resstream.presets import list_presets

    header = ("preset", "layers", "d_model", "heads", "context", "params", "description")
    rows = []
    for preset in list_presets():
        config = preset.config()
        params = _count_parameters(ResStreamLM, config, torch)
        rows.append((preset.name, str(config.n_layers), str(config.d_model), str(config.n_heads),
                     str(config.max_seq_len), f"{params / 1e6:.2f}M", preset.description))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in [header, *rows]]
    return "\n".join(lines)


def _count_parameters(model_cls, config, torch) -> int:
    """Parameter count of a model built on the meta device (no memory, no init cost), or on the
    CPU if some module cannot be built on meta."""
    try:
        with torch.device("meta"):
            return model_cls(config).num_parameters()
    except Exception:  # noqa: BLE001 - any meta-device limitation: count for real
        return model_cls(config).num_parameters()


# ---------------------------------------------------------------------------- export

def _register_export(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="write a run's weights as one model folder for inference",
        description="Gather the newest checkpoint of a run (or a checkpoints/step_N folder), "
                    "whatever number of processes trained it, into one folder: config.json and "
                    "model.safetensors in the Hugging Face layout (resstream.hf), loadable "
                    "without the run folder by `generate --checkpoint DIR`, "
                    "resstream.hf.load_model or AutoModelForCausalLM.")
    parser.add_argument("checkpoint", help="a run folder or a checkpoints/step_N folder")
    parser.add_argument("--out", required=True, help="a new or empty folder")
    parser.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from resstream.hf import save_model
    from resstream.loading import load_for_inference

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {str(out)!r} is not empty; allowed: a new or empty folder")
    model = load_for_inference(args.checkpoint)
    save_model(model, out)
    print(f"exported {model.num_parameters():,} parameters ({model.config.depth}) to {out}")
    return 0
