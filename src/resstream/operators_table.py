"""`resstream operators`: the compatibility and cost table of every registered depth-axis residual
operator and sequence-axis local mixer, for one model configuration.

Nothing in the table is typed in by hand except each operator's own metadata (what it
aggregates, static or dynamic, its paper). The numbers are measured on built models:
  * parameters added over `standard`: sum(p.numel()) of the model with the operator minus that
    of the same config with `depth="standard"` (built on the meta device: no memory, any size);
  * depth state per token: `depth_state_vectors()` x d, the peak number of d-vectors of one
    token alive across depth inside a forward;
  * cross-token decode state: values per sequence held by the cache entries that belong to the
    operator (or mixer), read from a fresh `new_cache(1)`;
  * pipeline payload: `pipeline_payload(l)` (formula and value, in d-vectors per token) at the
    middle stage boundary, after block n_layers // 2 - 1, against 1 for `standard`;
  * training FLOPs per token at seq_len = max_seq_len (`resstream.flops`: 6 x forward
    multiply-adds, the depth operator's and mixer's own cost as each declares it).
Operators run with their default options (override with `--option NAME.KEY=VALUE`);
`--depth-window` is given only to operators that use one.
"""
from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from resstream.bench.timing import format_table
from resstream.config import ModelConfig
from resstream.errors import UserError
from resstream.flops import training_flops_per_token
from resstream.registry import DEPTH_OPERATORS, LOCAL_MIXERS

METADATA = ("aggregates", "mixing", "granularity", "starts_at_baseline", "reads_through_norm", "paper",
            "source_note")
RESERVED_KEYS = ("depth", "depth_options", "depth_window", "local_mixer", "mixer_options")


def parse_value(text: str) -> Any:
    """JSON when it parses (numbers, booleans, null, lists), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_assignment(text: str, flag: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UserError(f"{flag} {text!r} is invalid; allowed: KEY=VALUE")
    return key.strip(), parse_value(value)


def build_model(config: ModelConfig):
    """The model on the meta device (parameters without storage); on CPU if an operator cannot
    be built there."""
    from resstream.model import ResStreamLM

    try:
        with torch.device("meta"):
            return ResStreamLM(config)
    except (NotImplementedError, RuntimeError):
        return ResStreamLM(config)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def depth_cache_values(model) -> int:
    """Values per sequence in the decode-cache entries of the depth operator's own modules."""
    cache = model.new_cache(1, model.config.max_seq_len, device=torch.device("meta"))
    return sum(t.numel() for key, entry in cache.entries.items() if key.startswith("depth.")
               for t in entry.tensors())


def mixer_cache_values(model) -> int:
    """Decode state of the local mixer: every cache entry except global attention's KV cache."""
    from resstream.model import Attention

    cache = model.new_cache(1, model.config.max_seq_len, device=torch.device("meta"))
    total = 0
    for name, module in model.named_modules():
        if hasattr(module, "new_cache_entry") and not isinstance(module, Attention) \
                and not name.startswith("depth"):
            entry = cache.entries[module.cache_key]
            total += sum(t.numel() for t in entry.tensors())
    return total


def filled_slots(block) -> list[str]:
    """The mixer slots a block actually has (mixers/base.py SLOTS)."""
    attn = getattr(block, "attn", None)  # absent when a mixer replaces global attention
    modules = {"block": getattr(block, "mix", None),
               "attn_input": attn.input_mixer if attn is not None else None,
               "qkv": attn.qkv_mixer if attn is not None else None,
               "mlp_input": block.mlp.input_mixer, "mlp_hidden": block.mlp.hidden_mixer}
    return [slot for slot, module in modules.items() if module is not None]


def operator_config(base: ModelConfig, name: str, options: dict, depth_window: int | None) -> ModelConfig:
    cls = DEPTH_OPERATORS.get(name)
    window = depth_window if cls.uses_depth_window else None
    return base.replace(depth=name, depth_options=dict(options), depth_window=window)


def operator_row(base: ModelConfig, name: str, options: dict, depth_window: int | None,
                 baseline_params: int) -> dict[str, Any]:
    cls = DEPTH_OPERATORS.get(name)
    row: dict[str, Any] = {"operator": name, "options": options}
    metadata = {key: getattr(cls, key) for key in METADATA}  # the class's, until options parse
    row.update(metadata)
    try:
        config = operator_config(base, name, options, depth_window)
        model = build_model(config)
    except UserError as error:
        row["error"] = str(error)
        return row
    op = model.depth
    boundary = base.n_layers // 2 - 1
    formula, payload = op.pipeline_payload(boundary) if boundary >= 0 else ("1", 1)
    vectors = op.depth_state_vectors()
    row.update({key: value for key, value in cls.metadata(op.options).items() if key in METADATA})
    row.update({
        "depth_window": config.depth_window,
        "params": count_parameters(model),
        "params_added": count_parameters(model) - baseline_params,
        "depth_state_vectors": vectors,
        "depth_state_values": vectors * base.d_model,
        "cross_token_state": bool(op.cross_token_state),
        "cross_token_cache_values": depth_cache_values(model),
        "pipeline_boundary": boundary,
        "pipeline_formula": formula,
        "pipeline_vectors": payload,
        "train_flops_per_token": training_flops_per_token(config, base.max_seq_len),
    })
    return row


def mixer_row(base: ModelConfig, name: str, options: dict, baseline_params: int) -> dict[str, Any]:
    cls = LOCAL_MIXERS.get(name)
    row: dict[str, Any] = {"mixer": name, "options": options, "paper": cls.paper,
                           "decode_state": cls.decode_state}
    try:
        config = base.replace(local_mixer=name, mixer_options=dict(options))
        model = build_model(config)
    except UserError as error:
        row["error"] = str(error)
        return row
    row.update({
        "slots": filled_slots(model.blocks[0]),
        "params": count_parameters(model),
        "params_added": count_parameters(model) - baseline_params,
        "decode_state_values": mixer_cache_values(model),
        "train_flops_per_token": training_flops_per_token(config, base.max_seq_len),
    })
    return row


def build_table(base: ModelConfig, option_overrides: dict[str, dict] | None = None,
                depth_window: int | None = None) -> dict[str, Any]:
    """Rows for every registered depth operator and local mixer (plain dicts, JSON-able)."""
    overrides = option_overrides or {}
    unknown = sorted(set(overrides) - set(DEPTH_OPERATORS.names()) - set(LOCAL_MIXERS.names()))
    if unknown:
        raise UserError(f"--option names unknown operator/mixer {', '.join(unknown)}; known: "
                        f"{', '.join(DEPTH_OPERATORS.names() + LOCAL_MIXERS.names())}")
    base = base.replace(depth="standard", depth_options={}, depth_window=None, local_mixer=None,
                        mixer_options={})
    baseline_params = count_parameters(build_model(base))
    operators = [operator_row(base, name, overrides.get(name, {}), depth_window, baseline_params)
                 for name in sorted(DEPTH_OPERATORS.names(), key=lambda n: (n != "standard", n))]
    mixers = [mixer_row(base, name, overrides.get(name, {}), baseline_params)
              for name in LOCAL_MIXERS.names()]
    shape = {k: getattr(base, k) for k in ("d_model", "n_layers", "n_heads", "kv_heads", "ffn_hidden",
                                           "vocab_size", "max_seq_len", "local_window")}
    return {"config": {**shape, "depth_window": depth_window, "standard_params": baseline_params,
                       "standard_train_flops_per_token": training_flops_per_token(base, base.max_seq_len)},
            "operators": operators, "mixers": mixers}


def add_graph_breaks(table: dict[str, Any], overrides: dict[str, dict]) -> None:
    """--graph-breaks: dynamo's graph breaks of the training forward and of a cached decode step
    (resstream.compile_check, tiny shapes) for every operator (alone) and mixer (with standard),
    at the options of its row. Traced, not timed: a few seconds per entry."""
    from resstream.compile_check import decode_graph_breaks, training_graph_breaks

    for key, kind in (("operators", "operator"), ("mixers", "mixer")):
        for row in table[key]:
            if "error" in row:
                continue
            name = row[kind]
            model_args = ({"depth": name, "depth_options": overrides.get(name, {})}
                          if kind == "operator" else
                          {"depth": "standard", "mixer": name,
                           "mixer_options": overrides.get(name, {})})
            depth = model_args.pop("depth")
            row["graph_breaks"] = {"train": training_graph_breaks(depth, **model_args).count,
                                   "decode": decode_graph_breaks(depth, **model_args).count}


def _breaks_text(row: dict) -> list[str]:
    breaks = row.get("graph_breaks")
    return [] if breaks is None else [f"{breaks['train']} / {breaks['decode']}"]


def _options_text(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"


def _flops_text(row: dict, config: dict) -> str:
    flops, standard = row["train_flops_per_token"], config["standard_train_flops_per_token"]
    return f"{flops / 1e6:.2f}M ({flops / standard:.3f}x)"


def _formula_text(formula: str, value) -> str:
    return str(formula) if str(formula) == f"{value:g}" else f"{formula} = {value:g}"


def to_markdown(table: dict[str, Any]) -> str:
    config = table["config"]
    d = config["d_model"]
    lines = [f"Depth-axis residual operators (d={d}, L={config['n_layers']}, heads={config['n_heads']}, "
             f"depth_window={config['depth_window']}; standard has {config['standard_params']:,} "
             f"parameters; pipeline boundary after block {config['n_layers'] // 2 - 1}):", ""]
    headers = ["operator", "options", "aggregates", "mixing", "granularity", "starts at baseline",
               "params added", "depth state / token", "cross-token decode state",
               "PP payload (d-vectors)", "PP vs standard", "train FLOPs/token (vs standard)"]
    breaks = any("graph_breaks" in r for r in table["operators"] + table["mixers"])
    if breaks:
        headers.append("graph breaks (train / decode)")
    rows = []
    for r in table["operators"]:
        if "error" in r:
            rows.append([r["operator"], _options_text(r["options"]), r["aggregates"], r["mixing"],
                         r["granularity"], "", f"n/a: {r['error']}", "", "", "", "", ""]
                        + [""] * breaks)
            continue
        cross = (f"yes: {r['cross_token_cache_values']:,} values/seq" if r["cross_token_state"] else "no")
        rows.append([r["operator"], _options_text(r["options"]), r["aggregates"], r["mixing"],
                     r["granularity"], "yes" if r["starts_at_baseline"] else "no",
                     f"{r['params_added']:,}", f"{r['depth_state_vectors']} x d = {r['depth_state_values']:,}",
                     cross, _formula_text(r["pipeline_formula"], r["pipeline_vectors"]),
                     f"{r['pipeline_vectors']:g}x", _flops_text(r, config)] + _breaks_text(r))
    lines.append(format_table(headers, rows))
    notes = [f"- `{r['operator']}`: {r['source_note']}" for r in table["operators"] if r.get("source_note")]
    lines += ["", "Notes:", "", *notes] if notes else []
    lines += ["", "Sequence-axis local mixers:", ""]
    mixer_rows = []
    for r in table["mixers"]:
        if "error" in r:
            mixer_rows.append([r["mixer"], _options_text(r["options"]), "", f"n/a: {r['error']}", "", "",
                               "", r["paper"]] + [""] * breaks)
            continue
        mixer_rows.append([r["mixer"], _options_text(r["options"]), ", ".join(r["slots"]),
                           f"{r['params_added']:,}",
                           f"{r['decode_state_values']:,} values/seq", r["decode_state"],
                           _flops_text(r, config), r["paper"]] + _breaks_text(r))
    lines.append(format_table(["mixer", "options", "slots", "params added", "decode state (measured)",
                               "decode state", "train FLOPs/token (vs standard)", "paper"]
                              + ["graph breaks (train / decode)"] * breaks, mixer_rows))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    values = dict(parse_assignment(item, "--set") for item in args.set)
    for key in RESERVED_KEYS:
        if key in values:
            raise UserError(f"--set {key}=... is invalid here; allowed: model shape keys (the table varies "
                            "the operator; use --option NAME.KEY=VALUE and --depth-window)")
    for flag, key in (("d_model", "d_model"), ("n_layers", "n_layers"), ("n_heads", "n_heads")):
        if getattr(args, flag) is not None:
            values[key] = getattr(args, flag)
    overrides: dict[str, dict] = {}
    for item in args.option:
        key, value = parse_assignment(item, "--option")
        name, dot, field_name = key.partition(".")
        if not dot or not field_name:
            raise UserError(f"--option {item!r} is invalid; allowed: NAME.KEY=VALUE, e.g. ddl.value_dim=4")
        overrides.setdefault(name, {})[field_name] = value
    base = ModelConfig.from_dict(values)
    table = build_table(base, overrides, args.depth_window)
    if args.graph_breaks:
        add_graph_breaks(table, overrides)
    if args.format == "json":
        print(json.dumps(table, indent=2))
    else:
        print(to_markdown(table))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "operators", help="compatibility and cost table of every depth operator and local mixer",
        description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", dest="d_model", type=int, default=None, help="model width d")
    parser.add_argument("--n-layers", dest="n_layers", type=int, default=None, help="number of blocks L")
    parser.add_argument("--n-heads", dest="n_heads", type=int, default=None, help="attention heads")
    parser.add_argument("--depth-window", type=int, default=None,
                        help="K for operators with a depth window (default: full depth)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other model config field, e.g. --set n_kv_heads=2 (repeatable)")
    parser.add_argument("--option", action="append", default=[], metavar="NAME.KEY=VALUE",
                        help="an option of one operator or mixer, e.g. --option ddl.value_dim=4")
    parser.add_argument("--graph-breaks", action="store_true",
                        help="also trace every operator and mixer with torch.compile's dynamo and "
                             "print its graph breaks, training / decode step (0 is the goal)")
    parser.add_argument("--format", choices=("markdown", "json"), default="markdown")
    parser.set_defaults(func=run)
