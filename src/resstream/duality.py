"""`resstream duality`: the residual stream duality, shown numerically.

One causal local-attention operator, two ordered axes. We build a small random model whose
blocks have a sequence-axis ShortSWA mixer (window w, no RoPE: the depth read has no positions)
and the depth-wise read `depth_swa` (window K = w), give both the same projection weights, and
check the two identities:

1. depth read == sequence ShortSWA on the transposed stack: the reads z_t^(l) that the model
   computed before every block equal the sequence mixer's attention applied to the depth stack
   X_t = [h_t^(0); ...; h_t^(L-1)] with depth as the sequence axis (tokens folded into batch);
2. sequence ShortSWA == depth read on the transposed sequence: the sequence mixer's output on
   H = [h_1; ...; h_T] equals the depth read stepped through H as if positions were layers.

The max absolute difference is printed in float32 and float64; it is at rounding level.
"""
from __future__ import annotations

import argparse

import torch

from resstream.config import ModelConfig
from resstream.depth.depth_swa import DepthState
from resstream.model import ResStreamLM
from resstream.testing import perturb_parameters


def duality_model(window: int, n_layers: int, seed: int, dtype: torch.dtype) -> ResStreamLM:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=256, d_model=64, n_layers=n_layers, n_heads=4, max_seq_len=256,
                         local_mixer="shortswa", local_window=window, mixer_options={"rope": False},
                         depth="depth_swa", depth_window=window)
    model = ResStreamLM(config).to(dtype).eval()
    perturb_parameters(model, scale=0.05, seed=seed)  # move zero-initialised W_O off zero
    sequence_mixer = model.blocks[0].mix
    depth_operator = model.depth
    # "the same projection weights": the depth operator uses the sequence mixer's norm and W's
    depth_operator.attention[0].load_state_dict(sequence_mixer.attention.state_dict())
    depth_operator.state_norm.load_state_dict(sequence_mixer.norm.state_dict())
    return model


def sequence_attention(model: ResStreamLM, x: torch.Tensor) -> torch.Tensor:
    """The sequence mixer's ShortSWA (before W_O) over the middle axis of x [M, N, d]."""
    mixer = model.blocks[0].mix
    q, k, v = mixer.attention.project(mixer.norm(x), None)
    return mixer.attention.attend(q, k, v)


def depth_read_equals_sequence_mixer(model: ResStreamLM, tokens: torch.Tensor) -> float:
    model.depth.record = []
    with torch.no_grad():
        model(tokens)
        states = torch.stack([h for h, _ in model.depth.record], dim=2)  # [B, T, L, d]
        reads = torch.stack([z for _, z in model.depth.record], dim=2)  # [B, T, L, H*D]
        b, t, n_states, d = states.shape
        along_depth = sequence_attention(model, states.reshape(b * t, n_states, d))
    model.depth.record = None
    return (along_depth.reshape(reads.shape) - reads).abs().max().item()


def sequence_mixer_equals_depth_read(model: ResStreamLM, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        hidden = model.embed(tokens)  # [B, T, d]: a sequence of states
        along_sequence = sequence_attention(model, hidden)
        state = DepthState(hidden[:, :1])
        stepped = []
        for position in range(hidden.shape[1]):  # positions taken as if they were layers
            state.h = hidden[:, position:position + 1]
            stepped.append(model.depth.read_step(state))
        along_depth = torch.cat(stepped, dim=1)
    return (along_depth - along_sequence).abs().max().item()


def run_duality(window: int = 3, n_layers: int = 6, tokens: int = 16, batch: int = 2,
                seed: int = 0) -> dict[str, dict[str, float]]:
    """Max |difference| of both identities, per dtype."""
    results: dict[str, dict[str, float]] = {}
    for dtype in (torch.float32, torch.float64):
        model = duality_model(window, n_layers, seed, dtype)
        ids = torch.randint(0, 256, (batch, tokens), generator=torch.Generator().manual_seed(seed))
        results[str(dtype).replace("torch.", "")] = {
            "depth read == sequence ShortSWA on the transposed stack": depth_read_equals_sequence_mixer(model, ids),
            "sequence ShortSWA == depth read on the transposed sequence": sequence_mixer_equals_depth_read(model, ids),
        }
    return results


def _command(args: argparse.Namespace) -> int:
    if args.window < 1 or args.layers < 1 or args.tokens < 1:
        raise ValueError(f"--window={args.window}, --layers={args.layers}, --tokens={args.tokens}: "
                         "allowed: integers >= 1")
    results = run_duality(args.window, args.layers, args.tokens, seed=args.seed)
    print(f"Residual stream duality: one local-attention operator, window {args.window}, "
          f"{args.layers} layers, {args.tokens} tokens\n")
    names = list(next(iter(results.values())))
    width = max(len(n) for n in names)
    print(f"{'identity':<{width}}  " + "  ".join(f"{dt:>12}" for dt in results))
    for name in names:
        print(f"{name:<{width}}  " + "  ".join(f"{results[dt][name]:>12.3e}" for dt in results))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("duality", help="show that the depth read and ShortSWA are one operator")
    parser.add_argument("--window", type=int, default=3, help="w = K (default 3)")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=_command)
