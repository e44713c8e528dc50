"""What a data file is and how it is opened: the formats and extensions read, compression known by its magic
bytes, the format sniffed from a file's first bytes, the reading options, and the errors a reader raises or the
skips it yields. Nothing here holds record content in a message: clinical notes must not reach logs.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import re
import sys
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

import pyarrow as pa
import zstandard

from mellama_train.data.digests import _CHUNK, ByteTap, RecordDigest, _NoDigest

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
