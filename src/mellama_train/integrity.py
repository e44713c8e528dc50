"""Content digests of checkpoint files: computed while a file is written, checked before anything is loaded.

A checkpoint sits on shared scratch for weeks, where other people's jobs, a bad disk or a hand edit can touch it.
Sizes catch a truncated copy but not a flipped bit in an optimizer moment or an edited integer in a JSON file, so
every file of a checkpoint gets a SHA-256 digest in its COMPLETE manifest (checkpoint.py).

Why SHA-256: it is the digest a person can check by hand (`sha256sum FILE` prints the value the manifest holds),
and x86 hosts of GPU nodes hash it in hardware (SHA-NI: about 1.5 GB/s a core, measured here). A fast
non-cryptographic checksum (CRC32, xxHash) would be quicker on a local page cache but could be matched on purpose.

Why while writing: reading a 15 GB shard back after the save, to hash it, adds the hash's time to the save's.
Here the hash runs beside the save: `HashingWriter` is the file object torch.save writes to, and a thread of its
own reads the bytes just written back from the page cache (a memory copy) and hashes them while the writer goes
on writing and then waits for fsync. The save costs about max(write + fsync, hash) rather than their sum
(bench/checkpoint_digest.py measures it; docs/PERFORMANCE.md has the figures). The thread reads the file rather
than the writer's buffers because torch.save hands over memory that is only valid during the call (a temporary
CPU copy of a GPU tensor), and copying it would double a 10 GB partition's memory.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import hmac
import io
import json
import os
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mellama_train.watchdog import progress

_READ_CHUNK = 16 << 20
_COALESCE = 1 << 20
"""Small writes (torch's zip headers) are gathered up to this size before they reach the file."""


@dataclass(frozen=True)
class FileDigest:
    size: int
    """Bytes of the file."""
    sha256: str
    """Hex SHA-256 of its content."""


class HashingWriter(io.RawIOBase):
    """A binary file that hashes what is written to it, in a thread that follows the writer through the page
    cache. `close()` writes the rest, fsyncs (the hash thread keeps going meanwhile), then waits for the hash;
    `digest` is valid after it. Write errors (ENOSPC) are raised from write() or close() and kept in `error`."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # the umask decides
        self._pending = bytearray()
        self._written = 0  # bytes handed to the OS: what the hash thread may read
        self._hasher = _HashBehind(path)
        self.error: OSError | None = None
        """The first write error: torch's zip writer masks it with its own RuntimeError."""

    def writable(self) -> bool:
        return True

    def write(self, chunk: Any) -> int:
        view = memoryview(chunk).cast("B")
        try:
            if len(self._pending) + len(view) < _COALESCE:
                self._pending += view
            else:
                self._drain()
                self._write_all(view)
        except OSError as exc:
            self.error = self.error or exc
            raise
        return len(view)

    def _drain(self) -> None:
        if self._pending:
            self._write_all(memoryview(self._pending))
            self._pending = bytearray()

    def _write_all(self, view: memoryview) -> None:
        while view:
            done = os.write(self._fd, view)
            view = view[done:]
            self._written += done
        self._hasher.advance(self._written)

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._drain()
            os.fsync(self._fd)  # durable before any marker vouches for it; the hash catches up meanwhile
        except OSError as exc:
            self.error = self.error or exc
            raise
        finally:
            os.close(self._fd)
            super().close()
            # The hash thread goes on after close: it overlaps the next file's writing (`pending` waits for it).

    @property
    def pending(self) -> PendingDigest:
        """The digest, once the hash thread has caught up with the file (`result()` waits for it)."""
        return PendingDigest(self._written, self._hasher)


class _HashBehind:
    """A thread hashing a file's bytes [0, advance()) as they appear, by reading them back (os.pread and
    hashlib both release the GIL, so it runs beside the writer)."""

    def __init__(self, path: Path):
        self._fd = os.open(path, os.O_RDONLY)
        self._hash = hashlib.sha256()
        self._target = self._done = 0
        self._closing = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="digest", daemon=True)
        self._thread.start()

    def advance(self, size: int) -> None:
        with self._cond:
            self._target = size
            self._cond.notify()

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while self._done >= self._target and not self._closing:
                        self._cond.wait()
                    target, closing = self._target, self._closing
                while self._done < target:
                    data = os.pread(self._fd, min(_READ_CHUNK, target - self._done), self._done)
                    if not data:
                        raise OSError(f"{self._fd}: the file shrank while it was being written")
                    self._hash.update(data)
                    self._done += len(data)
                if closing and self._done >= self._target:
                    return
        except BaseException as exc:  # noqa: BLE001 (handed to finish(), in the writer's thread)
            self._error = exc

    def finish(self) -> None:
        if self._fd < 0:
            return
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()
        os.close(self._fd)
        self._fd = -1
        if self._error is not None:
            raise self._error

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class PendingDigest:
    """A file's digest while its hash thread may still be reading it back; `result()` waits and returns it."""

    def __init__(self, size: int, hasher: _HashBehind):
        self._size, self._hasher = size, hasher

    def result(self) -> FileDigest:
        self._hasher.finish()  # raises what the thread met (a read error), in the caller's thread
        return FileDigest(self._size, self._hasher.hexdigest())


def save_torch(obj: Any, path: Path) -> FileDigest:
    """torch.save `obj` to `path`, hashing while writing. Raises OSError (ENOSPC: disk full) like any write."""
    return save_torch_pending(obj, path).result()


def save_torch_pending(obj: Any, path: Path) -> PendingDigest:
    """save_torch, returning as soon as the file is written and fsynced: its hash may still be catching up, so
    the hashing of one file overlaps the writing of the next (DeepSpeed writes two or more per rank)."""
    writer = HashingWriter(path)
    try:
        try:
            torch.save(obj, writer)
        finally:
            writer.close()
    except Exception:
        with contextlib.suppress(Exception):
            writer.pending.result()  # no hash thread or descriptor outlives a failed save
        if writer.error is not None:  # the disk's error, not torch's complaint about the file it left
            raise writer.error from None
        raise
    return writer.pending


def safe_load(path: str | Path, mmap: bool = False) -> Any:
    """torch.load with weights-only unpickling: tensors and builtin containers only, so a crafted pickle is
    refused instead of run. mmap: map the tensors instead of reading them (a cheap check of a large file)."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def file_digest(path: Path) -> FileDigest:
    """Digest of a file already on disk (small files rank 0 writes, and every check at resume)."""
    hasher = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_READ_CHUNK):
            hasher.update(chunk)
            size += len(chunk)
    return FileDigest(size, hasher.hexdigest())


def bytes_digest(data: bytes) -> FileDigest:
    return FileDigest(len(data), hashlib.sha256(data).hexdigest())


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, text: str) -> FileDigest:
    """Write `text` to `path` so that a reader (or a kill, or a crash) sees the old file or the whole new one:
    a uniquely named temporary file beside it (two writers never share one), fsynced, renamed over `path`, and
    the rename made durable. Returns the digest of what was written."""
    data = text.encode("utf-8")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes 0600: the file others read is the renamed one
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return bytes_digest(data)


def read_capped(path: Path | str, limit: int, truncate: bool = False) -> bytes | None:
    """A file read back untrusted: its bytes if it is a regular file of at most `limit` bytes (with `truncate`,
    its first `limit` bytes whatever its size); None for anything else (missing, unreadable, a directory, a
    FIFO that would block the reader forever, a device such as /dev/zero that never ends, or too large).
    Checked with stat before it is opened (opening some devices acts: a tape rewinds), opened non-blocking,
    and checked again on the descriptor (a file swapped meanwhile)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or (info.st_size > limit and not truncate):
            return None
        chunks, left = [], limit + (0 if truncate else 1)  # one byte more: a file that grew past the limit
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        return None if len(data) > limit else data
    except OSError:
        return None
    finally:
        os.close(fd)


def umask() -> int:
    """The process's umask, read without changing it (os.umask sets one to read it: another thread creating a
    file meanwhile would get the wrong mode). /proc has it since Linux 4.7; elsewhere, the set-and-restore."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_OPEN_NOFOLLOW = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)
"""How follow_umask opens an entry to set its mode through the descriptor: never through a symbolic link
(O_NOFOLLOW: ELOOP instead), never waiting for a FIFO's writer (O_NONBLOCK), never taking a terminal."""

Snapshot = set[tuple[int, int, int]]
"""(st_dev, st_ino, st_ctime_ns) of the entries under a directory: what files_under returns."""


def _walk(top_fd: int, visit: Callable[[os.DirEntry[str], int], int | None]) -> None:
    """Call `visit(entry, parent_fd)` for every entry below the directory open as `top_fd`, depth first.

    Each entry is reached by its name relative to its parent directory's descriptor, so swapping a directory on
    the way for a symbolic link leads nowhere. `visit` returns a descriptor of a directory to descend into (this
    closes it) or None. Descriptors held: one a level; a directory that cannot be listed is passed over."""

    def entries(fd: int) -> Iterator[os.DirEntry[str]]:
        try:
            with os.scandir(fd) as it:  # listed at once: its own descriptor is not held while descending
                return iter(list(it))
        except OSError:
            return iter(())

    stack = [(top_fd, entries(top_fd))]
    try:
        while stack:
            fd, pending = stack[-1]
            entry = next(pending, None)
            if entry is None:
                stack.pop()
                if fd != top_fd:
                    os.close(fd)
                continue
            child = visit(entry, fd)
            if child is not None:
                stack.append((child, entries(child)))
    finally:
        for fd, _ in stack:
            if fd != top_fd:
                os.close(fd)


def _open_root(root: Path) -> int | None:
    """A descriptor of directory `root` to walk below, or None (gone, or not a directory). The root itself may be
    named through a link (`--out` pointing at scratch): whatever was written under it went through that link."""
    try:
        return os.open(root, (_OPEN_NOFOLLOW & ~os.O_NOFOLLOW) | os.O_DIRECTORY)
    except OSError:
        return None


def files_under(root: Path) -> Snapshot:
    """(st_dev, st_ino, st_ctime_ns) of `root` and of every entry below it, links not followed (a link is listed,
    not what it points at): taken before writing into a directory that may already hold the user's files, and
    given to follow_umask as `keep`. An empty set when `root` does not exist.

    The inode names the file whatever its name; the inode-change time (set by the kernel on every write, chmod,
    rename or new link, and not settable by `touch` or a copy tool preserving times) tells a file we rewrote, or a
    new file that reuses a deleted one's inode, from the one that was there. Both come from the file system, not
    this host's clock, which on NFS may differ from the server's."""
    found: Snapshot = set()
    with contextlib.suppress(OSError):
        info = os.lstat(root)
        found.add((info.st_dev, info.st_ino, info.st_ctime_ns))
    top = _open_root(root)
    if top is None:
        return found

    def visit(entry: os.DirEntry[str], parent: int) -> int | None:
        try:
            info = entry.stat(follow_symlinks=False)
            found.add((info.st_dev, info.st_ino, info.st_ctime_ns))
            if stat.S_ISDIR(info.st_mode):
                return os.open(entry.name, _OPEN_NOFOLLOW | os.O_DIRECTORY, dir_fd=parent)
        except OSError:
            pass  # gone meanwhile, a link swapped in (ELOOP), or unreadable: nothing below it to list
        return None

    try:
        _walk(top, visit)
    finally:
        os.close(top)
    return found


def follow_umask(root: Path, keep: Snapshot | None = None, include_root: bool = True) -> None:
    """Give what we wrote under `root` the modes any other tool would (0644 files and 0755 directories under the
    usual umask 022; group-writable under 002): safetensors writes 0600 files through a temporary file, which
    on a shared cluster leaves colleagues unable to read the model.

    Only the owner's regular files and directories are touched; links are never followed (not even one swapped
    in for a file while this runs: each entry is opened with O_NOFOLLOW relative to its parent's descriptor and
    its mode set through that descriptor), and FIFOs, sockets and devices are left alone. Entries we cannot open
    for reading are left as they are. With `keep` (files_under(root), taken before writing), a file still in the
    snapshot (same device, inode and inode-change time) keeps its mode, and so does any directory that was there
    (same device and inode: writing into a directory changes its inode-change time, yet a directory of the user's
    that we wrote into is still theirs). A directory keeps its setgid bit (a shared group's directory)."""
    mask = umask()
    keep = keep or set()
    kept_dirs = {(dev, ino) for dev, ino, _ in keep}
    uid = os.getuid()

    def set_mode(name: str | Path, parent: int | None) -> int | None:
        """Set one entry's mode; return a descriptor of it when it is a directory (to descend into)."""
        try:
            fd = os.open(name, _OPEN_NOFOLLOW, dir_fd=parent)
        except OSError:
            return None  # ELOOP: a link; gone meanwhile; or not readable by us (not ours, or made 0200)
        try:
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                if info.st_uid == uid and (info.st_dev, info.st_ino) not in kept_dirs:
                    os.fchmod(fd, (0o777 & ~mask) | (info.st_mode & stat.S_ISGID))
                return fd  # descended into even when not ours: what we wrote inside is ours
            if stat.S_ISREG(info.st_mode) and info.st_uid == uid:
                if (info.st_dev, info.st_ino, info.st_ctime_ns) not in keep:
                    os.fchmod(fd, 0o666 & ~mask)
        except OSError:
            pass  # a file system refusing chmod (some mounts): leave the mode
        os.close(fd)
        return None

    def visit(entry: os.DirEntry[str], parent: int) -> int | None:
        # Sorted by lstat first (no open): a device is never opened, as opening a tape drive rewinds it, and a
        # file of the snapshot is not even opened (an existing tree of the user's costs no open per file).
        # set_mode checks the type again on the descriptor, in case of a swap meanwhile.
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            return None
        if stat.S_ISREG(info.st_mode):
            if (info.st_dev, info.st_ino, info.st_ctime_ns) in keep:
                return None
        elif not stat.S_ISDIR(info.st_mode):
            return None
        return set_mode(entry.name, parent)

    top = set_mode(root, None) if include_root else None
    if top is None:
        top = _open_root(root)  # not included, a link, or not ours to open for reading
    if top is None:
        return
    try:
        _walk(top, visit)
    finally:
        os.close(top)


def digests_of(paths: list[Path], threads: int | None = None) -> dict[Path, FileDigest | OSError]:
    """Digests of many files in parallel (reading and hashing both release the GIL); an unreadable file maps to
    its OSError instead of stopping the others."""

    def one(path: Path) -> FileDigest | OSError:
        try:
            return file_digest(path)
        except OSError as exc:
            return exc
        finally:
            progress(f"hashed {path.name}")  # a resume reading a terabyte is not a hang

    workers = threads or min(8, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return dict(zip(paths, pool.map(one, paths), strict=True))


def json_digest(obj: Any, key: bytes | None = None) -> str:
    """Digest of a JSON value in a canonical form (sorted keys, no spaces): what a manifest seals itself with.
    With `key`, an HMAC-SHA256: only a holder of the key can produce it."""
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    if key is not None:
        return hmac.new(key, canonical, hashlib.sha256).hexdigest()
    return hashlib.sha256(canonical).hexdigest()


SIGNING_KEY_ENV = "MELLAMA_CHECKPOINT_KEY"
"""An optional secret (from the environment only, never a config file): manifests are then sealed with an HMAC,
so that someone who can write the checkpoint directory but does not hold the key cannot edit a file and reseal
the manifest to match. Without it the digests catch damage and edits, but not a forger who rewrites both."""


def signing_key() -> bytes | None:
    value = os.environ.get(SIGNING_KEY_ENV)
    return value.encode("utf-8") if value else None


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
"""Weight files that are pickles: loading one can run arbitrary code."""


def pickle_only_problem(path: Path, what: str, reader: str, require_weights: bool = True) -> str | None:
    """None if a model or adapter directory has safetensors weights; else one line naming its pickle file (or,
    with `require_weights`, the absence of weights) and the fix. `reader` names who refuses it ("merge",
    "training")."""
    if any(path.glob("*.safetensors")):
        return None
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        return (
            f"{path}: the {what} has only pickle weights ({', '.join(pickles[:3])}), which {reader} does not load"
            " (unpickling can run code); convert it to safetensors where you trust the file (load it with"
            " transformers/PEFT and save_pretrained(..., safe_serialization=True)), then pass that directory"
        )
    if not require_weights:
        return None
    return f"{path}: the {what} directory has no weights (*.safetensors); pass a complete directory"
