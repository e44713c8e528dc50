"""Numerical faults: skip a bad optimizer step on every rank, count it, and stop a run that keeps failing.

A step is bad when its global loss (the token mean over the whole global batch, every rank) is not finite, when
its gradient norm is not finite, or, if `train.skip_loss_spikes` is on, when the loss is more than
`train.loss_spike_factor` times the running mean of the good steps before it. A bad step leaves the weights,
the optimizer moments and the lr schedule bitwise unchanged; the data it consumed is not replayed.

How the skip happens: both backends skip an optimizer step whose global gradient norm is not finite (DeepSpeed
ZeRO-2/3 from 0.19.8 discard such a step on every rank, zero the gradients and hold the lr schedule, hence the
project's lower bound; earlier releases applied it in bf16/fp32 and the weights became NaN; the single-device
backend does the same in backends/single.py). DeepSpeed has no public "discard this step" call, so
a step this guard rejects for another reason (a spike, or a non-finite loss whose gradients happen to be finite)
is made to take that same path: the last micro-batch's backward is multiplied by NaN, on every rank, since the
decision comes from an all-reduced loss. The backend then reports whether the step was applied, and the loop
refuses to go on if a step it rejected was applied anyway (a backend without that protection).

The decision is made on the device: no host sync is added before the optimizer step.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from mellama_train.exit_codes import EXIT_DIVERGED

log = logging.getLogger(__name__)

SPIKE_MIN_GOOD_STEPS = 10
"""Good steps needed before the running mean is trusted for spike detection (the first steps move fast)."""
EMA_BETA = 0.95
"""Weight of the past in the running mean of the loss (about the last 20 good steps)."""


class Diverged(Exception):
    """Too many consecutive skipped steps: a checkpoint of the last good weights was saved, the run stops."""

    exit_code = EXIT_DIVERGED

    def __init__(self, step: int, skipped: int, checkpoint: str):
        self.step = step
        super().__init__(
            f"{skipped} consecutive optimizer steps were skipped (non-finite loss or gradient norm, or loss"
            f" spikes) up to step {step}; the weights in {checkpoint} are the last good ones. Lower optim.lr,"
            " check the data read since the last good step, or raise train.max_consecutive_skips"
        )


@dataclass
class StepVerdict:
    applied: bool
    """The optimizer step changed the weights."""
    reason: str | None
    """Why it was skipped: non-finite, spike (None when applied)."""
    spike: bool
    """The loss exceeded loss_spike_factor x the running mean (skipped or only logged)."""


class StepGuard:
    """Per-run state of the checks: the running mean of good losses and the skip counters (all checkpointed)."""

    def __init__(self, spike_factor: float, skip_spikes: bool, max_consecutive: int):
        self.spike_factor, self.skip_spikes, self.max_consecutive = spike_factor, skip_spikes, max_consecutive
        self.loss_ema: float = 0.0
        """Bias-uncorrected exponential mean of the good steps' losses (see `mean`)."""
        self.good_steps = 0
        self.skipped_steps = 0
        self.loss_spikes = 0
        self.consecutive_skips = 0

    @property
    def mean(self) -> float | None:
        """Running mean of the good steps' losses, or None until enough of them were seen."""
        if self.good_steps < SPIKE_MIN_GOOD_STEPS:
            return None
        return self.loss_ema / (1 - EMA_BETA**self.good_steps)

    def _spike_limit(self) -> float | None:
        mean = self.mean
        return mean * self.spike_factor if mean is not None and self.spike_factor > 0 else None

    def backward_factor(self, step_loss: torch.Tensor) -> torch.Tensor:
        """1.0, or NaN for a step this guard rejects: multiplies the last micro-batch's backward (device only)."""
        bad = ~torch.isfinite(step_loss)
        limit = self._spike_limit()
        if self.skip_spikes and limit is not None:
            bad = bad | (step_loss > limit)
        return torch.where(bad, torch.full_like(step_loss, math.nan), torch.ones_like(step_loss))

    def after_step(self, step: int, step_loss: float, applied: bool) -> StepVerdict:
        """Update the counters once the optimizer step is done (or skipped) and say what happened."""
        limit = self._spike_limit()
        spike = limit is not None and math.isfinite(step_loss) and step_loss > limit
        rejected = not math.isfinite(step_loss) or (spike and self.skip_spikes)
        if rejected and applied:
            raise RuntimeError(
                f"step {step}: the engine applied an optimizer step this run rejected (loss {step_loss}); the"
                " weights may now be corrupt. Use DeepSpeed >= 0.19.8 (it skips non-finite steps) and resume"
                " from the previous checkpoint"
            )
        if spike:
            self.loss_spikes += 1
            action = "skipped" if self.skip_spikes else "kept (train.skip_loss_spikes is off)"
            log.warning(
                "step %d: loss spike %.4f > %.1f x running mean %.4f; step %s",
                step,
                step_loss,
                self.spike_factor,
                self.mean,
                action,
            )
        if applied:
            self.consecutive_skips = 0
            self.good_steps += 1
            self.loss_ema = EMA_BETA * self.loss_ema + (1 - EMA_BETA) * step_loss
            return StepVerdict(True, None, spike)
        self.skipped_steps += 1
        self.consecutive_skips += 1
        reason = "spike" if spike else "non-finite"
        if reason == "non-finite":
            what = "loss" if not math.isfinite(step_loss) else "gradient norm"
            log.warning(
                "step %d: non-finite %s; optimizer step skipped on every rank (%d in a row)",
                step,
                what,
                self.consecutive_skips,
            )
        return StepVerdict(False, reason, spike)

    def metrics(self) -> dict[str, float]:
        """Run totals (they survive a resume): skipped optimizer steps and loss spikes seen."""
        return {"train/skipped_steps": self.skipped_steps, "train/loss_spikes": self.loss_spikes}

    @property
    def diverged(self) -> bool:
        return self.consecutive_skips > self.max_consecutive

    def state_dict(self) -> dict[str, Any]:
        return {
            "loss_ema": self.loss_ema,
            "good_steps": self.good_steps,
            "skipped_steps": self.skipped_steps,
            "loss_spikes": self.loss_spikes,
            "consecutive_skips": self.consecutive_skips,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)
