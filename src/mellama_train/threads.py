"""How many threads each rank's torch uses for host-side work.

DeepSpeed's launcher sets no thread count, so every rank starts with torch's default, all the node's cores: on
CPU ranks that is N ranks x all cores fighting over the same cores (2 ranks x 2 threads on 2 cores measured 8-15%
slower than 1 thread each, issue 20), and on GPU ranks the data pipeline's tensor work and the tokenizer's thread
pool oversubscribe the node the same way. torchrun sets OMP_NUM_THREADS=1; we give each rank its share of the
cores instead, unless the user set OMP_NUM_THREADS (slurm/launch.sh sets it from --cpus-per-task)."""

from __future__ import annotations

import os
from typing import Any

import torch


def local_ranks() -> int:
    """Ranks on this node, as the launcher says: torchrun's LOCAL_WORLD_SIZE, DeepSpeed's LOCAL_SIZE."""
    for var in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def _pinned(usable: set[int]) -> bool:
    """True when this rank was bound to its own cores (numactl, taskset, SLURM's --cpu-bind): its affinity is
    narrower than its launcher's. A container's or job's cpuset narrows the launcher too, and is shared."""
    try:
        return usable < os.sched_getaffinity(os.getppid())
    except OSError:  # the parent is gone or not ours to read: no evidence of binding
        return False


def set_rank_threads() -> dict[str, Any]:
    """Sets this rank's torch threads (and the tokenizer's pool) to its share of the cores; returns what it set
    and why, for the run record."""
    if os.environ.get("OMP_NUM_THREADS"):
        return {
            "torch_threads": torch.get_num_threads(),
            "why": f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}",
        }
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    ranks = local_ranks()
    if _pinned(usable):
        share, why = len(usable), f"{len(usable)} cores this rank is bound to"
    else:
        share, why = max(1, len(usable) // ranks), f"{len(usable)} usable cores / {ranks} local ranks"
    torch.set_num_threads(share)
    # HF tokenizers' Rust pool reads this when it first starts (the tokenizer is loaded after this).
    os.environ.setdefault("RAYON_NUM_THREADS", str(share))
    return {"torch_threads": share, "why": why}
