"""Checkpoint layout, completeness, retention and resume discovery.

    <output-dir>/checkpoints/step_00000020/
        (DeepSpeed's files: model, optimizer and scheduler shards of every rank)
        rank_00000.pt ...     each rank's data position and RNG state (ranks read different documents)
        trainer.json          step, tokens per source, world size (rank 0)
        COMPLETE              written last, atomically, after every rank has finished writing

A directory without COMPLETE is an interrupted save: never resumed from, never counted for retention.
DeepSpeed's own `latest` file is not used: which checkpoint is newest is decided by the markers.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
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
) -> Path:
    """Collective. Every rank writes its shards and its own data/RNG state; then rank 0 marks it complete."""
    tag = tag_for(trainer.step)
    path = checkpoints_dir / tag
    engine.save(str(checkpoints_dir), tag)
    rank_file = _rank_file(path, rank)
    torch.save({"data": data_state, "rng": _rng_state()}, rank_file.with_suffix(".tmp"))
    os.replace(rank_file.with_suffix(".tmp"), rank_file)
    ds_engine.barrier()  # every rank's files are on disk before the marker says so
    if rank == 0:
        _atomic_write(path / TRAINER_STATE, json.dumps(asdict(trainer), indent=2))
        _atomic_write(path / COMPLETE, f"{tag}\n")
        _prune(checkpoints_dir, keep_last)
    ds_engine.barrier()
    return path


def _prune(checkpoints_dir: Path, keep_last: int) -> None:
    complete = complete_checkpoints(checkpoints_dir)
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    newest = complete[-1] if complete else None
    # Interrupted saves older than the newest complete one can never be resumed: reclaim their space.
    for partial in incomplete_checkpoints(checkpoints_dir):
        if newest is not None and partial.name < newest.name:
            shutil.rmtree(partial, ignore_errors=True)


def find_resume_point(output_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from, or None for a fresh start. Never silently starts over a run that has one."""
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
        return path
    if partial and (not complete or partial[-1].name > complete[-1].name):
        names = ", ".join(p.name for p in partial)
        log.warning("skipping incomplete checkpoint(s) %s (interrupted while saving)", names)
    if complete:
        return complete[-1]
    if partial:
        raise ValueError(
            f"{checkpoints_dir} holds only incomplete checkpoints ({partial[-1].name}); refusing to restart from "
            "step 0 over them: delete them or pass a new --output-dir"
        )
    return None


def load(
    engine: ds_engine.Engine, path: Path, rank: int, world_size: int
) -> tuple[TrainerState, dict[str, Any]]:
    """Collective. Restore model/optimizer/scheduler shards, then this rank's data position and RNG."""
    trainer = TrainerState(**json.loads((path / TRAINER_STATE).read_text()))
    if trainer.world_size != world_size:
        raise ValueError(
            f"{path} was written by {trainer.world_size} data-parallel ranks but this run has {world_size}; "
            f"resume on {trainer.world_size} ranks (each rank's exact data position cannot be remapped yet)"
        )
    engine.load(str(path.parent), path.name)
    # weights_only: this file holds only plain containers and tensors, so nothing executable can be loaded.
    rank_state = torch.load(_rank_file(path, rank), weights_only=True)
    _set_rng_state(rank_state["rng"])
    return trainer, rank_state["data"]
