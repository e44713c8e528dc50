"""The learning-rate schedule in closed form: linear warmup, then cosine decay to a floor.

    step s (0-based, the s-th optimizer step), W warmup steps, T total steps, peak lr P, floor F = P * min_lr_ratio
    s < W:   lr = P * (s + 1) / W                        (the first step already trains; step W-1 reaches P)
    s >= W:  lr = F + (P - F) * (1 + cos(pi * (s - W) / max(1, T - W))) / 2

so lr(W) = P and the last step (T - 1) sits just above F. Steps past T (a longer resumed run) stay at F.
"""

from __future__ import annotations

import math
from collections.abc import Callable


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """lr(step) / peak lr."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_lambda(warmup_steps: int, total_steps: int, min_lr_ratio: float) -> Callable[[int], float]:
    """For torch's LambdaLR, which calls it with the number of optimizer steps taken so far.

    A plain closure on purpose: LambdaLR checkpoints callable *objects* but not functions, so the schedule
    always follows the current config (a resumed run that raises max_steps stretches its cosine), while the
    step count itself is restored from the checkpoint."""

    def multiplier(step: int) -> float:
        return lr_multiplier(step, warmup_steps, total_steps, min_lr_ratio)

    return multiplier
