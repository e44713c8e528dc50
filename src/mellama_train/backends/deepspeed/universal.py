"""Moving a ZeRO checkpoint to another number of ranks: DeepSpeed's universal checkpoint.

A ZeRO-3 checkpoint holds each rank's partition of the weights and optimizer states, cut for the world size
that wrote it. DeepSpeed's own `ds_to_universal` rewrites it per parameter (fp32 weights and Adam moments,
whole), which an engine of any world size loads with `checkpoint.load_universal`. We run that conversion for
the user, on rank 0, the first time a checkpoint is resumed on another world size, and keep the result beside
the checkpoint:

    checkpoints/step_00000400/             the checkpoint as written (never changed)
    checkpoints/step_00000400.universal/   DeepSpeed's universal layout of it, sealed by SEAL

The conversion runs in a child process, written under `.partial` and renamed once its seal (every file's size
and SHA-256) is written, so a killed conversion is never used. A conversion read back is checked against its seal first, and
converted again when it does not match: it sits on scratch like the checkpoint itself. Retention deletes it with
its checkpoint (checkpoint.py). Every file either step reads is unpickled weights-only (files.safe_loading).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from mellama_train import integrity
from mellama_train.backends.deepspeed import load
from mellama_train.backends.deepspeed.files import safe_loading

log = logging.getLogger(__name__)

SUFFIX = ".universal"
SEAL = "SEAL.json"
COMPLETE = "COMPLETE"
"""checkpoint.COMPLETE, the step directory's completion marker (named, not imported: backends sit below the
checkpoint layer)."""


def universal_dir(step_dir: Path) -> Path:
    return step_dir.with_name(step_dir.name + SUFFIX)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != SEAL)


def _source(step_dir: Path) -> str:
    """The identity of the checkpoint converted: a digest of its completion marker, which seals every file of it
    (checkpoint.py). A step retrained later is another checkpoint under the same name."""
    return integrity.file_digest(step_dir / COMPLETE).sha256


def _sealed(root: Path, source: str) -> bool:
    """Whether `root` is the conversion of the checkpoint `source` names, holding exactly the files its seal
    lists with their sizes and digests."""
    try:
        seal = json.loads((root / SEAL).read_text(encoding="utf-8"))
        files = seal.get("files") if isinstance(seal, dict) else None
        listed = {str(p.relative_to(root)) for p in _files(root)}
        if seal.get("source") != source or not isinstance(files, dict) or set(files) != listed:
            return False
        digests = integrity.digests_of([root / name for name in files])
        return all(
            not isinstance(d, OSError) and [d.size, d.sha256] == files[str(p.relative_to(root))]
            for p, d in digests.items()
        )
    except (OSError, ValueError, TypeError, AttributeError, RecursionError):
        return False


RUNNING = "running"


class Conversion:
    """Rank 0's conversion of one checkpoint, in a child process (`python -m` this module): its worker pool
    reads the partitions in parallel, and nothing forks a process that holds the process group. `poll` lets
    the ranks wait in short collectives, each a sign of life for their watchdogs, however long it takes."""

    def __init__(self, step_dir: Path, workers: int):
        self.step_dir, self.out = step_dir, universal_dir(step_dir)
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.proc: subprocess.Popen[bytes] | None = None
        if _sealed(self.out, _source(step_dir)):
            log.info("using the universal checkpoint %s", self.out)
            return
        shutil.rmtree(self.partial, ignore_errors=True)
        log.info("converting %s to DeepSpeed's universal checkpoint for the new world size", step_dir)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", __name__, str(step_dir), str(self.partial), str(workers)],
            stdout=sys.stderr,  # its progress is a log, not output
        )

    def poll(self, seconds: float) -> str | None:
        """RUNNING, None once the sealed conversion is in place, or why it failed (one line)."""
        if self.proc is None:
            return None
        try:
            code = self.proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            return RUNNING
        if code != 0:
            return f"DeepSpeed's ds_to_universal exited with {code} (its log is above)"
        (self.step_dir.parent / "latest_universal").unlink(missing_ok=True)  # its pointer; we name the tag
        shutil.rmtree(self.out, ignore_errors=True)  # one whose seal failed
        os.replace(self.partial, self.out)
        return None


def convert(step_dir: Path, partial: Path, workers: int) -> None:
    """The child process: DeepSpeed's conversion with every file read weights-only, then the seal."""
    load()
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    args = SimpleNamespace(
        input_folder=str(step_dir),
        output_folder=str(partial),
        num_extract_workers=workers,
        num_merge_workers=max(1, workers // 2),
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=False,
    )
    with safe_loading():
        ds_to_universal(args)
    digests = integrity.digests_of(_files(partial))
    if failed := next((d for d in digests.values() if isinstance(d, OSError)), None):
        raise failed
    files = {str(p.relative_to(partial)): [d.size, d.sha256] for p, d in digests.items()}
    seal = {"source": _source(step_dir), "files": files}
    (partial / SEAL).write_text(json.dumps(seal, indent=1, sort_keys=True), encoding="utf-8")


if __name__ == "__main__":
    convert(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
