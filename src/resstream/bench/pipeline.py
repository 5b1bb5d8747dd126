"""`resstream bench pipeline`: the cross-stage traffic and step time of every registered depth
operator and local mixer under pipeline parallelism (torch.distributed.pipelining), measured in
one local gloo process group that this command spawns (CPU, one torch thread per process).

Model: 24 blocks split into 4 stages (boundaries after blocks 5, 11, 17), width 64, 4 heads,
T = 32, batch 8 in 4 micro-batches, 1F1B (flags change all of these). Every variant runs its
default options (mixers: on `standard`); depth_swa at full depth (no window).

Traffic is measured at the send: the engine's P2P send ops of every stage are wrapped and the
bytes of each tensor sent are counted, per boundary and direction, over the timed steps, then
divided by the micro-batches run. The formula is `pipeline_payload(l)` d-vectors per token at
the boundary after block l, in bytes: vectors x micro-batch x T x d x 4 (float32). The backward
pass sends the gradients of the same tensors, so its bytes equal the forward's.

Step time: every rank waits at a barrier, runs one pipeline step (forward, loss, backward and
the gradient sum of the shared parameters) and waits at a barrier again; median over the
repeats, whose variants run interleaved (repeat r runs every variant once), so that a slow
phase of a shared machine hits all alike. On a machine with fewer cores than processes the
stages time-share the cores: the ratios then say more than the milliseconds.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from resstream.bench.timing import format_table, print_result
from resstream.config import ModelConfig
from resstream.errors import UserError
from resstream.registry import list_depth_operators, list_local_mixers
from resstream.smoke import smoke_args

ELEMENT_BYTES = 4  # float32


def variant_config(base: ModelConfig, name: str) -> ModelConfig:
    """A variant by name: a depth operator, or a local mixer on `standard`."""
    if name in list_local_mixers():
        return base.replace(local_mixer=name)
    return base.replace(depth=name)


def choose_variants(requested: str | None) -> list[str]:
    known = list_depth_operators() + list_local_mixers()
    if not requested:
        return ["standard"] + [n for n in known if n != "standard"]
    names = [n.strip() for n in requested.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"--operators names unknown operator(s) or mixer(s) {', '.join(unknown)}; "
                        f"allowed: {', '.join(known)}")
    return ["standard"] + [n for n in names if n != "standard"]


def _measure(rank: int, world: int, base: ModelConfig, names: list[str], n_stages: int,
             schedule: str, batch: int, microbatches: int, repeats: int) -> dict:
    """One rank's part: per variant, the bytes its stages sent per boundary and micro-batch
    and the step times (the same on every rank: barriers around each step)."""
    import torch.distributed as dist

    from resstream.model import ResStreamLM
    from resstream.parallel.pipeline import build_pipeline

    generator = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, base.vocab_size, (batch, base.max_seq_len), generator=generator)
    targets = torch.randint(0, base.vocab_size, (batch, base.max_seq_len), generator=generator)
    pipes, out = {}, {}
    for name in names:
        torch.manual_seed(0)
        model = ResStreamLM(variant_config(base, name))
        pipe = build_pipeline(model, rank, n_stages, schedule=schedule, n_microbatches=microbatches)
        pipe.step(inputs, targets)  # warm-up: shape inference and first-step allocations
        pipe.traffic.reset()
        pipes[name] = pipe
        out[name] = {"times": [], "payload": [model.depth.pipeline_payload(r.stop - 1)
                                             for r in pipe.layers[:-1]]}
    for _ in range(repeats):
        for name, pipe in pipes.items():
            for p in pipe.parameters():
                p.grad = None
            dist.barrier()
            start = time.perf_counter()
            pipe.step(inputs, targets)
            dist.barrier()
            out[name]["times"].append(time.perf_counter() - start)
    for name, pipe in pipes.items():
        traffic = pipe.traffic
        out[name]["forward"] = {b: n / traffic.microbatches for b, n in traffic.forward.items()}
        out[name]["backward"] = {b: n / traffic.microbatches for b, n in traffic.backward.items()}
    return out


def run_benchmark(base: ModelConfig, names: list[str], n_stages: int, processes: int,
                  schedule: str, batch: int, microbatches: int, repeats: int) -> dict:
    from resstream.parallel.pipeline import run_local, split_layers

    per_rank = run_local(_measure, processes, (base, names, n_stages, schedule, batch,
                                               microbatches, repeats), timeout_s=1800)
    boundaries = [r.stop - 1 for r in split_layers(base.n_layers, n_stages)[:-1]]
    tokens = batch // microbatches * base.max_seq_len
    rows = []
    for name in names:
        forward, backward = {}, {}
        for result in per_rank:
            forward.update(result[name]["forward"])
            backward.update(result[name]["backward"])
        payload = per_rank[0][name]["payload"]
        rows.append({
            "variant": name,
            "boundaries": boundaries,
            "formula": [formula for formula, _ in payload],
            "formula_vectors": [vectors for _, vectors in payload],
            "formula_bytes": [vectors * tokens * base.d_model * ELEMENT_BYTES for _, vectors in payload],
            "forward_bytes": [forward.get(i, 0.0) for i in range(len(boundaries))],
            "backward_bytes": [backward.get(i, 0.0) for i in range(len(boundaries))],
            "step_s": statistics.median(per_rank[0][name]["times"]),
        })
    standard = rows[0]
    for row in rows:
        row["matches_formula"] = row["forward_bytes"] == row["formula_bytes"] == row["backward_bytes"]
        row["traffic_ratio"] = sum(row["forward_bytes"]) / sum(standard["forward_bytes"])
        row["time_ratio"] = row["step_s"] / standard["step_s"]
    config = {"n_layers": base.n_layers, "n_stages": n_stages, "processes": processes,
              "schedule": schedule, "d_model": base.d_model, "n_heads": base.n_heads,
              "seq_len": base.max_seq_len, "batch": batch, "microbatches": microbatches,
              "repeats": repeats, "torch": torch.__version__}
    return {"config": config, "rows": rows}


def to_markdown(result: dict) -> str:
    c = result["config"]
    lines = [f"pipeline: {c['n_layers']} layers in {c['n_stages']} stages on {c['processes']} "
             f"gloo processes ({c['schedule']}), d={c['d_model']}, T={c['seq_len']}, batch "
             f"{c['batch']} in {c['microbatches']} micro-batches; boundaries after blocks "
             f"{', '.join(map(str, result['rows'][0]['boundaries']))}; bytes per micro-batch "
             "per boundary, measured at the send", ""]
    headers = ["variant", "formula (d-vectors)", "forward bytes", "backward bytes", "= formula",
               "traffic vs standard", "step ms", "step vs standard"]

    def joined(values, unit=1):
        return " / ".join(f"{v / unit:,.0f}" for v in values)

    rows = [[r["variant"], joined(r["formula_vectors"]), joined(r["forward_bytes"]),
             joined(r["backward_bytes"]), "yes" if r["matches_formula"] else "NO",
             f"{r['traffic_ratio']:.2f}x", f"{1000 * r['step_s']:.1f}", f"{r['time_ratio']:.2f}x"]
            for r in result["rows"]]
    lines.append(format_table(headers, rows))
    lines += ["", "formula: pipeline_payload(l) at each boundary; = formula: forward and backward "
              "bytes both equal vectors x micro-batch tokens x d x 4; traffic: forward bytes summed "
              "over the boundaries; step: median pipeline step (all ranks, barrier to barrier)."]
    return "\n".join(lines)


def register(subparsers) -> None:
    parser = subparsers.add_parser("pipeline", help="cross-stage traffic and step time under "
                                   "pipeline parallelism", description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--processes", type=int, default=None,
                        help="gloo processes (default: --stages; interleaved: --stages / 2)")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--schedule", default="1f1b", help="gpipe, 1f1b or interleaved")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per variant (median)")
    parser.add_argument("--operators", default=None,
                        help="comma-separated operators and mixers (standard is always run)")
    parser.add_argument("--format", choices=("markdown", "json"), default="markdown")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 4 layers, 2 stages (interleaved: 4 on 2 processes), "
                        "d=32, T=8, batch 4, 1 repeat")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from resstream.parallel.pipeline import SCHEDULES

    smoke_args(args, "bench pipeline", quick=True)  # RESSTREAM_SMOKE: seconds
    if args.quick:
        interleaved = args.schedule == "interleaved"  # 2 stages on each of 2 processes
        args.layers, args.stages, args.d_model, args.n_heads = 4, 4 if interleaved else 2, 32, 4
        args.seq_len, args.batch, args.microbatches, args.repeats = 8, 4, 2, 1
        args.processes = None
    if args.schedule not in SCHEDULES:
        raise UserError(f"--schedule={args.schedule!r} is unknown; allowed: {', '.join(SCHEDULES)}")
    for flag in ("layers", "d_model", "n_heads", "seq_len", "batch", "microbatches", "repeats"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')}={getattr(args, flag)} is invalid; "
                            "allowed: an integer >= 1")
    if not 2 <= args.stages <= args.layers:
        raise UserError(f"--stages={args.stages} is invalid; allowed: 2..--layers={args.layers}")
    if args.batch % args.microbatches:
        raise UserError(f"--batch={args.batch} is not divisible by --microbatches="
                        f"{args.microbatches}; allowed: a multiple of {args.microbatches}")
    processes = args.processes or (args.stages // 2 if args.schedule == "interleaved" else args.stages)
    if args.schedule == "interleaved" and (args.stages % processes or args.stages < 2 * processes):
        raise UserError(f"--processes={processes} does not suit --stages={args.stages} with the "
                        "interleaved schedule; allowed: a divisor of --stages at most --stages / 2")
    if args.schedule != "interleaved" and processes != args.stages:
        raise UserError(f"--processes={processes} is invalid for {args.schedule!r}; allowed: "
                        f"--stages={args.stages} (one stage per process)")
    names = choose_variants(args.operators)
    base = ModelConfig(vocab_size=256, d_model=args.d_model, n_layers=args.layers,
                       n_heads=args.n_heads, max_seq_len=args.seq_len, local_window=8)
    result = run_benchmark(base, names, args.stages, processes, args.schedule, args.batch,
                           args.microbatches, args.repeats)
    print_result(result, args.format, to_markdown)
    return 0
