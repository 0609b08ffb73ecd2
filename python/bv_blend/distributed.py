"""Process-group plumbing for torchrun: one process per device, gloo on CPU and nccl on CUDA.

A single process (no torchrun) is the same code with world_size 1, where every collective below
returns its input.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str | None = None) -> Context:
    """Join the process group torchrun describes in the environment (if any) and pick a device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        device = _cuda_device(device, local_rank)
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Context(rank, world_size, device)


def _cuda_device(device: torch.device, local_rank: int) -> torch.device:
    """`device` with an index (plain `cuda` means this process's GPU), checked to exist."""
    if not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was requested but no CUDA device is available "
                         f"(torch.cuda.is_available() is False); use device cpu")
    index = local_rank if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"device cuda:{index} was requested but only "
                         f"{torch.cuda.device_count()} CUDA device(s) are visible")
    return torch.device("cuda", index)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_gather(ctx: Context, tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's tensor along dim 0, in rank order (equal shapes required)."""
    if not ctx.enabled:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(ctx.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_sum(ctx: Context, tensor: torch.Tensor) -> torch.Tensor:
    if ctx.enabled:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def mean_over_ranks(ctx: Context, value: float) -> float:
    total = all_reduce_sum(ctx, torch.tensor([value], dtype=torch.float64, device=ctx.device))
    return float(total) / ctx.world_size


def any_rank(ctx: Context, flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (so that all stop together)."""
    return bool(all_reduce_sum(ctx, torch.tensor([int(flag)], device=ctx.device)))


def max_over_ranks(ctx: Context, value: int) -> int:
    """The largest `value` of all ranks, on every rank."""
    if not ctx.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=ctx.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor)


def gather_objects(ctx: Context, obj) -> list:
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: Context) -> None:
    if ctx.enabled:
        dist.barrier()
