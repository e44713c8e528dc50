"""Checkpoint layout, integrity, consistency, retention and resume.

    <output-dir>/checkpoints/step_00000020/
        (DeepSpeed's files: model, optimizer and scheduler shards of every rank)
        rank_00000.pt ...     each rank's step, data position (coordinates only: file, record, token offset)
                              and RNG state
        trainer.json          step, tokens per source, world size, ledger (rank 0)
        hf/                   full-weight DeepSpeed runs: config.json, tokenizer and the probe logits that
                              `mellama-train export` checks its output against (export/final.py)
        COMPLETE              the manifest, written last: every other file with its size, its SHA-256 and the
                              rank that wrote it, and the manifest's own digest

How a save stays trustworthy:
- It is written under `step_00000020.partial/` and renamed to `step_00000020/` only once the manifest is in it,
  so a `step_*` directory is complete by construction; an interrupted save is a `.partial` directory, ignored by
  resume and reclaimed later. A save never deletes or overwrites a complete checkpoint: one already at that step
  (the run resumed from an older point) is moved aside to `step_00000020.replaced-<unix time>/`.
- Each file's digest is computed while it is written (integrity.py), by the rank that writes it.
- A write that fails (a full disk) stops every rank with one line; the `.partial` directory is left and ignored.

How a resume stays trustworthy (`load`, collective): the newest checkpoint is used only if
1. its manifest is intact (its own digest), names its directory, and lists exactly the files present;
2. every rank finds the files it reads with their recorded sizes and digests (each rank hashes its own files,
   in parallel), and their pickles hold nothing but tensors and plain data (nothing is ever unpickled that could
   run code: integrity.safe_load, and the backend's read_file for its own files);
3. its counters agree: the directory's step, trainer.json, DeepSpeed's global and scheduler steps, and every
   rank's data position (its step, and the ranks' token counts summed against trainer.json).
Otherwise it is named as damaged with the reason, and the previous checkpoint is tried. When none is intact the run
refuses to start (it never trains from step 0 over checkpoints). A `step_*` directory without COMPLETE is damaged
too (the marker was removed): removing markers cannot turn a run into a fresh start.
DeepSpeed's own `latest` file is not used.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mellama_train import integrity
from mellama_train.backends import Backend, collectives
from mellama_train.watchdog import progress

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer.json"
MANIFEST_FORMAT = 2
"""1: sizes only (before content digests; not resumable by this version). 2: sizes, SHA-256 and writer rank."""
_TAG_RE = re.compile(r"^step_(\d+)$")
_PARTIAL_RE = re.compile(r"^step_(\d+)\.partial$")


class CheckpointWriteError(ValueError):
    """A save could not be completed (disk full, I/O error): one line, the same on every rank."""


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
    data_changes: list[dict[str, Any]] = field(default_factory=list)
    """Data files that had changed before the saved position and that a resume continued over on purpose
    (`--accept-data-change`): {step, source, file, what}, on every rank, oldest first."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _dirs(checkpoints_dir: Path, pattern: re.Pattern[str]) -> list[tuple[int, Path]]:
    try:
        entries = list(checkpoints_dir.iterdir()) if checkpoints_dir.is_dir() else []
    except OSError as exc:  # unreadable (permissions): a refusal naming it beats a fresh start over it
        raise ValueError(
            f"{checkpoints_dir}: cannot list checkpoints ({exc.strerror}); fix its permissions"
        ) from None
    return sorted((int(m.group(1)), p) for p in entries if (m := pattern.match(p.name)) and p.is_dir())


def complete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Step directories, oldest first (a `step_*` directory is only ever created complete: see the module
    docstring). Whether one is intact is for `verify` to say."""
    return [p for _, p in _dirs(checkpoints_dir, _TAG_RE)]


def incomplete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Interrupted saves (`step_*.partial`), oldest first."""
    return [p for _, p in _dirs(checkpoints_dir, _PARTIAL_RE)]


def _step_of(path: Path) -> int | None:
    m = _TAG_RE.match(path.name) or _PARTIAL_RE.match(path.name)
    return int(m.group(1)) if m else None


# ---- writing --------------------------------------------------------------------------------------------


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


def _write_failure(what: str, exc: OSError, path: Path, needed: int | None) -> str:
    """One line for a failed write; a full disk says how much is free and how much the checkpoint needs."""
    import errno

    reason = exc.strerror or type(exc).__name__
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = shutil.disk_usage(path).free
        except OSError:
            free = 0
        need = f", the checkpoint needs about {needed:,}" if needed else ""
        reason = f"{reason}: {free:,} bytes free on the filesystem of {path}{need}"
    return f"{what} failed ({reason}); the partial save is left as {path.name} and is ignored on resume"


def save(
    backend: Backend,
    checkpoints_dir: Path,
    trainer: TrainerState,
    data_state: dict[str, Any],
    rank: int,
    keep_last: int,
    write_meta: Callable[[Path], None] | None = None,
) -> Path:
    """Collective. Every rank writes its shards and its rank file into `step_N.partial/`, hashing as it writes;
    then rank 0 writes `write_meta`'s files (export.write_checkpoint_meta), trainer.json and the manifest, and
    renames the directory to `step_N/`. Raises CheckpointWriteError on every rank if any write failed."""
    tag = tag_for(trainer.step)
    final, partial = checkpoints_dir / tag, checkpoints_dir / f"{tag}.partial"
    previous = complete_checkpoints(checkpoints_dir)
    needed = _directory_bytes(previous[-1]) if previous else None
    problem = None
    if rank == 0:
        try:
            if partial.exists():  # an earlier attempt at this step that never completed
                shutil.rmtree(partial)
            partial.mkdir(parents=True)
        except OSError as exc:
            problem = _write_failure(f"creating {partial}", exc, partial, needed)
    if problem := collectives.broadcast_object(problem):
        raise CheckpointWriteError(problem)

    written: dict[str, integrity.FileDigest] = {}
    try:
        written.update(backend.save(str(checkpoints_dir), partial.name))
        rank_state = {
            "step": trainer.step,
            "rank": rank,
            "world_size": trainer.world_size,
            "tokens_by_source": dict(data_state.get("tokens_by_source", {})),
            "data": data_state,
            "rng": _rng_state(),
        }
        rank_file = _rank_file(partial, rank)
        written[str(rank_file)] = integrity.save_torch(rank_state, rank_file)
    except OSError as exc:
        problem = _write_failure(f"writing {tag} on rank {rank}", exc, partial, needed)
    reports = collectives.gather_objects((_relative(written, partial, rank), problem))
    if failures := [p for _, p in reports if p]:
        raise CheckpointWriteError(failures[0])

    outcome = None
    if rank == 0:
        try:
            files = {name: entry for files, _ in reports for name, entry in files.items()}
            _finish(partial, final, trainer, files, write_meta)
        except OSError as exc:
            outcome = _write_failure(f"completing {tag}", exc, partial, needed)
        except Exception as exc:  # noqa: BLE001 (raised on rank 0 alone, it would leave the others waiting)
            outcome = (
                f"completing {tag} failed ({type(exc).__name__}: {exc}); {partial.name} is ignored on resume"
            )
        if outcome is None:
            try:  # retention is best effort: a checkpoint someone made read-only to keep it is kept
                _prune(checkpoints_dir, keep_last, just_written=final)
            except OSError as exc:
                log.warning("could not remove an old checkpoint (%s); it is kept", exc)
    if outcome := collectives.broadcast_object(outcome):
        raise CheckpointWriteError(outcome)
    return final


def _relative(written: dict[str, integrity.FileDigest], root: Path, rank: int) -> dict[str, dict[str, Any]]:
    """This rank's manifest entries: name relative to the step directory -> size, digest, writer."""
    root_abs = os.path.abspath(root)
    return {
        os.path.relpath(path, root_abs).replace(os.sep, "/"): {
            "bytes": d.size,
            "sha256": d.sha256,
            "rank": rank,
        }
        for path, d in written.items()
    }


def _finish(
    partial: Path,
    final: Path,
    trainer: TrainerState,
    files: dict[str, dict[str, Any]],
    write_meta: Callable[[Path], None] | None,
) -> None:
    """Rank 0: the metadata files, the manifest (last file written), then the rename that publishes it."""
    if write_meta is not None:
        write_meta(partial)
    digest = integrity.atomic_write(partial / TRAINER_STATE, json.dumps(asdict(trainer), indent=2))
    files[TRAINER_STATE] = {"bytes": digest.size, "sha256": digest.sha256, "rank": 0}
    # Files no rank hashed while writing (write_meta's, anything DeepSpeed wrote outside its checkpoint engine):
    # hashed here, after every rank's writes are closed.
    on_disk = _listing(partial)
    unhashed = [partial / name for name in on_disk if name not in files]
    for path, digest_or_error in integrity.digests_of(unhashed).items():
        if isinstance(digest_or_error, OSError):
            raise digest_or_error
        name = path.relative_to(partial).as_posix()
        files[name] = {"bytes": digest_or_error.size, "sha256": digest_or_error.sha256, "rank": 0}
    for name in on_disk:  # every file closed and flushed before the marker vouches for it
        _fsync_file(partial / name)
    integrity.follow_umask(partial)  # write_meta's safetensors come out 0600; modes are not in the manifest
    body = {
        "format": MANIFEST_FORMAT,
        "tag": final.name,
        "step": trainer.step,
        "world_size": trainer.world_size,
        "files": dict(sorted(files.items())),
    }
    integrity.atomic_write(partial / COMPLETE, json.dumps({**body, **_seal(body)}, indent=1))
    if final.exists():
        # The run trains through a step it had saved before (it resumed from an older checkpoint): keep that one.
        aside = final.with_name(f"{final.name}.replaced-{int(time.time())}")
        os.rename(final, aside)
        log.warning("%s already existed: moved aside to %s (nothing is deleted)", final, aside.name)
    os.rename(partial, final)
    integrity.fsync_dir(final.parent)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # Linux syncs a file's data through any descriptor, read-only included
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _listing(path: Path) -> list[str]:
    """Every file under a step directory but the marker and temporaries, as manifest names."""
    return sorted(
        item.relative_to(path).as_posix()
        for item in path.rglob("*")
        if item.is_file() and item.name != COMPLETE and not item.name.startswith(f".{COMPLETE}")
    )


def _directory_bytes(path: Path) -> int:
    try:
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    except OSError:
        return 0


def _prune(checkpoints_dir: Path, keep_last: int, just_written: Path | None = None) -> None:
    """Keep the newest `keep_last` checkpoints up to the one just written (never fewer than one); reclaim
    interrupted saves older than the newest checkpoint. Only this retention ever deletes a checkpoint.

    Checkpoints newer than the one just written (the run fell back past them: damaged, or a history `--resume
    PATH` left) are neither counted nor deleted: counting them would delete the intact one this run resumed
    from while keeping a damaged one."""
    every = complete = complete_checkpoints(checkpoints_dir)
    if just_written is not None and (limit := _step_of(just_written)) is not None:
        complete = [p for p in every if (_step_of(p) or 0) <= limit]
    for old in complete[: -max(keep_last, 1)]:
        if old == just_written:
            continue
        # Marker first: a prune killed half-way leaves a directory without a marker, which resume names as
        # damaged and passes over, never a "complete" husk.
        (old / COMPLETE).unlink(missing_ok=True)
        shutil.rmtree(old, ignore_errors=True)
        for derived in checkpoints_dir.glob(f"{old.name}.*"):  # its universal conversion (backends/deepspeed)
            shutil.rmtree(derived, ignore_errors=True)
    newest = _step_of(every[-1]) if every else None
    for partial in incomplete_checkpoints(checkpoints_dir):
        step = _step_of(partial)
        if newest is not None and step is not None and step < newest:
            shutil.rmtree(partial, ignore_errors=True)


# ---- verifying ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    tag: str
    step: int
    world_size: int
    files: dict[str, dict[str, Any]]
    """name -> {"bytes", "sha256", "rank"}."""


class Damaged(ValueError):
    """A checkpoint that cannot be trusted; the message is one line naming the file and what is wrong."""


_SEALS = ("manifest_sha256", "manifest_hmac")


def _seal(body: dict[str, Any]) -> dict[str, str]:
    """The manifest's own digest: an HMAC when a signing key is set (integrity.SIGNING_KEY_ENV), else SHA-256."""
    key = integrity.signing_key()
    if key is not None:
        return {"manifest_hmac": integrity.json_digest(body, key)}
    return {"manifest_sha256": integrity.json_digest(body)}


_MANIFEST_LIMIT = 64 << 20
"""A COMPLETE larger than this is not one this trainer wrote (a 70B run's lists a few thousand files)."""
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _whole(value: Any, what: str, marker: Path) -> int:
    """A non-negative JSON integer, or Damaged (a crafted manifest may hold floats, 1e999, strings, booleans)."""
    if type(value) is not int or value < 0:
        raise Damaged(f"{marker} is not a manifest this trainer wrote ({what} is {type(value).__name__})")
    return value


def read_manifest(path: Path) -> Manifest:
    """The manifest of a step directory, checked against itself and its directory (raises Damaged). Every value
    is type-checked: a crafted marker is named as damaged, never a traceback."""
    marker = path / COMPLETE
    try:
        if marker.stat().st_size > _MANIFEST_LIMIT:
            raise Damaged(f"{marker} is {marker.stat().st_size:,} bytes: not a manifest this trainer wrote")
        text = marker.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise Damaged(
            f"{marker} is missing (the save never finished, or the marker was removed; its files cannot be"
            " trusted without it)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise Damaged(f"{marker} cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError):
        raw = None
    if not isinstance(raw, dict):
        if text.lstrip().startswith(("{", "[")):
            raise Damaged(f"{marker} is not a readable manifest")
        raw = {"format": 0}  # the plain-text marker of versions before the manifest
    fmt = raw.get("format", 1)  # manifests of sizes only had no format field
    if type(fmt) is not int or fmt < MANIFEST_FORMAT:
        raise Damaged(
            f"{marker} was written by an earlier version without content digests and cannot be verified;"
            " finish that run with the version that started it"
        )
    body = {k: v for k, v in raw.items() if k not in _SEALS}
    key = integrity.signing_key()
    if "manifest_hmac" in raw and key is None:
        raise Damaged(
            f"{marker} is sealed with a key: set {integrity.SIGNING_KEY_ENV} to the key the run was started with"
        )
    if key is not None and "manifest_hmac" not in raw:
        raise Damaged(f"{marker} is not sealed with the key in {integrity.SIGNING_KEY_ENV}")
    ((seal_name, expected),) = _seal(body).items()
    if not hmac.compare_digest(str(raw.get(seal_name)), expected):
        raise Damaged(f"{marker} was modified after it was written (its digest does not match its content)")
    files = body.get("files")
    if not isinstance(files, dict) or not isinstance(body.get("tag"), str):
        raise Damaged(f"{marker} is not a manifest this trainer wrote (fields missing)")
    entries = {}
    for name, entry in files.items():
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts or not isinstance(entry, dict):
            raise Damaged(
                f"{marker} lists a file outside its directory or without a size and digest: {name!r}"
            )
        digest = entry.get("sha256")
        if not isinstance(digest, str) or not _HEX64.match(digest):
            raise Damaged(f"{marker} is not a manifest this trainer wrote (the digest of {name!r})")
        entries[name] = {
            "bytes": _whole(entry.get("bytes"), f"the size of {name!r}", marker),
            "sha256": digest,
            "rank": _whole(entry.get("rank"), f"the rank of {name!r}", marker),
        }
    manifest = Manifest(
        tag=body["tag"],
        step=_whole(body.get("step"), "step", marker),
        world_size=_whole(body.get("world_size"), "world_size", marker),
        files=entries,
    )
    if manifest.tag != path.name or _step_of(path) != manifest.step:
        raise Damaged(
            f"{marker} describes {manifest.tag} (step {manifest.step}), not its directory {path.name}"
        )
    return manifest


def verify(path: Path, deep: bool = False, rank: int | None = None, threads: int | None = None) -> str | None:
    """None if the checkpoint's files match its manifest, else one line naming the file and what is wrong.

    Always: the manifest is intact, every listed file is present with its size, and no unlisted file was added
    (DeepSpeed globs for shards, so an added file could be loaded). `deep`: also the SHA-256 of every file (of
    `rank`'s files only when `rank` is given, plus trainer.json, which every rank reads), in parallel."""
    try:
        manifest = read_manifest(path)
        listed = set(manifest.files)
        try:
            present = set(_listing(path))
        except OSError as exc:
            raise Damaged(f"{path} cannot be read ({exc.strerror or exc})") from None
        problems = [f"{path / name} is missing" for name in sorted(listed - present)]
        problems += [
            f"{path / name} is not in its manifest (added later)" for name in sorted(present - listed)
        ]
        for name in sorted(listed & present):
            expected, actual = manifest.files[name]["bytes"], (path / name).stat().st_size
            if actual != expected:
                problems.append(f"{path / name} is {actual} bytes, expected {expected}")
        if not problems and deep:
            mine = [
                n
                for n, e in manifest.files.items()
                if rank is None or e["rank"] == rank or n == TRAINER_STATE
            ]
            found = integrity.digests_of([path / n for n in mine], threads)
            for name in mine:
                got = found[path / name]
                if isinstance(got, OSError):
                    problems.append(f"{path / name} cannot be read ({got.strerror or got})")
                elif got.sha256 != manifest.files[name]["sha256"]:
                    problems.append(f"{path / name} changed after it was written (its SHA-256 differs)")
    except Damaged as exc:
        return str(exc)
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror or exc})"
    except Exception as exc:  # noqa: BLE001 (a hostile directory: too deep to walk, names that are not text)
        return f"{path} cannot be verified ({type(exc).__name__})"
    if not problems:
        return None
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return problems[0] + more


# ---- choosing and loading the resume point --------------------------------------------------------------


def resume_candidates(output_dir: Path, resume: str, same_run: bool = False) -> list[Path]:
    """The checkpoints to try, newest first (an empty list: a fresh start), after the cheap checks. Raises
    ValueError (one line) instead of ever starting from step 0 over a directory that holds checkpoints.

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
        return []
    if resume != "auto":
        path = Path(resume)
        if _TAG_RE.match(path.name) is None or not path.is_dir():
            hint = ""
            if (path / "config.json").is_file():
                hint = (
                    f"; {path} is an exported model: to train on from its weights, start a new run (a new"
                    f" --output-dir) with --set model.init=pretrained --set model.path={path}"
                    f" (tuning: --base {path})"
                )
            elif (path / "adapter_config.json").is_file():
                hint = (
                    f"; {path} is a LoRA adapter: to tune it on, start a new run (a new --output-dir) with"
                    f" --base <its base model> --init-adapter {path}"
                )
            raise ValueError(f"--resume {resume}: not a checkpoint directory (checkpoints/step_N){hint}")
        if problem := verify(path):
            raise ValueError(
                f"--resume {resume}: checkpoint is damaged: {problem}; restore that file or pass another checkpoint"
            )
        return [path]
    if partial and (not complete or _step_of(partial[-1]) > _step_of(complete[-1])):
        names = ", ".join(p.name for p in partial)
        log.warning("skipping incomplete checkpoint(s) %s (interrupted while saving)", names)
    candidates, damaged = [], []
    for candidate in reversed(complete):
        problem = verify(candidate)
        if problem is None:
            candidates.append(candidate)
            continue
        log.warning("skipping damaged checkpoint %s: %s; trying the previous one", candidate.name, problem)
        damaged.append(problem)
    if candidates:
        return candidates
    if damaged:
        raise ValueError(_none_intact(checkpoints_dir, damaged))
    if partial and same_run:
        log.warning(
            "%s holds only incomplete checkpoints (%s), interrupted saves of this same run (its run record"
            " matches): nothing complete to resume from, so training starts from step 0",
            checkpoints_dir,
            ", ".join(p.name for p in partial),
        )
        return []
    if partial:
        raise ValueError(
            f"{checkpoints_dir} holds only incomplete checkpoints ({partial[-1].name}); refusing to restart from "
            "step 0 over them: delete them or pass a new --output-dir"
        )
    return []


def find_resume_point(output_dir: Path, resume: str, same_run: bool = False) -> Path | None:
    """The newest checkpoint that passes the cheap checks (None: a fresh start); see resume_candidates."""
    candidates = resume_candidates(output_dir, resume, same_run)
    return candidates[0] if candidates else None


def _none_intact(checkpoints_dir: Path, damaged: list[str]) -> str:
    return (
        f"no checkpoint in {checkpoints_dir} is intact ({'; '.join(damaged)}); refusing to restart from step 0"
        " over them: restore the named file(s), or pass a new --output-dir to start over"
    )


@dataclass
class _Verdict:
    problem: str | None = None
    """Why this rank finds the checkpoint damaged (one line), or None."""
    refusal: str | None = None
    """Why it cannot be resumed at all, whatever its state (another world size): stops the run."""
    tokens: dict[str, int] = field(default_factory=dict)
    """This rank's tokens per source, summed over ranks against trainer.json."""


def _examine(backend: Backend, path: Path, rank: int, world_size: int) -> _Verdict:
    """One rank's checks of one checkpoint before anything of it is loaded: its files, then its counters. Never
    raises: a rank that raised here alone would leave the others waiting in the verdicts' collective."""
    try:
        return _examine_or_raise(backend, path, rank, world_size)
    except Exception as exc:  # noqa: BLE001 (a crafted file of any shape: damaged, not a traceback)
        return _Verdict(f"{path.name} cannot be checked ({type(exc).__name__})")


def _rank_state_problem(state: Any, rank_file: Path) -> str | None:
    """What is wrong with the shape of a rank file's content (a forged one may hold anything), or None."""
    if not isinstance(state, dict) or not isinstance(state.get("data"), dict):
        return f"{rank_file.name} is not a rank state this trainer wrote"
    tokens = state.get("tokens_by_source")
    if not isinstance(tokens, dict) or not all(
        isinstance(k, str) and type(v) is int for k, v in tokens.items()
    ):
        return f"{rank_file.name} holds no token counts per source"
    rng = state.get("rng")
    torch_rng = rng.get("torch") if isinstance(rng, dict) else None
    if not isinstance(torch_rng, torch.Tensor) or torch_rng.dtype != torch.uint8:
        return f"{rank_file.name} holds no RNG state"
    try:
        random.Random().setstate(rng["python"])  # the state must be one `random` accepts
    except (TypeError, ValueError, KeyError):
        return f"{rank_file.name} holds no RNG state"
    return None


def _examine_or_raise(backend: Backend, path: Path, rank: int, world_size: int) -> _Verdict:
    if problem := verify(path, deep=True, rank=rank):
        return _Verdict(problem)
    try:
        trainer = TrainerState(**json.loads((path / TRAINER_STATE).read_text()))
    except (OSError, ValueError, TypeError, RecursionError) as exc:
        return _Verdict(f"{path / TRAINER_STATE} cannot be read ({type(exc).__name__})")
    if type(trainer.step) is not int or type(trainer.world_size) is not int:
        return _Verdict(f"{path / TRAINER_STATE} is not a trainer state this trainer wrote")
    reshaped = trainer.world_size != world_size
    # On another world size, this rank reads the files of a rank that wrote the checkpoint: its own when there
    # was one, else rank 0's. Only the position of a prepared-corpus run is the same on every rank.
    reading = rank if rank < trainer.world_size else 0
    if reshaped and (refusal := _reshape_refusal(backend, path, trainer.world_size, world_size)):
        return _Verdict(refusal=refusal)
    if reshaped and reading != rank and (problem := verify(path, deep=True, rank=reading)):
        return _Verdict(problem)
    step = _step_of(path)
    rank_file = _rank_file(path, reading)
    try:
        # Every .pt file this rank reads is unpickled weights-only before DeepSpeed touches it, so a pickle that
        # would build anything but tensors and plain data fails here, where the ranks can still agree to fall
        # back, and never runs (an attacker who also rewrote the manifest's digests gets this far).
        for name, entry in read_manifest(path).files.items():
            if entry["rank"] == reading and name.endswith(".pt"):
                backend.read_file(str(path / name), mmap=True)
        rank_state = integrity.safe_load(str(rank_file))
        counters = backend.saved_counters(str(path), reading)
    except Exception as exc:  # noqa: BLE001 (whatever torch.load raises on a crafted or damaged pickle)
        return _Verdict(f"a file of {path} cannot be loaded safely ({_load_error(exc)})")
    if problem := _rank_state_problem(rank_state, rank_file):
        return _Verdict(problem)
    disagree = []
    if trainer.step != step:
        disagree.append(f"trainer.json says step {trainer.step}")
    position = rank_state["data"].get("prepared")
    if (
        isinstance(position, dict) and position.get("step") != step
    ):  # a prepared corpus's position is the step
        disagree.append(f"{rank_file.name}'s data position is at step {str(position.get('step'))[:20]}")
    if rank_state.get("step") != step or rank_state.get("rank") != reading:
        disagree.append(
            f"{rank_file.name} says step {rank_state.get('step')} of rank {rank_state.get('rank')}"
        )
    if counters is not None:
        if counters["global_steps"] != step:
            disagree.append(f"DeepSpeed's global_steps is {counters['global_steps']}")
        applied = counters["global_steps"] - counters["skipped_steps"]
        if counters["scheduler_steps"] >= 0 and counters["scheduler_steps"] != applied:
            disagree.append(
                f"the lr schedule has taken {counters['scheduler_steps']} steps, not {applied} (global - skipped)"
            )
    if disagree:
        return _Verdict(f"{path.name}'s counters disagree: {'; '.join(disagree)}")
    if reshaped:
        if "prepared" not in rank_state["data"]:
            return _Verdict(refusal=_streamed_refusal(path, trainer.world_size, world_size))
        # The ranks' split of the tokens is the old world size's: rank 0 answers for the whole run.
        return _Verdict(tokens=dict(trainer.tokens_by_source) if rank == 0 else {})
    return _Verdict(tokens=dict(rank_state["tokens_by_source"]))


def _streamed_refusal(path: Path, saved: int, now: int) -> str:
    return (
        f"{path} was written by {saved} data-parallel ranks but this run has {now}, and its sources are streamed:"
        " each rank's position in them cannot be remapped to another number of ranks (documents would be"
        f" repeated or skipped); relaunch on {saved} ranks, or train over a prepared corpus (`mellama-train"
        " prepare`, docs/DATA.md), whose order does not depend on the number of ranks"
    )


def _reshape_refusal(backend: Backend, path: Path, saved: int, now: int) -> str | None:
    """Why this checkpoint's states cannot move to `now` ranks, or None: the backend must be able to
    re-partition them (DeepSpeed's universal checkpoint). Its data position is judged once its files are
    verified: only a prepared corpus's moves."""
    if not backend.reshapes:
        return (
            f"{path} was written by {saved} ranks but this run has {now}; relaunch on {saved} ranks (a checkpoint"
            " moves to another number of ranks under ZeRO-3 only)"
        )
    return None


def load(
    backend: Backend, candidates: list[Path], rank: int, world_size: int
) -> tuple[Path, TrainerState, dict[str, Any]]:
    """Collective. The newest of `candidates` that every rank finds intact and consistent (module docstring):
    its model, optimizer and scheduler states, then this rank's data position and RNG. A damaged one is named
    with a warning and the previous one tried; ValueError (one line) when none is intact, or when a checkpoint
    cannot be resumed by this run at all."""
    damaged = []
    for path in candidates:
        verdicts: list[_Verdict] = collectives.gather_objects(_examine(backend, path, rank, world_size))
        progress(f"checked {path.name}")
        if refusal := next((v.refusal for v in verdicts if v.refusal), None):
            raise ValueError(refusal)
        problem = next((v.problem for v in verdicts if v.problem), None)
        trainer = None
        if problem is None:
            trainer = TrainerState(**json.loads((path / TRAINER_STATE).read_text()))
            summed: dict[str, int] = {}
            for v in verdicts:
                for name, tokens in v.tokens.items():
                    summed[name] = summed.get(name, 0) + tokens
            if summed != trainer.tokens_by_source:
                problem = (
                    f"{path.name}'s counters disagree: the ranks' data positions hold {summed} tokens per source,"
                    f" trainer.json {trainer.tokens_by_source}"
                )
        if problem is not None:
            if rank == 0:
                log.warning("skipping damaged checkpoint %s: %s; trying the previous one", path.name, problem)
            damaged.append(problem)
            continue
        try:
            backend.load(str(path.parent), path.name, reshape=trainer.world_size != world_size)
        except Exception as exc:  # whatever DeepSpeed raises on a file that passed every check above
            raise ValueError(_unloadable(path, exc)) from exc
        progress(f"loaded {path.name}")
        if backend.optimizer_steps != trainer.step:
            raise ValueError(
                f"{path}: the backend restored {backend.optimizer_steps} optimizer steps but the checkpoint is of step"
                f" {trainer.step}; resume from the previous checkpoint with --resume PATH"
            )
        rank_state = integrity.safe_load(str(_rank_file(path, rank if rank < trainer.world_size else 0)))
        _set_rng_state(rank_state["rng"])
        if damaged and rank == 0:
            log.warning(
                "resuming from %s: %d newer checkpoint(s) were damaged (named above)", path.name, len(damaged)
            )
        return path, trainer, rank_state["data"]
    checkpoints_dir = candidates[0].parent if candidates else Path(".")
    # Those the cheap checks passed over before (resume_candidates) are named too, newest first.
    passed_over = [p for p in reversed(complete_checkpoints(checkpoints_dir)) if p not in candidates]
    damaged += [problem for p in passed_over if (problem := verify(p))]
    raise ValueError(_none_intact(checkpoints_dir, damaged))


def _load_error(exc: Exception) -> str:
    """torch's weights-only refusal in a few words: the global it refused (its message runs to a page, with
    terminal colour codes), else the first line of whatever else was raised."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    if refused := re.search(r"GLOBAL ([\w.]+)", text):
        return f"{type(exc).__name__}: refused to build {refused.group(1)}"
    if refused := re.search(r"Unsupported operand[^\n]*", text):
        return f"{type(exc).__name__}: {refused.group(0).strip()}"
    return f"{type(exc).__name__}: {(text.strip().splitlines() or [''])[0][:160]}"


def _unloadable(path: Path, exc: Exception) -> str:
    step = _step_of(path)
    older = [p for p in complete_checkpoints(path.parent) if step is not None and (_step_of(p) or 0) < step]
    fix = (
        f"resume from the previous checkpoint with --resume {older[-1]}"
        if older
        else "restore its files from a copy, or pass a new --output-dir to start over"
    )
    detail = (str(exc).strip().splitlines() or [""])[0].split(". ")[0][:200]  # torch's first sentence says it
    return f"cannot load checkpoint {path} ({type(exc).__name__}: {detail}); its files may be damaged: {fix}"
