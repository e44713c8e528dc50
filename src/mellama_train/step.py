"""One training step: every micro-batch's forward and backward, then the optimizer step inside the backend.

One small collective a step, left on the device: after the last forward, one all-reduce carries the step's
per-source loss sums and token counts (the global loss, which the guard judges before the last backward:
guard.py), the next step's labelled-token count (its loss scale: feed.py draws each step's batches the step
before), the ranks' stop votes and, on a logged step, the log window's counters (accounting.py). At 512 ranks
each small all-reduce is a latency-bound round trip on every step, so everything the step needs from its peers
travels together. The loop reads the result on the host once, after the step's work is queued.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mellama_train.backends import Backend, collectives
from mellama_train.guard import StepGuard

# The layout of the step's all-reduce, after the 2 * num_sources loss sums and counts.
NEXT_TOKENS, STOP_VOTES, EXTRA = 0, 1, 2


@dataclass
class StepResult:
    """A step's numbers, on the device until the loop reads `reduced` once."""

    sums: torch.Tensor
    """This rank's per-source loss sums (float64)."""
    counts: torch.Tensor
    """This rank's per-source labelled-token counts."""
    reduced: torch.Tensor
    """The all-reduce over ranks: per-source loss sums, per-source counts, then the ranks' own part (below)."""
    judged: torch.Tensor
    """The step's global loss as the guard judged it on the device (global_loss)."""
    num_sources: int

    def read(self) -> tuple[list[float], float]:
        """`reduced` and the judged loss, in the step's one host read. The loss is the device's own value, not
        recomputed on the host: a reduction in another order could land on the other side of the spike limit,
        and the guard would then see an applied step it rejects."""
        values = torch.cat([self.reduced, self.judged.view(1).to(self.reduced.dtype)]).tolist()
        return values[:-1], values[-1]

    def tail(self, values: list[float]) -> list[float]:
        """What the loop added: [next step's labelled tokens, stop votes, then its log window's counters]."""
        return values[2 * self.num_sources :]


def train_step(
    backend: Backend,
    micro_batches: list[dict[str, torch.Tensor]],
    scale: torch.Tensor,
    guard: StepGuard,
    num_sources: int,
    ranks_part: Callable[[], torch.Tensor],
) -> StepResult:
    """Forward and backward every micro-batch; the optimizer steps inside the last `backend.step()`.

    `scale`: this step's loss scale (loss_scale()). `ranks_part()` is called once the last forward is queued
    (the device computes while the host draws the next step's batches): this rank's float64 vector of
    [next step's labelled tokens, stop vote, log counters...], summed over ranks in the step's one collective."""
    env = backend.env
    sums = torch.zeros(num_sources, dtype=torch.float64, device=env.device)
    counts = torch.zeros_like(sums)
    reduced = judged = sums
    for i, batch in enumerate(micro_batches):
        loss_sum, batch_sums, batch_counts = backend.forward_loss(batch, num_sources)
        sums += batch_sums
        counts += batch_counts
        factor = scale
        if i == len(micro_batches) - 1:
            # The step's loss is known once its last forward is done. For a step the guard rejects, this last
            # backward is multiplied by NaN on every rank, so the backend discards the whole step (guard.py).
            reduced = collectives.all_reduce_sum(torch.cat([sums, counts, ranks_part().to(sums.device)]))
            judged = global_loss(reduced, num_sources)
            factor = scale * guard.backward_factor(judged)
        backend.backward(loss_sum * factor.to(loss_sum.dtype))
        backend.step()  # optimizer + lr schedule step only on the last micro-batch
    return StepResult(sums, counts, reduced, judged, num_sources)


def global_loss(reduced: torch.Tensor, num_sources: int) -> torch.Tensor:
    """The step's loss over every rank, from the head of the step's reduced vector: every source's loss sum over
    every source's labelled tokens (at least one, so a step without labels gives 0, not NaN)."""
    n = num_sources
    return reduced[:n].sum() / reduced[n : 2 * n].sum().clamp(min=1.0)


def loss_scale(global_tokens: torch.Tensor | float, grad_accum: int, world_size: int) -> torch.Tensor:
    """The factor that turns a micro-batch's loss SUM into its share of the global-batch token mean (loss.py):
    the backend divides each backward by the accumulation steps and averages gradients over ranks."""
    total = torch.as_tensor(global_tokens, dtype=torch.float64)
    return (grad_accum * world_size) / total.clamp(min=1.0)


def first_scale(local_tokens: float, grad_accum: int, world_size: int, device: torch.device) -> torch.Tensor:
    """The loss scale of a start's first step: the one collective outside a step (later steps' token counts
    ride on the step before)."""
    total = collectives.all_reduce_sum(torch.tensor([local_tokens], dtype=torch.float64, device=device))
    return loss_scale(total[0], grad_accum, world_size)
