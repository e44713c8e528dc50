"""Which files of a download a source reads, and why every other file it found is left out.

A user points a source at the directory they downloaded. Next to the data, distributors ship files that are not
data: NCBI's README.txt and a `.md5` per PubMed file, PhysioNet's LICENSE.txt and SHA256SUMS.txt, MIMIC-IV-Note's
`*_detail.csv.gz` tables, MIMIC-CXR's record and study lists (CSV tables with no text column). Read as they are,
the text ones would be trained as documents and the tables would stop the run. So files FOUND by walking a
directory or matching a glob go through these rules, in order, and each one left out is recorded with its
reason (`--dry-run` lists them all; the run logs the count):

1. hidden (dot-prefixed) files and directories are never visited (not listed: `.git` may hold thousands);
   symlinked directories are followed, each real directory once, and a file reached twice is read once;
   a directory that cannot be listed is recorded, never dropped in silence;
2. the source's `exclude` globs, then its `include` globs (when given, a file must match one);
3. NOT_DATA names: readmes, licences, notices, project documentation, checksum lists and signatures, download
   lists, dataset descriptions, MIMIC-IV-Note's `*_detail` tables; unless an include glob takes the file, or a
   glob spells its name (`**/README.md`): a corpus of readmes is possible;
4. anything that is not a regular file (a pipe would hang the read), and extensions no reader takes;
5. (pretraining) CSV and parquet tables whose header lacks the source's text column, when the source's other
   files show them to be metadata: another table has the column, or one-document text files outnumber the
   tables (MIMIC-CXR's record lists beside its report tree). A header with the column up to case or spaces, or
   a first line that is not a header, is a data table read wrongly: start-up names it, with both fixes.

A file NAMED in `paths` (not a glob) is read whatever its name: the user asked for it; an existing path is
taken literally even when it holds glob characters (`[2024]/`). Globs match a file's path relative to the
directory walked (for a glob in `paths`: the directory before its first wildcard), or its name, for a pattern
without `/`; `*` crosses directories (fnmatch) and a leading `**/` also matches at the top, so
`exclude: ["*_metadata.csv.gz"]` and `include: ["files/**"]` both work.

Reasons name files and column names, never values: a CSV exported without a header has a note as its first
line, so a first line that does not look like a header is shown as a count only.
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
from mellama_train.data.fields import describe_columns
from mellama_train.data.files import (
    _ACCEPTED,
    DataFileError,
    _format_of_name,
    _is_hf_dir,
    _open_text,
    detect_format,
    sniff_format,
)

# A sidecar's name, then at most a version or language suffix (LICENSE-2.0, README.zh-CN, README_ja) and a
# document extension, possibly compressed: `notice_of_privacy_practices.txt` or `license.jsonl` stay data.
_DOC = r"([-_.](\d[\w.]*|[a-z]{2}([-_][a-z]{2})?))?(\.(txt|md|rst|html?))?(\.(gz|zst|zstd))?"
NOT_DATA = {
    "a readme": rf"(readme|lisezmoi|leeme|liesmich)({_DOC})",
    "a licence or notice": rf"(licen[cs]e|copying|notice|data_licen[cs]e|terms_of_use)({_DOC})",
    "project documentation": rf"(changelog|changes|history|release_notes|citation|authors|contributing|"
    rf"code_of_conduct|version|manifest)({_DOC})",
    "a checksum list": r"(sha\d*|md5|b2|checksum)s?(ums?|_?checksums?)?(\.txt)?",
    "a checksum or signature": r".*\.(md5|sha1|sha256|sha512|sig|asc)",
    "a download list": r"urls?\.txt|robots\.txt|requirements[\w.-]*\.txt",
    "NCBI's journal list": r"j_(medline|entrez)\.txt",
    "a dataset description (Hugging Face, LLaMA-Factory)": r"dataset_infos?\.json|dataset_dict\.json",
    "a MIMIC-IV-Note *_detail table (codes and fields, no note text)": r"(discharge|radiology)_detail\.csv"
    r"(\.gz|\.zst|\.zstd)?",
}
"""Reason -> full-name pattern (case-insensitive) of files that ship with a corpus but are not its data."""
_IDENTIFIER = re.compile(r"[A-Za-z_][\w .:/()-]{0,63}")
"""A column name as metadata tables have them; a first line of anything else is not a header."""
_THREADS = 16
"""Tables whose header or schema is read at once (rule 5)."""
_NOT_DATA = [(why, re.compile(pattern, re.IGNORECASE)) for why, pattern in NOT_DATA.items()]


@dataclass
class Selection:
    """The files a source reads (sorted, absolute) and those it found but leaves out, with why."""

    files: list[str] = field(default_factory=list)
    excluded: list[tuple[str, str]] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    """include/exclude globs that matched no file found (a typo, or a layout other than expected)."""


def not_data_reason(name: str) -> str | None:
    """Why a file name is not data by the NOT_DATA rule, or None."""
    return next((why for why, pattern in _NOT_DATA if pattern.fullmatch(name)), None)


def _matches(rel: str, patterns: list[str]) -> str | None:
    """The first glob that matches a relative path (a pattern without `/` also matches the bare name)."""
    name = os.path.basename(rel)
    for pattern in patterns:
        if fnmatch.fnmatchcase(rel, pattern) or ("/" not in pattern and fnmatch.fnmatchcase(name, pattern)):
            return pattern
        if pattern.startswith("**/") and fnmatch.fnmatchcase(rel, pattern[3:]):  # as glob: zero directories
            return pattern
    return None


def _walk(directory: str, unreadable: dict[str, str]) -> list[str]:
    """Every file under a directory (hidden names skipped), with save_to_disk directories as single units.
    Symlinked directories are followed (corpora are often linked in from shared storage), each real directory
    once (a link back up the tree is not a loop); a directory that cannot be listed is recorded in
    `unreadable`, never dropped in silence."""
    if _is_hf_dir(directory):
        return [directory]
    found = []
    seen: set[tuple[int, int]] = set()

    def failed(err: OSError) -> None:
        unreadable[os.path.abspath(err.filename or directory)] = (
            f"a directory that cannot be listed ({type(err).__name__})"
        )

    for root, dirnames, filenames in os.walk(directory, onerror=failed, followlinks=True):
        try:
            info = os.stat(root)
        except OSError:
            continue
        if (info.st_dev, info.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((info.st_dev, info.st_ino))
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


def _inside_hf_dir(path: str, base: str) -> bool:
    """True when an ancestor of `path` below the glob's base is a save_to_disk directory (its metadata files
    are not data). Only ancestors the wildcard reached are looked at: a stat or three per level, per match."""
    parent = os.path.dirname(os.path.abspath(path))
    stop = os.path.abspath(base or ".")
    while parent != os.path.dirname(parent) and parent != stop and parent.startswith(stop):
        if _is_hf_dir(parent):
            return True
        parent = os.path.dirname(parent)
    return False


def _glob_base(pattern: str) -> str:
    """The directory part of a glob before its first wildcard: relative paths for include/exclude start there."""
    head = re.split(r"[*?\[]", pattern, maxsplit=1)[0]
    return head if head.endswith(os.sep) else os.path.dirname(head)


def table_columns(path: str, declared: str | None = None) -> list[str] | None:
    """The columns of a CSV or parquet file (its header / schema), or None for other formats or when the file
    cannot be read (start-up then names that problem)."""
    try:
        fmt = detect_format(path, declared)
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
    declared: str | None = None,
) -> Selection:
    """Apply the rules of the module docstring to a source's paths (or eval_paths).

    `text_field`: the column a pretraining source reads (None: instruction records, no column rule).
    `declared`: the source's format (None: `auto`, each file's format by its name, else its first bytes).
    Raises DataFileError naming the source and pattern when a pattern matches nothing at all, and when every
    file it found was left out (with the reasons, and the setting that would take them)."""
    include = [_normalise(p) for p in include or []]
    exclude = [_normalise(p) for p in exclude or []]
    chosen: dict[str, str] = {}  # real path -> the path relative to where it was found
    excluded: dict[str, str] = {}
    named: set[str] = set()  # files the user spelled out: no by-name rule applies to them
    unused = {f"include {p!r}": p for p in include} | {f"exclude {p!r}": p for p in exclude}
    for pattern in patterns:
        path = os.path.expandvars(os.path.expanduser(pattern))
        literal = os.path.exists(path) or not any(char in path for char in "*?[")  # `[2024]/` can be a name
        unreadable: dict[str, str] = {}
        if literal:
            if not os.path.lexists(path):
                raise DataFileError(
                    f"data.sources[{source}].{key}: {pattern!r} matched no files; check the path or glob"
                    f" (accepted: {_ACCEPTED})"
                )
            if not os.path.isdir(path) or _is_hf_dir(path):
                if os.path.exists(path) and not os.path.isdir(path) and not os.path.isfile(path):
                    raise DataFileError(
                        f"data.sources[{source}].{key}: {pattern!r} is not a regular file (a pipe or device);"
                        " give the file itself"
                    )
                real = os.path.realpath(path)
                chosen[real] = os.path.basename(path)  # named: read whatever its name
                named.add(real)
                continue
            found = [(unit, os.path.relpath(unit, path)) for unit in _walk(path, unreadable)]
        else:
            base = _glob_base(path)
            spelled = not any(char in os.path.basename(path) for char in "*?[")  # **/README.md names them
            found = []
            # glob skips dot-prefixed names unless the pattern spells them out, which is the hidden-file rule.
            for match in glob.glob(path, recursive=True):
                if _inside_hf_dir(match, base):
                    continue  # `**` also reaches into save_to_disk directories; the directory is the unit
                units = _walk(match, unreadable) if os.path.isdir(match) else [match]
                found += [(unit, os.path.relpath(unit, base or ".")) for unit in units]
                if spelled and not os.path.isdir(match):
                    named.add(os.path.realpath(match))
        excluded.update(unreadable)
        if not found and not unreadable:
            raise DataFileError(
                f"data.sources[{source}].{key}: {pattern!r} matched no files; check the path or glob"
                f" (accepted: {_ACCEPTED})"
            )
        for unit, rel in found:
            for label, glob_pattern in list(unused.items()):
                if _matches(rel, [glob_pattern]) is not None:
                    del unused[label]
            real = os.path.realpath(unit)  # one file reached by two paths (a link) is read once
            if real in chosen:
                continue
            why = _rule(real, rel, include, exclude, real in named, declared)
            if why is None:
                chosen[real] = rel
            else:
                excluded[real] = why
    if text_field is not None:
        _leave_out_tables_without(text_field, chosen, excluded, named, declared)
    for unit in chosen:
        excluded.pop(unit, None)  # named by one pattern, found and left out by another: named wins
    if not chosen and patterns:
        reasons = sorted({why.split(" (", 1)[0] for why in excluded.values()})
        raise DataFileError(
            f"data.sources[{source}].{key}: all {len(excluded)} files found were left out ({'; '.join(reasons)});"
            " name the files in paths, or take them with the source's include globs (docs/DATA.md;"
            " `--dry-run` lists each file and why)"
        )
    return Selection(sorted(chosen), sorted(excluded.items()), list(unused))


def _normalise(pattern: str) -> str:
    """`./a/*` is `a/*`; a trailing `/` means everything under that directory."""
    pattern = pattern.removeprefix("./")
    return pattern + "*" if pattern.endswith("/") else pattern


def _rule(
    unit: str, rel: str, include: list[str], exclude: list[str], named: bool, declared: str | None = None
) -> str | None:
    """Why a found file is left out (rules 2-4), or None. A file an include glob takes, or one a glob spells
    out by name, is not left out by its name."""
    if (pattern := _matches(rel, exclude)) is not None:
        return f"matches exclude {pattern!r}"
    included = _matches(rel, include) is not None
    if include and not included:
        return f"matches no include ({', '.join(map(repr, include))})"
    name = os.path.basename(rel)
    if not (included or named) and (why := not_data_reason(name)) is not None:
        return f"not data: {why}"
    if os.path.isdir(unit):  # a save_to_disk unit
        return None
    if not os.path.isfile(unit):
        return (
            "not a regular file (a pipe, a device or a broken link)" if os.path.lexists(unit) else "vanished"
        )
    by_name = _format_of_name(name)
    if declared is not None:
        if by_name not in (None, declared):
            return f"a {by_name} file by its name, and the source reads {declared} (its format)"
        return None
    if by_name is None and not os.access(unit, os.R_OK):
        return "cannot be read (permission denied)"
    if by_name is None and sniff_format(unit) is None:
        return (
            f"not a format a source reads ({ascii(os.path.splitext(name)[1] or 'no extension')});"
            " set the source's format if it is one"
        )
    return None


def _leave_out_tables_without(
    column: str,
    chosen: dict[str, str],
    excluded: dict[str, str],
    named: set[str],
    declared: str | None = None,
) -> None:
    """Rule 5: found (not named) tables without the text column, where the source's other files show that they
    are metadata: another table has the column (so text_field is right), or the data are one-document text
    files that outnumber the tables (a table beside a report tree is its index, as in MIMIC-CXR). A table whose
    header has the column up to case or spaces (`Text`, ` text`), or whose first line is not a header, is a data
    table read wrongly: left for start-up to name, never left out."""
    units = list(chosen)

    def format_of(unit: str) -> str | None:
        return declared or _format_of_name(os.path.basename(unit))

    tables = [unit for unit in units if format_of(unit) in ("csv", "parquet")]
    if not tables:
        return  # no table to open
    # Every rank selects at start-up; on a shared filesystem each open is a round trip, so several at once
    # (thousands of parquet shards: one footer read each).
    with ThreadPoolExecutor(min(_THREADS, len(tables))) as pool:
        columns = dict(zip(tables, pool.map(lambda unit: table_columns(unit, declared), tables)))

    def metadata_like(names: list[str]) -> bool:
        near = {name.strip().lower() for name in names}
        return bool(names) and column.lower() not in near and all(_IDENTIFIER.fullmatch(n) for n in names)

    lacking = [
        unit
        for unit, names in columns.items()
        if names is not None and column not in names and unit not in named and metadata_like(names)
    ]
    if not lacking:
        return
    has_column = any(names is not None and column in names for names in columns.values())
    texts = sum(format_of(unit) == "text" for unit in units)
    if not (has_column or texts > len(tables)):
        return
    for unit in lacking:
        excluded[unit] = (
            f"a table without the {column!r} column ({describe_columns(columns[unit] or [])}): metadata, not"
            " the data"
        )
        del chosen[unit]


def describe_left_out(chosen: Selection) -> str:
    """One line: how many files are read, how many were left out and for which reasons."""
    reasons = Counter(why.split(" (", 1)[0] for _, why in chosen.excluded)
    counts = "; ".join(f"{n} {why}" for why, n in sorted(reasons.items()))
    return f"{len(chosen.files)} files read, {len(chosen.excluded)} left out ({counts}); --dry-run lists them"


def of_source(
    src: SourceConfig, key: str = "paths", *, records: bool = False, patterns: list[str] | None = None
) -> Selection:
    """`select` for a configured source's `paths` or `eval_paths` (`patterns`: others, named as `key`);
    `records`: instruction data (no column rule)."""
    text_field = None if records else (src.text_field or "text")
    return select(
        getattr(src, key) if patterns is None else patterns,
        src.name,
        include=src.include,
        exclude=src.exclude,
        text_field=text_field,
        key=key,
        declared=declared_format(src),
    )


def declared_format(src: SourceConfig) -> str | None:
    """The source's `format`, or None for `auto`."""
    return None if src.format == "auto" else src.format


def expand_paths(patterns: list[str], source: str) -> list[str]:
    """The files `select` takes for patterns with no include/exclude and no column rule (decontamination's
    --scan, tools and tests)."""
    return select(patterns, source, text_field=None).files
