"""Stop cleanly when the scheduler asks: save a complete checkpoint at the next step boundary, then exit with
EXIT_PREEMPTED so the job script requeues and the next start resumes exactly there.

SIGUSR2 is the early warning the SLURM scripts request (`--signal=B:USR2@300`, forwarded to every rank);
SIGTERM is what SLURM, `scancel` and most schedulers send before killing. SIGUSR1 is not used: some NCCL
builds use it themselves. The handler only sets a flag: saving from inside a signal handler could interrupt a
collective half-way. Ranks see signals at slightly different moments, so the loop agrees on the flag with one
collective per step (folded into the step's loss-scale all-reduce, train.py) and every rank stops after
the same step.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75
"""EX_TEMPFAIL ("try again later"): a checkpoint was saved on request; slurm/launch.sh requeues on it."""
STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class Preempted(Exception):
    """Raised out of the training loop after the stop checkpoint is complete on every rank."""

    def __init__(self, step: int, reason: str):
        self.step, self.reason = step, reason
        super().__init__(
            f"stopped at step {step} on {reason}; a complete checkpoint was saved: resume with --resume auto"
        )


class StopFlag:
    """Records the first stop signal; installed for the duration of a run."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.reason is None:
            self.reason = signal.Signals(signum).name

    def install(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():  # Python only allows handlers there
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.reason is not None
