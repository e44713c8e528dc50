"""Hang watchdog: a rank that makes no progress for `train.watchdog_minutes` dumps its Python stacks and exits.

A stuck collective, a dead peer, a hung filesystem or a full disk would otherwise hold every GPU of the job until
the time limit. The loop calls `beat()` whenever it completes something (a step, an evaluation, a save); a
daemon thread checks the time since the last beat. When it is too long, the thread writes every thread's stack
(faulthandler: file, function and line of each frame, never local values, so no training text) to stderr and to
`<output-dir>/logs/hang-rank-<R>.restart-<N>.txt`, then ends the process with EXIT_HUNG. A rank that is stuck
leaves its peers waiting inside a collective, so their watchdogs fire too: every rank's stacks are dumped, and
the stuck one is the rank whose stack is not inside a collective. slurm/launch.sh requeues a job whose step left
hang dumps (once in a row: a second hang after a requeue is left for a person).

The collective timeout (`train.dist_timeout_minutes`, engine.init_distributed) is the other half: it fails a
collective that waits too long even where Python cannot run. The watchdog should fire first (shorter), since
its dump says where each rank was.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from pathlib import Path

EXIT_HUNG = 76
"""Exit code of a rank ended by the watchdog (slurm/launch.sh requeues on its dump files)."""


def dump_path(run_dir: Path, rank: int) -> Path:
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    return run_dir / "logs" / f"hang-rank-{rank}.restart-{restart}.txt"


class Watchdog:
    def __init__(self, timeout_s: float, run_dir: Path, rank: int, poll_s: float | None = None):
        self.timeout_s, self.rank = timeout_s, rank
        self.path = dump_path(run_dir, rank)
        self.poll_s = poll_s if poll_s is not None else min(10.0, max(timeout_s / 10, 0.1))
        self.grace_s = min(30.0, timeout_s / 4)
        self._last = time.monotonic()
        self._what = "start-up"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self, what: str) -> None:
        """Record progress; `what` is what just completed (e.g. "step 12"), shown in a dump."""
        self._last, self._what = time.monotonic(), what

    def start(self) -> Watchdog:
        if self.timeout_s > 0:
            self.beat("start of training")
            self._thread = threading.Thread(target=self._watch, name="mellama-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                self._fire(idle)

    def _fire(self, idle: float) -> None:
        header = (
            f"rank {self.rank}: no progress for {idle:.0f} s (train.watchdog_minutes"
            f" {self.timeout_s / 60:g}); last completed: {self._what}; stacks of every thread follow,"
            f" then exit {EXIT_HUNG}\n"
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {header}")
            fh.flush()
            faulthandler.dump_traceback(file=fh, all_threads=True)
        sys.stderr.write(f"watchdog: {header}")
        sys.stderr.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.write(f"watchdog: stacks also in {self.path}\n")
        sys.stderr.flush()
        # Peers stalled at about the same moment and fire within a poll or a step of this one; the launcher
        # (or srun --kill-on-bad-exit) kills them as soon as this rank exits, so wait long enough for their
        # dumps too.
        time.sleep(self.grace_s)
        os._exit(EXIT_HUNG)  # the main thread is stuck: no normal shutdown can run
