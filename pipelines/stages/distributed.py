"""The workers of a stage as one job: their ranks, the collectives they call together, and
the model replicated (DDP, Ray Train's ``prepare_model``) or sharded (FSDP) over them."""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn


def world_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (a collective: every rank must call it)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce(values: torch.Tensor, op=None) -> torch.Tensor:
    """A copy of ``values`` summed (or reduced by ``op``) over every rank."""
    if world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=op or dist.ReduceOp.SUM)
    return values


@functools.cache
def host_group():
    """A process group over CPU tensors (gloo) for what ranks agree on every step: agreeing
    through NCCL would make each step wait for the GPU to finish the previous one. One per
    worker process, whatever the number of stages its group trains."""
    if world_size() == 1 or dist.get_backend() == dist.Backend.GLOO:
        return None
    return dist.new_group(backend=dist.Backend.GLOO)


def all_gather_ints(values: list[int]) -> torch.Tensor:
    """``values`` of every rank as a ``(world, len(values))`` int64 tensor (over the host group)."""
    mine = torch.tensor(values, dtype=torch.int64)
    if world_size() == 1:
        return mine[None]
    out = [torch.empty_like(mine) for _ in range(world_size())]
    dist.all_gather(out, mine, group=host_group())
    return torch.stack(out)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP's and torch.compile's wrappers (FSDP shards the model in place)."""
    model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return getattr(model, "_orig_mod", model)


def sharding_units(model: nn.Module) -> list[nn.Module]:
    """What ``parallelism: fsdp`` shards as one unit each: every outermost module whose class
    is a ``...Level`` or a ``...Block`` (a Swin level computes its blocks' position biases, so
    the level is the unit; a ViT's or a decoder's blocks stand alone); the rest is the root's."""
    names: list[str] = []
    units = []
    for name, module in model.named_modules():
        if not any(name.startswith(f"{unit}.") for unit in names) and type(module).__name__.endswith(("Level", "Block")):
            names.append(name)
            units.append(module)
    return units


def shard(model: nn.Module, device: torch.device) -> None:
    """Shard ``model`` over the workers in place (torch's ``fully_shard``, FSDP2): each of
    :func:`sharding_units` gathered for its forward and backward, then the rest.
    Every worker starts from rank 0's weights, as under DDP (each built its own, from its own seed)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    for tensor in model.state_dict().values():
        dist.broadcast(tensor, src=0)
    mesh = init_device_mesh(device.type, (world_size(),))
    for unit in sharding_units(model):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
