"""The two-axis decoder: token embedding, RoPE, RMSNorm pre-norm blocks of
[optional local-mixer sub-block] -> attention -> SwiGLU MLP, final norm and LM head.

The residual stream between sublayers belongs to a depth-axis operator (`config.depth`), the
sequence-axis local slots to one or more local mixers (`config.local_mixer`); the decoder composes
them by name through their registries, without knowing which it has (see depth/base.py,
mixers/base.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from resstream.cache import ForwardContext, KVCache, ModelCache
from resstream.config import ModelConfig
from resstream.depth.base import QKVViews, build_sites
from resstream.errors import UserError
from resstream.layers import RMSNorm, RotaryEmbedding, SwiGLU, init_linear, output_std
from resstream.mixers.base import ATTENTION_SLOTS, MixerChain, build_mixers


class Attention(nn.Module):
    """Global causal multi-head attention (grouped KV heads optional) through SDPA."""

    def __init__(self, config: ModelConfig, rope: RotaryEmbedding, out_std: float):
        super().__init__()
        d, std = config.d_model, config.init_std
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.head_dim
        self.norm = RMSNorm(d, config.norm_eps)
        self.q_proj = init_linear(nn.Linear(d, self.n_heads * self.head_dim, bias=False), std)
        self.k_proj = init_linear(nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False), std)
        self.v_proj = init_linear(nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False), std)
        self.o_proj = init_linear(nn.Linear(self.n_heads * self.head_dim, d, bias=False), out_std)
        self.rope = rope
        self.input_mixer: nn.Module | None = None  # Canon-A slot
        self.qkv_mixer: nn.Module | None = None  # Canon-B / ShortConv slot

    def _inputs(self, x: Tensor | QKVViews, ctx) -> tuple[Tensor, Tensor, Tensor]:
        views = x if isinstance(x, QKVViews) else None
        if self.input_mixer is not None:
            if views is None:
                x = self.input_mixer(x, ctx)
            else:
                views = QKVViews(*(self.input_mixer(view, ctx, stream=i) for i, view in enumerate(views)))
        if views is None:
            return x, x, x
        return views.q, views.k, views.v

    def _project(self, x: Tensor | QKVViews, ctx, values=None) -> tuple[Tensor, Tensor, Tensor]:
        xq, xk, xv = self._inputs(x, ctx)
        q, k, v = self.q_proj(xq), self.k_proj(xk), self.v_proj(xv)
        if self.qkv_mixer is not None:
            sizes = [q.shape[-1], k.shape[-1], v.shape[-1]]
            q, k, v = self.qkv_mixer(torch.cat([q, k, v], dim=-1), ctx).split(sizes, dim=-1)
        if values is not None:
            v = values(v)
        b, t, _ = q.shape
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = self.rope.cos_sin(ctx.positions, q.dtype)
        return RotaryEmbedding.apply(q, cos, sin), RotaryEmbedding.apply(k, cos, sin), v

    def forward(self, x: Tensor | QKVViews, ctx: ForwardContext, values=None) -> Tensor:
        """`values`: a function of the value vectors [B, T, kv_heads * head_dim] that the depth
        operator passes when it transforms them (DepthOperator.attention_values), else None."""
        q, k, v = self._project(x, ctx, values)
        n_new = q.shape[2]
        entry = ctx.entry(self)
        mask = None
        if entry is not None:
            k, v = entry.update(k, v, ctx.offset)
        if entry is not None and ctx.offset > 0 and n_new > 1:  # a chunk after cached tokens
            mask = self._mask(n_new, k.shape[2], q.device)
        is_causal = mask is None and n_new > 1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                             enable_gqa=self.n_kv_heads != self.n_heads)
        b, h, t, d = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, h * d))

    @staticmethod
    def _mask(n_queries: int, n_keys: int, device) -> Tensor:
        """End-aligned causal mask: the queries are the last `n_queries` of `n_keys` positions."""
        q_pos = torch.arange(n_keys - n_queries, n_keys, device=device)[:, None]
        k_pos = torch.arange(n_keys, device=device)[None, :]
        return k_pos <= q_pos

    def new_cache_entry(self, batch_size: int, max_len: int, device, dtype) -> KVCache:
        return KVCache(batch_size, self.n_kv_heads, max_len, self.head_dim, device, dtype)


class FeedForward(SwiGLU):
    """The MLP sublayer: its pre-norm plus a SwiGLU."""

    def __init__(self, config: ModelConfig, out_std: float):
        super().__init__(config.d_model, config.ffn_hidden, config.init_std, out_std)
        self.norm = RMSNorm(config.d_model, config.norm_eps)


def run_site(depth: nn.Module, state, site, sublayer: nn.Module, ctx):
    """One sublayer site: the depth operator's read, the sublayer, the operator's write. An
    operator that transforms attention's values hands attention a function of them
    (DepthOperator.attention_values)."""
    x = depth.read(state, site, sublayer.norm, ctx)
    if depth.transforms_values and site.kind == "attn":
        out = sublayer(x, ctx, values=lambda v: depth.attention_values(state, site, v, ctx))
    else:
        out = sublayer(x, ctx)
    return depth.write(state, site, out, ctx)


class Block(nn.Module):
    """One layer: an optional local-mixer sub-block ("mix"), attention ("attn"), MLP ("mlp").
    The residual stream between them is handled by the model's depth operator."""

    def __init__(self, config: ModelConfig, layer: int, rope: RotaryEmbedding, n_sublayers: int):
        super().__init__()
        out_std = output_std(config.init_std, n_sublayers)
        # (mixer, slot, module) of every local mixer; stacked mixers in one slot run in order
        self.mixer_parts = build_mixers(config, layer)
        grouped: dict[str, list[nn.Module]] = {}
        for _, slot, module in self.mixer_parts:
            grouped.setdefault(slot, []).append(module)
        if len(grouped.get("block", [])) > 1:
            raise ValueError("more than one local mixer fills slot 'block'; allowed: at most one")
        slots = {slot: modules[0] if len(modules) == 1 else MixerChain(modules)
                 for slot, modules in grouped.items()}
        if "block" in slots:
            self.mix = slots["block"]
        # a local mixer may replace global attention (ShortSWA `replace_attention`: [mix, mlp])
        has_attention = not any(c.local_mixer_cls.replaces_attention(c.mixer_opts)
                                for c in config.mixer_configs())
        if not has_attention and set(slots) & set(ATTENTION_SLOTS):
            raise ValueError(f"a local mixer fills {', '.join(sorted(set(slots) & set(ATTENTION_SLOTS)))} "
                             "but global attention is removed; allowed: no attention slots then")
        if has_attention:
            self.attn = Attention(config, rope, out_std)
            self.attn.input_mixer = slots.get("attn_input")
            self.attn.qkv_mixer = slots.get("qkv")
        self.mlp = FeedForward(config, out_std)
        self.mlp.input_mixer = slots.get("mlp_input")
        self.mlp.hidden_mixer = slots.get("mlp_hidden")
        self.site_kinds = ((("mix",) if "block" in slots else ()) + (("attn",) if has_attention else ())
                           + ("mlp",))
        self.sites: list = []  # filled by the model: this block's Site objects, in order

    def sublayers(self) -> list[nn.Module]:
        return [getattr(self, kind) for kind in self.site_kinds]

    def forward(self, depth: nn.Module, state, ctx):
        """Run this block's sublayers around the depth operator's read and write; returns the
        operator's state. A module call (not a loop in the model) so that wrappers that act per
        block, such as FSDP2's `fully_shard`, see one forward per block."""
        for site, sublayer in zip(self.sites, self.sublayers()):
            state = run_site(depth, state, site, sublayer, ctx)
        return state

    def mixer_slots(self) -> dict[str, nn.Module]:
        """The local-mixer modules of this block by slot (mixers/base.py SLOTS), filled ones only."""
        attn = getattr(self, "attn", None)  # absent when a mixer replaces global attention
        modules = {"block": getattr(self, "mix", None),
                   "attn_input": None if attn is None else attn.input_mixer,
                   "qkv": None if attn is None else attn.qkv_mixer,
                   "mlp_input": self.mlp.input_mixer, "mlp_hidden": self.mlp.hidden_mixer}
        return {slot: module for slot, module in modules.items() if module is not None}


def _check_token_ids(input_ids: Tensor, vocab_size: int) -> None:
    """Token ids must index the embedding: out-of-range ids otherwise fail deep inside
    nn.Embedding (IndexError on CPU, a device-side assert on CUDA). One reduction, one sync."""
    if input_ids.dtype not in (torch.long, torch.int32):  # what nn.Embedding takes
        raise UserError(f"input_ids have dtype {input_ids.dtype}; allowed: torch.long or "
                        "torch.int32 token ids")
    low, high = torch.stack(torch.aminmax(input_ids)).tolist()
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise UserError(f"input_ids holds token id {bad}, outside the vocabulary; allowed: "
                        f"0..{vocab_size - 1} (vocab_size={vocab_size})")


class ResStreamLM(nn.Module):
    """Decoder-only language model; `model(input_ids)` returns logits [B, T, vocab]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        rope = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        nn.init.normal_(self.embed.weight, std=config.init_std)
        n_sublayers = 2 * config.n_layers  # GPT-2 style scaling of residual-writing projections
        self.blocks = nn.ModuleList(Block(config, i, rope, n_sublayers) for i in range(config.n_layers))
        per_block = len(self.blocks[0].site_kinds)
        self.sites = build_sites(config.n_layers, self.blocks[0].site_kinds)
        for i, block in enumerate(self.blocks):
            block.sites = self.sites[i * per_block:(i + 1) * per_block]
        self.depth = config.depth_operator_cls(config, self.sites, config.depth_opts)
        with torch.no_grad():
            self.depth.init_sublayers(self.blocks)  # an operator's init of the sublayer weights
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        else:
            init_linear(self.lm_head, config.init_std)
        for name, module in self.named_modules():
            if hasattr(module, "new_cache_entry"):
                module.cache_key = name
        # no global attention: decode state is bounded and RoPE is relative, so the model may run
        # past max_seq_len ("slide"); models with global attention cannot (their KV cache grows)
        self.can_slide = not any(isinstance(m, Attention) for m in self.modules())

    # ---------------------------------------------------------------- forward
    def context(self, n_tokens: int, cache: ModelCache | None, device) -> ForwardContext:
        offset = 0 if cache is None else cache.length
        if offset + n_tokens > self.config.max_seq_len and not self.can_slide:
            raise UserError(f"sequence length {offset + n_tokens} exceeds max_seq_len="
                            f"{self.config.max_seq_len}; allowed: at most max_seq_len tokens "
                            "(this model has global attention and cannot slide past it)")
        positions = torch.arange(offset, offset + n_tokens, device=device)
        return ForwardContext(positions, cache)

    def hidden_states(self, input_ids: Tensor, ctx: ForwardContext) -> Tensor:
        """The depth operator's final stream (before the final norm), [B, T, d]."""
        state = self.depth.init_state(self.embed(input_ids), ctx)
        for block in self.blocks:
            state = block(self.depth, state, ctx)
        return self.depth.finalize(state, ctx)

    def forward(self, input_ids: Tensor, cache: ModelCache | None = None) -> Tensor:
        """Logits [B, T, vocab] of `input_ids` [B, T], continuing `cache` if given. There is no
        padding mask: every row is real tokens (batched prompts of different lengths go through
        `generate`, which uses per-row lengths instead of padding)."""
        if input_ids.dim() != 2:
            raise UserError(f"input_ids must be [batch, tokens]; got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] == 0:
            raise UserError("input_ids has 0 tokens; allowed: at least 1")
        if not torch.compiler.is_compiling():  # a data-dependent check cannot be traced
            _check_token_ids(input_ids, self.config.vocab_size)
        if cache is not None and cache.batch_size != input_ids.shape[0]:
            raise UserError(f"input_ids has batch {input_ids.shape[0]} but the cache was made for "
                            f"batch_size={cache.batch_size}; allowed: the cache's batch size")
        ctx = self.context(input_ids.shape[1], cache, input_ids.device)
        hidden = self.hidden_states(input_ids, ctx)
        logits = self.lm_head(self.norm(hidden))
        if cache is not None:
            cache.length += input_ids.shape[1]
            if input_ids.shape[1] > 1:
                cache.new_sequence()
        return logits

    # ---------------------------------------------------------------- utilities
    def new_cache(self, batch_size: int, max_len: int | None = None, device=None,
                  dtype=None) -> ModelCache:
        """A fresh decode cache for `batch_size` sequences of up to `max_len` tokens."""
        max_len = self.config.max_seq_len if max_len is None else max_len
        if not (1 <= max_len <= self.config.max_seq_len or (self.can_slide and max_len >= 1)):
            raise UserError(f"max_len={max_len} is invalid; allowed: 1..{self.config.max_seq_len}")
        param = self.embed.weight
        device = param.device if device is None else device
        dtype = param.dtype if dtype is None else dtype
        entries = {name: module.new_cache_entry(batch_size, max_len, device, dtype)
                   for name, module in self.named_modules() if hasattr(module, "new_cache_entry")}
        return ModelCache(entries, batch_size, max_len)

    def generate(self, input_ids, max_new_tokens: int, *args, **kwargs):
        """generate(input_ids, max_new_tokens, temperature, top_k, top_p, seed, *, stop, ...):
        sample continuations with the decode cache. Returns a LongTensor [B, T] of prompt + new
        tokens, rows right-padded with `pad_token_id` (default 0); `return_dict=True` gives the
        `Generation` record (per-row tokens, lengths, stop flags). See
        `resstream.generation.generate`, imported here so that generation never imports the
        model module at import time."""
        from resstream.generation import generate

        return generate(self, input_ids, max_new_tokens, *args, **kwargs)

    def depth_routing(self, input_ids: Tensor) -> dict:
        """The depth operator's routing weights on `input_ids` [B, T] (T >= 2: a one-token
        step takes the decode path, which does not record), averaged over the batch and
        positions: a dict with a "kind" ("none", "depth_attention", "depth_weights",
        "ddl_beta", "stream_mixing") whose shapes and labels `resstream.routing` documents."""
        if input_ids.dim() != 2 or input_ids.shape[1] < 2:
            raise UserError(f"input_ids must be [batch, tokens] with at least 2 tokens; got "
                            f"shape {tuple(input_ids.shape)}")
        with torch.no_grad(), self.depth.recording_routing() as recorder:
            self(input_ids)
        return self.depth.routing_result(recorder)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---------------------------------------------------------------- weight decay by role
    def no_weight_decay_names(self) -> set[str]:
        """Full names (as `named_parameters()` gives them) of the parameters that take no
        weight decay: every parameter with fewer than 2 dimensions (norm gains, biases, scalars,
        1-D mixing weights), what the depth operator declares (`DepthOperator.no_weight_decay`:
        by default all of its parameters, which are identity- or constant-initialised mixing
        coefficients, gates and queries) and what the local mixer declares for each of its slot
        modules (`LocalMixer.no_weight_decay`). Everything else -- embedding (tied LM head),
        attention and MLP matrices, a mixer's or depth_swa's attention projections -- is decayed."""
        names = {name for name, p in self.named_parameters() if p.dim() < 2}
        names |= {f"depth.{name}" for name in self.depth.no_weight_decay()}
        mixer_configs = {c.local_mixer: c for c in self.config.mixer_configs()}
        if mixer_configs:
            prefixes = {id(module): name for name, module in self.named_modules()}
            for block in self.blocks:
                for mixer, slot, module in block.mixer_parts:
                    config, prefix = mixer_configs[mixer], prefixes[id(module)]
                    names |= {f"{prefix}.{name}" for name in
                              config.local_mixer_cls.no_weight_decay(config.mixer_opts, slot, module)}
        known = {name for name, _ in self.named_parameters()}
        unknown = sorted(names - known)
        if unknown:
            raise RuntimeError(f"no_weight_decay names no parameter: {', '.join(unknown)}")
        return names

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """Two AdamW parameter groups, [decayed (weight_decay), not decayed (0.0)], each holding
        the trainable parameters in order of their names (see `no_weight_decay_names`)."""
        exempt = self.no_weight_decay_names()
        decay, no_decay = [], []
        for name, param in sorted(self.named_parameters(), key=lambda item: item[0]):
            if param.requires_grad:
                (no_decay if name in exempt else decay).append(param)
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    @classmethod
    def from_hf_llama(cls, hf_model) -> "ResStreamLM":
        """Build a `standard` model with the weights of a Hugging Face LlamaForCausalLM."""
        from resstream.interop import llama_to_resstream

        return llama_to_resstream(cls, hf_model)

