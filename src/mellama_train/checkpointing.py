"""When the loop saves and when it stops, and why: the checkpoint manager and the stop policy.

Reasons to save after a step: the interval (`train.save_every`), the last step, and every reason to stop. Reasons
to stop early, checked in this order: the run diverged (too many consecutive skipped steps, guard.py), the
general-domain held-out loss rose past its margin with `train.stop_on_forgetting` (evaluation.py), or a rank got
a stop signal (preemption.py; every rank learns of it through the step's stop votes, so all stop after the same
step). A stop always follows a complete checkpoint of that step, and its exception names it.
Retention (`train.keep_last`) and the checkpoint format are checkpoint.py's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mellama_train import checkpoint, disk_space
from mellama_train.accounting import record_ledger
from mellama_train.backends import Backend
from mellama_train.config import TrainConfig
from mellama_train.evaluation import Forgetting, ForgettingMonitor
from mellama_train.feed import StepFeed
from mellama_train.guard import Diverged, StepGuard
from mellama_train.preemption import Preempted, StopFlag


@dataclass(frozen=True)
class Stop:
    """Why the run stops after this step; `error(checkpoint)` is the exception that ends it."""

    why: str
    """"diverged", "forgetting" or "signal"."""
    error: Callable[[str], BaseException]


class StopPolicy:
    """Decides, after each step, whether the run stops there."""

    def __init__(self, t: TrainConfig, guard: StepGuard, forgetting: ForgettingMonitor, flag: StopFlag):
        self.t, self.guard, self.forgetting, self.flag = t, guard, forgetting, flag

    def after_step(self, step: int, last: bool, stop_votes: float) -> Stop | None:
        """stop_votes: how many ranks asked to stop (the step's first collective counted them)."""
        if self.guard.diverged:  # the weights saved are the last good ones: the skipped steps changed nothing
            skips = self.guard.consecutive_skips
            return Stop("diverged", lambda saved: Diverged(step, skips, saved))
        if last:
            return None
        f, t = self.forgetting, self.t
        if f.alarm and f.stop:
            rise = f.rise
            return Stop(
                "forgetting",
                lambda saved: Forgetting(step, str(t.forgetting_source), rise, t.forgetting_margin, saved),
            )
        if stop_votes > 0:
            # Ranks get signals at different moments: they stop after the same step by acting on the shared count.
            # The reason is read after the save: this rank's own signal may have come in the meantime.
            return Stop(
                "signal", lambda saved: Preempted(step, self.flag.reason or "a peer rank's stop signal")
            )
        return None


class CheckpointManager:
    """Saves at the interval, at the last step and before a stop; each save carries the guard's state, the
    mixture ledger and (full-weight DeepSpeed runs) the export probe, after checking the disk has room."""

    def __init__(
        self,
        backend: Backend,
        checkpoints_dir: Path,
        t: TrainConfig,
        guard: StepGuard,
        data: StepFeed,
        names: list[str],
        meta: Callable[[], Callable[[Path], None] | None],
        cfg: Any,
    ):
        self.backend, self.dir, self.t, self.guard = backend, checkpoints_dir, t, guard
        self.data, self.names, self.meta, self.cfg = data, names, meta, cfg

    def due(self, step: int, last: bool, stop: Stop | None) -> bool:
        return step % self.t.save_every == 0 or last or stop is not None

    def save(self, state: checkpoint.TrainerState) -> Path:
        """Collective: every rank writes its part of checkpoint `step_<state.step>`."""
        env = self.backend.env
        state.guard = self.guard.state_dict()
        # Small collectives per save: the mixture ledger, and rank 0's free-disk verdict.
        record_ledger(state, self.data.counts, self.names, env.device)
        disk_space.ensure_room(self.dir, self.cfg, env.is_main)
        return checkpoint.save(
            self.backend, self.dir, state, self.data.state_dict(), env.rank, self.t.keep_last, self.meta()
        )
