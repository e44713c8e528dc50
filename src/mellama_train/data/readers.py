"""Turn configured paths into data units and stream the text records of each unit.

A *unit* is one file, or one directory written by `datasets`' `save_to_disk`. Every unit is a sequence of
records with stable 0-based indices: malformed records keep their index and come back as a `Skip`, so a
shard assignment or a resume position computed from indices means the same thing on every run.

Memory stays bounded whatever a file or a record holds. Readers stream lines, CSV records, row batches or
XML events, and a record larger than `max_record_bytes` (data.max_record_bytes) is skipped as "too_large"
without ever being held whole: a JSONL line or a text file is read through in bounded chunks, a CSV record
is cut off at the limit and read past up to the line where its quotes balance, a PubMed article stops
collecting text at the limit. A JSON array file (.json holding `[...]`) is decoded one item at a time, and
may hold at most JSON_ARRAY_LIMIT_RECORDS x max_record_bytes (larger: refused at start-up, with the command
that converts it to JSONL). Parquet and save_to_disk rows above the limit are skipped before they become
Python strings (Arrow itself reads their pages).

Bad records are counted, located skips, never crashes: malformed JSON, JSON nested deeper than the parser
allows ("too_deep"), invalid UTF-8, a text field that is missing, not a string or blank, and text that is not
valid Unicode (a lone surrogate such as "\\ud800" is valid JSON but no tokenizer takes it: "bad_text").
Control characters are kept: they are valid text that tokenizers encode (byte fallback); the
`strip_control` cleaner removes them where a source wants that.

Every reader can also fingerprint what it reads, for resume checks (data/source.py):
- `RecordDigest`: an order-dependent digest of the unit's records (JSONL: the line's bytes; JSON array: the
  item's JSON text; CSV: the record's text; text file: its bytes; PubMed: the article's title and abstract
  text; parquet/save_to_disk: the text column's values, or whole rows in record mode), fed with EVERY
  record, wanted or not, in order, so that when a reader hands out record i the digest covers records 0..i
  exactly (and only completed records: see RecordDigest);
- `ByteTap`: a digest of the raw bytes pulled from the file (before decompression), with their count, so a
  file read to its end can later be checked by re-hashing its first `count` bytes (a file that grew since
  still matches). xxh3-128 (via `xxhash`, already a dependency of `datasets`): ~18 GB/s on one core, so
  hashing is never what limits reading; it guards against accidents (edits, reorders, truncation), not
  against an adversary forging collisions.

Nothing a reader raises or yields as a `Skip` contains record content: clinical notes are patient data and
must not reach logs. Error messages name the file, the location and the fix.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import os
import re
import sys
import xml.etree.ElementTree as ET
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash
import zstandard

FORMATS = ("jsonl", "csv", "parquet", "text", "hf_dataset", "pubmed_xml")

# Base extension -> format. Text-like formats may also carry a compression suffix (see _COMPRESSIONS).
_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
    ".md": "text",
    ".xml": "pubmed_xml",
}
_COMPRESSIONS = (".gz", ".zst", ".zstd")
_ACCEPTED = (
    ".jsonl/.json/.ndjson, .csv, .txt/.md, .xml (each optionally .gz/.zst), .parquet, "
    "or a datasets save_to_disk directory"
)
_ARROW_BATCH = 1024
_CHUNK = 1 << 20  # bytes per read when streaming through something too large to hold, or when hashing
# Formats read as one byte stream front to back (a ByteTap sees all of it); parquet and save_to_disk seek.
BYTE_STREAM_FORMATS = frozenset({"jsonl", "csv", "text", "pubmed_xml"})

DEFAULT_MAX_RECORD_BYTES = 32 * 2**20
"""data.max_record_bytes's default: far above any clinical note, abstract or web document (a MIMIC note is
tens of KB), small enough that tokenizing one record cannot exhaust a rank's memory."""

# MIMIC notes run to hundreds of KB per field, past csv's 128 KiB default. The limit is a C long, which is
# 32-bit on Windows, so sys.maxsize itself can overflow there. (Record size is bounded by _CsvLines instead.)
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


class DataFileError(ValueError):
    """A one-line error naming the file and the fix."""


class UnreadableFile(DataFileError):
    """Reading a file failed part-way (truncated or corrupt compression, malformed CSV quoting or XML, an I/O
    error, a file that vanished): a training stream skips the file's remainder as a counted skip."""

    def __init__(self, message: str, cause: str, lost: int = 0):
        super().__init__(message)
        self.cause = cause
        """What failed, without content: e.g. "EOFError: Compressed file ended before the end-of-stream
        marker was reached", "malformed XML at line 7, column 3"."""
        self.lost = lost
        """Records known to be in the unread remainder (PubMed: from the update index's scan; 0: unknown)."""

    def __reduce__(self) -> tuple:  # raised in worker processes (PubMed scan, data inspect): picklable
        return (type(self), (str(self), self.cause, self.lost))


@dataclass(frozen=True)
class Skip:
    """A record that was counted and skipped."""

    reason: str
    """Short machine-friendly reason: "bad_json", "bad_utf8", "too_deep", "missing_field", "empty",
    "not_text", "bad_text" or "too_large" (readers); encoders and streams add their own (source.py)."""
    where: str
    """Location only ("path:line N", "path:row N", "path:article N"), never record content."""


Record = tuple[int, str | Skip]


# ---------------------------------------------------------------------------------------------------------
# Fingerprints of what is read
# ---------------------------------------------------------------------------------------------------------


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


def byte_digest(path: str, count: int) -> tuple[int, str]:
    """(bytes read, digest) of the first `count` bytes of a file, as a ByteTap that read them would give."""
    tap = ByteTap()
    with _reading(path), open(path, "rb") as raw:
        while tap.count < count and (chunk := raw.read(min(_CHUNK, count - tap.count))):
            tap.update(chunk)
    return tap.count, tap.hexdigest()


def prefix_digest(
    path: str,
    text_field: str | None,
    records: int,
    *,
    record_mode: bool = False,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
) -> RecordDigest:
    """The RecordDigest of a unit's first `records` records, read as a stream reads them (its count is
    smaller when the unit now holds fewer). Raises UnreadableFile when it cannot be read that far."""
    digest = RecordDigest()
    if records <= 0:
        return digest
    options = ReadOptions(max_record_bytes, digest=digest)
    start = records - 1  # the reader hands out record `start` once it has digested records 0..start
    if record_mode:
        stream = iter_records(path, start=start, options=options)
    else:
        stream = iter_texts(path, text_field, start=start, options=options)
    next(stream, None)
    stream.close()
    return digest


@dataclass
class ReadOptions:
    """How a unit is read, beyond which records are wanted."""

    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    """Records above this size are skipped ("too_large") without being held whole."""
    digest: RecordDigest | None = None
    """Fed every record of the unit in order, wanted or not (None: no digest work)."""
    tap: ByteTap | None = None
    """Fed the raw bytes of byte-stream formats as they are read (None: none)."""
    where: dict[str, frozenset[str]] | None = None
    """Keep only records whose field (a column, a JSON key, or a dotted path into nested JSON such as
    `meta.redpajama_set_name`) holds one of these values, compared as text; the others are Skip
    "not_selected". Records with fields only: text and PubMed XML files refuse it."""
    require_abstract: bool = False
    """PubMed XML: records without an abstract are Skip "no_abstract" (other formats refuse it)."""
    format: str | None = None
    """The source's declared format (None: by name, then by first bytes; see detect_format)."""
    pubmed: Any = None
    """PubMed XML: the file's entry of the source's update index (data/pubmed.py FileIndex): citations it
    names are Skip "superseded" / "deleted", and the file's PMIDs are checked against it at its end."""


@dataclass
class _Reading:
    max_record_bytes: int
    digest: RecordDigest
    tap: ByteTap | None
    where: dict[str, frozenset[str]] | None = None
    require_abstract: bool = False
    pubmed: Any = None
    format: str | None = None


def _options(options: ReadOptions | None) -> _Reading:
    options = options or ReadOptions()
    return _Reading(
        options.max_record_bytes,
        options.digest or _NoDigest(),
        options.tap,
        options.where or None,
        options.require_abstract,
        options.pubmed,
        options.format,
    )


# ---------------------------------------------------------------------------------------------------------
# Finding units
# ---------------------------------------------------------------------------------------------------------


def _format_of_name(name: str) -> str | None:
    """The format implied by a file name, or None when the extension is not one we read."""
    stem, ext = os.path.splitext(name.lower())
    if ext in _COMPRESSIONS:
        stem, ext = os.path.splitext(stem)
        if ext == ".parquet":  # parquet compresses internally; an outer .gz cannot be streamed by pyarrow
            return None
    return _EXTENSIONS.get(ext)


def _is_hf_dir(path: str) -> bool:
    """True for a directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    # Stat the marker files first: this runs for every ancestor of every glob match, and listing a
    # directory of a thousand PubMed shards each time would be quadratic.
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        return True
    has_meta = any(os.path.isfile(os.path.join(path, name)) for name in ("state.json", "dataset_info.json"))
    return has_meta and any(name.endswith(".arrow") for name in os.listdir(path))


_GZIP_MAGIC, _ZSTD_MAGIC = b"\x1f\x8b", b"\x28\xb5\x2f\xfd"
_SNIFF_BYTES = 4096


def _compression(path: str) -> str | None:
    """ "gz", "zst" or None, by the file's first bytes: a `.jsonl` that is really gzipped, or a `.gz` that is
    not, is read by what it holds, not by its name."""
    with open(path, "rb") as fh:
        magic = fh.read(4)
    return "gz" if magic.startswith(_GZIP_MAGIC) else "zst" if magic == _ZSTD_MAGIC else None


def sniff_format(path: str) -> str | None:
    """The format a file's first bytes show (decompressed first), or None when they do not say: parquet's
    `PAR1`, PubMed XML's root element, or JSON (`{` a JSON-lines record, `[` an array). CSV and plain text
    cannot be told apart by their bytes: a source of them needs their extension, or its `format`."""
    try:
        with open(path, "rb") as fh:
            if fh.read(4) == b"PAR1":
                return "parquet"
        with _open_binary(path) as stream:
            head = stream.read(_SNIFF_BYTES)
    except (OSError, EOFError, zlib.error, zstandard.ZstdError):
        return None
    head = head.removeprefix(b"\xef\xbb\xbf").lstrip()
    if head.startswith(b"<") and re.search(
        rb"<(PubmedArticleSet|PubmedArticle|PubmedBookArticle)[\s>]", head
    ):
        return "pubmed_xml"
    if head[:1] in (b"{", b"["):
        return "jsonl"
    return None


def detect_format(path: str, declared: str | None = None) -> str:
    """The format of a unit: `declared` (the source's `format`) when given; else by extension (.jsonl/.json/
    .ndjson -> jsonl; .csv -> csv; .txt/.md -> text; .xml -> pubmed_xml, each may add .gz or .zst/.zstd;
    .parquet -> parquet; a save_to_disk directory -> hf_dataset); else by its first bytes (sniff_format).
    Anything else raises DataFileError naming the file, what we accept and the `format` setting."""
    if os.path.isdir(path):
        if _is_hf_dir(path):
            return "hf_dataset"
        raise DataFileError(
            f"{path}: is a directory but not a datasets save_to_disk directory; give a glob for its files"
        )
    if declared is not None and os.path.isfile(path):
        if declared == "hf_dataset":
            raise DataFileError(
                f"{path}: is a file, and the source's format hf_dataset reads save_to_disk directories;"
                " fix the source's format"
            )
        # Only bytes that cannot be anything else count: parquet's magic, a PubMed root element (a text
        # document may well begin with `{`).
        shown = sniff_format(path)
        if (shown in ("parquet", "pubmed_xml") and shown != declared) or (
            declared == "parquet" and shown is None
        ):
            raise DataFileError(
                f"{path}: its bytes show a {shown or 'non-parquet'} file, and the source's format says"
                f" {declared}; fix the source's format, or leave the file out with exclude"
            )
    if declared is not None:
        return declared
    fmt = _format_of_name(os.path.basename(path))
    if fmt is None and os.path.isfile(path):
        fmt = sniff_format(path)
    if fmt is None:
        problem = "not found" if not os.path.exists(path) else "unknown file type"
        raise DataFileError(f"{path}: {problem}; accepted: {_ACCEPTED}, or set the source's format")
    return fmt


# ---------------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------------


@contextmanager
def _open_binary(path: str, tap: ByteTap | None = None) -> Iterator[IO[bytes]]:
    """Open a file for buffered binary reading, decompressing gzip / zstd (known by their first bytes) on the
    fly; `tap` sees the raw bytes."""
    compression = _compression(path)
    with open(path, "rb", buffering=0 if tap else _CHUNK) as raw:
        source: Any = tap.wrap(raw) if tap else raw
        if compression == "gz":
            stream: IO[bytes] = gzip.GzipFile(fileobj=source, mode="rb")
        elif compression == "zst":
            # RedPajama shards are written with long-distance matching, which needs a window past the 128 MiB
            # default; BufferedReader adds the line iteration the raw zstd reader lacks. A file of several
            # frames (pzstd, concatenated shards) is read through all of them.
            reader = zstandard.ZstdDecompressor(max_window_size=2**31).stream_reader(
                source, read_across_frames=True, closefd=False
            )
            stream = io.BufferedReader(reader, buffer_size=_CHUNK)
        elif tap:
            stream = io.BufferedReader(source, buffer_size=_CHUNK)
        else:
            stream = raw
        with stream:
            yield stream


@contextmanager
def _open_text(path: str, tap: ByteTap | None = None) -> Iterator[IO[str]]:
    """Open for text reading (CSV). utf-8-sig drops an Excel-style BOM that would otherwise rename the first CSV
    column. errors="replace": the stream is decoded in blocks ahead of the CSV parser, so a bad byte cannot be
    tied to its row; it becomes U+FFFD instead (JSONL lines and text files with bad bytes are skipped)."""
    with _open_binary(path, tap) as binary:
        with io.TextIOWrapper(binary, encoding="utf-8-sig", errors="replace", newline="") as text:
            yield text


_READ_ERRORS = (OSError, EOFError, zlib.error, zstandard.ZstdError, csv.Error, pa.ArrowException)


def _cause(err: BaseException) -> str:
    """`Type: first line` of an error from a decompressor or parser: they never quote the data."""
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"


@contextmanager
def _reading(path: str) -> Iterator[None]:
    """Turn I/O and decoding failures into an UnreadableFile that names the file and the fix."""
    try:
        yield
    except FileNotFoundError as err:
        raise UnreadableFile(
            f"{path}: not found; check the path (was it moved after the run started?)", _cause(err)
        ) from err
    except PermissionError as err:
        raise UnreadableFile(
            f"{path}: permission denied; make it readable by the user running training", _cause(err)
        ) from err
    except _READ_ERRORS as err:
        raise UnreadableFile(
            f"{path}: could not read ({_cause(err)}); the file may be truncated or corrupt, "
            "re-download or re-create it",
            _cause(err),
        ) from err


def is_valid_text(text: str) -> bool:
    """False for a string no tokenizer can take: one holding a lone UTF-16 surrogate (valid in JSON)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _as_text(value: object, where: str) -> str | Skip:
    """The record's text, or the Skip that says why there is none (missing/null, non-string, blank, invalid)."""
    if value is None:
        return Skip("missing_field", where)
    if not isinstance(value, str):
        return Skip("not_text", where)
    if not value.strip():
        return Skip("empty", where)
    if not is_valid_text(value):
        return Skip("bad_text", where)
    return value


_ABSENT = object()


_MAX_NESTED_JSON = 1 << 20


def field_value(record: dict, name: str) -> object:
    """A record's value of a field: a key of its own, else a dotted path into nested objects
    (`meta.redpajama_set_name`), also through an object stored as a JSON string (RedPajama's `meta` as the
    Hugging Face copies hold it); _ABSENT when it has neither."""
    if name in record:
        return record[name]
    value: object = record
    for part in name.split("."):
        if isinstance(value, str) and value.lstrip().startswith("{") and len(value) <= _MAX_NESTED_JSON:
            try:
                value = json.loads(value)
            except (ValueError, RecursionError):
                return _ABSENT
        if not isinstance(value, dict) or part not in value:
            return _ABSENT
        value = value[part]
    return value


def _as_compared(value: object) -> str | None:
    """A field's value as the text `where` compares: strings as they are, numbers and booleans as YAML
    writes them; None for anything else (absent, null, a list or an object)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return value if isinstance(value, str) else None


def is_selected(record: dict, where: dict[str, frozenset[str]] | None) -> bool:
    """True when every `where` field of the record holds one of its allowed values."""
    return not where or all(
        _as_compared(field_value(record, name)) in allowed for name, allowed in where.items()
    )


def _value(
    obj: object, field: str | None, where: str, select: dict[str, frozenset[str]] | None = None
) -> str | dict | Skip:
    """A record's text field, or (field None: record mode) the whole record as a dict; Skip "not_selected"
    for a record the source's `where` leaves out."""
    if not isinstance(obj, dict):
        return Skip("bad_json", where)
    if not is_selected(obj, select):
        return Skip("not_selected", where)
    if field is None:
        return obj
    return _as_text(obj.get(field), where)


_COLUMN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")


def describe_columns(columns: list[str]) -> str:
    """A table's column names for a message: at most 8. Names are shown only when every one looks like an
    identifier (`note_id`, `meta.set`): a first line that is data, not a header (a CSV exported without one, a
    JSON line read as CSV), could be a patient's note, and is then only counted, never shown."""
    if not columns:
        return "no columns"
    if len(columns) > 512 or not all(_COLUMN_NAME.fullmatch(name) for name in columns):
        return f"{len(columns)} columns; is its first line a header, and is it CSV?"
    shown = ", ".join(columns[:8])
    return f"columns: {shown}{', ...' if len(columns) > 8 else ''}"


def _require_column(path: str, field: str | None, columns: list[str]) -> None:
    if field is not None and field not in columns:
        raise DataFileError(
            f"{path}: no column {field!r} ({describe_columns(columns)}); set the source's text_field to the"
            " column that holds the text, or if this table is not data (metadata), leave it out with the"
            " source's exclude"
        )


def _where_columns(
    path: str, where: dict[str, frozenset[str]] | None, columns: list[str], nested: bool = True
) -> list[str]:
    """The table columns a source's `where` reads, in its order, each checked to exist (`nested`: a dotted
    name not itself a column reads the struct column of its first part)."""
    needed = []
    for name in where or {}:
        column = name if name in columns or not nested else name.split(".")[0]
        if column not in columns:
            raise DataFileError(
                f"{path}: no column {name!r} for the source's where ({describe_columns(columns)}); name a"
                " column it has, or leave this file out with exclude"
            )
        needed.append(column)
    return needed


def _arrow_selection(
    table: pa.RecordBatch | pa.Table, where: dict[str, frozenset[str]] | None, columns: list[str]
) -> list[bool] | None:
    """Per row of an Arrow batch: does `where` keep it (None: no `where`)."""
    if not where:
        return None
    columns = list(dict.fromkeys(columns))
    values = {name: table.column(name).to_pylist() for name in columns}
    return [is_selected({name: values[name][i] for name in columns}, where) for i in range(table.num_rows)]


def _emit_arrow(
    path: str,
    base: int,
    values: pa.Array | pa.ChunkedArray | pa.RecordBatch | pa.Table,
    keep: Callable[[int], bool],
    start: int,
    opts: _Reading,
    selected: list[bool] | None = None,
) -> Iterator[Record]:
    """The kept rows of one Arrow batch (rows base.. of the unit): strings (text mode; only the kept rows
    become Python strings, and those over the size limit never do) or dicts (record mode); Skip
    "not_selected" for rows `selected` (the source's `where`) leaves out. The digest is fed up to each row
    before it is handed out, so it covers exactly the rows handed out so far."""
    n = len(values)
    picked = [index for index in range(max(base, start), base + n) if keep(index)]
    chosen = [index for index in picked if selected is None or selected[index - base]]
    digested = 0
    if picked:
        # rows left out never become Python objects (an explicit int64 array: take([]) has no type to infer)
        rows = values.take(pa.array([index - base for index in chosen], type=pa.int64()))
        converted: dict[int, Any] = {}
        if isinstance(rows, pa.Array | pa.ChunkedArray) and (
            pa.types.is_string(rows.type) or pa.types.is_large_string(rows.type)
        ):
            sizes = pc.binary_length(rows).to_pylist()
            small = [i for i, size in enumerate(sizes) if size is None or size <= opts.max_record_bytes]
            converted = dict(zip((chosen[i] for i in small), rows.take(small).to_pylist())) if small else {}
        elif chosen:
            converted = dict(zip(chosen, rows.to_pylist()))
        for index in picked:
            opts.digest.add_arrow(values, digested, index - base + 1)
            digested = index - base + 1
            where = f"{path}:row {index + 1}"
            if selected is not None and not selected[index - base]:
                yield index, Skip("not_selected", where)
            elif index not in converted:
                yield index, Skip("too_large", where)
            else:
                value = converted[index]
                yield index, value if isinstance(value, dict) else _as_text(value, where)
    opts.digest.add_arrow(values, digested, n)


# ---------------------------------------------------------------------------------------------------------
# Per-format readers: (path, text_field, keep, start, options) -> (index, text | Skip) for kept indices
# ---------------------------------------------------------------------------------------------------------


def _jsonl_lines(path: str, opts: _Reading) -> Iterator[tuple[int, bytes | None]]:
    """Non-blank lines with their 1-based line numbers, each digested before it is handed out; None for a line
    longer than the limit, which is read through in chunks (into the digest) and never held whole."""
    limit, digest = opts.max_record_bytes, opts.digest
    with _open_binary(path, opts.tap) as stream:
        line_no = 0
        while raw := stream.readline(limit + 1):
            line_no += 1
            if line_no == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            if len(raw) > limit and not raw.endswith(b"\n"):
                digest.feed(raw)
                while chunk := stream.readline(_CHUNK):
                    digest.feed(chunk.rstrip(b"\r\n"))
                    if chunk.endswith(b"\n"):
                        break
                digest.end_record()
                yield line_no, None
                continue
            if raw.isspace():
                continue
            # The line terminator is not part of the record: a last line that gains its newline when more
            # lines are appended is the same record.
            digest.add(raw.rstrip(b"\r\n"))
            yield line_no, raw


def _is_json_array_unit(path: str) -> bool:
    with _reading(path):
        return _is_json_array(path)


def _is_json_array(path: str) -> bool:
    head = b""
    with _open_binary(path) as stream:
        # read1: only what is at hand, so that a file truncated after its first records still shows them
        while len(head) < 4096 and (chunk := stream.read1(4096)):
            head += chunk
            if head.removeprefix(b"\xef\xbb\xbf").strip():
                break
    return head.removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"[")


JSON_ARRAY_LIMIT_RECORDS = 4
"""A JSON array file (the alpaca_data.json layout) may hold at most this many times data.max_record_bytes of
JSON text (decompressed): 128 MiB at the default, far above the instruction sets published that way (alpaca's
is 22 MB). Its items are decoded one at a time as the file is read, but an item cannot be skipped without
decoding it (that needs a streaming JSON parser, which no dependency provides), so the file size is what
bounds the memory: a larger array is refused at start-up with the command that converts it to JSONL, which
streams whatever its size."""


def json_array_limit(max_record_bytes: int) -> int:
    """Bytes of JSON text a JSON array file may hold (JSON_ARRAY_LIMIT_RECORDS x data.max_record_bytes)."""
    return JSON_ARRAY_LIMIT_RECORDS * max_record_bytes


def _to_jsonl_fix(path: str) -> str:
    """The one-line command that converts a JSON array file to JSONL, and what to do then."""
    lower = path.lower()
    stem = path
    for suffix in _COMPRESSIONS:
        if lower.endswith(suffix):
            stem = path[: -len(suffix)]
    out = stem[: -len(".json")] + ".jsonl" if stem.lower().endswith(".json") else stem + ".jsonl"
    if lower.endswith(".gz"):
        source = f"zcat {path} | jq -c '.[]'"
    elif lower.endswith((".zst", ".zstd")):
        source = f"zstdcat {path} | jq -c '.[]'"
    else:
        source = f"jq -c '.[]' {path}"
    return (
        f'convert it to JSONL, which is read as a stream: {source} > {out} (or python -c "import json, sys;'
        ' [print(json.dumps(r)) for r in json.load(sys.stdin)]" with the array on stdin), then point the'
        " source at the .jsonl"
    )


def _array_too_large(path: str, limit: int) -> UnreadableFile:
    """Found at start-up (check_unit); mid-run only when the file grew since: its remainder is then skipped."""
    return UnreadableFile(
        f"{path}: a JSON array of more than {limit} bytes ({JSON_ARRAY_LIMIT_RECORDS} x data.max_record_bytes)"
        f" is not read, as it cannot be streamed; {_to_jsonl_fix(path)}",
        f"a JSON array of more than {limit} bytes",
    )


_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _json_array_items(path: str, opts: _Reading) -> Iterator[tuple[bytes, object]]:
    """Each item of a JSON array file, decoded one at a time as the file is read: (its JSON text, its value).

    Only the item being decoded is held (json's raw_decode on a buffer that grows, doubling, until the item is
    complete), and the file holds at most json_array_limit bytes. Raises UnreadableFile when the file turns
    out not to be a valid JSON array part-way, or to hold more than the limit (it grew since start-up)."""
    limit = json_array_limit(opts.max_record_bytes)
    if not path.lower().endswith(_COMPRESSIONS) and os.path.getsize(path) > limit:
        raise _array_too_large(path, limit)
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8-sig")()
    with _open_binary(path, opts.tap) as stream:
        text, at, read, done = "", 0, 0, False
        index = 0  # the item being read (0-based)

        def broken(problem: str) -> UnreadableFile:
            return UnreadableFile(
                f"{path}: invalid JSON array ({problem} at item {index + 1}); fix the file or"
                f" {_to_jsonl_fix(path)}",
                f"{problem} at item {index + 1}",
            )

        def more() -> bool:
            """Read on (at least as much again as is pending: decoding a long item restarts O(log) times)."""
            nonlocal text, at, read, done
            if done:
                return False
            chunk = stream.read(max(_CHUNK, len(text) - at))
            read += len(chunk)
            if read > limit:
                raise _array_too_large(path, limit)
            done = not chunk
            try:
                text = text[at:] + utf8.decode(chunk, final=done)
            except UnicodeDecodeError:
                raise broken("not UTF-8") from None
            at = 0
            return True

        def peek() -> str:
            """The next character that is not whitespace ("" at the end of the file)."""
            nonlocal at
            while True:
                at = _JSON_SPACE.match(text, at).end()  # type: ignore[union-attr]
                if at < len(text):
                    return text[at]
                if not more():
                    return ""

        if peek() != "[":
            raise broken("not an array")
        at += 1
        if peek() == "]":
            at += 1
        else:
            while True:
                peek()  # (raw_decode does not skip the whitespace before an item)
                while True:
                    try:
                        value, end = decoder.raw_decode(text, at)
                    except json.JSONDecodeError:  # incomplete so far, or invalid: read on to tell which
                        if not more():
                            raise broken("malformed JSON") from None
                        continue
                    except RecursionError:  # the item's end cannot be found without decoding it
                        raise broken("JSON nested too deeply") from None
                    if end == len(text) and more():  # a bare number may go on in the next chunk
                        continue
                    break
                item, at = text[at:end].encode("utf-8", "surrogatepass"), end
                yield item, value
                index += 1
                following = peek()
                at += 1
                if following == "]":
                    break
                if following != ",":
                    raise broken("expected , or ]")
        if peek() != "":
            raise broken("data after the array")


def _read_jsonl(
    path: str, field: str | None, keep: Callable[[int], bool], start: int, opts: _Reading
) -> Iterator[Record]:
    if _is_json_array(path):
        for index, (item, obj) in enumerate(_json_array_items(path, opts)):
            opts.digest.add(item)  # the item's JSON text, as a JSONL line's bytes
            if keep(index):
                where = f"{path}:item {index + 1}"
                too_large = len(item) > opts.max_record_bytes
                yield index, Skip("too_large", where) if too_large else _value(obj, field, where, opts.where)
        return
    # Hand-read rather than datasets' JSON builder: one malformed line makes that builder fail the whole
    # file, and it materialises the file into Arrow before yielding anything. Reading lines ourselves
    # gives a counted, located skip and true streaming, and unwanted lines are never JSON-decoded.
    for index, (line_no, raw) in enumerate(_jsonl_lines(path, opts)):
        if not keep(index):
            continue
        where = f"{path}:line {line_no}"
        if raw is None:
            yield index, Skip("too_large", where)
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:  # (a ValueError too): a line that is not UTF-8 is not trusted as text
            yield index, Skip("bad_utf8", where)
            continue
        except ValueError:
            yield index, Skip("bad_json", where)
            continue
        except RecursionError:  # valid JSON nested deeper than the parser's stack: no text to train on
            yield index, Skip("too_deep", where)
            continue
        yield index, _value(obj, field, where, opts.where)


class _RecordTooLarge(Exception):
    """Raised through csv.reader when the record it is assembling passes the size limit."""


class _CsvLines:
    """The physical lines csv.reader assembles records from, held to `limit` characters per record.

    The csv module keeps a whole record in memory and cannot resume after an error, so the size limit is
    enforced here: once a record passes it, csv.reader is abandoned (_RecordTooLarge), the rest of the record
    is read past without being kept (it ends at the first line end where its quote characters balance: the
    rule of the default dialect, where a quote inside a field is doubled), and a fresh reader continues."""

    def __init__(self, stream: IO[str], limit: int, digest: RecordDigest):
        self.stream, self.limit, self.digest = stream, limit, digest
        self.used = 0  # characters of the current record so far
        self.quotes = 0  # quote characters of the current record so far
        self.line_no = 0
        self.at_line_end = True

    def __iter__(self) -> _CsvLines:
        return self

    def __next__(self) -> str:
        line = self.stream.readline(self.limit - self.used + 1)
        if not line:
            raise StopIteration
        self._took(line)
        if self.used > self.limit:
            raise _RecordTooLarge
        return line

    def _took(self, line: str) -> None:
        self.at_line_end = line.endswith("\n")
        self.line_no += self.at_line_end
        self.used += len(line)
        self.quotes += line.count('"')
        self.digest.feed(line.encode("utf-8", "surrogatepass"))

    def new_record(self, ends_record: bool) -> None:
        """csv.reader returned a row: the next characters belong to the next record (a blank line is no
        record: its characters join the next record's digest)."""
        self.used = self.quotes = 0
        if ends_record:
            self.digest.end_record()

    def skip_rest(self) -> None:
        while not (self.at_line_end and self.quotes % 2 == 0):
            line = self.stream.readline(_CHUNK)
            if not line:
                break
            self._took(line)
        self.new_record(True)


def _read_csv(
    path: str, field: str | None, keep: Callable[[int], bool], start: int, opts: _Reading
) -> Iterator[Record]:
    # csv.reader rather than DictReader: rows we do not want never become dicts.
    with _open_text(path, opts.tap) as stream:
        lines = _CsvLines(stream, opts.max_record_bytes, opts.digest)
        rows = csv.reader(lines)
        try:
            header = next(rows, None)
        except _RecordTooLarge:
            raise DataFileError(
                f"{path}: its header row is larger than data.max_record_bytes ({opts.max_record_bytes});"
                " is it a CSV file?"
            ) from None
        if header is None:
            raise DataFileError(f"{path}: empty CSV (no header row); export it again with a header")
        _require_column(path, field, header)
        by = {name: header.index(name) for name in _where_columns(path, opts.where, header, nested=False)}
        lines.new_record(False)  # the header's characters are digested with the first record's
        column = header.index(field) if field is not None else -1
        index = -1
        while True:
            try:
                row = next(rows, None)
            except _RecordTooLarge:
                lines.skip_rest()
                rows = csv.reader(lines)
                index += 1
                if keep(index):
                    yield index, Skip("too_large", f"{path}:row {index + 1}")
                continue
            except csv.Error as err:
                raise UnreadableFile(
                    f"{path}: malformed CSV at line {lines.line_no + 1} ({err}); fix its quoting or export it"
                    " again",
                    f"malformed CSV at line {lines.line_no + 1}",
                ) from err
            if row is None:
                break
            lines.new_record(bool(row))
            if not row:  # a blank line is not a record (as with DictReader)
                continue
            index += 1
            if keep(index):
                where = f"{path}:row {index + 1}"
                if by and not is_selected(
                    {n: row[i] if i < len(row) else None for n, i in by.items()}, opts.where
                ):
                    yield index, Skip("not_selected", where)
                    continue
                if field is None:
                    yield index, dict(zip(header, row))
                    continue
                value = row[column] if column < len(row) else None
                yield index, _as_text(value, where)


def _read_parquet(
    path: str, field: str | None, keep: Callable[[int], bool], start: int, opts: _Reading
) -> Iterator[Record]:
    with pq.ParquetFile(path) as parquet:
        names = parquet.schema_arrow.names
        _require_column(path, field, names)
        by = _where_columns(path, opts.where, names)
        base = 0
        for group in range(parquet.num_row_groups):
            rows = parquet.metadata.row_group(group).num_rows
            if base + rows <= start and not opts.digest.active:
                base += rows  # resuming: whole row groups before `start` are never read (unless digested)
                continue
            columns = list(dict.fromkeys([field, *by])) if field is not None else None  # only what is used
            for batch in parquet.iter_batches(batch_size=_ARROW_BATCH, row_groups=[group], columns=columns):
                values = batch.column(field) if field else batch
                selected = _arrow_selection(batch, opts.where, by)
                yield from _emit_arrow(path, base, values, keep, start, opts, selected)
                base += batch.num_rows


def _read_text(
    path: str, field: str | None, keep: Callable[[int], bool], start: int, opts: _Reading
) -> Iterator[Record]:
    if not keep(0):  # one file is one document (e.g. one MIMIC-CXR report per study): not ours, not opened
        return
    limit = opts.max_record_bytes
    with _open_binary(path, opts.tap) as stream:
        raw = stream.read(limit + 1)
        if len(raw) > limit:
            opts.digest.feed(raw)
            del raw
            while chunk := stream.read(_CHUNK):
                opts.digest.feed(chunk)
            opts.digest.end_record()
            yield 0, Skip("too_large", path)
            return
    opts.digest.add(raw)
    try:
        yield 0, _as_text(raw.decode("utf-8-sig"), path)
    except UnicodeDecodeError:
        yield 0, Skip("bad_utf8", path)


def _load_hf(path: str):  # -> datasets.Dataset; untyped to keep the slow `datasets` import lazy
    import datasets

    # keep_in_memory=False: memory-map the Arrow files instead of copying them into RAM.
    try:
        dataset = datasets.load_from_disk(path, keep_in_memory=False)
    except (ValueError, RecursionError, KeyError, TypeError, AttributeError, IndexError) as err:
        # What `datasets` raises on metadata (state.json, dataset_info.json) that is not JSON, is nested past
        # the parser's depth, or lacks or mistypes a field: the directory cannot be read, whatever the rows.
        raise UnreadableFile(
            f"{path}: its save_to_disk metadata (state.json, dataset_info.json) cannot be read"
            f" ({_cause(err)}); save the dataset again with save_to_disk",
            _cause(err),
        ) from err
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise DataFileError(
                f"{path}: DatasetDict has no 'train' split (splits: {', '.join(dataset)}); "
                "save the split you want on its own with save_to_disk"
            )
        dataset = dataset["train"]
    return dataset


def _read_hf(
    path: str, field: str | None, keep: Callable[[int], bool], start: int, opts: _Reading
) -> Iterator[Record]:
    dataset = _load_hf(path)
    _require_column(path, field, dataset.column_names)
    by = _where_columns(path, opts.where, dataset.column_names)
    # Arrow format: a slice is a zero-copy view of the memory-mapped table, not a dict of Python lists.
    table = (dataset.select_columns(list(dict.fromkeys([field, *by]))) if field else dataset).with_format(
        "arrow"
    )
    first = 0 if opts.digest.active else start - start % _ARROW_BATCH
    for base in range(first, len(table), _ARROW_BATCH):
        rows = table[base : base + _ARROW_BATCH]
        values = rows.column(field) if field else rows
        yield from _emit_arrow(path, base, values, keep, start, opts, _arrow_selection(rows, opts.where, by))


# Element paths, from the record's root, of the text a PubMed record trains on. Journal articles keep their
# title and abstract under MedlineCitation/Article; book chapters and books (PubmedBookArticle, NCBI Bookshelf
# records in the same files) keep theirs under BookDocument, where a chapter has an ArticleTitle and a whole
# book only its Book/BookTitle.
_TITLE_PATHS = {
    ("PubmedArticle", "MedlineCitation", "Article", "ArticleTitle"): "title",
    ("PubmedBookArticle", "BookDocument", "ArticleTitle"): "title",
    ("PubmedBookArticle", "BookDocument", "Book", "BookTitle"): "book_title",
}
_ABSTRACT_PATHS = frozenset(
    {
        ("PubmedArticle", "MedlineCitation", "Article", "Abstract", "AbstractText"),
        ("PubmedBookArticle", "BookDocument", "Abstract", "AbstractText"),
    }
)
_PMID_PATHS = frozenset(
    {("PubmedArticle", "MedlineCitation", "PMID"), ("PubmedBookArticle", "BookDocument", "PMID")}
)
PUBMED_ROOTS = frozenset({"PubmedArticle", "PubmedBookArticle"})
NOT_AVAILABLE = "[Not Available]."
"""The ArticleTitle NLM gives a citation that has no title: a placeholder, never trained as text."""

# Superscripts and subscripts are written TeX-style, the form every LLM tokenizer's training text already
# uses for them in plain text: `10<sup>6</sup> CFU` -> `10^6 CFU`, `CO<sub>2</sub>` -> `CO_2`, `Na<sup>+</sup>`
# -> `Na^+`. A script that is not one token-like run, or that runs into a following letter or digit, is
# braced so it cannot be misread: `<sup>14</sup>C` -> `^{14}C`, `10<sup>-3</sup> M` keeps `^-3`,
# `x<sup>a b</sup>` -> `^{a b}`, `x<sup>2</sup><sup>3</sup>` -> `x^{2}^3` (braces inside become parentheses). Dropping the markup (the old behaviour) made `10<sup>6</sup>` read "106".
# The markers are C0 control characters, which XML 1.0 cannot carry (expat rejects them, even as character
# references), so no text of the file can be mistaken for one.
_SCRIPT_MARKS = {"sup": ("\x01", "\x02"), "sub": ("\x03", "\x04")}
_SCRIPT = re.compile(r"([\x01\x03])([^\x01-\x04]*)[\x02\x04](?=(.?))", re.S)
_PLAIN_SCRIPT = re.compile(r"[+\-\u2212\u00b1]?[0-9A-Za-z]+[+\-\u2212]?|[+\-\u2212*\u2032\u2020\u2021#]")


def _script(match: re.Match[str]) -> str:
    mark = "^" if match[1] == "\x01" else "_"
    body = " ".join(match[2].split())
    if not body:
        return " " if match[2] else ""  # `a<sup> </sup>b` keeps its space
    after = match[3]
    if _PLAIN_SCRIPT.fullmatch(body) and not after.isalnum() and not (after and after in "\x01\x03^_"):
        return mark + body
    return f"{mark}{{{body.replace('{', '(').replace('}', ')')}}}"  # `x^2^3` would be ambiguous: `x^{2}^3`


def render_scripts(text: str) -> str:
    """Replace the reader's superscript/subscript markers by `^x` / `_x` (or `^{...}` / `_{...}`)."""
    while True:  # innermost first: a script inside a script (rare) is rendered inside its braces
        rendered = _SCRIPT.sub(_script, text)
        if rendered == text:
            return re.sub(r"[\x01-\x04]", "", rendered)  # an unbalanced marker (cut by the size limit)
        text = rendered


MAX_XML_DEPTH = 1000
"""Elements a PubMed XML file may nest (a PubMed article nests about 10, a few dozen with MathML): expat and
the reader keep one entry per open element, so a file of nested tags would otherwise grow memory without
bound (200 MB of them took 3.9 GB). Deeper nesting makes the rest of the file an unreadable remainder: a
counted skip, located by article and byte offset."""


class _TooDeep(Exception):
    """Raised through expat when an element opens past MAX_XML_DEPTH."""


MAX_PMID_DIGITS = 12
"""A PMID is a positive integer (8 digits today); a longer run of digits is not one."""


def pmid_number(text: str) -> int:
    """A PMID element's text as its number, or 0 (no PMID) for anything but ASCII digits (at most 12)."""
    text = text.strip()
    return int(text) if text.isascii() and text.isdigit() and len(text) <= MAX_PMID_DIGITS else 0


class PmidDigest:
    """An order-dependent digest of a file's citation PMIDs (0 for a citation without one): the reader's
    parse and the update index's scan (data/pubmed.py) must agree on it."""

    def __init__(self) -> None:
        self._hash = xxhash.xxh64()
        self.count = 0

    def add(self, pmid: int) -> None:
        self._hash.update(pmid.to_bytes(8, "little"))
        self.count += 1

    @property
    def value(self) -> int:
        return self._hash.intdigest()


@dataclass
class PubmedRecord:
    """What the reader keeps of one PubmedArticle or PubmedBookArticle."""

    pmid: int | None
    """The record's own PMID (not the PMIDs it cites); None when missing or not a number."""
    title: str
    """ArticleTitle (a book: its BookTitle when the record has no chapter title), possibly NOT_AVAILABLE."""
    abstract: str
    """AbstractText sections, one per line, "LABEL: text" when labelled; "" when there is no abstract."""
    too_large: bool
    """Title and abstract passed the size limit: neither was kept."""
    book: bool
    """A PubmedBookArticle (an NCBI Bookshelf chapter or book)."""

    @property
    def text(self) -> str:
        """Title, a blank line, the abstract; NLM's "[Not Available]." title placeholder is left out."""
        title = "" if self.title == NOT_AVAILABLE else self.title
        return "\n\n".join(part for part in (title, self.abstract) if part)


class _PubmedArticles:
    """An expat target that keeps, of each PubmedArticle and PubmedBookArticle, only its PMID, title and
    abstract (PubmedRecord); inline markup such as <i> and MathML contributes its text, <sup>/<sub> are
    marked for render_scripts. Unlike ElementTree's tree builder it never holds a record's other elements,
    and it stops keeping text once a record's text passes the size limit.

    Each finished record is (PubmedRecord, a hash of its title and abstract text): one feed of the parser can
    finish several records, so the reader digests each one only as it hands it out. DeleteCitation blocks
    (update files) are not records: their PMIDs are collected in `deleted` (data/pubmed.py applies them)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.done: list[tuple[PubmedRecord, bytes]] = []
        self.deleted: list[int] = []
        self._tags: list[str] = []
        self._root: int | None = None  # index in _tags of the open record's root element
        self._in: str | None = None  # "title", "book_title", "part" or "pmid" while inside one
        self._new_article()

    def _path(self) -> tuple[str, ...]:
        """The open elements from the record's root (outside a record: the last two, for DeleteCitation)."""
        return tuple(self._tags[self._root :]) if self._root is not None else tuple(self._tags[-2:])

    def _new_article(self) -> None:
        self._texts: dict[str, list[str]] = {"title": [], "book_title": [], "part": [], "pmid": []}
        self._sections: list[str] = []
        self._label: str | None = None
        self._pmid: str | None = None
        self._size, self._too_large = 0, False
        self._seen: set[str] = set()
        self._hash = xxhash.xxh3_128()

    def start(self, tag: str, attrib: dict[str, str]) -> None:
        if len(self._tags) >= MAX_XML_DEPTH:
            raise _TooDeep
        self._tags.append(tag)
        if self._root is None and tag in PUBMED_ROOTS:
            self._root = len(self._tags) - 1
            self._new_article()
            return
        path = self._path()
        if self._in is not None:
            if tag in _SCRIPT_MARKS and self._in != "pmid":
                self.data(_SCRIPT_MARKS[tag][0], mark=True)
        elif (kind := _TITLE_PATHS.get(path)) and kind not in self._seen:
            self._in = kind
        elif path in _ABSTRACT_PATHS:
            self._in, self._texts["part"], self._label = "part", [], attrib.get("Label")
        elif path in _PMID_PATHS or path == ("DeleteCitation", "PMID"):
            self._in, self._texts["pmid"] = "pmid", []

    def data(self, text: str, mark: bool = False) -> None:
        if self._in is None:
            return
        if self._in == "pmid":
            if sum(map(len, self._texts["pmid"])) < 64:  # a PMID is at most 8 digits: never hold more
                self._texts["pmid"].append(text)
            return
        if not mark:
            self._hash.update(text.encode("utf-8", "surrogatepass"))
            self._size += len(text)
        if self._size > self.limit:  # too large: hash what passes, hold none of it
            self._too_large, self._sections = True, []
            self._texts.update(title=[], book_title=[], part=[])
        elif not self._too_large:
            self._texts[self._in].append(text)

    def end(self, tag: str) -> None:
        path = self._path()
        if self._in is not None and tag in _SCRIPT_MARKS and path not in _ABSTRACT_PATHS:
            if self._in != "pmid":
                self.data(_SCRIPT_MARKS[tag][1], mark=True)
        elif self._in in ("title", "book_title") and _TITLE_PATHS.get(path) == self._in:
            self._seen.add(self._in)
            self._in = None
        elif self._in == "part" and path in _ABSTRACT_PATHS:
            body = render_scripts("".join(self._texts["part"])).strip()
            if body and not self._too_large:
                self._sections.append(f"{self._label}: {body}" if self._label else body)
            self._in, self._texts["part"] = None, []
        elif self._in == "pmid":
            value = "".join(self._texts["pmid"]).strip()
            if path == ("DeleteCitation", "PMID"):
                if value.isdigit():
                    self.deleted.append(int(value))
            elif self._pmid is None:
                self._pmid = value
            self._in = None
        elif self._root == len(self._tags) - 1:
            self.done.append((self._record(tag), self._hash.digest()))
            self._root = None
        self._tags.pop()

    def _record(self, root: str) -> PubmedRecord:
        title = render_scripts("".join(self._texts["title"])).strip()
        if not title and root == "PubmedBookArticle":
            title = render_scripts("".join(self._texts["book_title"])).strip()
        pmid = pmid_number(self._pmid or "") or None
        abstract = "" if self._too_large else "\n".join(self._sections)
        return PubmedRecord(
            pmid, "" if self._too_large else title, abstract, self._too_large, root != "PubmedArticle"
        )

    def close(self) -> None:
        pass


def pubmed_records(path: str, opts: _Reading, deleted: list[int] | None = None) -> Iterator[PubmedRecord]:
    """Each PubmedArticle and PubmedBookArticle of a baseline/update file, streaming; each is digested just
    before it is handed out. `deleted`, when given, receives the PMIDs of the file's DeleteCitation blocks."""
    target = _PubmedArticles(opts.max_record_bytes)
    # expat does not fetch external DTDs or entities, so the DOCTYPE pointing at dtd.nlm.nih.gov is never
    # resolved: no network access and no XXE.
    parser = ET.XMLParser(target=target)
    with _open_binary(path, opts.tap) as stream:
        fed, handed_out = 0, 0  # XML bytes given to the parser; articles handed out
        while True:
            chunk = stream.read(64 * 1024)
            failure: Exception | None = None
            try:
                if chunk:
                    parser.feed(chunk)
                else:
                    parser.close()
            except (ET.ParseError, _TooDeep) as err:
                failure = err
            # Articles that ended before a failure in this chunk are whole: hand them out first.
            for record, article_hash in target.done:
                opts.digest.add(article_hash)
                handed_out += 1
                yield record
            target.done.clear()
            if deleted is not None:
                deleted += target.deleted
            target.deleted.clear()
            if isinstance(failure, ET.ParseError):
                line, column = failure.position
                raise UnreadableFile(
                    f"{path}: malformed XML at line {line}, column {column}; the file may be truncated, "
                    "re-download it",
                    f"malformed XML at line {line}, column {column}",
                ) from failure
            if failure is not None:  # (the C parser does not say the line: the bytes and article locate it)
                where = f"in article {handed_out + 1}, XML bytes {fed}-{fed + len(chunk)}"
                raise UnreadableFile(
                    f"{path}: XML nested deeper than {MAX_XML_DEPTH} elements ({where}); is it a PubMed"
                    " baseline/update file? fix or re-download it",
                    f"XML nested deeper than {MAX_XML_DEPTH} elements, {where}",
                ) from None
            fed += len(chunk)
            if not chunk:
                return


def _read_pubmed(
    path: str, field: str | None, keep: Callable[[int], bool], start: int, opts: _Reading
) -> Iterator[Record]:
    index = opts.pubmed
    seen: Counter[int] = Counter()  # occurrences so far of the PMIDs the index skips
    pmids, deleted = PmidDigest(), []
    records = pubmed_records(path, opts, deleted)
    position = -1
    while True:
        try:
            record = next(records, None)
        except UnreadableFile as err:
            # The scan counted the citations past the damage: they are lost, and (when they were later
            # versions) so are the earlier versions they replace. Say how many, so they count as bad data.
            lost = index.citations - pmids.count if index is not None else 0
            raise UnreadableFile(str(err), err.cause, max(lost, 0)) from err
        if record is None:
            break
        position += 1
        pmid = record.pmid or 0
        pmids.add(pmid)
        replaced = None
        if index is not None and pmid in index.skip:
            seen[pmid] += 1
            reason, first = index.skip[pmid]
            replaced = reason if seen[pmid] <= first else None
        if not keep(position):
            continue
        where = f"{path}:article {position + 1}"
        if replaced:
            yield position, Skip(replaced, where)
        elif record.too_large:
            yield position, Skip("too_large", where)
        elif opts.require_abstract and not record.abstract:
            yield position, Skip("no_abstract", where)
        elif not record.text and record.title == NOT_AVAILABLE:
            yield position, Skip("not_available", where)
        else:
            yield position, _as_text(record.text, where)
    if index is None:
        return
    deletions = PmidDigest()
    for pmid in deleted:
        deletions.add(pmid)
    parsed = (pmids.count, pmids.value, deletions.count, deletions.value)
    if parsed != (index.citations, index.digest, index.deletions, index.deletions_digest):
        raise DataFileError(
            f"{path}: its citations or deletions ({pmids.count} and {deletions.count}) differ, in number or in"
            f" PMIDs, from the update index's scan at start-up ({index.citations} and {index.deletions}): the"
            " file changed during the run, or it writes PMIDs in a way the scan reads otherwise; restore or"
            " re-download it, then resume"
        )


_READERS = {
    "jsonl": _read_jsonl,
    "csv": _read_csv,
    "parquet": _read_parquet,
    "text": _read_text,
    "hf_dataset": _read_hf,
    "pubmed_xml": _read_pubmed,
}


# ---------------------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------------------


def iter_texts(
    path: str,
    text_field: str | None,
    want: Callable[[int], bool] | None = None,
    start: int = 0,
    options: ReadOptions | None = None,
) -> Iterator[tuple[int, str | Skip]]:
    """Stream the records of one unit in file order.

    Record indices are 0-based and consecutive over all records of the unit, malformed ones included, so
    they are stable. Yields (index, text) or (index, Skip) only for records with index >= start and
    (want is None or want(index)); other records are passed over as cheaply as the format allows.
    `want` is called exactly once for every index >= start, in order (the source stream relies on this to
    count a file's records while reading it).
    `text_field` (default "text") names the JSON key / column; text and pubmed_xml units ignore it.
    `options`: the record size limit, and the digests to feed (see ReadOptions).
    Raises UnreadableFile when the unit cannot be read (from the start, or part-way).
    """
    opts = _options(options)
    fmt = detect_format(path, opts.format)
    _check_options(path, fmt, opts)

    def keep(index: int) -> bool:
        return index >= start and (want is None or want(index))

    with _reading(path):
        yield from _READERS[fmt](path, text_field or "text", keep, start, opts)


def iter_records(
    path: str,
    want: Callable[[int], bool] | None = None,
    start: int = 0,
    options: ReadOptions | None = None,
) -> Iterator[tuple[int, dict | Skip]]:
    """Like `iter_texts`, but yields whole records as dicts (instruction data: several fields per record).

    jsonl (or a JSON array), csv, parquet and save_to_disk units have records; text and PubMed XML do not."""
    fmt = detect_format(path, options.format if options else None)
    if fmt in ("text", "pubmed_xml"):
        raise DataFileError(
            f"{path}: a {fmt} file holds plain text, not instruction records; use jsonl, json, csv or parquet"
        )

    opts = _options(options)
    _check_options(path, fmt, opts)

    def keep(index: int) -> bool:
        return index >= start and (want is None or want(index))

    with _reading(path):
        yield from _READERS[fmt](path, None, keep, start, opts)


def _check_options(path: str, fmt: str, opts: _Reading) -> None:
    """Source options that the unit's format cannot apply are refused, never ignored."""
    if opts.where and fmt in ("text", "pubmed_xml"):
        raise DataFileError(
            f"{path}: a {fmt} file has no fields for the source's where to test; drop where, or leave the file"
            " out with exclude"
        )
    if opts.require_abstract and fmt != "pubmed_xml":
        raise DataFileError(
            f"{path}: require_abstract applies to PubMed XML only, and this is a {fmt} file; drop"
            " require_abstract, or leave the file out with exclude"
        )


def count_records(path: str, declared: str | None = None) -> int:
    """Number of records in the unit (malformed ones included), by the cheapest route for its format
    (`declared`: the source's format)."""
    fmt = detect_format(path, declared)
    with _reading(path):
        if fmt == "jsonl":
            if _is_json_array(path):
                return sum(1 for _ in _json_array_items(path, _options(None)))
            return sum(1 for _ in _jsonl_lines(path, _options(None)))
        if fmt == "csv":
            return _count_by_want(iter_records, path, declared)
        if fmt == "parquet":
            with pq.ParquetFile(path) as parquet:
                return parquet.metadata.num_rows
        if fmt == "text":
            os.stat(path)  # a missing file has no record; let _reading say so
            return 1
        if fmt == "hf_dataset":
            return len(_load_hf(path))
        return sum(1 for _ in pubmed_records(path, _options(None)))


def _count_by_want(read: Callable[..., Iterator[Any]], path: str, declared: str | None = None) -> int:
    """Records of a unit counted through `want` (called for every index; none is decoded or kept)."""
    seen = 0

    def want(index: int) -> bool:
        nonlocal seen
        seen = index + 1
        return False

    for _ in read(path, want=want, options=ReadOptions(format=declared)):
        pass
    return seen


PROBE_RECORDS = 8
"""Records read from the start of every file by `check_unit`."""
# Skips that say the file does not hold what the source says (not merely that one record is bad).
_STRUCTURAL_SKIPS = frozenset({"bad_json", "bad_utf8", "missing_field", "not_text", "bad_text", "too_deep"})


def check_unit(
    path: str,
    text_field: str | None,
    *,
    record_mode: bool = False,
    is_record: Callable[[dict], str | None] | None = None,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    where: dict[str, frozenset[str]] | None = None,
    require_abstract: bool = False,
    declared: str | None = None,
) -> str | None:
    """What is wrong with a unit, in one line naming it and the fix, or None: it opens and decompresses, its
    CSV header / parquet schema / dataset has the text column, and at least one of its first PROBE_RECORDS
    records has the text field (record mode: is a record `is_record` accepts; it returns why not, or None),
    and the fields the source's `where` tests exist (a column, or a key of one of the first records).
    A file whose first records are merely empty is fine here: only a run can say whether too many are."""
    options = ReadOptions(max_record_bytes, where=where, require_abstract=require_abstract, format=declared)
    try:
        fmt = detect_format(path, declared)
        if where and fmt == "jsonl":
            if (missing := _where_missing(path, where, max_record_bytes, declared)) is not None:
                return missing
        if fmt == "jsonl" and _is_json_array_unit(path):
            # A JSON array is decoded through once, one item at a time: its size is checked, and a malformed
            # item anywhere in it is named now rather than becoming an unreadable remainder mid-run.
            with _reading(path):
                for _ in _json_array_items(path, _options(options)):
                    pass
        read = (
            iter_records(path, options=options)
            if record_mode
            else iter_texts(path, text_field, options=options)
        )
        first = []
        for _, value in read:
            first.append(value)
            if len(first) == PROBE_RECORDS:
                break
        read.close()
    except DataFileError as err:
        return str(err)
    first = [value for value in first if not (isinstance(value, Skip) and value.reason == "not_selected")]
    skips = [value for value in first if isinstance(value, Skip)]
    usable = [value for value in first if not isinstance(value, Skip)]
    if record_mode and is_record is not None:
        verdicts = [is_record(value) for value in usable]
        if usable and all(verdicts):
            return f"{path}: none of its first {len(usable)} records is an instruction record: {verdicts[0]}"
    if usable or not any(skip.reason in _STRUCTURAL_SKIPS for skip in skips):
        return None
    reasons = ", ".join(
        f"{n} {reason}" for reason, n in sorted(Counter(skip.reason for skip in skips).items())
    )
    fix = {
        "missing_field": f"set the source's text_field to the key that holds the text (now {text_field or 'text'!r})",
        "not_text": f"its {text_field or 'text'!r} values are not strings: set text_field to the key that holds the text",
        "bad_json": "is it JSON lines (one object per line)? fix or convert it",
        "bad_utf8": "convert it to UTF-8",
    }.get(skips[0].reason, "fix the file or drop it from the source's paths")
    return f"{path}: its first {len(first)} records were all skipped ({reasons}; first at {skips[0].where}); {fix}"


def _where_missing(
    path: str, where: dict[str, frozenset[str]], max_record_bytes: int, declared: str | None = None
) -> str | None:
    """JSON lines have no schema: a `where` field none of the first records has is a misspelling, not a filter
    (it would leave out every record). Names the keys the records do have, never their values."""
    records = []
    for _, value in iter_records(path, options=ReadOptions(max_record_bytes, format=declared)):
        if isinstance(value, dict):
            records.append(value)
        if len(records) == PROBE_RECORDS:
            break
    for name in where:
        if records and all(field_value(record, name) is _ABSENT for record in records):
            keys = describe_columns(list(dict.fromkeys(key for record in records for key in record)))
            return (
                f"{path}: none of its first {len(records)} records has the field {name!r} the source's where"
                f" tests ({keys.replace('columns', 'keys')}); name a field the records have (meta.x reads"
                " into meta)"
            )
    return None
