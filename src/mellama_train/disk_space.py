"""Room on disk for the next checkpoint: checked at start and before every save, so a full filesystem stops
the run with a message instead of a save that dies half-written (or a rank stuck in a collective).

The size expected is the newest complete checkpoint's size on disk once one exists (what the next one will
take), else the memory planner's estimate (plan.py: parameters x bytes per parameter of the saved states).
Pruning to train.keep_last happens after a save completes, so the next checkpoint needs its full size free.
The check assumes the run directory is on one filesystem that every rank writes to (the usual shared
scratch); rank 0 measures it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from mellama_train import checkpoint
from mellama_train.backends import collectives
from mellama_train.config import Config

GIB = 2**30


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def checkpoint_bytes_needed(checkpoints_dir: Path, cfg: Config) -> tuple[int, str]:
    """(bytes the next checkpoint takes, how that was found)."""
    complete = checkpoint.complete_checkpoints(checkpoints_dir)
    if complete:
        return directory_bytes(complete[-1]), f"the size of {complete[-1].name}"
    from mellama_train.plan import make_plan

    return int(make_plan(cfg).checkpoint_bytes), "the memory planner's estimate"


def _existing(path: Path) -> Path:
    """The path, or its nearest existing ancestor (the checkpoints dir may not be created yet)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def room_problem(checkpoints_dir: Path, cfg: Config) -> str | None:
    """None if the filesystem of `checkpoints_dir` has room for the next checkpoint, else the one-line error."""
    needed, how = checkpoint_bytes_needed(checkpoints_dir, cfg)
    where = _existing(checkpoints_dir)
    free = shutil.disk_usage(where).free
    if free >= needed:
        return None
    return (
        f"{checkpoints_dir}: {free:,} bytes free ({free / GIB:.2f} GiB) on {where}'s filesystem but the next"
        f" checkpoint needs {needed:,} bytes ({needed / GIB:.2f} GiB, {how}); free space there (e.g. old"
        " runs' checkpoints) or use an --output-dir on a larger filesystem"
    )


def check_room(checkpoints_dir: Path, cfg: Config) -> None:
    """Raise ValueError if there is no room (one process: rank 0 at start, inside its resume decision)."""
    if problem := room_problem(checkpoints_dir, cfg):
        raise ValueError(problem)


def ensure_room(checkpoints_dir: Path, cfg: Config, is_main: bool) -> None:
    """Collective, before each save: rank 0 measures and tells every rank, so all stop together (a rank that
    stopped alone would leave the others waiting in the save's collectives until the timeout)."""
    problem = room_problem(checkpoints_dir, cfg) if is_main else None
    problem = collectives.broadcast_object(problem)
    if problem:
        raise ValueError(problem)
