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

This module holds the per-format readers and the entry points (iter_texts, iter_records, count_records,
check_unit); the file layer is data/files.py, the fingerprints data/digests.py, dotted fields and `where`
data/fields.py, and PubMed XML data/pubmed_xml.py.
"""

from __future__ import annotations

import codecs
import csv
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from typing import IO, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mellama_train.data.digests import ByteTap, RecordDigest
from mellama_train.data.fields import (
    _ABSENT,
    _arrow_selection,
    _require_column,
    _value,
    _where_columns,
    describe_columns,
    field_value,
    is_selected,
)
from mellama_train.data.files import (
    _ARROW_BATCH,
    _CHUNK,
    _COMPRESSIONS,
    DEFAULT_MAX_RECORD_BYTES,
    DataFileError,
    ReadOptions,
    Record,
    Skip,
    UnreadableFile,
    _as_text,
    _cause,
    _open_binary,
    _open_text,
    _options,
    _Reading,
    _reading,
    detect_format,
)
from mellama_train.data.pubmed_xml import _read_pubmed, pubmed_records


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
