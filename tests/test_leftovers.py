"""What DeepSpeed's CPU communication leaves on a machine (leftovers.py). A PyTorch extension build lock left by a
killed process: removed when no process holds it, kept while one does, and on a shared filesystem kept until
older than any build. DeepSpeed's shared-memory all-reduce buffers: unlinked by each rank once mapped, and those
of killed runs removed at the next start. The end-to-end case plants both in a real run's way: the lock that
hung this project's CI, and a killed run's buffer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_train_e2e import LAUNCH, TINY, run

from mellama_train import leftovers


def plant(root: Path, op: str = "deepspeed_shm_comm") -> Path:
    lock = root / op / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    return lock


def test_a_lock_no_process_holds_is_removed_with_a_line_naming_it(tmp_path, caplog):
    lock = plant(tmp_path)
    with caplog.at_level(logging.WARNING, logger="mellama_train.leftovers"):
        assert leftovers.clear_stale_locks([tmp_path]) == [lock]
    assert not lock.exists()
    assert str(lock) in caplog.text and "no process on this host holds it" in caplog.text


def test_the_default_root_level_per_python_and_device_is_searched(tmp_path):
    lock = plant(tmp_path / "py311_cpu")
    assert leftovers.find_locks([tmp_path]) == [lock]


@contextlib.contextmanager
def held_open(path: Path) -> Iterator[int]:
    """A live process holding `path` open, as a build or a rank does; yields its pid."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import os, time; fd = os.open({str(path)!r}, os.O_RDONLY); print(1); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "1"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_a_live_process_holds_is_kept(tmp_path):
    lock = plant(tmp_path)
    with held_open(lock) as pid:
        stale, why = leftovers.is_stale(lock)
        assert not stale and f"process {pid} holds it" in why
        assert leftovers.clear_stale_locks([tmp_path]) == []
        assert lock.exists()
    assert leftovers.clear_stale_locks([tmp_path]) == [lock]  # its holder died: now it is stale


def test_on_a_shared_filesystem_only_a_lock_older_than_any_build_is_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(leftovers, "filesystem_type", lambda path: "nfs4")
    lock = plant(tmp_path)
    stale, why = leftovers.is_stale(lock)
    assert not stale and "another host may be building" in why
    assert leftovers.clear_stale_locks([tmp_path]) == []
    old = time.time() - leftovers.SHARED_FS_STALE_S - 60
    os.utime(lock, (old, old))
    assert leftovers.clear_stale_locks([tmp_path]) == [lock]


def test_the_filesystem_is_the_longest_mount_point_holding_the_path():
    assert leftovers.filesystem_type(Path("/proc/self/status")) == "proc"


def test_torch_extensions_dir_replaces_the_default_root(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert leftovers.extension_roots() == [tmp_path]


def shm_buffers() -> set[Path]:
    return set(leftovers.SHM_DIR.glob(f"{leftovers.SHM_BUFFER}_{os.getuid()}_*"))


def test_shm_buffers_no_process_holds_are_removed_and_held_or_other_users_ones_kept(tmp_path):
    uid = os.getuid()
    stale = tmp_path / f"{leftovers.SHM_BUFFER}_{uid}_127.0.0.1_29999_0"
    held = tmp_path / f"{leftovers.SHM_BUFFER}_{uid}_127.0.0.1_29999_1"
    other_user = tmp_path / f"{leftovers.SHM_BUFFER}_{uid + 1}_127.0.0.1_29999_0"
    for path in (stale, held, other_user):
        path.write_bytes(b"\0" * 4096)
    with held_open(held):
        assert leftovers.clear_stale_shm_buffers(tmp_path) == [stale]
    assert held.exists() and other_user.exists() and not stale.exists()


def test_a_rank_releases_its_own_buffer_by_the_name_deepspeed_gives_it(monkeypatch, tmp_path):
    monkeypatch.setattr(leftovers, "SHM_DIR", tmp_path)
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.7")
    monkeypatch.setenv("MASTER_PORT", "29500")
    mine = tmp_path / f"{leftovers.SHM_BUFFER}_{os.getuid()}_10.0.0.7_29500_3"
    peer = tmp_path / f"{leftovers.SHM_BUFFER}_{os.getuid()}_10.0.0.7_29500_2"
    mine.touch()
    peer.touch()
    leftovers.release_shm_buffer(3)
    assert not mine.exists() and peer.exists()
    leftovers.release_shm_buffer(3)  # nothing left to release: not an error


@pytest.mark.slow
def test_a_run_starts_past_a_stale_lock_and_leaves_no_shared_memory_behind(tmp_path):
    """DeepSpeed's CPU comm op load waits forever on a lock a killed process left: without the clean-up this run
    hangs until the timeout. The extension directory is a copy of the machine's (built by an earlier run, else
    built here: ~80 s), so the machine's own is never touched. The run also removes a killed run's 69 MB
    buffer and leaves none of its own."""
    from torch.utils.cpp_extension import get_default_build_root

    ext = tmp_path / "torch_extensions"
    built = Path(get_default_build_root()) / f"py{sys.version_info.major}{sys.version_info.minor}_cpu"
    if built.is_dir():
        shutil.copytree(built, ext, ignore=shutil.ignore_patterns("lock"))
    lock = plant(ext)
    killed_runs_buffer = leftovers.SHM_DIR / f"{leftovers.SHM_BUFFER}_{os.getuid()}_127.0.0.1_1_0"
    killed_runs_buffer.write_bytes(b"\0" * 4096)
    before = shm_buffers()
    cmd = [sys.executable, LAUNCH, "--output-dir", str(tmp_path / "run"), *TINY, "--max-steps", "1"]
    proc = run(cmd, timeout=400, env={"TORCH_EXTENSIONS_DIR": str(ext)})
    assert not lock.exists()
    assert f"removed a stale PyTorch extension build lock {lock}" in proc.stderr
    assert not killed_runs_buffer.exists()
    assert shm_buffers() <= before - {killed_runs_buffer}  # the run's own buffer is gone too
