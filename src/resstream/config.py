"""Model configuration: one dataclass, validated on construction, JSON-able, never executed."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from resstream.coerce import coerce_instance, require
from resstream.errors import UserError


@dataclass
class ModelConfig:
    """Decoder shape plus the two design axes: the depth-axis residual operator (`depth`) and
    the sequence-axis local mixer (`local_mixer`). Options specific to one operator or mixer go
    in `depth_options` / `mixer_options`; they are validated against that operator's typed
    `Options` dataclass (see `resstream.operator_options(name)`).

    `local_mixer` is one mixer's name, or a list of names to stack several (applied in the
    listed order where two fill the same slot); `mixer_options` is then keyed by mixer name,
    e.g. local_mixer=["shortswa", "canon"], mixer_options={"canon": {"placements": "AC"}}."""

    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int | None = None  # None: same as n_heads (plain multi-head attention)
    max_seq_len: int = 1024
    mlp_hidden: int | None = None  # None: 8/3 * d_model rounded up to a multiple of 32 (SwiGLU)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    # depth axis
    depth: str = "standard"
    depth_window: int | None = None  # K for windowed depth operators; None = full depth
    depth_options: dict = field(default_factory=dict)
    depth_layers: list | None = None  # blocks where the operator is active; None = all
    # sequence axis
    local_mixer: str | list | None = None  # a mixer name, a list of names (stacked), or null
    local_window: int = 128
    mixer_options: dict = field(default_factory=dict)  # a list of mixers: {name: its options}
    attn_backend: str = "auto"  # backend of ops.local_attention for local mixers / depth reads

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived values
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        return -(-(8 * self.d_model) // (3 * 32)) * 32

    @property
    def depth_operator_cls(self) -> type:
        from resstream.registry import DEPTH_OPERATORS

        return DEPTH_OPERATORS.get(self.depth)

    @property
    def local_mixers(self) -> list[str]:
        """The local mixers' names, in order (empty without a local mixer)."""
        if self.local_mixer is None:
            return []
        return [self.local_mixer] if isinstance(self.local_mixer, str) else list(self.local_mixer)

    def mixer_config(self, name: str) -> "ModelConfig":
        """The config as local mixer `name` sees it: `name` the only local mixer, with its own
        options (this config itself when it names that one mixer). Every mixer hook (build,
        validate_config, forward_macs_per_token, ...) gets such a config, so a mixer never
        needs to know what it is stacked with."""
        if self.local_mixer == name:
            return self
        if name not in self.local_mixers:
            raise UserError(f"local mixer {name!r} is not in local_mixer={self.local_mixer!r}; "
                            f"allowed: {', '.join(self.local_mixers) or '(none)'}")
        return self.replace(local_mixer=name, mixer_options=dict(self.mixer_options.get(name) or {}))

    def mixer_configs(self) -> list["ModelConfig"]:
        """`mixer_config(name)` of every local mixer, in order."""
        return [self.mixer_config(name) for name in self.local_mixers]

    @property
    def local_mixer_cls(self) -> type | None:
        """The class of the one local mixer (None without one); a stack has no single class:
        use `mixer_configs()`."""
        from resstream.registry import LOCAL_MIXERS

        names = self.local_mixers
        if len(names) > 1:
            raise UserError(f"local_mixer={self.local_mixer!r} stacks several mixers; allowed "
                            "here: one (use mixer_configs() for a stack)")
        return LOCAL_MIXERS.get(names[0]) if names else None

    @property
    def depth_opts(self) -> Any:
        from resstream.options import parse_options

        cls = self.depth_operator_cls
        return parse_options(cls.Options, self.depth_options, f"depth_options[{self.depth}]")

    @property
    def mixer_opts(self) -> Any:
        from resstream.options import NoOptions, parse_options

        cls = self.local_mixer_cls
        if cls is None:
            return NoOptions()
        if not isinstance(self.local_mixer, str):  # a list of one: options keyed by its name
            return self.mixer_config(self.local_mixer[0]).mixer_opts
        return parse_options(cls.Options, self.mixer_options, f"mixer_options[{self.local_mixer}]")

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        coerce_instance(self)  # the shared coercion: types, "5e-1" as a number, floats finite
        positive_ints = ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "local_window")
        for name in positive_ints:
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                    name, value, "an integer >= 1")
        require(self.d_model % self.n_heads == 0, "d_model", self.d_model,
                f"a multiple of n_heads={self.n_heads}")
        require(self.head_dim % 2 == 0, "d_model", self.d_model,
                f"d_model / n_heads even (RoPE); got head_dim={self.head_dim}")
        if self.n_kv_heads is not None:
            require(isinstance(self.n_kv_heads, int) and 1 <= self.n_kv_heads <= self.n_heads
                    and self.n_heads % self.n_kv_heads == 0, "n_kv_heads", self.n_kv_heads,
                    f"a divisor of n_heads={self.n_heads}")
        if self.mlp_hidden is not None:
            require(isinstance(self.mlp_hidden, int) and self.mlp_hidden >= 1, "mlp_hidden",
                    self.mlp_hidden, "an integer >= 1 or null")
        require(self.rope_theta > 0, "rope_theta", self.rope_theta, "a finite number > 0")
        require(0 < self.norm_eps < 1, "norm_eps", self.norm_eps, "a number in (0, 1)")
        # std of the normal init: negative is meaningless (torch raises), zero makes all
        # weights equal so no unit can learn anything different from its neighbours
        require(self.init_std > 0, "init_std", self.init_std, "a finite number > 0")
        if self.depth_window is not None:
            require(isinstance(self.depth_window, int) and self.depth_window >= 1, "depth_window",
                    self.depth_window, "an integer >= 1 or null (full depth)")
        require(self.attn_backend in ("auto", "reference", "chunked", "flex"), "attn_backend",
                self.attn_backend, "auto, reference, chunked, flex")
        if self.depth_layers is not None:
            require(isinstance(self.depth_layers, (list, tuple)) and all(
                isinstance(i, int) and 0 <= i < self.n_layers for i in self.depth_layers),
                "depth_layers", self.depth_layers, f"null or a list of block indices in [0, {self.n_layers})")
            self.depth_layers = sorted(set(self.depth_layers))
        operator = self.depth_operator_cls  # raises for unknown names, listing the known ones
        operator.validate_config(self, self.depth_opts)
        if self.depth_window is not None and not operator.metadata(self.depth_opts)["uses_depth_window"]:
            raise UserError(f"depth_window={self.depth_window} is not used by depth={self.depth!r}; "
                            "allowed: null for this operator")
        if isinstance(self.local_mixer, list):
            self._validate_mixer_stack()
        elif self.local_mixer is not None:
            self.local_mixer_cls.validate_config(self, self.mixer_opts)

    def _validate_mixer_stack(self) -> None:
        """local_mixer as a list: distinct known names, mixer_options keyed by them, each
        mixer valid with its options, and the mixers compatible (mixers/base.py check_stack)."""
        from resstream.mixers.base import check_stack
        from resstream.registry import LOCAL_MIXERS

        names = self.local_mixer
        require(len(names) >= 1 and all(isinstance(n, str) for n in names)
                and len(set(names)) == len(names), "local_mixer", names,
                "a mixer name, a non-empty list of distinct mixer names, or null")
        for name in names:
            LOCAL_MIXERS.get(name)  # raises for unknown names, listing the known ones
        for key, value in self.mixer_options.items():
            require(key in names, "mixer_options", self.mixer_options,
                    f"with local_mixer a list, a mapping from its mixer names ({', '.join(names)}) "
                    f"to their options; {key!r} is not one of them")
            require(isinstance(value, dict), f"mixer_options.{key}", value, "a mapping of options")
        check_stack(self.mixer_configs())  # each config validates its own mixer

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise UserError(f"unknown model config key(s) {', '.join(unknown)}; valid keys: "
                            f"{', '.join(cls.field_names())}")
        return cls(**values)

    def replace(self, **changes: Any) -> "ModelConfig":
        return ModelConfig.from_dict({**self.to_dict(), **changes})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))
