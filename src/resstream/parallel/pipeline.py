"""Pipeline parallelism on PyTorch's own engine (`torch.distributed.pipelining`), applied to a
`ResStreamLM` from outside: the model is split at block boundaries into stage modules, each
wrapped in a `PipelineStage`, and run by `ScheduleGPipe`, `Schedule1F1B` or
`ScheduleInterleaved1F1B` over micro-batches. Nothing here sends a tensor itself.

* Stage s owns a contiguous range of blocks (`split_layers`); stage 0 also the embedding, the
  last stage the final norm and LM head (the schedule applies the loss there). Every stage
  holds the whole depth operator: its parameters are few, and several operators build
  per-forward tables from all of them (pseudo-queries, hyper-connection coefficients).
* Between stages the depth operator's state travels as the stage's output tuple:
  `DepthOperator.stage_state(state, layer)` on the sending stage and `from_stage_state` on the
  receiving one (depth/base.py). The engine sends between adjacent stages only, so state that
  spans many layers (DenseFormer's kept outputs, AttnRes's sources) is relayed through every
  stage. Nothing in this module depends on which operator the model has.
* Parameters held by stages on more than one rank (the depth operator's, and a tied embedding
  on the first and last stage) get their gradients summed over the pipeline group with one
  `all_reduce` after the schedule, as Megatron-LM does for tied embeddings, so that every copy
  holds the unsplit model's gradient. Gradients are the mean over micro-batches (the mean loss).
* Parameter names are the unsplit model's (`blocks.5.attn.q_proj.weight` on the stage owning
  block 5), so the stages' state dicts together form the full model's (`full_state_dict`).
* Traffic is measured at the send: the stage's P2P send ops (`get_fwd_send_ops`,
  `get_bwd_send_ops`) are wrapped and the bytes of every tensor they send are counted
  (`Pipeline.traffic`); the bench compares them with `pipeline_payload`.

One stage per rank for "gpipe" and "1f1b"; "interleaved" puts n_stages / world_size stages on
each rank (stage s on rank s mod world_size). The process group must be initialised by the
caller (torchrun, or `resstream bench pipeline`, which spawns its own gloo group).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from resstream.cache import ForwardContext
from resstream.errors import UserError
from resstream.model import run_site

SCHEDULES = ("gpipe", "1f1b", "interleaved")


def split_layers(n_layers: int, n_stages: int) -> list[range]:
    """Contiguous block ranges, one per stage, as equal as possible (earlier stages take the
    extra block): 24 layers, 4 stages -> boundaries after blocks 5, 11, 17."""
    base, extra = divmod(n_layers, n_stages)
    ranges, start = [], 0
    for stage in range(n_stages):
        stop = start + base + (stage < extra)
        ranges.append(range(start, stop))
        start = stop
    return ranges


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy over a micro-batch, in float32 (as the trainer) or in
    float64 for a float64 model."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


class StageModule(nn.Module):
    """The blocks `layers` of a model (and the embedding / final norm and head when first /
    last), with the depth operator; the same module objects as the unsplit model's."""

    def __init__(self, model: nn.Module, layers: range, first: bool, last: bool):
        super().__init__()
        self.layers, self.first, self.last = layers, first, last
        if first:
            self.embed = model.embed
        # a ModuleDict keyed by the block index keeps the unsplit names: blocks.<i>.<...>
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in layers})
        self.depth = model.depth
        if last:
            self.norm = model.norm
            self.lm_head = model.lm_head

    def forward(self, *inputs: Tensor) -> Tensor | tuple[Tensor, ...]:
        # every stage tensor has [B, T, ...] first (stage 0: the token ids [B, T])
        n_tokens = inputs[0].shape[1]
        ctx = ForwardContext(torch.arange(n_tokens, device=inputs[0].device))
        if self.first:
            state = self.depth.init_state(self.embed(inputs[0]), ctx)
        else:
            state = self.depth.from_stage_state(inputs, self.layers.start - 1)
        for block in self.blocks.values():
            for site, sublayer in zip(block.sites, block.sublayers()):
                state = run_site(self.depth, state, site, sublayer, ctx)
        if self.last:
            return self.lm_head(self.norm(self.depth.finalize(state, ctx)))
        # contiguous: the engine sends each output as it is
        return tuple(t.contiguous() for t in self.depth.stage_state(state, self.layers.stop - 1))


@dataclass
class Traffic:
    """Bytes this rank's stages sent, counted at the send ops the engine issues: forward
    activations by boundary (after stage s: boundary s) and backward gradients by boundary
    (stage s sends over boundary s - 1), and the micro-batches they cover."""

    forward: dict[int, int] = field(default_factory=dict)
    backward: dict[int, int] = field(default_factory=dict)
    microbatches: int = 0

    def reset(self) -> None:
        self.forward.clear()
        self.backward.clear()
        self.microbatches = 0


def _count_sends(stage, traffic: Traffic) -> None:
    """Wrap the stage's send-op builders so that every tensor they send is counted."""
    index = stage.stage_index
    fwd_ops, bwd_ops = stage.get_fwd_send_ops, stage.get_bwd_send_ops

    def counted(ops, table: dict, boundary: int):
        sent = sum(op.tensor.numel() * op.tensor.element_size() for op in ops)
        if ops:
            table[boundary] = table.get(boundary, 0) + sent
        return ops

    stage.get_fwd_send_ops = lambda chunk: counted(fwd_ops(chunk), traffic.forward, index)
    stage.get_bwd_send_ops = lambda chunk: counted(bwd_ops(chunk), traffic.backward, index - 1)


class Pipeline:
    """This rank's stages of a pipelined model and the schedule that runs them."""

    def __init__(self, model: nn.Module, stage_indices: list[int], n_stages: int,
                 schedule: str, n_microbatches: int, loss_fn: Callable, group=None,
                 wrap: Callable[[nn.Module], nn.Module] | None = None):
        self.n_stages, self.n_microbatches, self.schedule_name = n_stages, n_microbatches, schedule
        self.layers = split_layers(model.config.n_layers, n_stages)
        self.group = group
        world = dist.get_world_size(group)
        names = _canonical_names(model)
        self.dtype, self.device = next(model.parameters()).dtype, next(model.parameters()).device
        self.modules = [StageModule(model, self.layers[s], s == 0, s == n_stages - 1)
                        for s in stage_indices]
        # which ranks hold each parameter: shared ones get their gradients summed
        holders: dict[str, set[int]] = {}
        for s, layers in enumerate(self.layers):
            module = StageModule(model, layers, s == 0, s == n_stages - 1)
            for p in module.parameters():
                holders.setdefault(names[id(p)], set()).add(s % world)
        self.params = {names[id(p)]: p for m in self.modules for p in m.parameters()}
        self.shared = [(name, model.get_parameter(name).shape) for name in sorted(holders)
                       if len(holders[name]) > 1]
        # the lowest rank holding a parameter owns it: it alone counts it in the gradient norm
        # (and sends it when pipeline_training synchronises the whole model)
        self.owner = {name: min(ranks) for name, ranks in holders.items()}
        from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe,
                                                  ScheduleInterleaved1F1B)

        # `wrap` (e.g. DDP over a data-parallel group) goes around the stage module itself:
        # the engine then defers its gradient reduction to the last micro-batch
        wrap = wrap or (lambda module: module)
        self.stages = [PipelineStage(wrap(m), s, n_stages, self.device, group=group)
                       for m, s in zip(self.modules, stage_indices)]
        self.traffic = Traffic()
        for stage in self.stages:
            _count_sends(stage, self.traffic)
        # scale_grads=False: a shared module on two local stages would be scaled twice;
        # `step` divides each parameter's gradient once
        if schedule == "interleaved":
            self.schedule = ScheduleInterleaved1F1B(self.stages, n_microbatches, loss_fn=loss_fn,
                                                    scale_grads=False)
        else:
            cls = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
            self.schedule = cls(self.stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False)

    @property
    def is_last(self) -> bool:
        return any(m.last for m in self.modules)

    def parameters(self) -> list[nn.Parameter]:
        """This rank's parameters, each once (give them to the optimizer)."""
        return list(self.params.values())

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(unsplit name, parameter) of this rank's parameters."""
        return sorted(self.params.items())

    def state_dict(self) -> dict[str, Tensor]:
        """This rank's part of the unsplit model's state dict (same keys)."""
        merged = {}
        for module in self.modules:
            merged.update(module.state_dict())
        return merged  # StageModule keeps the unsplit names

    def step(self, inputs: Tensor, targets: Tensor) -> Tensor | None:
        """One forward and backward of the batch `inputs` [B, T] (token ids) against `targets`
        [B, T] over the micro-batches. Call it with no gradients (`zero_grad()` before): it
        leaves in .grad the unsplit model's gradient of the mean loss, on every rank. Returns
        the mean loss on the rank holding the last stage, None elsewhere."""
        if inputs.shape[0] % self.n_microbatches:
            raise UserError(f"batch size {inputs.shape[0]} is not divisible by n_microbatches="
                            f"{self.n_microbatches}; allowed: a multiple of {self.n_microbatches}")
        losses: list[Tensor] = []
        has_first = any(m.first for m in self.modules)
        args = (inputs,) if has_first else ()
        self.schedule.step(*args, target=targets if self.is_last else None, losses=losses)
        self.traffic.microbatches += self.n_microbatches
        for p in self.params.values():
            if p.grad is not None:
                p.grad.div_(self.n_microbatches)
        self._sum_shared_grads()
        if not self.is_last:
            return None
        return torch.stack([loss.detach() for loss in losses]).mean()

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Scale every rank's gradients by min(1, max_norm / norm) as `clip_grad_norm_` does on
        the unsplit model, and return the norm: the global one over all stages, each parameter
        counted once (on its owner), so shared ones (the depth operator's, a tied embedding)
        are not counted on every rank that holds them."""
        rank = dist.get_rank(self.group)
        held = [(name, p.grad) for name, p in self.params.items() if p.grad is not None]
        owned = [grad.detach().float().pow(2).sum() for name, grad in held
                 if self.owner[name] == rank]
        squares = torch.stack(owned).sum() if owned else torch.zeros((), device=self.device)
        dist.all_reduce(squares, group=self.group)
        norm = squares.sqrt()
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for _, grad in held:
            grad.mul_(scale.to(grad.dtype))
        return float(norm)

    def _sum_shared_grads(self) -> None:
        """Sum the gradients of parameters held on several ranks (one flat all_reduce; a
        gradient that no rank has stays None, as in the unsplit model)."""
        if not self.shared:
            return
        parts, has_grad = [], []
        like = {"dtype": self.dtype, "device": self.device}
        for name, shape in self.shared:
            p = self.params.get(name)
            grad = None if p is None else p.grad
            parts.append(torch.zeros(shape.numel(), **like) if grad is None else grad.reshape(-1))
            has_grad.append(float(grad is not None))
        buffer = torch.cat(parts + [torch.tensor(has_grad, **like)])
        dist.all_reduce(buffer, group=self.group)
        sizes = [shape.numel() for _, shape in self.shared]
        *sums, counts = buffer.split(sizes + [len(sizes)])
        for (name, shape), summed, count in zip(self.shared, sums, counts.tolist()):
            p = self.params.get(name)
            if p is not None:
                p.grad = summed.view(shape).clone() if count else None


def _canonical_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> its name in the unsplit model (a tied weight: its first name)."""
    return {id(p): name for name, p in reversed(list(model.named_parameters(remove_duplicate=False)))}


def build_pipeline(model: nn.Module, stage_rank: int, n_stages: int, schedule: str = "1f1b",
                   n_microbatches: int | None = None, loss_fn: Callable | None = None,
                   group=None, wrap: Callable[[nn.Module], nn.Module] | None = None) -> Pipeline:
    """Split `model` (a ResStreamLM, the same weights on every rank: build it with the same
    seed) into `n_stages` stages and return this rank's `Pipeline`. `stage_rank` is this
    process's rank in the pipeline group (initialised by the caller); "gpipe" and "1f1b" need
    n_stages == world size, "interleaved" a multiple of it (at least 2 stages per rank).
    `n_microbatches` defaults to n_stages; `loss_fn(logits, targets)` to `lm_loss`; `wrap`
    wraps each stage module before the engine takes it (DDP over a data-parallel group)."""
    n_layers = model.config.n_layers
    if schedule not in SCHEDULES:
        raise UserError(f"schedule={schedule!r} is unknown; allowed: {', '.join(SCHEDULES)}")
    if not isinstance(n_stages, int) or not 2 <= n_stages <= n_layers:
        raise UserError(f"n_stages={n_stages} is invalid; allowed: 2..n_layers={n_layers} "
                        "(one block at least per stage)")
    n_microbatches = n_stages if n_microbatches is None else n_microbatches
    if not isinstance(n_microbatches, int) or n_microbatches < 1:
        raise UserError(f"n_microbatches={n_microbatches} is invalid; allowed: an integer >= 1")
    if not dist.is_initialized():
        raise UserError("build_pipeline needs an initialised process group; allowed: call it "
                        "under torchrun or after torch.distributed.init_process_group")
    world = dist.get_world_size(group)
    if schedule == "interleaved":
        if n_stages % world or n_stages // world < 2:
            raise UserError(f"n_stages={n_stages} does not suit the interleaved schedule on "
                            f"{world} ranks; allowed: a multiple of {world} that is at least "
                            f"{2 * world}")
    elif n_stages != world:
        raise UserError(f"n_stages={n_stages} does not match the {world} ranks of the group; "
                        f"allowed: {world} (one stage per rank for {schedule!r})")
    if not 0 <= stage_rank < world:
        raise UserError(f"stage_rank={stage_rank} is invalid; allowed: 0..{world - 1}")
    stage_indices = list(range(stage_rank, n_stages, world))
    return Pipeline(model, stage_indices, n_stages, schedule, n_microbatches,
                    loss_fn or lm_loss, group, wrap)


# ---------------------------------------------------------------- local process groups
def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _local_worker(fn, rank: int, world_size: int, port: int, queue, args: tuple,
                  timeout_s: float) -> None:
    import datetime
    import traceback

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        result = fn(rank, world_size, *args)
        queue.put((rank, True, result))
    except BaseException:  # noqa: BLE001 -- reported to the parent, which raises it
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_local(fn: Callable, world_size: int, args: tuple = (), timeout_s: float = 600.0) -> list:
    """`fn(rank, world_size, *args)` in `world_size` spawned local processes joined in a gloo
    process group (one torch thread each); returns their results by rank. A failing rank's
    traceback is raised here as RuntimeError; every process is ended before this returns,
    also on failure or after `timeout_s`. `fn` and its results must be picklable."""
    import multiprocessing
    import queue as queues
    import time

    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    processes = [context.Process(target=_local_worker, daemon=True,
                                 args=(fn, rank, world_size, port, results, args, timeout_s))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout_s
    by_rank: dict[int, object] = {}
    try:
        while len(by_rank) < world_size:
            try:
                rank, ok, value = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queues.Empty:
                raise RuntimeError(f"local process group timed out after {timeout_s:.0f} s "
                                   f"(ranks done: {sorted(by_rank)})") from None
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            by_rank[rank] = value
    finally:
        for process in processes:
            process.join(timeout=5 if len(by_rank) == world_size else 0.5)
            if process.is_alive():
                process.kill()
                process.join()
    return [by_rank[rank] for rank in range(world_size)]
