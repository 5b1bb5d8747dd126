"""Weight interop with Hugging Face Llama (the independent reference implementation of our
`standard` decoder): RMSNorm pre-norm, RoPE (rotate-half), SwiGLU, grouped KV heads."""
from __future__ import annotations

import torch

from resstream.config import ModelConfig
from resstream.errors import UserError


def config_from_llama(hf_config) -> ModelConfig:
    """The `standard` ModelConfig with the shape of a LlamaConfig (rejects what we don't model)."""
    unsupported = {
        "attention_bias": getattr(hf_config, "attention_bias", False),
        "mlp_bias": getattr(hf_config, "mlp_bias", False),
        "rope_scaling": _rope_scaling(hf_config),
    }
    for name, value in unsupported.items():
        if value:
            raise UserError(f"Llama config {name}={value!r} is not supported; allowed: false/None")
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise UserError(f"Llama config hidden_act={hf_config.hidden_act!r} is not supported; allowed: silu")
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    if head_dim * hf_config.num_attention_heads != hf_config.hidden_size:
        raise UserError(f"Llama config head_dim={head_dim} is not supported; allowed: hidden_size / num_attention_heads")
    return ModelConfig(
        vocab_size=hf_config.vocab_size, d_model=hf_config.hidden_size,
        n_layers=hf_config.num_hidden_layers, n_heads=hf_config.num_attention_heads,
        n_kv_heads=hf_config.num_key_value_heads, max_seq_len=hf_config.max_position_embeddings,
        mlp_hidden=hf_config.intermediate_size, rope_theta=float(_rope_theta(hf_config)),
        norm_eps=hf_config.rms_norm_eps, tie_embeddings=bool(hf_config.tie_word_embeddings))


def _rope_parameters(hf_config) -> dict:
    return dict(getattr(hf_config, "rope_parameters", None) or {})


def _rope_scaling(hf_config):
    params = _rope_parameters(hf_config)
    rope_type = params.get("rope_type", "default")
    scaling = getattr(hf_config, "rope_scaling", None)
    if rope_type != "default":
        return params
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        return scaling
    return None


def _rope_theta(hf_config) -> float:
    params = _rope_parameters(hf_config)
    return params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))


def llama_state_mapping(n_layers: int) -> dict[str, str]:
    """Our parameter name -> the HF LlamaForCausalLM name."""
    mapping = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
               "lm_head.weight": "lm_head.weight"}
    for i in range(n_layers):
        ours, theirs = f"blocks.{i}", f"model.layers.{i}"
        mapping[f"{ours}.attn.norm.weight"] = f"{theirs}.input_layernorm.weight"
        mapping[f"{ours}.mlp.norm.weight"] = f"{theirs}.post_attention_layernorm.weight"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            mapping[f"{ours}.attn.{proj}.weight"] = f"{theirs}.self_attn.{proj}.weight"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            mapping[f"{ours}.mlp.{proj}.weight"] = f"{theirs}.mlp.{proj}.weight"
    return mapping


def llama_to_resstream(model_cls, hf_model):
    config = config_from_llama(hf_model.config)
    model = model_cls(config)
    theirs = hf_model.state_dict()
    ours = model.state_dict()
    with torch.no_grad():
        for name, hf_name in llama_state_mapping(config.n_layers).items():
            if name == "lm_head.weight" and config.tie_embeddings:
                continue
            ours[name].copy_(theirs[hf_name])
    return model.to(next(hf_model.parameters()).dtype)
