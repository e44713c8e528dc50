"""One training step: every micro-batch's forward and backward, then the optimizer step inside the backend.

Two small collectives a step, both left on the device: before the forwards, the global count of labelled tokens
(the loss scale) with the ranks' stop votes; after the last forward, the step's global loss, which the guard
judges before the last backward (guard.py). The loop reads them on the host once, after the step's work is
queued.
"""

from __future__ import annotations

import torch

from mellama_train.backends import Backend, collectives
from mellama_train.guard import StepGuard
from mellama_train.loss import labelled_tokens


def train_step(
    backend: Backend,
    micro_batches: list[dict[str, torch.Tensor]],
    guard: StepGuard,
    stop_requested: bool,
    num_sources: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward and backward every micro-batch; the optimizer steps inside the last `backend.step()`.

    Returns this rank's per-source loss sums and token counts, the step's global loss and the ranks' stop votes,
    all still on the device."""
    env = backend.env
    scale, stop_votes = step_reduce(micro_batches, env.world_size, env.device, stop_requested)
    sums = torch.zeros(num_sources, dtype=torch.float64, device=env.device)
    counts = torch.zeros_like(sums)
    step_loss = sums.new_zeros(())
    for i, batch in enumerate(micro_batches):
        loss_sum, batch_sums, batch_counts = backend.forward_loss(batch, num_sources)
        sums += batch_sums
        counts += batch_counts
        factor = scale
        if i == len(micro_batches) - 1:
            # The step's loss is known once its last forward is done. For a step the guard rejects, this last
            # backward is multiplied by NaN on every rank, so the backend discards the whole step (guard.py).
            step_loss = global_step_loss(sums, counts)
            factor = scale * guard.backward_factor(step_loss)
        backend.backward(loss_sum * factor.to(loss_sum.dtype))
        backend.step()  # optimizer + lr schedule step only on the last micro-batch
    return sums, counts, step_loss, stop_votes


def step_reduce(
    micro_batches: list[dict[str, torch.Tensor]], world_size: int, device: torch.device, stop_requested: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's first collective, before its forward passes: (loss scale, ranks that asked to stop).

    The scale turns a micro-batch's loss SUM into its share of the global-batch token mean (loss.py): the backend
    divides each backward by the accumulation steps and averages gradients over ranks. The stop count rides
    along so every rank learns of a peer's stop signal without another collective."""
    local = torch.tensor(
        [float(sum(labelled_tokens(b) for b in micro_batches)), float(stop_requested)], device=device
    )
    total = collectives.all_reduce_sum(local)
    return (len(micro_batches) * world_size) / total[:1].clamp(min=1.0), total[1]


def global_step_loss(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The step's loss over the whole global batch: one all-reduce of two numbers, on the device (no host
    sync). A non-finite loss on any rank makes it non-finite on every rank."""
    total = collectives.all_reduce_sum(torch.stack([sums.sum(), counts.sum()]))
    return total[0] / total[1].clamp(min=1.0)
