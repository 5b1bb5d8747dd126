"""Pipeline parallel training (`resstream train --parallel.pp=S` under torchrun): the trainer's
side of `resstream.parallel.pipeline`, composed with data parallel on a 2-D mesh.

* The WORLD_SIZE processes form a `DeviceMesh` of shape (WORLD_SIZE / S, S) named ("dp", "pp"):
  rank r is pipeline rank r % S of data-parallel replica r // S. Each replica runs the whole
  pipeline on its rows of the global batch (`data_parallel.rank_rows`). With several replicas
  each stage module is wrapped in DDP over its "dp" group; the pipelining engine then skips the
  reduction on every micro-batch's backward but the last.
* Every rank builds the whole model with the run's seed, so the stages start from the unsplit
  model's init, and keeps it: the parts outside its stages go stale while training and `sync`
  refreshes them before an evaluation or a checkpoint.
* The optim.grad_accum micro-batches of a step run in one schedule (micro-batch m's rows are
  pipeline micro-batches m * microbatches ... (m + 1) * microbatches - 1): the schedule's mean
  over equal micro-batches is the single-process step's mean loss and gradient.
* Checkpoints are the single-process format: the synchronised model's state dict and the
  optimizer state of every parameter, gathered to rank 0 under the unsplit model's names, so a
  pipeline checkpoint resumes on any layout and loads for inference in one process.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist

from resstream.errors import UserError
from resstream.parallel.data_parallel import Distributed
from resstream.parallel.pipeline import build_pipeline


def stages_per_rank(schedule: str) -> int:
    """The interleaved schedule runs two (virtual) stages on each process, the others one."""
    return 2 if schedule == "interleaved" else 1


def check_depth(parallel, n_layers: int) -> None:
    """Every stage needs at least one block."""
    per_rank = stages_per_rank(parallel.schedule)
    if parallel.pp * per_rank > n_layers:
        raise UserError(f"parallel.pp={parallel.pp} is invalid for model.n_layers={n_layers} "
                        f"(schedule {parallel.schedule!r}: {per_rank} stage(s) of at least one "
                        f"block per process); allowed: at most {max(1, n_layers // per_rank)}")


def check_microbatches(batch_size: int, dist_ctx: Distributed, parallel) -> None:
    """Each replica's rows of a micro-batch must split into equal pipeline micro-batches (so
    that the mean over them is the mean over the rows)."""
    rows = batch_size // dist_ctx.dp_size
    if rows % parallel.n_microbatches:
        raise UserError(f"parallel.microbatches={parallel.n_microbatches} is invalid with "
                        f"{rows} rows per data-parallel replica (data.batch_size={batch_size} / "
                        f"{dist_ctx.dp_size}); allowed: a divisor of {rows}")


class PipelineTraining:
    """This rank's stages of `model` on the run's 2-D mesh, and what the trainer does with them:
    a step, clipping, synchronising the whole model, gathering and loading checkpoints."""

    def __init__(self, model: torch.nn.Module, dist_ctx: Distributed, parallel, grad_accum: int,
                 device: torch.device):
        from torch.distributed.device_mesh import init_device_mesh

        self.model, self.pp, self.dp_size = model, parallel.pp, dist_ctx.dp_size
        self.is_first_replica = dist_ctx.dp_rank == 0
        mesh = init_device_mesh(device.type, (dist_ctx.dp_size, parallel.pp),
                                mesh_dim_names=("dp", "pp"))
        self.group, self.rank = mesh["pp"].get_group(), mesh.get_local_rank("pp")
        wrap = None
        if dist_ctx.dp_size > 1:
            wrap = functools.partial(_ddp, group=mesh["dp"].get_group(), device=device)
        n_stages = parallel.pp * stages_per_rank(parallel.schedule)
        self.pipe = build_pipeline(model, self.rank, n_stages, parallel.schedule,
                                   parallel.n_microbatches * grad_accum, group=self.group,
                                   wrap=wrap)
        self.full_optimizer: torch.optim.Optimizer | None = None
        self.layout = (f"pipeline parallel: {self.pipe.n_stages} stages on {parallel.pp} "
                       f"processes x {dist_ctx.dp_size} data-parallel replica(s), schedule "
                       f"{parallel.schedule!r}, {self.pipe.n_microbatches} micro-batches per step")

    def stage_optimizer(self, full: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """An optimizer like `full`, the unsplit model's (same class, groups and settings), over
        this rank's parameters only. `full` is kept, stateless, to load checkpoints through."""
        mine = {id(p) for p in self.pipe.parameters()}
        self.full_optimizer = full
        return type(full)([{**group, "params": [p for p in group["params"] if id(p) in mine]}
                           for group in full.param_groups])

    def step(self, inputs: torch.Tensor, targets: torch.Tensor, autocast=None) -> float:
        """One schedule over this replica's rows; returns the global batch's mean loss on every
        rank (the last stage of each replica knows its replica's: the other ranks add 0 to an
        all_reduce over all processes, divided by the replicas)."""
        with autocast or contextlib.nullcontext():
            loss = self.pipe.step(inputs, targets)
        total = torch.tensor([0.0 if loss is None else float(loss)], dtype=torch.float64,
                             device=inputs.device)
        dist.all_reduce(total)
        return float(total) / self.dp_size

    def clip_grad_norm_(self, max_norm: float) -> float:
        return self.pipe.clip_grad_norm_(max_norm)

    def sync(self) -> None:
        """The whole model on every rank takes the trained weights: each pipeline rank
        broadcasts the parameters it owns over its pipeline group (the replicas are equal)."""
        params = dict(self.model.named_parameters())
        for src in range(self.pp):
            owned = [params[name] for name, owner in sorted(self.pipe.owner.items())
                     if owner == src]
            if not owned:
                continue
            flat = torch.cat([p.detach().reshape(-1) for p in owned])
            dist.broadcast(flat, group=self.group, group_src=src)
            with torch.no_grad():
                for param, part in zip(owned, flat.split([p.numel() for p in owned])):
                    param.copy_(part.view_as(param))

    def gather_training_state(self, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """(model state dict, optimizer state dict keyed by parameter name) of the unsplit
        model on rank 0, as `checkpoint.gather_training_state` gives in one process; empty
        dicts elsewhere. A collective: every rank calls it."""
        self.sync()
        names = {id(p): name for name, p in self.pipe.named_parameters()}
        mine = {}
        if self.is_first_replica:  # one copy of each state: its owner's in replica 0
            for param, values in optimizer.state.items():
                if self.pipe.owner[names[id(param)]] == self.rank:
                    mine[names[id(param)]] = {key: value.detach().cpu() if torch.is_tensor(value)
                                              else value for key, value in values.items()}
        parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(mine, parts, dst=0)
        if parts is None:
            return {}, {}
        canonical = {id(p): name for name, p in self.model.named_parameters()}
        groups = [{**{key: value for key, value in group.items() if key != "params"},
                   "params": [canonical[id(p)] for p in full["params"]]}
                  for group, full in zip(optimizer.param_groups, self.full_optimizer.param_groups)]
        state = {name: values for part in parts for name, values in part.items()}
        model_state = {name: t.detach().cpu() for name, t in self.model.state_dict().items()}
        return model_state, {"state": state, "param_groups": groups}

    def load_training_state(self, checkpoint, optimizer: torch.optim.Optimizer) -> None:
        """A checkpoint of any layout: its weights into the whole model (every rank reads the
        files) and its optimizer state through the unsplit model's optimizer, whose state for
        this rank's parameters the stage optimizer then takes."""
        from resstream.train import checkpoint as ckpt

        full = self.full_optimizer
        ckpt.load_training_state(checkpoint, self.model, full)
        for group, full_group in zip(optimizer.param_groups, full.param_groups):
            group.update({key: value for key, value in full_group.items() if key != "params"})
        for param in self.pipe.parameters():
            if param in full.state:
                optimizer.state[param] = full.state[param]
        full.state.clear()


def _ddp(module: torch.nn.Module, group, device: torch.device) -> torch.nn.Module:
    """DDP over a data-parallel group for one stage module. A stage holds the whole depth
    operator, whose parameters for other stages' blocks get no gradient here: unused parameters
    are expected. Buffers are deterministic (no broadcast per forward)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, process_group=group,
                                   find_unused_parameters=True, broadcast_buffers=False)
