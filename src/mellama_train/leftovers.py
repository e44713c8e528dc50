"""What DeepSpeed's CPU communication leaves behind on a machine, found and removed: a PyTorch extension build
lock that hangs every later start, and shared-memory buffers that hold RAM until reboot.

**Build locks.** On CPU, `deepspeed.init_distributed` loads DeepSpeed's shared-memory all-reduce op through
PyTorch's JIT extension loader. Every load, cached or not, first creates `<extensions dir>/<op>/lock` and
removes it when done; any other process that finds the file waits, with no timeout, until it disappears. A
process killed while it holds the file (a preempted job, a Ctrl-C during the ~80 s first build, a test that
kills a rank, a machine image saved mid-run) leaves it forever, and from then on every CPU run on that machine
hangs in start-up until the watchdog ends it with exit 76. This was seen in this project's own CI.
PyTorch's lock holds no process id, but its owner keeps the file open for as long as it holds it. So a lock that
no process on this host has open is stale, unless its directory is on a filesystem other hosts share (home on
NFS): an owner there would be invisible, so such a lock is removed only when older than any build takes.
PyTorch offers no stale-lock recovery of its own (its FileBaton only waits). Only a node's local rank 0 removes
a lock: two removers could otherwise delete a fresh lock that a third process took in between.

**Shared-memory buffers.** When every rank is on one machine, that op gives each rank a 69 MB buffer
`/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`, which DeepSpeed 0.19.8 never
unlinks (its shared_close is never called): every run on a new port leaves 69 MB of RAM per rank in /dev/shm
until reboot, and a test suite filled 20 GB of a 24 GB machine. So, once every rank has mapped every buffer
(DeepSpeed's init waits for that, and a barrier follows it), each rank unlinks its own: the mappings stay valid
and the memory is freed when the last process of the run exits, however it exits. Buffers of runs killed
before that point are removed at the next start, by local rank 0, when no process on the host has them open.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

SHARED_FS_STALE_S = 15 * 60.0
"""On a filesystem other hosts share, a lock with no local holder is removed only past this age: the CPU comm
op's full build takes about 80 s on two cores."""
NETWORK_FS = {
    "nfs",
    "nfs4",
    "lustre",
    "gpfs",
    "beegfs",
    "cifs",
    "smb3",
    "fuse.sshfs",
    "ceph",
    "fuse.glusterfs",
}
"""Filesystem types whose files processes on other hosts may hold."""


def extension_roots() -> list[Path]:
    """Where PyTorch builds JIT extensions for this interpreter: TORCH_EXTENSIONS_DIR, else its default root."""
    given = os.environ.get("TORCH_EXTENSIONS_DIR")
    if given:
        return [Path(given)]
    from torch.utils.cpp_extension import get_default_build_root

    return [Path(get_default_build_root())]


def find_locks(roots: list[Path]) -> list[Path]:
    """Every `lock` of an extension build directory under the roots (the default root adds a pyXY_<device>
    level, TORCH_EXTENSIONS_DIR does not)."""
    found: list[Path] = []
    for root in roots:
        if root.is_dir():
            found += [p for pattern in ("*/lock", "*/*/lock") for p in root.glob(pattern) if p.is_file()]
    return sorted(found)


def local_holders(path: Path) -> list[int] | None:
    """Process ids on this host that have `path` open, or None where /proc cannot tell (not Linux)."""
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    target = os.path.realpath(path)
    holders = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except (
            OSError
        ):  # gone, or another user's process (it could not have opened our cache directory anyway)
            continue
        for fd in fds:
            try:
                if os.readlink(fd) == target:
                    holders.append(int(entry.name))
                    break
            except OSError:
                continue
    return holders


def filesystem_type(path: Path) -> str | None:
    """The type of the filesystem holding `path` (the longest mount point that contains it), from /proc/mounts."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    target = os.path.realpath(path)
    best, kind = "", None
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best):
            best, kind = point, fields[2]
    return kind


def is_stale(path: Path, now: float | None = None) -> tuple[bool, str]:
    """Whether a build lock can be removed, and why (for the log line)."""
    holders = local_holders(path)
    if holders is None:
        return False, "this platform cannot tell who holds it"
    if holders:
        return False, f"process {holders[0]} holds it (a build in progress)"
    fs = filesystem_type(path) or "unknown"
    if fs in NETWORK_FS:
        age = (now if now is not None else time.time()) - path.stat().st_mtime
        if age < SHARED_FS_STALE_S:
            return (
                False,
                f"it is on a shared {fs} filesystem and {age:.0f} s old: another host may be building",
            )
        return True, f"no process holds it and it is {age / 60:.0f} min old on a shared {fs} filesystem"
    return True, "no process on this host holds it"


def clear_stale_locks(roots: list[Path] | None = None) -> list[Path]:
    """Remove every stale extension build lock under the roots (default: PyTorch's); return those removed."""
    removed = []
    for lock in find_locks(roots if roots is not None else extension_roots()):
        try:
            stale, why = is_stale(lock)
        except OSError:  # removed meanwhile by its owner
            continue
        if not stale:
            log.info("extension build lock %s kept: %s", lock, why)
            continue
        try:
            lock.unlink()
        except FileNotFoundError:
            continue
        log.warning(
            "removed a stale PyTorch extension build lock %s (%s): a killed process left it, and DeepSpeed's op"
            " load would have waited for it forever",
            lock,
            why,
        )
        removed.append(lock)
    return removed


SHM_DIR = Path("/dev/shm")
SHM_BUFFER = "deepspeed_allreduce_buffer"
"""The prefix of DeepSpeed's shared-memory all-reduce buffers (deepspeed/ops/csrc/cpu/comm/shm.cpp)."""


def shm_buffer(rank: int) -> Path:
    """This run's buffer of `rank`, named as DeepSpeed names it from the environment its launcher set."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return SHM_DIR / f"{SHM_BUFFER}_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_buffer(rank: int) -> None:
    """Unlink this rank's buffer; call only after every rank has mapped every buffer (a barrier after
    DeepSpeed's init). A name another process can still reach would be a leak; a mapping needs no name."""
    try:
        shm_buffer(rank).unlink()
    except FileNotFoundError:  # not created (GPU, or ranks on several machines): nothing to release
        pass
    except OSError as exc:
        log.warning("could not remove DeepSpeed's shared-memory buffer %s: %s", shm_buffer(rank), exc)


def clear_stale_shm_buffers(directory: Path = SHM_DIR) -> list[Path]:
    """Remove this user's DeepSpeed all-reduce buffers that no process on the host has open (runs killed
    before they released theirs); return those removed."""
    removed = []
    for path in sorted(directory.glob(f"{SHM_BUFFER}_{os.getuid()}_*")):
        holders = local_holders(path)
        if holders is None or holders:
            continue
        try:
            size = path.stat().st_size
            path.unlink()
        except OSError:  # gone meanwhile
            continue
        removed.append(path)
        log.info("removed %s (%.0f MB of RAM), left by a DeepSpeed run that was killed", path, size / 1e6)
    return removed
