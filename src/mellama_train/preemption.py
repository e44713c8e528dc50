"""Stop cleanly when the scheduler or a person asks: save a complete checkpoint at the next step boundary, then
exit with EXIT_PREEMPTED so the job script requeues and the next start resumes exactly there.

In each rank (StopFlag): SIGUSR2 is the early warning the SLURM scripts request (`--signal=B:USR2@300`,
forwarded to every rank); SIGTERM is what SLURM, `scancel`, torchrun and most schedulers send before killing;
SIGINT is Ctrl-C, which users expect to stop a run the same way. A second Ctrl-C ends the process at once.
SIGUSR1 is not used: some NCCL builds use it themselves. The handler only sets a flag: saving from inside a
signal handler could interrupt a collective half-way. Ranks see signals at slightly different moments, so the
loop agrees on the flag with one collective per step (folded into the step's loss-scale all-reduce, train.py)
and every rank stops after the same step. The flag is set from the start of the run: a signal during start-up
or the step-0 evaluation stops the run at its first step.

Around a launcher (`mellama-train launch LAUNCHER ...`, `supervise`): DeepSpeed's and torch's launchers do not
pass a stop on intact. DeepSpeed 0.19.8's `deepspeed` runner installs no handler on a single node, so SIGTERM
kills it and leaves the ranks training unattended; its per-node launcher (deepspeed.launcher.launch) sends
SIGTERM to one rank at a time, waits up to 30 s for each, SIGKILLs it, and exits 1 whatever the ranks exited
with. torchrun sends SIGTERM to all ranks, waits `--shutdown-timeout` (default 30 s), SIGKILLs them and exits 1
with a traceback. So `supervise` starts the launcher in a session of its own (Ctrl-C reaches only the
supervisor), and on a stop signal sends it to each rank directly, never to the launcher: the launchers'
30-second kill timers never start, and a save takes as long as it takes. Ranks tell the supervisor their pid
and, at the end, their exit code through files in a private directory (MELLAMA_LAUNCH_DIR); the supervisor
exits with the ranks' own code, whatever the launcher turned it into. It starts no rank itself: DeepSpeed,
torchrun and SLURM stay the launchers.

If the supervisor itself is killed (SIGKILL, the OOM killer), the ranks in their own session would train on with
no one to pass them a stop. Making the launcher die with it (prctl PR_SET_PDEATHSIG) would not help: DeepSpeed's
runner dies of a SIGTERM and leaves its per-node launcher and the ranks running, and torchrun would SIGKILL the
ranks 30 s into their save. So the ranks watch the supervisor instead: it holds an exclusive lock on
MELLAMA_LAUNCH_DIR/supervisor.lock for as long as it lives (the kernel drops it when the process ends, however it
ends; no pid that could be reused is involved), and a rank that can take the lock treats the supervisor's end as
a stop: it saves at its next step and exits 75, before any launcher's kill timer starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from mellama_train.exit_codes import EXIT_PREEMPTED

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
LAUNCH_DIR_VAR = "MELLAMA_LAUNCH_DIR"
"""Set by `mellama-train launch` for the launcher and so for every rank: where ranks leave their pid and code."""
SUPERVISOR_LOCK = "supervisor.lock"
"""In the launch directory: locked by the supervisor for as long as it lives (see the module docstring)."""
WATCH_SUPERVISOR_S = 1.0
"""How often a rank under `mellama-train launch` checks that its supervisor still lives: one non-blocking
flock() call, off the training thread."""
SUPERVISOR_LOST = "the end of its `mellama-train launch` supervisor"
"""StopFlag.reason when the supervisor died: a stop as on a signal."""


class Preempted(Exception):
    """Raised out of the training loop after the stop checkpoint is complete on every rank."""

    exit_code = EXIT_PREEMPTED

    def __init__(self, step: int, reason: str):
        self.step, self.reason = step, reason
        super().__init__(
            f"stopped at step {step} on {reason}; a complete checkpoint was saved: resume with --resume auto"
        )


class StopFlag:
    """Records the first stop signal; installed for the whole run, start-up and export included."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, object] = {}
        self._unwatch = threading.Event()
        self._watcher: threading.Thread | None = None

    def _handle(self, signum: int, frame: object) -> None:
        if self.reason is None:
            self.reason = signal.Signals(signum).name
        if signum == signal.SIGINT:
            # A second Ctrl-C ends the process at once. The kernel's default action does it: no Python code has
            # to run, which matters when the main thread is inside a collective and cannot run a handler.
            signal.signal(signal.SIGINT, signal.SIG_DFL)

    def install(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():  # Python only allows handlers there
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            announce()  # only now can a supervisor's signal be caught rather than kill this rank
        lock = _launch_file(SUPERVISOR_LOCK)
        if lock is not None and lock.is_file():  # on another node (a launch over ssh) there is none to watch
            self._watcher = threading.Thread(
                target=self._watch_supervisor, args=(lock,), name="mellama-supervisor-watch", daemon=True
            )
            self._watcher.start()
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        if self._watcher is not None:
            self._unwatch.set()
            self._watcher.join(timeout=5)
            self._watcher = None

    def _watch_supervisor(self, lock: Path) -> None:
        """Set the flag once the supervisor's lock can be taken: it has ended."""
        try:
            fd = os.open(lock, os.O_RDONLY)
        except OSError:  # removed: the supervisor finished and cleaned up
            return
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:  # held: the supervisor lives
                    if self._unwatch.wait(WATCH_SUPERVISOR_S):
                        return
                    continue
                except OSError as exc:  # a filesystem without locks: nothing can be watched
                    log.warning("cannot watch mellama-train launch through %s: %s", lock, exc)
                    return
                if self.reason is None:
                    self.reason = SUPERVISOR_LOST
                log.warning(
                    "mellama-train launch is gone (killed?): this rank stops as on a stop signal, saving a"
                    " checkpoint at its next step and exiting %d",
                    EXIT_PREEMPTED,
                )
                return
        finally:
            os.close(fd)

    @property
    def requested(self) -> bool:
        return self.reason is not None


# ---- the rank's side of `mellama-train launch` -------------------------------------------------------------


def _launch_file(name: str) -> Path | None:
    link = os.environ.get(LAUNCH_DIR_VAR)
    return Path(link) / name if link else None


def _rank_file(suffix: str) -> Path | None:
    return _launch_file(f"rank-{os.environ.get('RANK', '0')}.{suffix}")


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)  # the supervisor never reads half a number
    except OSError as exc:  # the supervisor then falls back to the launcher's own behaviour
        log.warning("could not write %s for mellama-train launch: %s", path, exc)


def announce() -> None:
    """Under `mellama-train launch`: tell it this rank's pid (its stop handler is installed)."""
    if (path := _rank_file("pid")) is not None:
        _write(path, str(os.getpid()))


def report_exit(code: int) -> None:
    """Under `mellama-train launch`: record the code this rank is about to exit with (the launcher may not pass
    it on)."""
    if (path := _rank_file("exit")) is not None:
        _write(path, str(code))


# ---- `mellama-train launch`: the supervisor around a launcher -----------------------------------------------


def _descendants(pid: int) -> dict[int, Any]:
    import psutil

    try:
        return {p.pid: p for p in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return {}


def _read_numbers(link: Path, suffix: str) -> dict[str, int]:
    numbers = {}
    for path in link.glob(f"rank-*.{suffix}"):
        try:
            numbers[path.name.removesuffix(f".{suffix}")] = int(path.read_text())
        except (OSError, ValueError):
            continue
    return numbers


def exit_code(launcher_code: int, registered: int, rank_codes: dict[str, int]) -> int:
    """The supervisor's exit code. The ranks' own code when they agree on it: 75, 3, 4 and 0 are decided together
    (after a barrier), so one such code proves the outcome for all, even if the launcher then killed a rank
    before it could report; 0 only counts when every rank reported it (one rank may still fail alone, e.g. in
    the merge). Otherwise the launcher's, a signal death as 128 + the signal, like a shell."""
    codes = set(rank_codes.values())
    if len(codes) == 1:
        (code,) = codes
        if code != 0 or len(rank_codes) == registered:
            return code
    if launcher_code < 0:
        return 128 - launcher_code
    if launcher_code == 0 and len(rank_codes) < registered:
        return 1  # the deepspeed runner reports success when its per-node launcher was killed by a signal
    return launcher_code


def supervise(command: list[str], poll_s: float = 0.2) -> int:
    """Run `command` (a launcher: deepspeed, torchrun, python ...) and pass stop signals to its ranks; returns the
    exit code for `mellama-train launch`."""
    if not command:
        raise ValueError(
            "give the launcher command, e.g. `mellama-train launch deepspeed --num_gpus 8 launch/pretrain.py ...`"
        )
    if shutil.which(command[0]) is None and not Path(command[0]).is_file():
        raise ValueError(f"{command[0]}: command not found; check PATH or activate the venv")
    import psutil  # DeepSpeed's own dependency (its launcher uses it to end process trees)

    link = Path(tempfile.mkdtemp(prefix="mellama-launch-"))
    env = {**os.environ, LAUNCH_DIR_VAR: str(link)}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):  # the launcher gives each rank its own
        env.pop(var, None)
    # Held until this process ends, however it ends: the ranks take its end for a stop (module docstring). The
    # descriptor is not inherited (Python's default), so no launcher or rank can keep the lock alive.
    lock = os.open(link / SUPERVISOR_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    requests: list[int] = []
    signalled: set[int] = set()
    proc: subprocess.Popen | None = None  # set once started; a stop before that is passed on after

    def forward() -> None:
        """Send the stop to each registered rank not yet told; a rank registers once its handler is installed,
        so one still starting is told when it registers. Only descendants: a pid file never names a stranger."""
        if not requests or proc is None:
            return
        sig = signal.SIGTERM if requests[0] == signal.SIGHUP else requests[0]
        pids = _read_numbers(link, "pid")
        if not pids:
            return
        alive = _descendants(proc.pid)
        for pid in set(pids.values()) - signalled:
            if pid in alive:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:  # it ended in between
                    pass
                signalled.add(pid)

    def end_every_process() -> None:
        if proc is None:
            return
        children = list(_descendants(proc.pid).values())
        proc.kill()  # the launcher first, so that it cannot start a rank again (torchrun --max-restarts)
        for child in children:
            with contextlib.suppress(psutil.Error):  # already gone
                child.kill()

    def on_signal(signum: int, frame: object) -> None:
        requests.append(signum)
        name = signal.Signals(signum).name
        if len(requests) == 1:
            print(
                f"mellama-train launch: {name}: every rank saves a checkpoint at its next step and exits"
                f" {EXIT_PREEMPTED}; send it again (a second Ctrl-C) to end every process at once",
                file=sys.stderr,
                flush=True,
            )
            forward()
            return
        print(f"mellama-train launch: {name} again: ending every process now", file=sys.stderr, flush=True)
        end_every_process()

    # Installed before the launcher starts: a stop that arrives while it starts is held, not the default action
    # (which would kill this process and leave the ranks unattended). SIGHUP (the terminal went away) stops the
    # run too, unless it is ignored (nohup): then it stays ignored.
    handled = [*STOP_SIGNALS] + ([signal.SIGHUP] if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN else [])
    previous = {sig: signal.signal(sig, on_signal) for sig in handled}
    try:
        try:
            proc = subprocess.Popen(command, env=env, start_new_session=True)
        except OSError as exc:  # found, but not runnable (permissions, not an executable)
            raise ValueError(f"{command[0]}: cannot be started ({exc.strerror or exc})") from None
        if len(requests) > 1:  # a second stop while it was being started
            end_every_process()
        while True:
            try:
                launcher_code = proc.wait(timeout=poll_s)
                break
            except subprocess.TimeoutExpired:
                forward()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(lock)
        if proc is None:
            shutil.rmtree(link, ignore_errors=True)
    registered, rank_codes = len(_read_numbers(link, "pid")), _read_numbers(link, "exit")
    shutil.rmtree(link, ignore_errors=True)
    if len(requests) > 1:
        return 128 + requests[-1]
    code = exit_code(launcher_code, registered, rank_codes)
    if code != launcher_code:
        print(
            f"mellama-train launch: the ranks exited {sorted(set(rank_codes.values())) or 'without a code'}"
            f" ({len(rank_codes)} of {registered} reported); the launcher exited {launcher_code}: exit {code}",
            file=sys.stderr,
            flush=True,
        )
    if requests and not registered:
        print(
            "mellama-train launch: no rank registered (started over ssh/pdsh?), so the stop went nowhere;"
            " run one `mellama-train launch` per node (deepspeed --no_ssh --node_rank N) or use slurm/",
            file=sys.stderr,
            flush=True,
        )
    return code
