"""Which files of a download a source reads, and why every other file it found is left out.

A user points a source at the directory they downloaded. Next to the data, distributors ship files that are not
data: NCBI's README.txt and a `.md5` per PubMed file, PhysioNet's LICENSE.txt and SHA256SUMS.txt, MIMIC-IV-Note's
`*_detail.csv.gz` tables, MIMIC-CXR's record and study lists (CSV tables with no text column). Read as they are,
the text ones would be trained as documents and the tables would stop the run. So files FOUND by walking a
directory or matching a glob go through these rules, in order, and each one left out is recorded with its
reason (`--dry-run` lists them all; the run logs the count):

1. hidden (dot-prefixed) files and directories are never visited (not listed: `.git` may hold thousands);
2. the source's `exclude` globs, then its `include` globs (when given, a file must match one);
3. NOT_DATA names: readmes, licences, notices, checksum lists and signatures, the `*_detail` tables;
4. extensions no reader takes (`.html`, `.pdf`, ...);
5. (pretraining) CSV and parquet tables without the source's text column, when the source's other files show
   them to be metadata: another table has the column, or the data are one-document text files (MIMIC-CXR's
   record lists beside its report tree). Otherwise the text_field may be what is wrong, and start-up says so.

A file NAMED in `paths` (not a glob) is read whatever its name: the user asked for it. Globs match a file's
path relative to the directory walked (or its name, for a pattern without `/`), case-sensitively as the
filesystem is, with `*` crossing directories (fnmatch), so `exclude: ["*_detail.csv.gz"]` and
`include: ["files/**"]` both work.
"""

from __future__ import annotations

import csv
import fnmatch
import glob
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from mellama_train.config import SourceConfig
from mellama_train.data.readers import (
    _ACCEPTED,
    DataFileError,
    _format_of_name,
    _is_hf_dir,
    _open_text,
    detect_format,
)

_DOC = r"([-_]\w*(\.\d+)*)?(\.(txt|md|rst))?"  # README, README.md, LICENSE-2.0.txt; not license.jsonl
NOT_DATA = {
    "a readme": rf"readme({_DOC})",
    "a licence": rf"(licen[cs]e|copying|notice)({_DOC})",
    "a changelog or citation file": rf"(changelog|changes|citation|authors)({_DOC})",
    "a checksum list": r"(sha\d*|md5|b2|checksum)s?(ums?)?(\.txt)?",
    "a checksum or signature": r".*\.(md5|sha1|sha256|sha512|sig|asc)",
    "a download list": r"urls?\.txt",
    "a MIMIC-IV-Note *_detail table (codes and fields, no note text)": r".*_detail\.csv(\.gz|\.zst)?",
}
"""Reason -> full-name pattern (case-insensitive) of files that ship with a corpus but are not its data."""
_THREADS = 16
"""Tables whose header or schema is read at once (rule 5)."""
_NOT_DATA = [(why, re.compile(pattern, re.IGNORECASE)) for why, pattern in NOT_DATA.items()]


@dataclass
class Selection:
    """The files a source reads (sorted, absolute) and those it found but leaves out, with why."""

    files: list[str] = field(default_factory=list)
    excluded: list[tuple[str, str]] = field(default_factory=list)


def not_data_reason(name: str) -> str | None:
    """Why a file name is not data by the NOT_DATA rule, or None."""
    return next((why for why, pattern in _NOT_DATA if pattern.fullmatch(name)), None)


def _matches(rel: str, patterns: list[str]) -> str | None:
    """The first glob that matches a relative path (a pattern without `/` also matches the bare name)."""
    name = os.path.basename(rel)
    for pattern in patterns:
        if fnmatch.fnmatchcase(rel, pattern) or ("/" not in pattern and fnmatch.fnmatchcase(name, pattern)):
            return pattern
    return None


def _walk(directory: str) -> list[str]:
    """Every file under a directory (hidden names skipped), with save_to_disk directories as single units."""
    if _is_hf_dir(directory):
        return [directory]
    found = []
    for root, dirnames, filenames in os.walk(directory):
        descend = []
        for name in sorted(dirnames):
            sub = os.path.join(root, name)
            if name.startswith("."):
                continue
            if _is_hf_dir(sub):
                found.append(sub)  # one unit; its .arrow/.json files are not separate data
            else:
                descend.append(name)
        dirnames[:] = descend
        found += [os.path.join(root, name) for name in filenames if not name.startswith(".")]
    return found


def _inside_hf_dir(path: str) -> bool:
    """True when an ancestor of `path` is a save_to_disk directory (its metadata files are not data)."""
    parent = os.path.dirname(os.path.abspath(path))
    while parent != os.path.dirname(parent):
        if _is_hf_dir(parent):
            return True
        parent = os.path.dirname(parent)
    return False


def _glob_base(pattern: str) -> str:
    """The directory part of a glob before its first wildcard: relative paths for include/exclude start there."""
    head = re.split(r"[*?\[]", pattern, maxsplit=1)[0]
    return head if head.endswith(os.sep) else os.path.dirname(head)


def table_columns(path: str) -> list[str] | None:
    """The columns of a CSV or parquet file (its header / schema), or None for other formats or when the file
    cannot be read (start-up then names that problem)."""
    try:
        fmt = detect_format(path)
        if fmt == "parquet":
            return list(pq.read_schema(path).names)
        if fmt == "csv":
            with _open_text(path) as stream:
                return next(
                    csv.reader([stream.readline(1 << 20)]), []
                )  # bounded: a binary file has no newline
    except Exception:  # unreadable (OSError, corrupt gzip/zstd/parquet: each raises its own type): not this
        pass  # rule's business, start-up names it
    return None


def select(
    patterns: list[str],
    source: str,
    *,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    text_field: str | None = "text",
    key: str = "paths",
) -> Selection:
    """Apply the rules of the module docstring to a source's paths (or eval_paths).

    `text_field`: the column a pretraining source reads (None: instruction records, no column rule).
    Raises DataFileError naming the source and pattern when a pattern matches nothing at all, and when every
    file it found was left out (with the reasons, and the setting that would take them)."""
    include, exclude = include or [], exclude or []
    chosen: dict[str, str] = {}  # absolute path -> the path relative to where it was found
    excluded: dict[str, str] = {}
    for pattern in patterns:
        path = os.path.expanduser(pattern)
        if not any(char in path for char in "*?["):
            if not os.path.exists(path):
                raise DataFileError(
                    f"data.sources[{source}].{key}: {pattern!r} matched no files; check the path or glob"
                    f" (accepted: {_ACCEPTED})"
                )
            if not os.path.isdir(path) or _is_hf_dir(path):
                chosen[os.path.abspath(path)] = os.path.basename(path)  # named: read whatever its name
                continue
            found = [(unit, os.path.relpath(unit, path)) for unit in _walk(path)]
        else:
            base = _glob_base(path)
            found = []
            # glob skips dot-prefixed names unless the pattern spells them out, which is the hidden-file rule.
            for match in glob.glob(path, recursive=True):
                if _inside_hf_dir(match):
                    continue  # `**` also reaches into save_to_disk directories; the directory is the unit
                units = _walk(match) if os.path.isdir(match) else [match]
                found += [(unit, os.path.relpath(unit, base or ".")) for unit in units]
        if not found:
            raise DataFileError(
                f"data.sources[{source}].{key}: {pattern!r} matched no files; check the path or glob"
                f" (accepted: {_ACCEPTED})"
            )
        for unit, rel in found:
            unit = os.path.abspath(unit)
            if unit in chosen:
                continue
            why = _rule(unit, rel, include, exclude)
            if why is None:
                chosen[unit] = rel
            else:
                excluded[unit] = why
    if text_field is not None:
        _leave_out_tables_without(text_field, chosen, excluded)
    for unit in chosen:
        excluded.pop(unit, None)  # named by one pattern, found and left out by another: named wins
    if not chosen:
        reasons = sorted({why for why in excluded.values()})
        raise DataFileError(
            f"data.sources[{source}].{key}: all {len(excluded)} files found were left out ({'; '.join(reasons)});"
            " name the files, or set the source's include/exclude (docs/DATA.md, `--dry-run` lists them)"
        )
    return Selection(sorted(chosen), sorted(excluded.items()))


def _rule(unit: str, rel: str, include: list[str], exclude: list[str]) -> str | None:
    """Why a found file is left out (rules 2-4), or None."""
    if (pattern := _matches(rel, exclude)) is not None:
        return f"matches exclude {pattern!r}"
    if include and _matches(rel, include) is None:
        return f"matches no include ({', '.join(map(repr, include))})"
    name = os.path.basename(rel)
    if (why := not_data_reason(name)) is not None:
        return f"not data: {why}"
    if not os.path.isdir(unit) and _format_of_name(name) is None:  # a directory here is a save_to_disk unit
        return f"not a format a source reads ({os.path.splitext(name)[1] or 'no extension'})"
    return None


def _leave_out_tables_without(column: str, chosen: dict[str, str], excluded: dict[str, str]) -> None:
    """Rule 5: tables without the text column, where the source's other files show that they are metadata:
    another table of the source has the column (so text_field is right), or the data are one-document text
    files (a table beside a report tree is its index, as in MIMIC-CXR). Otherwise a table without the column
    may be a data table with the wrong text_field, and start-up names it."""
    units = list(chosen)
    if not any(_format_of_name(os.path.basename(unit)) in ("csv", "parquet") for unit in units):
        return  # no table to open
    # Every rank selects at start-up; on a shared filesystem each open is a round trip, so several at once
    # (thousands of parquet shards: one footer read each).
    with ThreadPoolExecutor(min(_THREADS, len(units))) as pool:
        columns = dict(zip(units, pool.map(table_columns, units)))
    lacking = [unit for unit, names in columns.items() if names is not None and column not in names]
    if not lacking:
        return
    has_column = any(names is not None and column in names for names in columns.values())
    beside_text = any(_format_of_name(os.path.basename(unit)) == "text" for unit in chosen)
    if not (has_column or beside_text):
        return
    for unit in lacking:
        names = columns[unit] or []
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        excluded[unit] = f"a table without the {column!r} column (columns: {shown}): metadata, not the data"
        del chosen[unit]


def describe_left_out(chosen: Selection) -> str:
    """One line: how many files are read, how many were left out and for which reasons."""
    reasons = Counter(why.split(" (", 1)[0] for _, why in chosen.excluded)
    counts = "; ".join(f"{n} {why}" for why, n in sorted(reasons.items()))
    return f"{len(chosen.files)} files read, {len(chosen.excluded)} left out ({counts}); --dry-run lists them"


def of_source(src: SourceConfig, key: str = "paths", *, records: bool = False) -> Selection:
    """`select` for a configured source's `paths` or `eval_paths`; `records`: instruction data (no column
    rule)."""
    text_field = None if records else (src.text_field or "text")
    return select(
        getattr(src, key), src.name, include=src.include, exclude=src.exclude, text_field=text_field, key=key
    )


def expand_paths(patterns: list[str], source: str) -> list[str]:
    """The files `select` takes for patterns with no include/exclude and no column rule (decontamination's
    --scan, tools and tests)."""
    return select(patterns, source, text_field=None).files
