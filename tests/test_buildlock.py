"""A PyTorch extension build lock left by a killed process (buildlock.py): removed when no process holds it, kept
while one does, and on a shared filesystem kept until older than any build. The end-to-end case plants the lock
that hung this project's CI in a real run's extension directory."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train_e2e import LAUNCH, TINY, run

from mellama_train import buildlock


def plant(root: Path, op: str = "deepspeed_shm_comm") -> Path:
    lock = root / op / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    return lock


def test_a_lock_no_process_holds_is_removed_with_a_line_naming_it(tmp_path, caplog):
    lock = plant(tmp_path)
    with caplog.at_level(logging.WARNING, logger="mellama_train.buildlock"):
        assert buildlock.clear_stale_locks([tmp_path]) == [lock]
    assert not lock.exists()
    assert str(lock) in caplog.text and "no process on this host holds it" in caplog.text


def test_the_default_root_level_per_python_and_device_is_searched(tmp_path):
    lock = plant(tmp_path / "py311_cpu")
    assert buildlock.find_locks([tmp_path]) == [lock]


def test_a_lock_a_live_process_holds_is_kept(tmp_path):
    lock = plant(tmp_path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import os, sys, time; fd = os.open({str(lock)!r}, os.O_RDONLY); print(1); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "1"
        stale, why = buildlock.is_stale(lock)
        assert not stale and f"process {holder.pid} holds it" in why
        assert buildlock.clear_stale_locks([tmp_path]) == []
        assert lock.exists()
    finally:
        holder.kill()
        holder.wait()
    assert buildlock.clear_stale_locks([tmp_path]) == [lock]  # its holder died: now it is stale


def test_on_a_shared_filesystem_only_a_lock_older_than_any_build_is_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(buildlock, "filesystem_type", lambda path: "nfs4")
    lock = plant(tmp_path)
    stale, why = buildlock.is_stale(lock)
    assert not stale and "another host may be building" in why
    assert buildlock.clear_stale_locks([tmp_path]) == []
    old = time.time() - buildlock.SHARED_FS_STALE_S - 60
    os.utime(lock, (old, old))
    assert buildlock.clear_stale_locks([tmp_path]) == [lock]


def test_the_filesystem_is_the_longest_mount_point_holding_the_path():
    assert buildlock.filesystem_type(Path("/proc/self/status")) == "proc"


def test_torch_extensions_dir_replaces_the_default_root(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert buildlock.extension_roots() == [tmp_path]


@pytest.mark.slow
def test_a_run_starts_past_the_stale_lock_that_hung_ci(tmp_path):
    """DeepSpeed's CPU comm op load waits forever on a lock a killed process left: without the clean-up this run
    hangs until the timeout. The extension directory is a copy of the machine's (built by an earlier run, else
    built here: ~80 s), so the machine's own is never touched."""
    from torch.utils.cpp_extension import get_default_build_root

    ext = tmp_path / "torch_extensions"
    built = Path(get_default_build_root()) / f"py{sys.version_info.major}{sys.version_info.minor}_cpu"
    if built.is_dir():
        shutil.copytree(built, ext, ignore=shutil.ignore_patterns("lock"))
    lock = plant(ext)
    cmd = [sys.executable, LAUNCH, "--output-dir", str(tmp_path / "run"), *TINY, "--max-steps", "1"]
    proc = run(cmd, timeout=400, env={"TORCH_EXTENSIONS_DIR": str(ext)})
    assert not lock.exists()
    assert f"removed a stale PyTorch extension build lock {lock}" in proc.stderr
