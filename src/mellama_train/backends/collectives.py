"""The collectives the loop, evaluation and checkpointing need, on torch.distributed alone.

Every function is a no-op (returns its input) without a process group or in a world of one, so the single-device
backend and the tools that run outside a launcher share the same code. Small tensors and small objects only: the
model's own traffic (ZeRO gathers, gradient reduction) is the backend's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a small tensor over ranks (a host sync on GPU: call it only when logging)."""
    if _distributed():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_reduce_min(values: torch.Tensor) -> torch.Tensor:
    """The element-wise smallest of a small tensor over ranks."""
    if _distributed():
        dist.all_reduce(values, op=dist.ReduceOp.MIN)
    return values


def all_reduce_max(value: int) -> int:
    """The largest of one integer over ranks (e.g. a batch count every rank must match)."""
    if not _distributed():
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    box = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return int(box.item())


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (small things: file digests, problems found)."""
    if not _distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
