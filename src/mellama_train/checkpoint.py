"""Checkpoint layout, completeness, retention and resume discovery.

    <output-dir>/checkpoints/step_00000020/
        (DeepSpeed's files: model, optimizer and scheduler shards of every rank)
        rank_00000.pt ...     each rank's data position and RNG state (ranks read different documents)
        trainer.json          step, tokens per source, world size (rank 0)
        hf/                   full-weight DeepSpeed runs: config.json, tokenizer and the probe logits that
                              `mellama-train export` checks its output against (export.py)
        COMPLETE              written last, atomically, after every rank has finished writing: JSON naming
                              every other file of the directory with its size in bytes (the manifest)

A directory without COMPLETE is an interrupted save: never resumed from, never counted for retention.
A complete one is resumed from only if every file of its manifest is present with its recorded size; `--resume
auto` skips one that is not (naming the file) and takes the previous complete checkpoint. A marker of plain
text (`step_00000020`, from versions before the manifest) is accepted unverified.
DeepSpeed's own `latest` file is not used: which checkpoint is newest is decided by the markers.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mellama_train import engine as ds_engine

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer.json"
_TAG_RE = re.compile(r"^step_(\d+)$")


@dataclass
class TrainerState:
    step: int = 0
    """Optimizer steps completed."""
    tokens_by_source: dict[str, int] = field(default_factory=dict)
    """Training tokens consumed per source, summed over ranks."""
    world_size: int = 1
    """Data-parallel ranks that wrote the checkpoint."""
    guard: dict[str, Any] = field(default_factory=dict)
    """The numerical guard's running loss mean and skip counters (guard.StepGuard), for an exact resume."""
    eval_baseline: dict[str, float] = field(default_factory=dict)
    """Held-out loss per source at step 0: what the forgetting monitor compares with (evaluation.py)."""
    mixture_taken: dict[str, int] = field(default_factory=dict)
    """Units the mixture weights count (tokens; tune: examples) taken per source, summed over ranks."""
    epochs_by_source: dict[str, int] = field(default_factory=dict)
    """Epochs every rank has completed of each source (the fewest over ranks): the mixture ledger."""
    data_licenses: dict[str, str | None] = field(default_factory=dict)
    """Each source's license / data-use note (data.sources[].license): a checkpoint copied elsewhere still says
    under which terms its training data came."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _step_dirs(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    if not checkpoints_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in checkpoints_dir.iterdir() if (m := _TAG_RE.match(p.name)) and p.is_dir()
    ]
    return sorted(found)


def complete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    return [p for _, p in _step_dirs(checkpoints_dir) if (p / COMPLETE).is_file()]


def incomplete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    return [p for _, p in _step_dirs(checkpoints_dir) if not (p / COMPLETE).is_file()]


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # Linux syncs a file's data through any descriptor, read-only included
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _flush_and_list(path: Path) -> dict[str, int]:
    """Every file of a step directory but the marker (relative path -> bytes), each flushed to disk first.

    Rank 0 lists files that every rank wrote: this assumes the checkpoint directory is on a filesystem shared
    by all nodes (DeepSpeed's ZeRO checkpoints assume it too). There, the writers' close() has published their
    files to every client before the barrier; on a local disk the fsync here makes them durable before the
    marker vouches for them."""
    files = {}
    for item in sorted(path.rglob("*")):
        if item.is_file() and item.name not in (COMPLETE, f".{COMPLETE}.tmp"):
            _fsync(item)
            files[item.relative_to(path).as_posix()] = item.stat().st_size
    return files


def verify(path: Path) -> str | None:
    """None if every file the COMPLETE marker lists is present with its recorded size; else what is wrong, as
    one line naming the file. Sizes catch truncated and missing files, not damaged content (load() reports
    those)."""
    marker = path / COMPLETE
    text = marker.read_text(encoding="utf-8", errors="replace")
    if not text.lstrip().startswith("{"):
        log.debug("%s: marker without a manifest (written by an earlier version); not verified", marker)
        return None
    try:
        files = json.loads(text)["files"]
        expected = {str(name): int(size) for name, size in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"{marker} is not a readable manifest ({exc})"
    problems = []
    for name, size in expected.items():
        file = path / name
        if not file.is_file():
            problems.append(f"{file} is missing")
        elif (actual := file.stat().st_size) != size:
            problems.append(f"{file} is {actual} bytes, expected {size}")
    if not problems:
        return None
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return problems[0] + more


def _rank_file(path: Path, rank: int) -> Path:
    return path / f"rank_{rank:05d}.pt"


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(
    engine: ds_engine.Engine,
    checkpoints_dir: Path,
    trainer: TrainerState,
    data_state: dict[str, Any],
    rank: int,
    keep_last: int,
    write_meta: Callable[[Path], None] | None = None,
) -> Path:
    """Collective. Every rank writes its shards and its own data/RNG state; then rank 0 writes `write_meta`'s
    files (export.write_checkpoint_meta) and the manifest marker, the last file of the checkpoint."""
    tag = tag_for(trainer.step)
    path = checkpoints_dir / tag
    if rank == 0 and path.exists():
        # Left by an earlier attempt at this step (an interrupted save, or a checkpoint skipped at resume): its
        # old marker must not vouch for new files while they are being written, nor its stale files linger.
        shutil.rmtree(path)
    ds_engine.barrier()
    engine.save(str(checkpoints_dir), tag)
    rank_file = _rank_file(path, rank)
    torch.save({"data": data_state, "rng": _rng_state()}, rank_file.with_suffix(".tmp"))
    _fsync(rank_file.with_suffix(".tmp"))
    os.replace(rank_file.with_suffix(".tmp"), rank_file)
    ds_engine.barrier()  # every rank's files are written before the marker says so
    if rank == 0:
        if write_meta is not None:
            write_meta(path)
        _atomic_write(path / TRAINER_STATE, json.dumps(asdict(trainer), indent=2))
        marker = {"tag": tag, "files": _flush_and_list(path)}
        _atomic_write(path / COMPLETE, json.dumps(marker, indent=1) + "\n")
        _prune(checkpoints_dir, keep_last, just_written=path)
    ds_engine.barrier()
    return path


def _prune(checkpoints_dir: Path, keep_last: int, just_written: Path | None = None) -> None:
    """Keep the newest `keep_last` complete checkpoints (never fewer than one) and the one just written."""
    complete = complete_checkpoints(checkpoints_dir)
    for old in complete[: -max(keep_last, 1)]:
        if old == just_written:
            continue
        # Marker first: a prune killed half-way leaves an incomplete directory, never a "complete" husk.
        (old / COMPLETE).unlink(missing_ok=True)
        shutil.rmtree(old, ignore_errors=True)
    newest = complete[-1] if complete else None
    # Interrupted saves older than the newest complete one can never be resumed: reclaim their space.
    for partial in incomplete_checkpoints(checkpoints_dir):
        if newest is not None and partial.name < newest.name:
            shutil.rmtree(partial, ignore_errors=True)


def find_resume_point(output_dir: Path, resume: str, same_run: bool = False) -> Path | None:
    """The checkpoint to resume from, or None for a fresh start. Never silently starts over a run that has one.

    `same_run`: the output dir's run record shows this very run (outputs.same_run). Then a directory holding only
    interrupted saves (a run killed during its first save) starts from step 0, with a warning: nothing complete
    was ever saved, so nothing is lost, and a requeued job must not stop there. Otherwise that is refused."""
    checkpoints_dir = output_dir / "checkpoints"
    complete = complete_checkpoints(checkpoints_dir)
    partial = incomplete_checkpoints(checkpoints_dir)
    if resume == "never":
        if complete or partial:
            raise ValueError(
                f"--resume never, but {checkpoints_dir} already holds checkpoints; choose a new --output-dir "
                "or use --resume auto to continue that run"
            )
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / COMPLETE).is_file():
            raise ValueError(f"--resume {resume}: not a complete checkpoint directory (no {COMPLETE} marker)")
        if problem := verify(path):
            raise ValueError(
                f"--resume {resume}: checkpoint is damaged: {problem}; restore that file or pass another checkpoint"
            )
        return path
    if partial and (not complete or partial[-1].name > complete[-1].name):
        names = ", ".join(p.name for p in partial)
        log.warning("skipping incomplete checkpoint(s) %s (interrupted while saving)", names)
    damaged = []
    for candidate in reversed(complete):
        problem = verify(candidate)
        if problem is None:
            return candidate
        log.warning(
            "skipping damaged checkpoint %s: %s; trying the previous complete one", candidate.name, problem
        )
        damaged.append(problem)
    if damaged:
        raise ValueError(
            f"no checkpoint in {checkpoints_dir} is intact ({'; '.join(damaged)}); refusing to restart from step 0"
            " over them: restore the named file(s), or pass a new --output-dir to start over"
        )
    if partial and same_run:
        log.warning(
            "%s holds only incomplete checkpoints (%s), interrupted saves of this same run (its run record"
            " matches): nothing complete to resume from, so training starts from step 0",
            checkpoints_dir,
            ", ".join(p.name for p in partial),
        )
        return None
    if partial:
        raise ValueError(
            f"{checkpoints_dir} holds only incomplete checkpoints ({partial[-1].name}); refusing to restart from "
            "step 0 over them: delete them or pass a new --output-dir"
        )
    return None


def load(
    engine: ds_engine.Engine, path: Path, rank: int, world_size: int
) -> tuple[TrainerState, dict[str, Any]]:
    """Collective. Restore model/optimizer/scheduler shards, then this rank's data position and RNG.

    A file that cannot be read (damaged content that the manifest's sizes cannot see) is a ValueError naming the
    checkpoint and the previous one to resume from instead. It does not fall back by itself: ranks that read
    different files could disagree about where the run stands."""
    try:
        trainer = TrainerState(**json.loads((path / TRAINER_STATE).read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(_unloadable(path, exc)) from exc
    if trainer.world_size != world_size:
        raise ValueError(
            f"{path} was written by {trainer.world_size} data-parallel ranks but this run has {world_size}: each "
            "rank's position in the data cannot be remapped exactly to another number of ranks (documents would "
            f"be repeated or skipped), so resuming is refused; relaunch on the original {trainer.world_size} ranks"
        )
    try:
        engine.load(str(path.parent), path.name)
        # weights_only: this file holds only plain containers and tensors, so nothing executable can be loaded.
        rank_state = torch.load(_rank_file(path, rank), weights_only=True)
    except Exception as exc:  # whatever DeepSpeed or torch.load raise on a damaged file
        raise ValueError(_unloadable(path, exc)) from exc
    _set_rng_state(rank_state["rng"])
    return trainer, rank_state["data"]


def _unloadable(path: Path, exc: Exception) -> str:
    step = int(m.group(1)) if (m := _TAG_RE.match(path.name)) else None
    older = [
        p for s, p in _step_dirs(path.parent) if step is not None and s < step and (p / COMPLETE).is_file()
    ]
    fix = (
        f"resume from the previous checkpoint with --resume {older[-1]}"
        if older
        else "restore its files from a copy, or pass a new --output-dir to start over"
    )
    detail = (str(exc).strip().splitlines() or [""])[0].split(". ")[0][:200]  # torch's first sentence says it
    return f"cannot load checkpoint {path} ({type(exc).__name__}: {detail}); its files may be damaged: {fix}"
