"""Named model presets: a shape for the decoder, selected with `--preset NAME`.

A preset fixes only the model's shape (width, depth, heads, context); the depth-axis operator
and the sequence-axis mixer are chosen on top of it (`--model.depth=ddl`,
`--model.local_mixer=shortswa`), so variants of one preset differ only in the residual stream.

| preset | use |
|---|---|
| tiny  | unit tests: trains in milliseconds per step |
| small | the shipped studies (`resstream compare demo`: 4 variants x 3 seeds in about 15 minutes on 2 CPU cores) |
| base  | a GPU-sized character model, the shape of nanoGPT's Shakespeare recipe (6 x 384) |
"""
from __future__ import annotations

from dataclasses import dataclass, field

from resstream.errors import UserError


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    model: dict = field(default_factory=dict)

    def config(self, **overrides):
        """The preset's ModelConfig with `overrides` applied (unknown keys are rejected)."""
        from resstream.config import ModelConfig

        return ModelConfig.from_dict({**self.model, **overrides})


PRESETS: dict[str, Preset] = {}


def register_preset(preset: Preset) -> Preset:
    """Add a preset to the registry (a name may be registered once)."""
    if preset.name in PRESETS:
        raise ValueError(f"preset {preset.name!r} is already registered")
    PRESETS[preset.name] = preset
    return preset


register_preset(Preset(
    "tiny", "tests: 2 layers, width 32, context 64",
    dict(vocab_size=256, d_model=32, n_layers=2, n_heads=2, max_seq_len=64, mlp_hidden=64),
))
register_preset(Preset(
    "small", "demo on a 2-core CPU: 8 layers, width 128, context 128",
    dict(vocab_size=256, d_model=128, n_layers=8, n_heads=4, max_seq_len=128),
))
register_preset(Preset(
    "base", "GPU character model: 6 layers, width 384, context 256 (nanoGPT Shakespeare shape)",
    dict(vocab_size=256, d_model=384, n_layers=6, n_heads=6, max_seq_len=256),
))


def list_presets() -> list[Preset]:
    """All registered presets, in registration order."""
    return list(PRESETS.values())


def get_preset(name: str) -> Preset:
    """The preset called `name`; an unknown name is a user error listing the known ones."""
    if name not in PRESETS:
        raise UserError(f"preset {name!r} not found; available presets: {', '.join(PRESETS)}")
    return PRESETS[name]
