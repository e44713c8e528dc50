"""The backend protocol: what the loop, evaluation, checkpointing and export may ask of a backend, and DistEnv."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

LossParts = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(loss SUM over the batch's labelled tokens, per-source loss sums, per-source token counts); see loss.py."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: its rank among `world_size` data-parallel ranks and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class Backend(Protocol):
    """The verbs the loop trains through. Semantics every implementation keeps (DeepSpeed's):
    `backward` divides by the accumulation steps; `step` is called after every micro-batch and steps the
    optimizer and the lr schedule at accumulation ends; `grad_norm` is the norm before clipping; a step whose
    gradient norm is not finite is discarded (`step_applied` False) and still counts."""

    env: DistEnv

    @property
    def module(self) -> torch.nn.Module:
        """The model (PEFT-wrapped under LoRA), for its config and for saving."""
        ...

    def __call__(self, **inputs: torch.Tensor) -> Any:
        """The model's forward (logits); under ZeRO-3 a collective."""
        ...

    def forward_loss(self, batch: dict[str, torch.Tensor], num_sources: int) -> LossParts:
        """The batch's loss SUM and per-source sums and counts (loss.py); the backend picks how the output layer
        runs (whole, or in chunks on one device), so no loss setting crosses the loop."""
        ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None: ...

    def train(self) -> None: ...

    def eval(self) -> None: ...

    @property
    def lr(self) -> float: ...

    @property
    def grad_norm(self) -> float | None: ...

    @property
    def optimizer_steps(self) -> int: ...

    @property
    def step_applied(self) -> bool: ...

    @property
    def exportable(self) -> bool:
        """Whether `mellama-train export` can read this backend's checkpoints (each then carries a probe)."""
        ...

    def save(self, checkpoints_dir: str, tag: str) -> dict[str, Any]:
        """Collective: write this rank's files of checkpoint `tag`; {path: integrity.FileDigest}."""
        ...

    def load(self, checkpoints_dir: str, tag: str, reshape: bool = False) -> None:
        """Collective: restore checkpoint `tag`; `reshape`: it was written by another number of ranks (only when
        `reshapes`)."""
        ...

    @property
    def reshapes(self) -> bool:
        """Whether this backend's checkpoints can be loaded by another number of ranks than wrote them."""
        ...

    def saved_counters(self, step_dir: str, rank: int) -> dict[str, int] | None:
        """{"global_steps", "skipped_steps", "scheduler_steps"} of a checkpoint, read before loading it."""
        ...

    def read_file(self, path: str, mmap: bool = False) -> Any:
        """Weights-only unpickling of one of this backend's checkpoint files (plus the plain classes it writes)."""
        ...

    def trainable_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Collective: the trained parameters' full values on rank 0 (None elsewhere)."""
        ...

    def full_tensors(self) -> dict[str, torch.Tensor]:
        """The weights a model directory holds (exported_weights) as meta tensors of their full shapes and
        dtypes: the same on every rank, nothing gathered (what the export plans its shards from)."""
        ...

    def gathered_full(
        self, names: list[str]
    ) -> contextlib.AbstractContextManager[dict[str, torch.Tensor] | None]:
        """Collective context: the full values of these weights (full_tensors' names) on rank 0's host, None
        elsewhere; valid only inside the block (they may be the gathered buffers themselves, not copies)."""
        ...


class BackendMaker(Protocol):
    """The three moments a backend is involved in before training: joining the ranks, building the model
    (ZeRO-3 partitions it as it is built), and wrapping it with an optimizer and schedule."""

    ds_config: dict[str, Any]
    """The DeepSpeed JSON as resolved once the ranks have joined (for the run record); {} without DeepSpeed."""

    def start(self, timeout_minutes: int) -> DistEnv: ...

    def building_model(self) -> contextlib.AbstractContextManager[torch.device | None]:
        """Context the model is built in; yields the device to build it on (None: the backend places it)."""
        ...

    def wrap(
        self,
        model: torch.nn.Module,
        param_groups: list[dict[str, Any]],
        lr_lambda: Callable[[int], float],
        env: DistEnv,
    ) -> Backend: ...

    def release_model_construction(self) -> None:
        """Forget the construction context, so a model loaded later in this process is an ordinary one."""
        ...


def exported_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a model's state dict saves, by name: every parameter (a tied one once, under its first name, as
    save_pretrained keeps it) and every persistent buffer; the objects themselves (ZeRO-3 partitions included)."""
    weights: dict[str, torch.Tensor] = dict(module.named_parameters())
    for prefix, sub in module.named_modules():
        for key, buffer in sub._buffers.items():
            if buffer is not None and key not in sub._non_persistent_buffers_set:
                weights[f"{prefix}.{key}" if prefix else key] = buffer
    return weights
