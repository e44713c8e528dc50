"""Where a run starts: the checkpoint to resume (decided on rank 0 and shared) and the collective resume of the
model, optimizer, data position and RNG from it. Every refusal reaches every rank, so none waits for a peer that
has already given up.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mellama_train import checkpoint, disk_space
from mellama_train.backends import Backend, collectives
from mellama_train.config import Config
from mellama_train.data.source import CheckShare
from mellama_train.outputs import amend_run_record, check_same_run, same_run

log = logging.getLogger(__name__)


def resume(
    backend: Backend, data: Any, candidates: list[Path], record: Path | None
) -> checkpoint.TrainerState:
    """Collective: the newest intact checkpoint of `candidates` (checkpoint.load: each rank checks its own files'
    digests, their safe unpickling and the counters; together they fall back past a damaged one), then each
    rank's data position, checked against the data before it (data/source.py)."""
    env = backend.env
    loaded, state, data_state = checkpoint.load(backend, candidates, env.rank, env.world_size)
    # Every rank read every file: the files finished earlier in the epoch are checked once, shared out over the
    # ranks by what each one finished (data/source.py CheckShare), not re-hashed by every rank.
    try:
        claims = data.finished_claims(data_state)
    except Exception:  # noqa: BLE001 (a position of the wrong shape: refused just below, on this rank)
        claims = {}
    share = CheckShare(env.rank, collectives.gather_objects(claims))
    # The ranks agree on the data verdict: a change any rank finds stops every rank with that rank's line
    # (unless data.accept_changes), and every rank's accepted changes go into trainer.json (rank 0 writes it).
    try:
        verdict: tuple[str | None, list[dict[str, str]]] = (None, data.load_state_dict(data_state, share))
    except ValueError as exc:
        verdict = (str(exc), [])
    except Exception as exc:  # noqa: BLE001 (a position of the wrong shape; the rank's files were verified)
        verdict = (f"{loaded}: this rank's data position cannot be used ({type(exc).__name__})", [])
    verdicts = collectives.gather_objects(verdict)
    if refusal := next((problem for problem, _ in verdicts if problem), None):
        raise ValueError(refusal)
    for change in (change for _, changes in verdicts for change in changes):
        if (entry := {"step": state.step, **change}) not in state.data_changes:
            state.data_changes.append(entry)
    if record is not None and loaded != candidates[0]:
        amend_run_record(record, resumed_from=str(loaded))  # damaged ones were passed over
    if state.world_size != env.world_size:  # a prepared corpus's run, moved to another number of ranks
        log.info("resumed on %d ranks a checkpoint written by %d", env.world_size, state.world_size)
        state.world_size = env.world_size
    log.info("resumed from %s at step %d", loaded, state.step)
    return state


def start_point(cfg: Config, run_dir: Path, is_main: bool) -> list[Path]:
    """Collective: the checkpoints to try, newest first (empty: a fresh start), or the refusal, on every rank.

    Rank 0 decides and tells the others, so ranks on different nodes cannot disagree about the start point.
    A refusal is broadcast too: raised on rank 0 alone it would leave the others waiting for the timeout."""
    decision: tuple[list[str], str | None] = ([], None)
    if is_main:
        try:
            found = checkpoint.resume_candidates(run_dir, cfg.train.resume, same_run(run_dir, cfg))
            # Another run's checkpoints are refused, naming what differs.
            check_same_run(run_dir, cfg, found[0] if found else None)
            disk_space.check_room(run_dir / "checkpoints", cfg)
            decision = ([str(p) for p in found], None)
        except ValueError as exc:
            decision = ([], str(exc))
        except Exception as exc:  # noqa: BLE001 (a hostile run directory: the others must not wait for rank 0)
            decision = ([], f"{run_dir}: cannot decide where to resume ({type(exc).__name__}: {exc})")
    found_paths, refusal = collectives.broadcast_object(decision)
    if refusal:
        raise ValueError(refusal)
    return [Path(p) for p in found_paths]
