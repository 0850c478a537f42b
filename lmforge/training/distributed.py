"""Multi-process training on torch.distributed, started by `torchrun --nproc_per_node=N script.py`.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; `setup()` joins the process group (gloo on CPU, NCCL
on CUDA) and pins each process to its GPU. A single process (no torchrun) needs none of this and
every helper below degrades to the obvious single-process answer.

The FSDP, DDP and distributed-checkpoint modules of torch are imported inside the helpers that need
them: only multi-process runs use them, and importing them adds about a second to every start.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lmforge.nn import TransformerBlock


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def setup(device: torch.device) -> World:
    """Join the process group torchrun describes (once per process); a plain run is World(0, 1, 0)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
        # the group this process joined is left at exit: a group still alive when the interpreter tears down
        # can abort the process ("terminate called without an active exception", seen with gloo + FSDP)
        atexit.register(_leave)
    return World(rank, size, local_rank)


def _leave() -> None:
    """Destroy the default process group if it is still there (the program may have destroyed it itself)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def process_device(device: torch.device) -> torch.device:
    """Each process of a multi-GPU run uses the GPU of its local rank."""
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def wrap(model: nn.Module, world: World, device: torch.device, fsdp: bool) -> nn.Module:
    """DDP (each process holds the whole model; gradients are averaged) or FSDP2's fully_shard
    (parameters, gradients and optimizer state sharded across processes)."""
    if not world.distributed:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        blocks = _blocks(model)
        for block in blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The Transformer blocks (sharded one by one, so only one block is gathered at a time)."""
    return [m for m in model.modules() if isinstance(m, TransformerBlock)]


def all_reduce_sum(values: list[float], device: torch.device, world: World) -> list[float]:
    """Element-wise sum of `values` over all processes."""
    if not world.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj: Any, world: World) -> Any:
    """Rank 0's `obj` on every process."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any, world: World) -> list[Any]:
    """Every process's `obj`, in rank order, on every process."""
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def full_state_dict(model: nn.Module, world: World, fsdp: bool) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict on rank 0 (None elsewhere); FSDP shards are gathered first."""
    if not (world.distributed and fsdp):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, world: World, fsdp: bool
) -> dict[str, Any]:
    """The optimizer's whole state dict (FSDP shards gathered to full tensors on the CPU)."""
    if not (world.distributed and fsdp):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
