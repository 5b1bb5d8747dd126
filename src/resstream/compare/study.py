"""A study file: which variants, which seeds, which budget, read as data and checked field by
field before anything runs.

    name: my-study
    preset: tiny                  # model shape shared by all variants
    seeds: [0, 1, 2]
    budget: {tokens: 2000000}     # or {steps: N} or {flops: X} (training FLOPs per run)
    config:                       # shared settings: the sections of a `resstream train` config
      data: {source: shakespeare, seq_len: 128, batch_size: 16}
      optim: {lr: 3.0e-3}
      train: {eval_every: 25}
    baseline: baseline            # the reference variant (default: the first)
    match: {params: shortswa}     # optional: widen the baseline's MLP to that variant's size
    variants:                     # each variant overrides sections of the shared config
      baseline: {}
      ddl: {model: {depth: ddl}}

Beyond the public keys: `description` (text for the report), `systems` (decode contexts of the
systems measurements), and per variant `title` (a label for the report) and `match` (the same
parameter matching for any variant, e.g. `{params: shortswa, widen: d_model}`).

Files are parsed with a YAML loader that accepts plain data only: explicit tags (`!!python/...`,
`!!str`, custom `!tags`) and duplicate keys are errors, since a duplicated variant name would
otherwise silently replace the first.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from resstream.errors import UserError

STUDY_KEYS = ("name", "description", "preset", "seeds", "budget", "config", "baseline", "match",
              "variants", "systems")
BUDGET_KINDS = ("tokens", "steps", "flops")
VARIANT_SECTIONS = ("model", "data", "optim", "train")
VARIANT_KEYS = VARIANT_SECTIONS + ("title", "match")
MATCH_KEYS = ("params", "widen")
WIDEN_CHOICES = ("mlp", "d_model")
SYSTEMS_KEYS = ("decode_contexts", "decode_steps")
# Settings the study owns: set per run from `seeds` and `budget`, never from the config.
STUDY_OWNED = ("train.seed", "train.steps")


@dataclass
class Match:
    """Widen a variant (`widen`: its MLP or d_model) until its parameter count is within 2% of
    the variant named `params`."""

    params: str
    widen: str = "mlp"


@dataclass
class Variant:
    name: str
    overrides: dict  # sections (model, data, optim, train) over the shared config
    title: str = ""
    match: Match | None = None


@dataclass
class Study:
    name: str
    preset: str
    seeds: list[int]
    budget_kind: str
    budget_value: float
    config: dict
    variants: list[Variant]
    baseline: str
    description: str = ""
    decode_contexts: list[int] | None = None  # None: a quarter of the context and all of it
    decode_steps: int = 16
    source_text: str = ""  # the exact study file, copied into the report
    raw: dict = field(default_factory=dict)

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)

    def train_values(self, variant: Variant) -> dict:
        """The `resstream train` config (as plain data) of `variant`, without seed and steps."""
        values = copy.deepcopy(self.config)
        for section, overrides in variant.overrides.items():
            values[section] = deep_merge(values.get(section) or {}, overrides)
        values["preset"] = self.preset
        values["name"] = variant.name
        return values


# ---------------------------------------------------------------------------- loading

class _DataOnlyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate mapping keys (tags are refused before loading,
    by `_reject_explicit_tags`)."""


def _mapping_without_duplicates(loader: _DataOnlyLoader, node: yaml.MappingNode) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise UserError(f"study file: duplicate key {key!r} at line "
                            f"{key_node.start_mark.line + 1}; allowed: each key once")
        seen.add(key)
    return loader.construct_mapping(node)


_DataOnlyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                                _mapping_without_duplicates)


def _reject_explicit_tags(text: str) -> None:
    """Explicit `!!` tags resolve to standard tags, so the constructors cannot tell them from
    plain scalars; find them in the token stream instead."""
    try:
        for token in yaml.scan(text, Loader=yaml.SafeLoader):
            if isinstance(token, yaml.TagToken):
                handle, suffix = token.value
                raise UserError(f"study file: YAML tag {(handle or '') + suffix!r} at line "
                                f"{token.start_mark.line + 1} is not allowed; allowed: plain "
                                "YAML data (no tags)")
    except yaml.YAMLError as error:
        raise UserError(f"study file is not valid YAML: {_first_line(error)}") from None


def shipped_studies() -> list[str]:
    """Names of the studies shipped with resstream (`resstream compare NAME`)."""
    folder = resources.files("resstream") / "studies"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def read_study_text(reference: str) -> tuple[str, str]:
    """(text, where) of a study: a YAML file path, or the name of a shipped study."""
    path = Path(reference)
    if path.suffix in (".yaml", ".yml", ".json") or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"study file {reference!r} does not exist; allowed: a YAML "
                                    f"file or a shipped study ({', '.join(shipped_studies())})")
        return path.read_text(encoding="utf-8"), str(path)
    if reference not in shipped_studies():
        raise UserError(f"study {reference!r} is neither a file nor a shipped study; allowed: a "
                        f"YAML file or one of {', '.join(shipped_studies())}")
    text = (resources.files("resstream") / "studies" / f"{reference}.yaml").read_text("utf-8")
    return text, f"shipped study {reference!r}"


def load_study(reference: str) -> Study:
    """Read and check a study (file path or shipped name). Raises UserError on any bad field."""
    text, where = read_study_text(reference)
    return parse_study(text, where)


def parse_study(text: str, where: str = "study file") -> Study:
    _reject_explicit_tags(text)
    try:
        data = yaml.load(text, Loader=_DataOnlyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        raise UserError(f"{where} is not valid YAML: {_first_line(error)}") from None
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a mapping with keys {', '.join(STUDY_KEYS)}; got "
                        f"{type(data).__name__}")
    study = _build(data)
    study.source_text = text
    _check_runs_configure(study)
    return study


# ---------------------------------------------------------------------------- checks

def _build(data: dict) -> Study:
    _no_unknown(data, STUDY_KEYS, "study")
    for key in ("name", "seeds", "budget", "variants"):
        if key not in data:
            raise UserError(f"study: {key!r} is missing; allowed: a study with "
                            "name, seeds, budget and variants")
    name = _text(data["name"], "name")
    seeds = _seeds(data["seeds"])
    kind, value = _budget(data["budget"])
    config = _mapping(data.get("config"), "config")
    _no_unknown(config, VARIANT_SECTIONS, "config")
    _not_study_owned(config, "config")
    variants = _variants(data["variants"])
    names = [v.name for v in variants]
    baseline = data.get("baseline", names[0])
    if baseline not in names:
        raise UserError(f"study: baseline={baseline!r} is not a variant; allowed: one of "
                        f"{', '.join(names)}")
    if data.get("match") is not None:
        baseline_variant = next(v for v in variants if v.name == baseline)
        if baseline_variant.match is not None:
            raise UserError(f"study: match is given both at the top and in variant {baseline!r}; "
                            "allowed: one of them")
        baseline_variant.match = _match(data["match"], "match")
    for variant in variants:
        if variant.match is not None and variant.match.params not in names:
            raise UserError(f"variants.{variant.name}.match.params={variant.match.params!r} is "
                            f"not a variant; allowed: one of {', '.join(names)}")
        if variant.match is not None and variant.match.params == variant.name:
            raise UserError(f"variants.{variant.name}.match.params names the variant itself; "
                            "allowed: another variant")
    systems = _mapping(data.get("systems"), "systems")
    _no_unknown(systems, SYSTEMS_KEYS, "systems")
    contexts = systems.get("decode_contexts")
    if contexts is not None:
        if (not isinstance(contexts, list) or not contexts
                or not all(_is_int(c) and c >= 1 for c in contexts)):
            raise UserError(f"systems.decode_contexts={contexts!r} is invalid; allowed: a list "
                            "of integers >= 1")
    steps = systems.get("decode_steps", 16)
    if not _is_int(steps) or steps < 1:
        raise UserError(f"systems.decode_steps={steps!r} is invalid; allowed: an integer >= 1")
    preset = _text(data.get("preset", "small"), "preset")
    from resstream.presets import get_preset

    get_preset(preset)
    return Study(name=name, preset=preset, seeds=seeds, budget_kind=kind, budget_value=value,
                 config=config, variants=variants, baseline=baseline,
                 description=_text(data.get("description", ""), "description", empty=True),
                 decode_contexts=contexts, decode_steps=steps, raw=data)


def _variants(value: Any) -> list[Variant]:
    if not isinstance(value, dict) or not value:
        raise UserError(f"study: variants={value!r} is invalid; allowed: a non-empty mapping of "
                        "variant name to overrides")
    variants = []
    for name, overrides in value.items():
        if not isinstance(name, str) or not name.strip() or "/" in name or name.startswith("."):
            raise UserError(f"study: variant name {name!r} is invalid; allowed: a non-empty "
                            "name without '/' that does not start with '.'")
        overrides = _mapping(overrides, f"variants.{name}")
        _no_unknown(overrides, VARIANT_KEYS, f"variants.{name}")
        sections = {}
        for section in VARIANT_SECTIONS:
            if section in overrides:
                sections[section] = _mapping(overrides[section], f"variants.{name}.{section}")
        _not_study_owned(sections, f"variants.{name}")
        match = overrides.get("match")
        variants.append(Variant(
            name=name, overrides=sections,
            title=_text(overrides.get("title", ""), f"variants.{name}.title", empty=True),
            match=_match(match, f"variants.{name}.match") if match is not None else None))
    return variants


def _match(value: Any, where: str) -> Match:
    if isinstance(value, str):
        raise UserError(f"{where}={value!r} is invalid; allowed: a mapping such as "
                        "{params: VARIANT} (optionally widen: mlp or d_model)")
    value = _mapping(value, where)
    _no_unknown(value, MATCH_KEYS, where)
    if "params" not in value:
        raise UserError(f"{where}: 'params' is missing; allowed: {{params: VARIANT}}")
    widen = value.get("widen", "mlp")
    if widen not in WIDEN_CHOICES:
        raise UserError(f"{where}.widen={widen!r} is invalid; allowed: "
                        f"{', '.join(WIDEN_CHOICES)}")
    return Match(params=_text(value["params"], f"{where}.params"), widen=widen)


def _seeds(value: Any) -> list[int]:
    if (not isinstance(value, list) or not value
            or not all(_is_int(s) and s >= 0 for s in value)):
        raise UserError(f"study: seeds={value!r} is invalid; allowed: a non-empty list of "
                        "integers >= 0")
    if len(set(value)) != len(value):
        raise UserError(f"study: seeds={value!r} repeats a seed; allowed: distinct seeds")
    return list(value)


def _budget(value: Any) -> tuple[str, float]:
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in BUDGET_KINDS:
        raise UserError(f"study: budget={value!r} is invalid; allowed: exactly one of "
                        "{tokens: N}, {steps: N}, {flops: X}")
    kind, amount = next(iter(value.items()))
    if isinstance(amount, str):  # YAML 1.1 reads 2e6 as a string
        try:
            amount = float(amount)
        except ValueError:
            pass
    if (isinstance(amount, bool) or not isinstance(amount, (int, float))
            or not math.isfinite(amount) or amount <= 0):
        raise UserError(f"study: budget.{kind}={value[kind]!r} is invalid; allowed: a finite "
                        "number > 0")
    if kind == "steps" and not float(amount).is_integer():
        raise UserError(f"study: budget.steps={amount!r} is invalid; allowed: an integer >= 1")
    return kind, float(amount)


def _check_runs_configure(study: Study) -> None:
    """Every variant's train config must build (unknown operators, bad options, bad values),
    before anything runs or is written."""
    from resstream.train.config import TrainConfig

    for variant in study.variants:
        values = study.train_values(variant)
        try:
            TrainConfig.from_dict(values).model_config()
        except UserError as error:
            raise UserError(f"variants.{variant.name}: {_first_line(error)}") from None


def _not_study_owned(sections: dict, where: str) -> None:
    for dotted in STUDY_OWNED:
        section, key = dotted.split(".")
        if key in (sections.get(section) or {}):
            raise UserError(f"{where}.{dotted} is set by the study ({'seeds' if key == 'seed' else 'budget'}); "
                            f"allowed: remove it and use the study's "
                            f"{'seeds' if key == 'seed' else 'budget'}")


def _no_unknown(values: dict, allowed: tuple[str, ...], where: str) -> None:
    unknown = [str(k) for k in values if k not in allowed]
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: "
                        f"{', '.join(allowed)}")


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{where}={value!r} is invalid; allowed: a mapping")
    return value


def _text(value: Any, where: str, empty: bool = False) -> str:
    if not isinstance(value, str) or (not empty and not value.strip()):
        raise UserError(f"study: {where}={value!r} is invalid; allowed: "
                        f"{'a string' if empty else 'a non-empty string'}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def deep_merge(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` applied; nested mappings merge key by key."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
