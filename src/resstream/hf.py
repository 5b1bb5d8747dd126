"""Hugging Face interop (optional extra `resstream[hf]`): a `PretrainedConfig` and a causal-LM
`PreTrainedModel` + `GenerationMixin` around `ResStreamLM`, registered with `AutoConfig` /
`AutoModelForCausalLM` in-process, for every depth operator and local mixer.

    import resstream.hf                       # cheap: transformers is imported on first use
    hf_model = resstream.hf.from_resstream(model)        # or ResStreamForCausalLM(config)
    hf_model.save_pretrained(directory)                  # config.json + model.safetensors
    AutoModelForCausalLM.from_pretrained(directory)      # after resstream.hf.register()
    hf_model.generate(input_ids, max_new_tokens=32)

The checkpoint layout (also written by `save_model` and read by `load_model`, which do not need
transformers): `config.json` with `"model_type": "resstream"` and the whole `ModelConfig` under
the key `"resstream"` (plus the usual HF size fields, derived from it), and `model.safetensors`
with the `ResStreamLM` state dict under the prefix `model.` (a tied LM head is not stored).

Decoding inside HF `generate()` uses resstream's own cache (`ModelCache`, wrapped so that
`generate` can carry it between steps); the cache is preallocated for `max_seq_len` positions.
It travels under the name the installed transformers uses: `cache` (transformers >= 5.x, where
`past_key_values` is deprecated) or `past_key_values` (older releases); `forward` takes either.
HF-style left padding (an `attention_mask` with zeros) is refused, since the model has no
padding mask: batched prompts of different lengths go through `ResStreamLM.generate`, which uses
per-row lengths and is exact for every operator.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from resstream.config import ModelConfig
from resstream.errors import UserError
from resstream.model import ResStreamLM

MODEL_TYPE = "resstream"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PREFIX = "model."


# ---------------------------------------------------------------------------------- file layout
def hf_size_fields(config: ModelConfig) -> dict[str, Any]:
    """The standard HF config fields, derived from the ModelConfig (read by HF tooling only)."""
    return {"vocab_size": config.vocab_size, "hidden_size": config.d_model,
            "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
            "num_key_value_heads": config.kv_heads, "max_position_embeddings": config.max_seq_len,
            "tie_word_embeddings": config.tie_embeddings}


def save_model(model: ResStreamLM, directory: str | Path) -> Path:
    """Write `model` in the HF layout above without needing transformers."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"model_type": MODEL_TYPE, "architectures": ["ResStreamForCausalLM"],
              MODEL_TYPE: model.config.to_dict(), **hf_size_fields(model.config)}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    state = {PREFIX + k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop(PREFIX + "lm_head.weight")
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    return directory


def read_model_config(directory: str | Path) -> ModelConfig:
    """The ModelConfig of a saved directory (HF layout, or a bare ModelConfig JSON)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; allowed: a directory saved by save_model / "
                                "save_pretrained (config.json + model.safetensors)")
    values = json.loads(path.read_text())
    if MODEL_TYPE in values and isinstance(values[MODEL_TYPE], dict):
        return ModelConfig.from_dict(values[MODEL_TYPE])
    if values.get("model_type") not in (None, MODEL_TYPE):
        raise UserError(f"{path} has model_type={values['model_type']!r}; allowed: {MODEL_TYPE!r}")
    return ModelConfig.from_dict(values)


def load_model(directory: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> ResStreamLM:
    """Load a directory written by `save_model` or by HF `save_pretrained` (no transformers)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not directory.is_dir():
        raise NotADirectoryError(f"checkpoint {directory} is not a directory")
    config = read_model_config(directory)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {directory}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    state = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in state.items()}
    model = ResStreamLM(config)
    expected = set(model.state_dict())
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise UserError(f"weights in {directory} do not match the config: missing "
                        f"{missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=False)
    model = model.to(device)
    return model if dtype is None else model.to(dtype)


# ---------------------------------------------------------------------------------- HF classes
_CLASSES: dict[str, type] = {}


def _require_transformers():
    try:
        import transformers
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("resstream.hf needs transformers: pip install 'resstream[hf]'") from error
    return transformers


class ResStreamHFCache:
    """Carries a `ModelCache` through HF `generate()` (which only needs its length)."""

    is_compileable = False
    is_croppable = False
    is_linear = (False,)  # not a linear-attention state: generate slices inputs by get_seq_length

    def __init__(self, cache):
        self.cache = cache

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.cache.length

    def nbytes(self) -> int:
        return self.cache.nbytes()


def _cache_name(transformers) -> str:
    """The keyword HF `generate()` carries caches under: `cache` since transformers 5.x renamed
    it (the old names then warn that they are deprecated), `past_key_values` before."""
    from transformers.generation import utils

    return "cache" if "cache" in getattr(utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


def check_attention_mask(attention_mask) -> None:
    """Only masks without padding are allowed: the model has no padding mask (see module doc)."""
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise UserError("attention_mask has zeros (padding), which ResStreamForCausalLM does not "
                        "support; allowed: no attention_mask or an all-ones one (for prompts of "
                        "different lengths use ResStreamLM.generate, which needs no padding)")


def _build_classes() -> dict[str, type]:
    if _CLASSES:
        return _CLASSES
    transformers = _require_transformers()
    from transformers import GenerationMixin, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutputWithPast

    cache_name = _cache_name(transformers)

    base_config = getattr(transformers, "PreTrainedConfig", None) or transformers.PretrainedConfig

    class ResStreamConfig(base_config):
        """HF config holding a resstream `ModelConfig` under `resstream` (validated on load)."""

        model_type = MODEL_TYPE

        def __init__(self, resstream: dict | None = None, **kwargs):
            config = ModelConfig.from_dict(dict(resstream or {}))
            self.resstream = config.to_dict()
            kwargs.update(hf_size_fields(config))
            super().__init__(**kwargs)

        def to_model_config(self) -> ModelConfig:
            return ModelConfig.from_dict(dict(self.resstream))

    class ResStreamForCausalLM(PreTrainedModel, GenerationMixin):
        """`ResStreamLM` as an HF causal LM; the wrapped model is `self.model`."""

        config_class = ResStreamConfig
        base_model_prefix = "model"
        main_input_name = "input_ids"
        _no_split_modules = ["Block"]
        # transformers >= 5 maps tied target -> source; 4.x lists the tied targets
        _tied_weights_keys = ({"model.lm_head.weight": "model.embed.weight"}
                              if int(transformers.__version__.split(".")[0]) >= 5
                              else ["model.lm_head.weight"])

        def __init__(self, config: ResStreamConfig):
            super().__init__(config)
            self.model = ResStreamLM(config.to_model_config())
            self.post_init()

        @classmethod
        def _supports_default_dynamic_cache(cls) -> bool:
            return False  # we bring our own cache

        def _init_weights(self, module) -> None:
            """ResStreamLM initialises its own parameters (many operators start from exact
            zeros or identities that a generic init would destroy); only buffers that are not
            saved (RoPE frequencies) are recomputed after a meta-device load."""
            from resstream.layers import RotaryEmbedding

            if isinstance(module, RotaryEmbedding):
                head_dim = 2 * module.inv_freq.numel()
                theta = self.config.resstream["rope_theta"]
                fresh = RotaryEmbedding(head_dim, theta).inv_freq
                with torch.no_grad():
                    module.inv_freq.copy_(fresh.to(module.inv_freq.device))

        def get_input_embeddings(self):
            return self.model.embed

        def set_input_embeddings(self, value):
            self.model.embed = value

        def get_output_embeddings(self):
            return self.model.lm_head

        def forward(self, input_ids=None, attention_mask=None, cache=None, use_cache=None,
                    labels=None, return_dict=None, inputs_embeds=None, **kwargs):
            """Logits (and the shifted LM loss with `labels`); `cache` continues decoding
            (`past_key_values`, its older name, is accepted too)."""
            if input_ids is None:
                raise UserError("ResStreamForCausalLM needs input_ids (inputs_embeds is not supported)")
            check_attention_mask(attention_mask)
            cache = _legacy_cache(cache, kwargs)
            if use_cache is None:
                use_cache = self.config.use_cache if hasattr(self.config, "use_cache") else False
            if cache is None and use_cache:
                cache = ResStreamHFCache(self.model.new_cache(input_ids.shape[0]))
            if cache is not None and not isinstance(cache, ResStreamHFCache):
                raise UserError(f"cache must come from this model; got {type(cache).__name__}")
            logits = self.model(input_ids, cache=None if cache is None else cache.cache)
            loss = None
            if labels is not None:
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                    labels[:, 1:].reshape(-1), ignore_index=-100)
            return CausalLMOutputWithPast(loss=loss, logits=logits, **{cache_name: cache})

        def prepare_inputs_for_generation(self, input_ids, attention_mask=None, use_cache=True,
                                          **kwargs):
            """Only the tokens the cache has not seen, under transformers' cache keyword."""
            cache = kwargs.get(cache_name)
            if cache is not None:
                input_ids = input_ids[:, cache.get_seq_length():]
            return {"input_ids": input_ids, cache_name: cache, "attention_mask": attention_mask,
                    "use_cache": use_cache}

        def _reorder_cache(self, past_key_values, beam_idx):
            raise UserError("beam search is not supported by ResStreamForCausalLM; allowed: greedy "
                            "or sampling (num_beams=1)")

    def _legacy_cache(cache, kwargs: dict):
        """`cache`, or the `past_key_values` of older callers (warned about where transformers
        itself has renamed it)."""
        legacy = kwargs.pop("past_key_values", None)
        if legacy is None or cache is not None:
            return cache
        if cache_name == "cache":
            warnings.warn("ResStreamForCausalLM.forward: past_key_values is deprecated; use cache",
                          FutureWarning, stacklevel=3)
        return legacy

    _CLASSES.update(ResStreamConfig=ResStreamConfig, ResStreamForCausalLM=ResStreamForCausalLM)
    return _CLASSES


def register() -> None:
    """Register the classes with AutoConfig / AutoModelForCausalLM (idempotent, in-process)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    classes = _build_classes()
    try:
        AutoConfig.register(MODEL_TYPE, classes["ResStreamConfig"])
    except ValueError:  # already registered in this process
        pass
    try:
        AutoModelForCausalLM.register(classes["ResStreamConfig"], classes["ResStreamForCausalLM"])
    except ValueError:
        pass


def from_resstream(model: ResStreamLM):
    """Wrap an existing ResStreamLM (its weights are shared, not copied) as an HF causal LM."""
    register()
    classes = _build_classes()
    hf_config = classes["ResStreamConfig"](resstream=model.config.to_dict())
    with torch.device("meta"):  # the placeholder model is replaced at once: build it for free
        hf_model = classes["ResStreamForCausalLM"](hf_config)
    hf_model.model = model
    return hf_model


def __getattr__(name: str):
    if name in ("ResStreamConfig", "ResStreamForCausalLM"):
        register()
        return _CLASSES[name]
    raise AttributeError(f"module 'resstream.hf' has no attribute {name!r}")
