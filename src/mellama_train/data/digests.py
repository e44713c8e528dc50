"""Fingerprints of what a reader reads, for resume checks (data/source.py): `RecordDigest` over a unit's
records in order, `ByteTap` over the raw bytes pulled from a file. xxh3-128: fast enough that hashing never limits
reading; it guards against accidents (edits, reorders, truncation), not against forged collisions.
"""

from __future__ import annotations

import io
import json
from typing import IO, Any

import numpy as np
import pyarrow as pa
import xxhash

# ---------------------------------------------------------------------------------------------------------
# Fingerprints of what is read
# ---------------------------------------------------------------------------------------------------------

_CHUNK = 1 << 20  # bytes per read when streaming through something too large to hold, or when hashing


def short_digest(*parts: bytes) -> str:
    """16 hex digits identifying the parts (xxh3-64): small enough to keep per file in every checkpoint."""
    h = xxhash.xxh3_64()
    for part in parts:
        h.update(part)
    return h.hexdigest()


class RecordDigest:
    """Order-dependent digest of a sequence of records.

    Two streaming hashes: one over the records' bytes concatenated, one over their lengths (int64, -1 for a
    null value). Together they pin the exact sequence (content, order and boundaries), and both can be fed a
    record in pieces or a whole Arrow column slice at once, giving the same digest either way. Lengths are
    hashed in blocks: per record this costs one hash update and one list append (~0.2 us).

    The digest (and `count`) only ever covers completed records: a record fed in pieces whose end never
    comes (its file broke part-way, in a multi-line CSV record or a JSONL line over the size limit) is left
    out, so that a file read until it broke is fingerprinted exactly as `prefix_digest` later reads the
    same records of the file restored."""

    active = True

    def __init__(self) -> None:
        self._data = xxhash.xxh3_128()
        self._lengths = xxhash.xxh3_128()
        self._unhashed: list[int] = []  # lengths not yet fed to self._lengths
        self._hashed = 0  # records whose lengths were
        self._pending = 0
        # self._data as it was after the last completed record, kept while a record arrives in pieces (one
        # hash-state copy, ~0.13 us, per record fed in pieces: CSV records and over-limit lines only).
        self._completed: Any = None

    @property
    def count(self) -> int:
        """Records digested so far."""
        return self._hashed + len(self._unhashed)

    def feed(self, data: bytes | memoryview) -> None:
        """Part of the current record (call end_record() after its last part)."""
        if self._completed is None:
            self._completed = self._data.copy()
        self._data.update(data)
        self._pending += len(data)

    def end_record(self) -> None:
        self._push(self._pending)
        self._pending = 0
        self._completed = None

    def add(self, record: bytes) -> None:
        self._data.update(record)
        unhashed = self._unhashed  # (inlined _push: this runs for every record every rank reads)
        unhashed.append(len(record))
        if len(unhashed) >= 4096:
            self._flush()

    def _push(self, length: int) -> None:
        self._unhashed.append(length)
        if len(self._unhashed) >= 4096:
            self._flush()

    def _flush(self) -> None:
        if self._unhashed:
            self._lengths.update(np.asarray(self._unhashed, dtype="<i8").tobytes())
            self._hashed += len(self._unhashed)
            self._unhashed = []

    def add_arrow(
        self, values: pa.Array | pa.ChunkedArray | pa.RecordBatch | pa.Table, lo: int, hi: int
    ) -> None:
        """Rows lo..hi-1 of an Arrow column (string/binary: straight from its buffers) or table (record mode)."""
        if hi <= lo:
            return
        part = values.slice(lo, hi - lo)
        if isinstance(part, pa.RecordBatch | pa.Table):
            for row in part.to_pylist():
                self.add(_record_bytes(row))
            return
        for chunk in part.chunks if isinstance(part, pa.ChunkedArray) else [part]:
            self._add_array(chunk)

    def _add_array(self, array: pa.Array) -> None:
        kind = array.type
        if not (
            pa.types.is_string(kind)
            or pa.types.is_binary(kind)
            or pa.types.is_large_string(kind)
            or pa.types.is_large_binary(kind)
        ):
            for value in array.to_pylist():
                if value is None:
                    self._push(-1)
                else:
                    self.add(_record_bytes(value))
            return
        n = len(array)
        if n == 0:
            return
        _, offsets_buffer, data_buffer = array.buffers()
        wide = pa.types.is_large_string(kind) or pa.types.is_large_binary(kind)
        offsets = np.frombuffer(offsets_buffer, dtype=np.int64 if wide else np.int32)
        offsets = offsets[array.offset : array.offset + n + 1].astype(np.int64)
        if data_buffer is not None and offsets[-1] > offsets[0]:
            self._data.update(memoryview(data_buffer)[offsets[0] : offsets[-1]])
        lengths = np.diff(offsets)
        if array.null_count:
            lengths[array.is_null().to_numpy(zero_copy_only=False)] = -1
        self._flush()
        self._lengths.update(lengths.astype("<i8").tobytes())
        self._hashed += n

    def hexdigest(self) -> str:
        """The digest of the completed records (a record still in pieces is not one)."""
        self._flush()
        data = self._data if self._completed is None else self._completed
        return short_digest(data.digest(), self._lengths.digest(), self.count.to_bytes(8, "little"))


class _NoDigest(RecordDigest):
    """Digests nothing: readers called without a digest skip the work."""

    active = False

    def feed(self, data: bytes | memoryview) -> None:
        pass

    def end_record(self) -> None:
        pass

    def add(self, record: bytes) -> None:
        pass

    def add_arrow(self, values: Any, lo: int, hi: int) -> None:
        pass


def _record_bytes(value: object) -> bytes:
    """Canonical bytes of a decoded record (a dict, a JSON array item, a non-string cell) for the digest."""
    try:
        return json.dumps(
            value, sort_keys=True, default=str
        ).encode()  # ensure_ascii: lone surrogates escaped
    except (RecursionError, ValueError, TypeError):
        return repr(type(value)).encode()


class ByteTap:
    """Hashes and counts the raw bytes a reader pulls from a file (below any decompressor)."""

    def __init__(self, limit: int | None = None) -> None:
        self._hash = xxhash.xxh3_128()
        self.count = 0
        self.attached = False
        """True once a reader opened the file through this tap (arrow formats and unowned text files never do)."""
        self.limit = limit
        """Bytes after which the file reads as ended (None: its real end): `data inspect`'s sample of a prefix."""

    def wrap(self, raw: IO[bytes]) -> io.RawIOBase:
        self.attached = True
        return _TappedFile(raw, self)

    def update(self, data: bytes | memoryview) -> None:
        self._hash.update(data)
        self.count += len(data)

    def finish(self, path: str) -> None:
        """Hash whatever the reader left unread (e.g. bytes after an XML root or a last zstd frame), so the
        digest covers the whole file as it was when the reader reached its end."""
        with open(path, "rb") as raw:
            raw.seek(self.count)
            while chunk := raw.read(_CHUNK):
                self.update(chunk)

    def hexdigest(self) -> str:
        return short_digest(self._hash.digest(), self.count.to_bytes(8, "little"))


class _TappedFile(io.RawIOBase):
    def __init__(self, raw: IO[bytes], tap: ByteTap):
        self._raw, self._tap = raw, tap

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._tap.limit is not None:
            buffer = memoryview(buffer)[: max(self._tap.limit - self._tap.count, 0)]
        n = self._raw.readinto(buffer)
        if n:
            self._tap.update(memoryview(buffer)[:n])
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()
