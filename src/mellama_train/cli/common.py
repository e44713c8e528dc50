"""What every command shares: one-line failures (exit 2) with --debug tracebacks, a rank's closing line in one
write, leaving every rank together, and the watchdog around a command.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

from mellama_train.config import ConfigError
from mellama_train.exit_codes import EXIT_CONFIG


def is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def watchdog_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--watchdog-minutes",
        type=float,
        default=20.0,
        metavar="M",
        help=f"if {what} makes no progress for M minutes (a hung filesystem), print every thread's stack and"
        " exit 76 (default 20, as train.watchdog_minutes; 0: off)",
    )


@contextlib.contextmanager
def watched(minutes: float, phase: str) -> Iterator[None]:
    """A standalone command under the hang watchdog (dumps to stderr: there is no run directory)."""
    from mellama_train.watchdog import Watchdog

    dog = Watchdog(minutes * 60, None, 0, limit_name="--watchdog-minutes").start()
    dog.enter(phase)
    try:
        yield
    finally:
        dog.stop()


def exit_together(code: int) -> None:
    """Leave with `code` on every rank at the same moment. srun --kill-on-bad-exit ends a step as soon as one
    rank exits non-zero, so a rank still tearing down the interpreter would be killed and the step's status
    would read 143 instead of `code`. After a last barrier every rank exits at once, skipping the teardown
    (the checkpoint, metrics and logs are already closed and flushed)."""
    from mellama_train.backends import collectives
    from mellama_train.preemption import report_exit

    report_exit(code)  # before the barrier: a launcher may kill this rank as soon as a peer has exited
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    collectives.barrier()
    os._exit(code)


def traceback_if(debug: bool) -> None:
    """--debug: the traceback of the exception being handled, before its one-line message. It holds code
    locations and the message only: no error of this project quotes record content (data/readers.py)."""
    if debug:
        traceback.print_exc(file=sys.stderr)


def rank_line(line: str) -> None:
    """One line to stderr in ONE write: every rank prints its line at the same moment to the same terminal or
    log, and print()'s separate write of the newline let two ranks' lines run together (seen in CI)."""
    sys.stderr.write(line.replace("\n", " ") + "\n")
    sys.stderr.flush()


def fail(problems: list[str]) -> int:
    """Configuration problems, all of them, one line each (rank 0 prints; every rank exits 2)."""
    if is_rank0():
        print(ConfigError(problems), file=sys.stderr)
    return EXIT_CONFIG


def error(message: str) -> int:
    """Any other input error: one line (rank 0 prints; every rank exits 2)."""
    if is_rank0():
        print(f"error: {message}", file=sys.stderr)
    return EXIT_CONFIG


def unreadable_run(run_dir: str, exc: Exception) -> str:
    """`status`/`report` failing on a run directory, as one line naming it: a refusal (ValueError) and a file
    that cannot be read (OSError, e.g. --out names a file) say what to fix; anything else (a file crafted or
    damaged past what the readers check) names the directory, the error's type and --debug."""
    if isinstance(exc, ValueError) and not isinstance(exc, (UnicodeError, json.JSONDecodeError)):
        message = " ".join(str(exc).splitlines())  # the readers' refusals name the file and the fix
        return message if run_dir in message else f"{run_dir}: {message}"
    if isinstance(exc, OSError):
        return os_error(exc)
    return (
        f"{run_dir}: a file of this run directory could not be read ({type(exc).__name__}); check that it is a"
        " run directory this trainer wrote and that its files are intact; --debug prints the traceback"
    )


def os_error(exc: OSError) -> str:
    """An OSError as one line naming the path, what the system said, and where to look."""
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or exc}; check the path, its permissions and the free space there"


def unwritable_output_dir(output_dir: str | None) -> str | None:
    """Why a run could not write its output dir, or None. Checked before the process group starts: found later,
    on rank 0 alone, it would be a traceback there and a wait for the collective timeout everywhere else."""
    if not output_dir:
        return None

    path = Path(output_dir)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None:
        return None
    if not existing.is_dir():
        return f"--output-dir {output_dir}: {existing} is a file, not a directory; pass a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"--output-dir {output_dir}: {existing} is not writable by this user; pass a directory you can write"
    return None
