"""`resstream bench train`: our `standard` training step beside a plain GPT's, at equal size,
measured side by side in one run, and both as a fraction of this machine's fp32 matmul rate.

The plain GPT is written here from nanoGPT's equations (nanoGPT's model file is not a
dependency): learned position embeddings, pre-LayerNorm without biases, causal SDPA attention,
a 4x GELU MLP, tied embeddings. At d=256, 6 layers, T=256 and a 256-token vocabulary it has
4.85M parameters against 4.89M for `standard` (RMSNorm, RoPE, SwiGLU at 8/3 d). Both train with
AdamW on the same batch; the timed steps alternate between the two models.

FLOPs per step are counted by torch.utils.flop_counter.FlopCounterMode over one forward and
backward of each model (matrix products and attention, as torch counts them), so the rate is
what the step achieves in useful arithmetic. The reference rate is a large fp32 matmul timed in
the same run. `--profile` adds each model's most expensive ops (torch.profiler), which is where
a gap between the two steps comes from.
"""
from __future__ import annotations

import argparse
import math
import statistics

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from resstream.bench.timing import format_table, print_result, seconds_per_call, set_threads
from resstream.config import ModelConfig
from resstream.errors import UserError
from resstream.hardware import parse_device
from resstream.smoke import smoke_args


# ------------------------------------------------------------------------ the plain GPT
class PlainBlock(nn.Module):
    """x + Attn(LN(x)), then x + MLP(LN(x)): nanoGPT's block, bias=False."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.fc, self.out = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for z in self.qkv(self.ln_1(x)).split(d, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln_2(x))))


class PlainGPT(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, max_len: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(PlainBlock(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d, bias=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.t()  # tied head


# ------------------------------------------------------------------------ measurement
def _step(model, optimizer, ids, targets) -> None:
    optimizer.zero_grad(set_to_none=True)
    logits = model(ids)
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    optimizer.step()


def step_flops(model, ids, targets) -> int:
    """FLOPs of one forward + backward, as torch's flop counter counts them."""
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(model(ids).flatten(0, 1), targets.flatten()).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul_rate(device, size: int, repeats: int) -> float:
    """FLOP/s of a size^3 fp32 matrix product (the machine's reference rate), best of repeats."""
    a, b = (torch.randn(size, size, device=device) for _ in range(2))
    a @ b  # warm-up
    best = min(seconds_per_call(lambda: a @ b) for _ in range(repeats))
    return 2 * size ** 3 / best


def top_ops(model, optimizer, ids, targets, count: int = 8) -> list[tuple[str, float]]:
    """(op, self CPU ms) of the `count` most expensive ops of one training step."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _step(model, optimizer, ids, targets)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [(e.key, e.self_cpu_time_total / 1000) for e in events[:count]]


def build_models(shape: dict, device) -> dict[str, nn.Module]:
    from resstream.model import ResStreamLM

    torch.manual_seed(0)
    ours = ResStreamLM(ModelConfig(vocab_size=shape["vocab"], d_model=shape["d_model"],
                                   n_layers=shape["n_layers"], n_heads=shape["n_heads"],
                                   max_seq_len=shape["seq_len"])).to(device)
    plain = PlainGPT(shape["vocab"], shape["d_model"], shape["n_layers"], shape["n_heads"],
                     shape["seq_len"]).to(device)
    return {"standard (resstream)": ours, "plain GPT (nanoGPT's equations)": plain}


def run_benchmark(shape: dict, repeats: int, device, profile: bool) -> dict:
    models = build_models(shape, device)
    generator = torch.Generator().manual_seed(0)
    size = (shape["batch_size"], shape["seq_len"])
    ids = torch.randint(0, shape["vocab"], size, generator=generator).to(device)
    targets = torch.randint(0, shape["vocab"], size, generator=generator).to(device)
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    flops = {name: step_flops(m, ids, targets) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for name, model in models.items():  # warm-up (and the AdamW state)
        _step(model, optimizers[name], ids, targets)
    for r in range(repeats):
        order = list(models) if r % 2 == 0 else list(models)[::-1]
        for name in order:
            times[name].append(seconds_per_call(
                lambda name=name: _step(models[name], optimizers[name], ids, targets)))
    rate = matmul_rate(device, shape["gemm"], 5)
    rows = []
    for name, model in models.items():
        median = statistics.median(times[name])
        rows.append({"model": name, "params": sum(p.numel() for p in model.parameters()),
                     "step_ms": 1000 * median, "min_ms": 1000 * min(times[name]),
                     "step_flops": flops[name], "flops_per_s": flops[name] / median,
                     "gemm_fraction": flops[name] / median / rate})
    ours, plain = rows
    result = {"setup": {**shape, "repeats": repeats, "device": str(device),
                        "threads": torch.get_num_threads(), "torch": torch.__version__,
                        "gemm_flops_per_s": rate},
              "rows": rows, "ratio": ours["step_ms"] / plain["step_ms"]}
    if profile:
        result["profile"] = {name: top_ops(m, optimizers[name], ids, targets)
                             for name, m in models.items()}
    return result


GOAL_RATIO = 1.0  # our step at most as slow as the plain GPT's
GOAL_FRACTION = 0.60  # of the machine's fp32 matmul rate


def to_markdown(result: dict) -> str:
    s = result["setup"]
    lines = [f"Training step (forward + backward + AdamW), d={s['d_model']}, {s['n_layers']} "
             f"layers, T={s['seq_len']}, batch {s['batch_size']}, {s['device']} "
             f"({s['threads']} threads), median of {s['repeats']} alternating repeats; "
             f"reference: {s['gemm']}^3 fp32 matmul at {s['gemm_flops_per_s'] / 1e9:.1f} GFLOP/s "
             "in the same run.", ""]
    rows = [[r["model"], f"{r['params'] / 1e6:.2f}M", f"{r['step_ms']:.1f} ({r['min_ms']:.1f})",
             f"{r['step_flops'] / 1e9:.2f}", f"{r['flops_per_s'] / 1e9:.1f}",
             f"{100 * r['gemm_fraction']:.0f}%"] for r in result["rows"]]
    lines.append(format_table(["model", "params", "step ms median (min)", "GFLOP/step",
                               "GFLOP/s", "of matmul rate"], rows))
    ours = result["rows"][0]
    goals = [["standard step <= plain GPT step", f"{result['ratio']:.2f}x",
              "yes" if result["ratio"] <= GOAL_RATIO else "NO"],
             [f"standard >= {GOAL_FRACTION:.0%} of the matmul rate",
              f"{ours['gemm_fraction']:.0%}",
              "yes" if ours["gemm_fraction"] >= GOAL_FRACTION else "NO"]]
    lines += ["", format_table(["goal", "measured", "met"], goals)]
    for name, ops in result.get("profile", {}).items():
        lines += ["", f"{name}: most expensive ops of one step (self CPU ms)", "",
                  format_table(["op", "self ms"], [[op, f"{ms:.1f}"] for op, ms in ops])]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    smoke_args(args, "bench train", quick=True)  # RESSTREAM_SMOKE: seconds
    if args.quick:
        shape = dict(d_model=32, n_layers=2, n_heads=2, seq_len=16, batch_size=2, gemm=128)
        args.repeats = 2
    else:
        shape = dict(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                     seq_len=args.seq_len, batch_size=args.batch_size, gemm=args.gemm)
    for key, value in {**shape, "repeats": args.repeats}.items():
        if value < 1:
            raise UserError(f"--{key.replace('_', '-')}={value} is invalid; allowed: an integer >= 1")
    if shape["d_model"] % shape["n_heads"]:
        raise UserError(f"--d-model={shape['d_model']} is invalid with --n-heads="
                        f"{shape['n_heads']}; allowed: a multiple of the head count")
    set_threads(args.threads)
    shape["vocab"] = 256
    result = run_benchmark(shape, args.repeats, parse_device(args.device), args.profile)
    print_result(result, args.format, to_markdown)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="our baseline training step vs a plain GPT, "
                                                 "and both vs the machine's matmul rate",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-layers", type=int, default=6)
    parser.add_argument("--n-heads", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--gemm", type=int, default=1024, help="size of the reference matmul")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per model (median)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--profile", action="store_true",
                        help="also list each model's most expensive ops (torch.profiler)")
    parser.add_argument("--format", choices=("markdown", "json"), default="markdown")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny shapes, 2 repeats")
    parser.set_defaults(func=run)
