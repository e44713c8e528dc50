"""Turn configured paths into data units and stream the text records of each unit.

A *unit* is one file, or one directory written by `datasets`' `save_to_disk`. Every unit is a sequence of
records with stable 0-based indices: malformed records keep their index and come back as a `Skip`, so a
shard assignment or a resume position computed from indices means the same thing on every run. Readers
never hold a whole file in memory; they stream lines, row batches or XML elements.

Nothing a reader raises or yields as a `Skip` contains record content: clinical notes are patient data and
must not reach logs. Error messages name the file, the location and the fix.
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import os
import sys
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO

import pyarrow as pa
import pyarrow.parquet as pq
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

# MIMIC notes run to hundreds of KB per field, past csv's 128 KiB default. The limit is a C long, which is
# 32-bit on Windows, so sys.maxsize itself can overflow there.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


class DataFileError(ValueError):
    """A one-line error naming the file and the fix."""


@dataclass(frozen=True)
class Skip:
    """A record that was counted and skipped (malformed JSON, missing/empty/non-string text field)."""

    reason: str
    """Short machine-friendly reason: "bad_json", "bad_utf8", "missing_field", "empty" or "not_text"."""
    where: str
    """Location only ("path:line N", "path:row N", "path:article N"), never record content."""


Record = tuple[int, str | Skip]


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


def _inside_hf_dir(path: str) -> bool:
    """True when an ancestor of `path` is a save_to_disk directory (its metadata files are not data)."""
    parent = os.path.dirname(os.path.abspath(path))
    while parent != os.path.dirname(parent):
        if _is_hf_dir(parent):
            return True
        parent = os.path.dirname(parent)
    return False


def _walk(directory: str) -> list[str]:
    """Data units under a directory: known-extension files, and save_to_disk directories as single units."""
    if _is_hf_dir(directory):
        return [directory]
    units = []
    for root, dirnames, filenames in os.walk(directory):
        keep_descending = []
        for name in sorted(dirnames):
            sub = os.path.join(root, name)
            if name.startswith("."):
                continue
            if _is_hf_dir(sub):
                units.append(sub)  # one unit; its .arrow/.json files are not separate data
            else:
                keep_descending.append(name)
        dirnames[:] = keep_descending
        units += [
            os.path.join(root, name)
            for name in filenames
            if not name.startswith(".") and _format_of_name(name) is not None
        ]
    return units


def expand_paths(patterns: list[str], source_name: str) -> list[str]:
    """Globs (incl. ** recursive), files and directories -> sorted, de-duplicated list of readable units.

    A directory is walked recursively for files with known extensions, except a `save_to_disk` directory,
    which is itself one unit. Hidden (dot-prefixed) files and directories are ignored. A file named
    explicitly is kept whatever its extension, so that `detect_format` can say what is wrong with it.
    Raises DataFileError naming the source and pattern when a pattern matches nothing.
    """
    units: set[str] = set()
    for pattern in patterns:
        path = os.path.expanduser(pattern)
        is_glob = any(char in path for char in "*?[")
        # glob skips dot-prefixed names unless the pattern spells them out, which is the hidden-file rule.
        matches = glob.glob(path, recursive=True) if is_glob else ([path] if os.path.exists(path) else [])
        found: set[str] = set()
        for match in matches:
            if is_glob and _inside_hf_dir(match):
                continue  # `**` also reaches into save_to_disk directories; the directory is the unit
            if os.path.isdir(match):
                found.update(_walk(match))
            elif not is_glob or _format_of_name(match) is not None:
                found.add(match)
        if not found:
            raise DataFileError(
                f"data.sources[{source_name}].paths: {pattern!r} matched no files; check the path or glob "
                f"(accepted: {_ACCEPTED})"
            )
        units.update(os.path.abspath(unit) for unit in found)
    return sorted(units)


def detect_format(path: str) -> str:
    """The format of a unit, by extension, or "hf_dataset" for a save_to_disk directory.

    .jsonl/.json/.ndjson -> jsonl; .csv -> csv; .txt/.md -> text; .xml -> pubmed_xml (each may add .gz or
    .zst/.zstd); .parquet -> parquet. Anything else raises DataFileError naming the file and what we accept.
    """
    if os.path.isdir(path):
        if _is_hf_dir(path):
            return "hf_dataset"
        raise DataFileError(
            f"{path}: is a directory but not a datasets save_to_disk directory; give a glob for its files"
        )
    fmt = _format_of_name(os.path.basename(path))
    if fmt is None:
        problem = "not found" if not os.path.exists(path) else "unknown file type"
        raise DataFileError(f"{path}: {problem}; accepted: {_ACCEPTED}")
    return fmt


# ---------------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------------


def _open_binary(path: str) -> IO[bytes]:
    """Open a file for buffered binary reading, decompressing .gz / .zst on the fly."""
    lower = path.lower()
    if lower.endswith(".gz"):
        return gzip.open(path, "rb")
    if lower.endswith((".zst", ".zstd")):
        # RedPajama shards are written with long-distance matching, which needs a window past the 128 MiB
        # default; BufferedReader adds the line iteration the raw zstd reader lacks.
        reader = zstandard.ZstdDecompressor(max_window_size=2**31).stream_reader(open(path, "rb"))
        return io.BufferedReader(reader)
    return open(path, "rb")


def _open_text(path: str) -> IO[str]:
    """Open for text reading (CSV). utf-8-sig drops an Excel-style BOM that would otherwise rename the first CSV
    column. errors="replace": the stream is decoded in blocks ahead of the CSV parser, so a bad byte cannot be
    tied to its row; it becomes U+FFFD instead (JSONL lines and text files with bad bytes are skipped)."""
    return io.TextIOWrapper(_open_binary(path), encoding="utf-8-sig", errors="replace", newline="")


_READ_ERRORS = (OSError, EOFError, zlib.error, zstandard.ZstdError, csv.Error, pa.ArrowException)


@contextmanager
def _reading(path: str) -> Iterator[None]:
    """Turn I/O and decoding failures into a DataFileError that names the file and the fix."""
    try:
        yield
    except FileNotFoundError as err:
        raise DataFileError(
            f"{path}: not found; check the path (was it moved after the run started?)"
        ) from err
    except PermissionError as err:
        raise DataFileError(
            f"{path}: permission denied; make it readable by the user running training"
        ) from err
    except _READ_ERRORS as err:
        raise DataFileError(
            f"{path}: could not read ({type(err).__name__}: {err}); the file may be truncated or corrupt, "
            "re-download or re-create it"
        ) from err


def _as_text(value: object, where: str) -> str | Skip:
    """The record's text, or the Skip that says why there is none (missing/null, non-string, blank)."""
    if value is None:
        return Skip("missing_field", where)
    if not isinstance(value, str):
        return Skip("not_text", where)
    if not value.strip():
        return Skip("empty", where)
    return value


def _value(obj: object, field: str | None, where: str) -> str | dict | Skip:
    """A record's text field, or (field None: record mode) the whole record as a dict."""
    if not isinstance(obj, dict):
        return Skip("bad_json", where)
    if field is None:
        return obj
    return _as_text(obj.get(field), where)


def _require_column(path: str, field: str | None, columns: list[str]) -> None:
    if field is not None and field not in columns:
        raise DataFileError(
            f"{path}: no column {field!r} (columns: {', '.join(columns)}); set the source's text_field "
            "to one of them"
        )


def _pick(base: int, count: int, keep: Callable[[int], bool]) -> list[int]:
    return [index for index in range(base, base + count) if keep(index)]


def _emit_arrow(
    path: str, base: int, picked: list[int], column: pa.Array | pa.ChunkedArray | pa.RecordBatch | pa.Table
) -> Iterator[Record]:
    """Convert only the picked rows of an Arrow column (to strings) or table (to dicts: record mode)."""
    values = column.take([index - base for index in picked]).to_pylist()
    for index, value in zip(picked, values, strict=True):
        where = f"{path}:row {index + 1}"
        yield index, value if isinstance(value, dict) else _as_text(value, where)


# ---------------------------------------------------------------------------------------------------------
# Per-format readers: (path, text_field, keep, start) -> (index, text | Skip) for kept indices
# ---------------------------------------------------------------------------------------------------------


def _jsonl_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """Non-blank lines with their 1-based line numbers; blank lines are not records."""
    first = True
    with _open_binary(path) as stream:
        for line_no, raw in enumerate(stream, 1):
            if raw.isspace():
                continue
            if first:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
                first = False
            yield line_no, raw


def _is_json_array(path: str) -> bool:
    with _open_binary(path) as stream:
        head = stream.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    return head.startswith(b"[")


def _json_array(path: str) -> list[object]:
    # A JSON array (the alpaca_data.json layout) cannot be streamed without a streaming JSON parser. Such
    # files are instruction sets of at most a few hundred MB, so it is loaded whole; use JSONL for corpora.
    with _open_binary(path) as stream:
        try:
            return json.load(stream)
        except ValueError as err:
            raise DataFileError(
                f"{path}: invalid JSON array ({err}); fix the file or convert it to JSONL (one object per line)"
            ) from None


def _read_jsonl(path: str, field: str | None, keep: Callable[[int], bool], start: int) -> Iterator[Record]:
    if _is_json_array(path):
        for index, obj in enumerate(_json_array(path)):
            if keep(index):
                yield index, _value(obj, field, f"{path}:item {index + 1}")
        return
    # Hand-read rather than datasets' JSON builder: one malformed line makes that builder fail the whole
    # file, and it materialises the file into Arrow before yielding anything. Reading lines ourselves
    # gives a counted, located skip and true streaming, and unwanted lines are never JSON-decoded.
    for index, (line_no, raw) in enumerate(_jsonl_lines(path)):
        if not keep(index):
            continue
        where = f"{path}:line {line_no}"
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:  # (a ValueError too): a line that is not UTF-8 is not trusted as text
            yield index, Skip("bad_utf8", where)
            continue
        except ValueError:
            yield index, Skip("bad_json", where)
            continue
        yield index, _value(obj, field, where)


def _read_csv(path: str, field: str | None, keep: Callable[[int], bool], start: int) -> Iterator[Record]:
    # csv.reader rather than DictReader: rows we do not want never become dicts.
    with _open_text(path) as stream:
        rows = csv.reader(stream)
        try:
            header = next(rows, None)
            if header is None:
                raise DataFileError(f"{path}: empty CSV (no header row); export it again with a header")
            _require_column(path, field, header)
            column = header.index(field) if field is not None else -1
            index = -1
            for row in rows:
                if not row:  # a blank line is not a record (as with DictReader)
                    continue
                index += 1
                if keep(index):
                    where = f"{path}:row {index + 1}"
                    if field is None:
                        yield index, dict(zip(header, row))
                        continue
                    value = row[column] if column < len(row) else None
                    yield index, _as_text(value, where)
        except csv.Error as err:
            raise DataFileError(
                f"{path}: malformed CSV at line {rows.line_num} ({err}); fix its quoting or export it again"
            ) from err


def _read_parquet(path: str, field: str | None, keep: Callable[[int], bool], start: int) -> Iterator[Record]:
    with pq.ParquetFile(path) as parquet:
        _require_column(path, field, parquet.schema_arrow.names)
        base = 0
        for group in range(parquet.num_row_groups):
            rows = parquet.metadata.row_group(group).num_rows
            if base + rows <= start:  # resuming: whole row groups before `start` are never read
                base += rows
                continue
            columns = [field] if field is not None else None
            for batch in parquet.iter_batches(batch_size=_ARROW_BATCH, row_groups=[group], columns=columns):
                if picked := _pick(base, batch.num_rows, keep):
                    yield from _emit_arrow(path, base, picked, batch.column(0) if field else batch)
                base += batch.num_rows


def _read_text(path: str, field: str | None, keep: Callable[[int], bool], start: int) -> Iterator[Record]:
    if keep(0):  # one file is one document (e.g. one MIMIC-CXR report per study)
        with _open_binary(path) as stream:
            raw = stream.read()
        try:
            yield 0, _as_text(raw.decode("utf-8-sig"), path)
        except UnicodeDecodeError:
            yield 0, Skip("bad_utf8", path)


def _load_hf(path: str):  # -> datasets.Dataset; untyped to keep the slow `datasets` import lazy
    import datasets

    # keep_in_memory=False: memory-map the Arrow files instead of copying them into RAM.
    dataset = datasets.load_from_disk(path, keep_in_memory=False)
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise DataFileError(
                f"{path}: DatasetDict has no 'train' split (splits: {', '.join(dataset)}); "
                "save the split you want on its own with save_to_disk"
            )
        dataset = dataset["train"]
    return dataset


def _read_hf(path: str, field: str | None, keep: Callable[[int], bool], start: int) -> Iterator[Record]:
    dataset = _load_hf(path)
    _require_column(path, field, dataset.column_names)
    # Arrow format: a slice is a zero-copy view of the memory-mapped table, not a dict of Python lists.
    table = (dataset.select_columns([field]) if field else dataset).with_format("arrow")
    for base in range(start - start % _ARROW_BATCH, len(table), _ARROW_BATCH):
        if picked := _pick(base, min(_ARROW_BATCH, len(table) - base), keep):
            rows = table[base : base + _ARROW_BATCH]
            yield from _emit_arrow(path, base, picked, rows.column(0) if field else rows)


def _pubmed_articles(path: str) -> Iterator[ET.Element]:
    """Stream the PubmedArticle elements of a baseline/update file, freeing each one after use."""
    with _open_binary(path) as stream:
        # ElementTree (expat) does not fetch external DTDs or entities, so the DOCTYPE pointing at
        # dtd.nlm.nih.gov is never resolved: no network access and no XXE.
        events = ET.iterparse(stream, events=("start", "end"))
        try:
            _, root = next(events)
            for event, elem in events:
                if event == "end" and elem.tag == "PubmedArticle":
                    yield elem
                    root.clear()  # drop finished articles from the tree so memory stays flat
        except ET.ParseError as err:
            line, column = err.position
            raise DataFileError(
                f"{path}: malformed XML at line {line}, column {column}; the file may be truncated, "
                "re-download it"
            ) from err


def _inner_text(elem: ET.Element | None) -> str:
    # itertext keeps the text inside inline markup such as <i>, <sup> and MathML.
    return "" if elem is None else "".join(elem.itertext()).strip()


def _article_text(article: ET.Element) -> str:
    """Title, a blank line, then the abstract sections one per line ("METHODS: ..." when labelled)."""
    title = _inner_text(article.find("MedlineCitation/Article/ArticleTitle"))
    sections = []
    for part in article.iterfind("MedlineCitation/Article/Abstract/AbstractText"):
        body, label = _inner_text(part), part.get("Label")
        if body:
            sections.append(f"{label}: {body}" if label else body)
    return "\n\n".join(text for text in (title, "\n".join(sections)) if text)


def _read_pubmed(path: str, field: str | None, keep: Callable[[int], bool], start: int) -> Iterator[Record]:
    for index, article in enumerate(_pubmed_articles(path)):
        if keep(index):
            yield index, _as_text(_article_text(article), f"{path}:article {index + 1}")


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
    path: str, text_field: str | None, want: Callable[[int], bool] | None = None, start: int = 0
) -> Iterator[tuple[int, str | Skip]]:
    """Stream the records of one unit in file order.

    Record indices are 0-based and consecutive over all records of the unit, malformed ones included, so
    they are stable. Yields (index, text) or (index, Skip) only for records with index >= start and
    (want is None or want(index)); other records are passed over as cheaply as the format allows.
    `want` is called exactly once for every index >= start, in order (the source stream relies on this to
    count a file's records while reading it).
    `text_field` (default "text") names the JSON key / column; text and pubmed_xml units ignore it.
    """
    reader = _READERS[detect_format(path)]

    def keep(index: int) -> bool:
        return index >= start and (want is None or want(index))

    with _reading(path):
        yield from reader(path, text_field or "text", keep, start)


def iter_records(
    path: str, want: Callable[[int], bool] | None = None, start: int = 0
) -> Iterator[tuple[int, dict | Skip]]:
    """Like `iter_texts`, but yields whole records as dicts (instruction data: several fields per record).

    jsonl (or a JSON array), csv, parquet and save_to_disk units have records; text and PubMed XML do not."""
    fmt = detect_format(path)
    if fmt in ("text", "pubmed_xml"):
        raise DataFileError(
            f"{path}: a {fmt} file holds plain text, not instruction records; use jsonl, json, csv or parquet"
        )

    def keep(index: int) -> bool:
        return index >= start and (want is None or want(index))

    with _reading(path):
        yield from _READERS[fmt](path, None, keep, start)


def count_records(path: str) -> int:
    """Number of records in the unit (malformed ones included), by the cheapest route for its format."""
    fmt = detect_format(path)
    with _reading(path):
        if fmt == "jsonl":
            if _is_json_array(path):
                return len(_json_array(path))
            return sum(1 for _ in _jsonl_lines(path))
        if fmt == "csv":
            with _open_text(path) as stream:
                return max(0, sum(1 for row in csv.reader(stream) if row) - 1)  # minus the header
        if fmt == "parquet":
            with pq.ParquetFile(path) as parquet:
                return parquet.metadata.num_rows
        if fmt == "text":
            os.stat(path)  # a missing file has no record; let _reading say so
            return 1
        if fmt == "hf_dataset":
            return len(_load_hf(path))
        return sum(1 for _ in _pubmed_articles(path))
