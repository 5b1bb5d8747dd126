"""Data parallel training under `torchrun`: DistributedDataParallel or FSDP2 (`fully_shard`),
applied to a `ResStreamLM` from outside, as torchtitan's `parallelize` does.

Nothing here is a communication layer of our own: process groups, DDP, FSDP2 and the state-dict
gathering of `torch.distributed.checkpoint.state_dict` are PyTorch's.

* `Distributed.from_environment` reads torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR/PORT) and starts the process group (gloo on CPU, NCCL on CUDA) with a timeout, so
  that a collective waiting for a dead or stuck rank ends every process with an error instead
  of a hang. One process (no WORLD_SIZE, or 1) gives a disabled context: every method is then
  the single-process identity, and the trainer runs exactly as before.
* `parallelize(model, dp, ...)` wraps the model: "ddp" with DistributedDataParallel (unused
  parameters, e.g. of an operator limited by `depth_layers`, are found by one probe step
  before wrapping), "fsdp" with `fully_shard` per block and on the root. Blocks keep their
  parameters gathered between forward and backward (`reshard_after_forward=False`): a block
  passes the depth operator's state object, not tensors, so FSDP2 cannot hook the backward of
  its outputs to gather them again (the ZeRO-2 trade: parameters sharded at rest and in the
  optimizer, gathered per block in the step).
* `rank_rows(batch, dist)` is this rank's share of the global batch: the global batch and its
  order are those of the single-process run with the same config. With pipeline stages
  (`parallel.pp` > 1) the share is its data-parallel replica's: rank r is replica r // pp and
  pipeline rank r % pp (the trainer's 2-D mesh, resstream.parallel.pipeline_training).
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from resstream.errors import UserError


@dataclass
class Distributed:
    """The process group of a run: rank, world size and the device this rank computes on;
    `pp` processes form one pipeline, so there are world_size / pp data-parallel replicas."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    dp: str = "none"
    pp: int = 1
    owns_group: bool = False  # this context started the process group (and so ends it)

    @property
    def dp_size(self) -> int:
        return self.world_size // self.pp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.pp

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, dp: str, timeout_s: float, device: torch.device,
                         pp: int = 1) -> "Distributed":
        """The context of this process: disabled for one process, else a started process group."""
        world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world_size % pp or (pp > 1 and world_size == 1):
            raise UserError(f"parallel.pp={pp} is invalid with WORLD_SIZE={world_size} processes; "
                            "allowed: a divisor of the number of processes (1: no pipeline)")
        if world_size == 1:
            return cls()
        if dp == "none" and world_size > pp:
            replicas = "" if pp == 1 else f" and parallel.pp={pp}"
            raise UserError(f"parallel.dp='none' is invalid with WORLD_SIZE={world_size} "
                            f"processes{replicas}; allowed: ddp or fsdp under torchrun")
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if dist.is_initialized():  # a study's group: its runs share it (resstream compare)
            return cls(rank, world_size, local_rank, dp, pp)
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as error:  # rendezvous failed or timed out
            raise UserError(f"rank {rank}: cannot join the process group of "
                            f"{world_size} processes within parallel.timeout_s="
                            f"{timeout_s:g} s: {_first_line(error)}") from None
        return cls(rank, world_size, local_rank, dp, pp, owns_group=True)

    def device(self, device: torch.device) -> torch.device:
        """One accelerator per process: cuda -> cuda:LOCAL_RANK."""
        if self.enabled and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

    def mean(self, value: float) -> float:
        """The mean of `value` over ranks (every rank gets it; identity for one process)."""
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(tensor)
        return float(tensor) / self.world_size

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    def _comm_device(self) -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def collective_error(error: BaseException, dist_ctx: Distributed, timeout_s: float) -> UserError:
    """One line for a rank that stopped on an error of the engine: most often a collective that
    failed because another process died or none answered in time."""
    return UserError(f"rank {dist_ctx.rank} of {dist_ctx.world_size} stopped: "
                     f"{_first_line(error)} (a collective fails when another process died or "
                     f"none answered within parallel.timeout_s={timeout_s:g} s)")


def rank_rows(batch: Tensor, dist_ctx: Distributed) -> Tensor:
    """This rank's contiguous share of the global batch's rows (its data-parallel replica's:
    the stages of one pipeline train on the same rows)."""
    if not dist_ctx.enabled:
        return batch
    share = batch.shape[0] // dist_ctx.dp_size
    return batch[dist_ctx.dp_rank * share:(dist_ctx.dp_rank + 1) * share]


def check_batch_divides(batch_size: int, dist_ctx: Distributed) -> None:
    if not dist_ctx.enabled or batch_size % dist_ctx.dp_size == 0:
        return
    if dist_ctx.pp == 1:
        raise UserError(f"data.batch_size={batch_size} is invalid with {dist_ctx.world_size} "
                        f"processes; allowed: a multiple of the number of processes")
    raise UserError(f"data.batch_size={batch_size} is invalid with {dist_ctx.dp_size} "
                    f"data-parallel replicas ({dist_ctx.world_size} processes / parallel.pp="
                    f"{dist_ctx.pp}); allowed: a multiple of {dist_ctx.dp_size}")


def parallelize(model: torch.nn.Module, dist_ctx: Distributed, device: torch.device,
                probe_len: int) -> torch.nn.Module:
    """`model` wrapped for data parallel training (unchanged for one process)."""
    if not dist_ctx.enabled:
        return model
    if dist_ctx.dp == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        unused = _has_unused_parameters(model, device, probe_len)
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=unused)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist_ctx.world_size,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=False)
    fully_shard(model, mesh=mesh)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The ResStreamLM inside a DDP wrapper (FSDP2 wraps in place)."""
    return getattr(model, "module", model)


def gradient_sync(model: torch.nn.Module, sync: bool):
    """A context for one micro-batch's backward: gradients are reduced across ranks only on the
    last micro-batch of an accumulated step."""
    if hasattr(model, "no_sync") and not sync:  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def full_norm(norm: Tensor) -> Tensor:
    """A gradient norm as a plain tensor (FSDP2 returns a DTensor over the mesh)."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def _has_unused_parameters(model: torch.nn.Module, device: torch.device, length: int) -> bool:
    """Whether some trainable parameter gets no gradient from a forward/backward (DDP must then
    be told, or its reducer waits for them forever). One probe step on a short sequence."""
    ids = torch.zeros(1, max(2, min(8, length)), dtype=torch.long, device=device)
    model(ids).float().sum().backward()
    unused = any(p.requires_grad and p.grad is None for p in model.parameters())
    model.zero_grad(set_to_none=True)
    return unused


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
