"""Hang watchdog and heartbeat: a rank that makes no progress for `train.watchdog_minutes` dumps its Python stacks
and exits; rank 0 publishes that it is alive, and what it last completed, for `mellama-train status`.

A stuck collective, a dead peer, a hung filesystem or a full disk would otherwise hold every GPU of the job until
the time limit. The watchdog runs from the first line of a run to its last: start-up (rendezvous, model load,
resume), the step-0 evaluation, the loop, and the final export and merge. Code records progress with `beat()`
(something completed: a step, an evaluation, a save, a start-up stage, an export shard) and `enter()` (a phase
begins: its name is shown in a dump); code deep inside a phase that holds no handle calls `progress()`. A daemon
thread checks the time since the last progress. When it is too long, the thread writes every thread's stack
(faulthandler: file, function and line of each frame, never local values, so no training text) to stderr and then
to `<output-dir>/logs/hang-rank-<R>.restart-<N>.txt`, and ends the process with EXIT_HUNG. Stderr comes first and
the file is written by a helper thread it does not wait on for long: a hung filesystem is one of the hangs, and
must not hang the watchdog too. A rank that is stuck leaves its peers waiting inside a collective, so their
watchdogs fire too: every rank's stacks are dumped, and the stuck one is the rank whose stack is not inside a
collective. slurm/launch.sh requeues a job whose step left hang dumps (once in a row: a second hang after a
requeue is left for a person).

Before the run directory is known (a default `runs/<profile>-<time>` is decided on rank 0 after the rendezvous),
a dump goes to stderr only.

The heartbeat (rank 0): `<output-dir>/heartbeat.json`, rewritten every HEARTBEAT_EVERY_S by its own thread, says
which host and process run the job, when it last completed something and what, and at the end how the process
left (`state`). `mellama-train status` reads it to tell a live run from a dead one without a process group.

The collective timeout (`train.dist_timeout_minutes`, engine.init_distributed) is the other half: it fails a
collective that waits too long even where Python cannot run. The watchdog should fire first (shorter), since
its dump says where each rank was.
"""

from __future__ import annotations

import faulthandler
import json
import math
import os
import socket
import sys
import threading
import time
from pathlib import Path

from mellama_train import preemption
from mellama_train.exit_codes import EXIT_HUNG

HEARTBEAT = "heartbeat.json"
"""Rank 0's liveness file in the run directory (read by `mellama-train status`)."""
HEARTBEAT_EVERY_S = 10.0
"""How often rank 0 rewrites the heartbeat: a few small writes a minute, even on a shared filesystem."""

_active: Watchdog | None = None


def dump_path(run_dir: Path, rank: int) -> Path:
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    return run_dir / "logs" / f"hang-rank-{rank}.restart-{restart}.txt"


def progress(what: str) -> None:
    """Record progress on this process's running watchdog, if there is one. For code deep inside a phase (an
    export shard, a merge stage) that holds no handle on the watchdog."""
    if _active is not None:
        _active.beat(what)


def outcome(exc: BaseException | None) -> str:
    """How a run left, for the heartbeat's `state`: finished, stopped (exit N) for the stops that save first
    (75 on a signal, 3 the numerical guard, 4 forgetting), or failed (the exception's type: never its message)."""
    if exc is None:
        return "finished"
    code = getattr(exc, "exit_code", None)
    if isinstance(code, int):
        return f"stopped (exit {code})"
    return f"failed ({type(exc).__name__})"


_HEARTBEAT_FIELDS: dict[str, type | tuple[type, ...]] = {
    "host": str,
    "pid": int,
    "state": str,
    "time": (int, float),
    "started": (int, float),
    "phase": str,
    "last_completed": str,
    "last_progress": (int, float),
    "every_s": (int, float),
    "watchdog_minutes": (int, float),
}
"""The heartbeat's fields and their types."""


def read_heartbeat(run_dir: Path) -> dict | None:
    """The run's heartbeat, or None when there is none or it cannot be read (a run from before heartbeats, or
    a file cut short): `status` then judges from the metrics' times alone."""
    try:
        beat = json.loads((run_dir / HEARTBEAT).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # RecursionError: nested too deeply for the parser
        return None
    if not isinstance(beat, dict):
        return None
    # Read back like any file in a shared directory: only the fields written, of the types written, and numbers
    # only when finite (1e999 parses as inf).
    return {
        key: value
        for key, value in beat.items()
        if key in _HEARTBEAT_FIELDS
        and isinstance(value, _HEARTBEAT_FIELDS[key])
        and not isinstance(value, bool)
        and (not isinstance(value, float) or math.isfinite(value))
    }


class Watchdog:
    def __init__(
        self,
        timeout_s: float,
        run_dir: Path | None,
        rank: int,
        poll_s: float | None = None,
        heartbeat: bool = False,
        limit_name: str = "train.watchdog_minutes",
    ):
        """`timeout_s` 0 disables the watchdog (the heartbeat still runs). `run_dir`: where dumps go (None:
        stderr only, until `set_run_dir`). `heartbeat`: write heartbeat.json into the run directory once
        `set_run_dir` names it (rank 0 of a run). `limit_name`: the setting a dump names as the limit."""
        self.timeout_s, self.rank, self.limit_name = timeout_s, rank, limit_name
        self.run_dir = run_dir
        self.poll_s = poll_s if poll_s is not None else min(10.0, max(timeout_s / 10, 0.1))
        self.grace_s = min(30.0, timeout_s / 4)
        self.heartbeat = heartbeat
        self._heartbeat_dir: Path | None = None  # set by set_run_dir: a start refused early writes none
        self._last, self._last_wall = time.monotonic(), time.time()
        self._what = "nothing yet"
        self._phase = "start-up"
        self._started_wall = time.time()
        self._stop_watch, self._stop_pulse = threading.Event(), threading.Event()
        self._watcher: threading.Thread | None = None
        self._pulser: threading.Thread | None = None

    @property
    def path(self) -> Path | None:
        return dump_path(self.run_dir, self.rank) if self.run_dir is not None else None

    def set_run_dir(self, run_dir: Path) -> None:
        """Where dumps and the heartbeat go, once the run directory is decided and the start accepted (a start
        refused before this, e.g. over another run's checkpoints, never overwrites that run's heartbeat)."""
        self.run_dir = run_dir
        if self.heartbeat:
            self._heartbeat_dir = run_dir

    def beat(self, what: str) -> None:
        """Record progress; `what` is what just completed (e.g. "step 12"), shown in a dump."""
        self._last, self._last_wall, self._what = time.monotonic(), time.time(), what

    def enter(self, phase: str) -> None:
        """A phase begins (e.g. "final export"): a dump names it. Starting one is progress too."""
        self._phase = phase
        self._last, self._last_wall = time.monotonic(), time.time()

    def start(self) -> Watchdog:
        global _active
        self.beat("start of the run")
        if self.timeout_s > 0:
            self._watcher = threading.Thread(target=self._watch, name="mellama-watchdog", daemon=True)
            self._watcher.start()
        if self.heartbeat:
            self._pulser = threading.Thread(target=self._pulse, name="mellama-heartbeat", daemon=True)
            self._pulser.start()
        _active = self
        return self

    def stop(self, state: str = "finished") -> None:
        """Stop both threads; the heartbeat records `state` (outcome(): finished, stopped (exit 75), ...)."""
        global _active
        if self._pulser is not None:
            self._stop_pulse.set()
            self._pulser.join(timeout=5)
            self._pulser = None
        # While the watchdog still runs: a filesystem that hangs here is caught too.
        self._write_heartbeat(state)
        if self._watcher is not None:
            self._stop_watch.set()
            self._watcher.join(timeout=5)
            self._watcher = None
        if _active is self:
            _active = None

    # ---- the threads ---------------------------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop_watch.wait(self.poll_s):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                self._fire(idle)

    def _pulse(self) -> None:
        while True:
            self._write_heartbeat("running")
            if self._stop_pulse.wait(HEARTBEAT_EVERY_S):
                return

    def _write_heartbeat(self, state: str) -> None:
        if self._heartbeat_dir is None:
            return
        beat = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "state": state,
            "time": round(time.time(), 3),
            "started": round(self._started_wall, 3),
            "phase": self._phase,
            "last_completed": self._what,
            "last_progress": round(self._last_wall, 3),
            "every_s": HEARTBEAT_EVERY_S,
            "watchdog_minutes": self.timeout_s / 60,
        }
        path = self._heartbeat_dir / HEARTBEAT
        tmp = path.with_name(f".{HEARTBEAT}.{os.getpid()}.tmp")
        try:  # a replaced file, never a half-written one; the mtime is the liveness signal
            tmp.write_text(json.dumps(beat) + "\n", encoding="utf-8")
            os.replace(tmp, path)
        except OSError:
            pass  # a heartbeat that cannot be written must not end the run; status then reads it as stale

    def _fire(self, idle: float) -> None:
        header = (
            f"rank {self.rank}: no progress for {idle:.0f} s during {self._phase} ({self.limit_name}"
            f" {self.timeout_s / 60:g}); last completed: {self._what}; stacks of every thread follow,"
            f" then exit {EXIT_HUNG}\n"
        )
        started = time.monotonic()
        sys.stderr.write(f"watchdog: {header}")
        sys.stderr.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        self._stop_pulse.set()  # so that no "running" overwrites the "hung" the writer records
        if self._pulser is not None:
            self._pulser.join(timeout=1.0)
        if self.path is not None:
            # A helper thread writes the file; if the filesystem hangs, the exit below still happens.
            writer = threading.Thread(target=self._write_dump, args=(header,), daemon=True)
            writer.start()
            writer.join(timeout=max(self.grace_s, 1.0))
            sys.stderr.write(f"watchdog: stacks also in {self.path}\n")
        sys.stderr.flush()
        preemption.report_exit(EXIT_HUNG)
        # Peers stalled at about the same moment and fire within a poll or a step of this one; the launcher
        # (or srun --kill-on-bad-exit) kills them as soon as this rank exits, so wait long enough for their
        # dumps too.
        time.sleep(max(self.grace_s - (time.monotonic() - started), 0.0))
        os._exit(EXIT_HUNG)  # the main thread is stuck: no normal shutdown can run

    def _write_dump(self, header: str) -> None:
        assert self.path is not None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {header}")
                fh.flush()
                faulthandler.dump_traceback(file=fh, all_threads=True)
        except OSError as exc:
            sys.stderr.write(f"watchdog: could not write {self.path}: {exc}\n")
        self._write_heartbeat(f"hung (exit {EXIT_HUNG})")
