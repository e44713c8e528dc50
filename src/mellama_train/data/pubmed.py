"""PubMed/MEDLINE as NCBI ships it: a yearly baseline plus update files, read as the one corpus they describe.

NCBI's rule (https://www.nlm.nih.gov/databases/download/pubmed_medline.html): the files are numbered in the
order they were published, baseline first, then the daily update files; a citation in a later file replaces
any earlier version of the same PMID, and a `<DeleteCitation>` block removes the PMIDs it lists. So, over
the PubMed XML files of one source, in that order:

- the files are ordered by name, numbers compared as numbers (`pubmed25n0001` ... `pubmed25n1274` is the
  2025 baseline, `pubmed25n1275` onwards its updates; directories do not matter);
- every citation (PubmedArticle or PubmedBookArticle) and every deletion is an event of its PMID at (file
  number, place in the file); a file's deletions count as after its citations (NCBI writes them last);
- a citation is trained on only when it is its PMID's last event: an earlier version is skipped as
  `superseded`, and every version of a PMID whose last event is a deletion as `deleted` (a deletion
  followed by a later citation brings the PMID back). Both are counted per source like every filter.

The events come from a scan of every file at start-up (`build_index`): a byte-level scan for the record and
PMID tags, about 6x faster than parsing the XML (129 against 22 MB/s of XML here, gzip included;
docs/PERFORMANCE.md), run over the files in parallel processes. It is checked, not trusted: as a file is trained on, the reader's own parse
gives each citation's PMID, and at the file's end the count and digest of that sequence must equal the
scan's, or the run stops naming the file (it changed during the run, or it holds XML the scan reads
otherwise: a PMID written with a character reference, an entity, a comment inside a record).

Memory: building the index holds 16 bytes per event plus an 8-byte sort order, about 0.9 GB for the ~36M
citations of a full baseline; the index kept for training holds only the citations to skip (a few hundred
thousand PMIDs a year: a few MB). Rank 0 builds the index at every start and saves it in the run directory
(`data_index/<source>.npz`, plain arrays, loaded without pickle, with the size and modification time of every
file it covers) for the other ranks of the same start; a saved index is never trusted across starts.

Held-out files (eval_paths) are read as they are: they are not part of the training corpus's history.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from mellama_train.data.files import _format_of_name, _open_binary, _options, _reading, sniff_format
from mellama_train.data.pubmed_xml import PmidDigest, pmid_number, pubmed_records

log = logging.getLogger(__name__)

INDEX_DIR = "data_index"
"""The run directory's folder of saved update indexes, one `<source>.npz` per source with PubMed files."""

# The scan reads only what NCBI's files are made of: record and deletion tags, and PMID elements holding
# digits. Anything that could make an XML parser see the file otherwise (comments, CDATA, processing
# instructions other than the XML declaration, a DOCTYPE with an internal subset, entity declarations,
# a default namespace, UTF-16, quotes or markup or character references where the pattern reads, a record inside a
# record, a deletion inside a record, a PMID element the pattern does not take) makes the file "unsure": it is
# then parsed instead, exactly, at the parser's speed. NCBI's files contain none of these. Every repetition
# stops at the next `<` (which attribute values and PMID text cannot hold), so the scan is linear in the
# file's size whatever it holds, and no token is longer than _TAIL.
# (Every alternative begins with a literal `<`, so the regex engine skips from `<` to `<`: about 150 MB/s. A
# group or a different first character in any alternative costs it that, down to 14 MB/s.)
_TOKEN = re.compile(
    rb"<(/?)(PubmedArticle|PubmedBookArticle|DeleteCitation)(?=[\s/>])([^<>]{0,4096})>"
    rb"|<PMID(?=[\s>])[^<>]{0,4096}>([^<]{0,4096})</PMID\s*>"
    rb"|<PMID(?=[\s/>])"  # a PMID element the pattern above does not take (every group None)
)
# A default namespace (`xmlns="..."`) renames every element for the parser; a prefixed one (MathML's
# `xmlns:mml`, found in real abstracts) renames only its own elements, so it is no reason to parse.
_UNSURE = re.compile(rb"<(?:!--|!\[CDATA\[|\?(?!xml[\s?])|!DOCTYPE[^<>\[]*\[|!ENTITY|\x00)")
_DEFAULT_NAMESPACE = re.compile(rb"xmlns\s*=")
_SCAN_CHUNK = 4 << 20
_TAIL = 1 << 16  # longer than any token: what a round leaves unscanned for the next, with the next bytes
_DELETE_POSITION = 2**32 - 1
_PARALLEL_BYTES = 256 << 20  # below this in all, the files are scanned in this process (no start-up cost)


def as_pmid(raw: bytes) -> int:
    """A PMID element's raw text as the reader's parse reads it (pubmed_xml.pmid_number)."""
    return pmid_number(raw.decode("utf-8", "replace"))


def pmid_digest(pmids: list[int]) -> int:
    """The digest of a sequence of PMIDs (0 where a citation has none), as the reader computes it."""
    digest = PmidDigest()
    for pmid in pmids:
        digest.add(pmid)
    return digest.value


def _quotes_balanced(attributes: bytes) -> bool:
    return attributes.count(b'"') % 2 == 0 and attributes.count(b"'") % 2 == 0


class _Scanner:
    """The scan of one file: the PMID of each citation in order (0: none found), the deleted PMIDs, and
    whether anything in the file could make a parser read it otherwise (`unsure`)."""

    def __init__(self) -> None:
        self.citations: list[int] = []
        self.deleted: list[int] = []
        self.unsure = False
        self._in_record = self._has_pmid = self._in_delete = False

    def feed(self, data: bytes, final: bool) -> int:
        """Scan `data` (the unscanned bytes so far); returns how many were scanned. Short of the end, tokens
        ending in the last _TAIL bytes wait for the next round, which sees them whole."""
        if not self.unsure and (_UNSURE.search(data) or _DEFAULT_NAMESPACE.search(data) or b"\x00<" in data):
            self.unsure = True
        limit = len(data) if final else len(data) - _TAIL
        for match in _TOKEN.finditer(data):
            if match.end() > limit:
                return max(min(match.start(), limit), 0)
            self._token(*match.group(1, 2, 3, 4))
        return max(limit, 0)

    def _token(
        self, closing: bytes | None, tag: bytes | None, attributes: bytes | None, pmid: bytes | None
    ) -> None:
        if tag is None and pmid is None:  # a PMID element the pattern does not take
            self.unsure = True
        elif pmid is not None:
            if not pmid.strip().isdigit():
                self.unsure = self.unsure or bool(pmid.strip())  # `&#53;`, `"&gt;5`: the parser may differ
            if self._in_record and not self._has_pmid:
                self.citations[-1], self._has_pmid = as_pmid(pmid), True
            elif self._in_delete and (number := as_pmid(pmid)):
                self.deleted.append(number)
        elif tag is not None:
            attributes = attributes or b""
            if not _quotes_balanced(attributes):
                self.unsure = True  # a `>` inside a quoted attribute value ended the tag early
            empty = attributes.rstrip().endswith(b"/")
            if tag == b"DeleteCitation":
                if self._in_record:
                    self.unsure = True  # the parser takes no deletion inside a record
                self._in_delete = not closing and not empty
            elif closing:
                self._in_record = False
            else:
                if self._in_record or self._in_delete:
                    self.unsure = True
                self.citations.append(0)
                self._in_record, self._has_pmid = not empty, False


def scan_file(path: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """(citation PMIDs in file order, deleted PMIDs, unsure) of one PubMed XML file, decompressing as it reads;
    holds at most one chunk and a tail of the file at a time."""
    scanner = _Scanner()
    held = b""
    with _reading(path), _open_binary(path) as stream:
        while chunk := stream.read(_SCAN_CHUNK):
            if not held and (chunk.startswith((b"\xff\xfe", b"\xfe\xff")) or chunk[:1] == b"\x00"):
                scanner.unsure = True  # UTF-16 or -32: the byte patterns cannot read it
            held += chunk
            held = held[scanner.feed(held, final=False) :]
        scanner.feed(held, final=True)
    citations = np.asarray(scanner.citations, dtype=np.int64)
    return citations, np.asarray(scanner.deleted, dtype=np.int64), scanner.unsure


def parse_file(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(citation PMIDs, deleted PMIDs) of one file from the reader's own XML parse: exact, ~5x slower."""
    deleted: list[int] = []
    citations = [record.pmid or 0 for record in pubmed_records(path, _options(None), deleted)]
    return np.asarray(citations, dtype=np.int64), np.asarray(deleted, dtype=np.int64)


def file_events(path: str) -> tuple[np.ndarray, np.ndarray]:
    """A file's citations and deletions: scanned, or parsed when the scan is unsure of it."""
    citations, deleted, unsure = scan_file(path)
    if unsure:
        log.info("%s: holds XML the fast scan does not read (comments, entities, ...): parsed instead", path)
        return parse_file(path)
    return citations, deleted


def _natural_key(path: str) -> tuple:
    # re.split with a group alternates text and ASCII digit runs, so each place compares like with like.
    parts = re.split(r"([0-9]+)", os.path.basename(path))
    return (tuple(int(part) if i % 2 else part for i, part in enumerate(parts)), path)


def ordered(files: list[str], declared: str | None = None) -> list[str]:
    """The PubMed XML files among a source's files (`declared`: its format), in NCBI's publication order: by
    name, numbers compared as numbers."""

    def is_pubmed(path: str) -> bool:
        fmt = declared or _format_of_name(os.path.basename(path))
        return fmt == "pubmed_xml" or (
            fmt is None and os.path.isfile(path) and sniff_format(path) == "pubmed_xml"
        )

    return sorted(filter(is_pubmed, files), key=_natural_key)


@dataclass(frozen=True)
class FileIndex:
    """What the reader of one file needs: which citations to skip, and what to check at the file's end."""

    skip: dict[int, tuple[str, int]]
    """PMID -> (reason, how many of its first occurrences in this file to skip): "superseded" or "deleted"."""
    citations: int
    """Citations the scan found in the file."""
    digest: int
    """pmid_digest of their PMIDs, in order."""
    deletions: int = 0
    """PMIDs the file's DeleteCitation blocks list."""
    deletions_digest: int = field(default_factory=lambda: pmid_digest([]))
    """pmid_digest of those PMIDs, in order."""


REASONS = ("superseded", "deleted")


@dataclass
class PubmedIndex:
    """The skips of every PubMed file of one source, and the figures of the build."""

    files: list[str]
    """The source's PubMed XML files, in publication order."""
    by_file: dict[str, FileIndex]
    citations: int = 0
    """Citations in all files (every version of every PMID)."""
    superseded: int = 0
    """Citations replaced by a later version of their PMID."""
    deleted: int = 0
    """Citations removed by a later DeleteCitation."""
    deletions_unmatched: int = 0
    """Deleted PMIDs with no citation before the deletion in these files (deleted from an older baseline)."""

    def for_file(self, path: str) -> FileIndex | None:
        return self.by_file.get(path)

    def describe(self) -> str:
        return (
            f"{len(self.files)} PubMed file(s), {self.citations:,} citations: {self.superseded:,} replaced by a"
            f" later version, {self.deleted:,} deleted ({self.deletions_unmatched:,} deletions of PMIDs not in"
            " these files)"
        )


def _resolve(files: list[str], scans: list[tuple[np.ndarray, np.ndarray]]) -> PubmedIndex:
    """Apply NCBI's rule to the scans of `files` (in publication order)."""
    pmids, keys, kinds = [], [], []
    for ordinal, (citations, deleted) in enumerate(scans):
        pmids += [citations, deleted]
        keys += [
            (ordinal << 32) + np.arange(len(citations), dtype=np.int64),
            np.full(len(deleted), (ordinal << 32) + _DELETE_POSITION, dtype=np.int64),
        ]
        kinds += [np.zeros(len(citations), dtype=np.int8), np.ones(len(deleted), dtype=np.int8)]
    pmid, key, kind = (np.concatenate(a) if a else np.zeros(0, dtype=np.int64) for a in (pmids, keys, kinds))
    real = pmid > 0  # a citation without a PMID is never replaced or deleted
    pmid, key, kind = pmid[real], key[real], kind[real]
    order = np.lexsort((key, pmid))  # by PMID, then by (file, place): each PMID's last event last
    pmid, key, kind = pmid[order], key[order], kind[order]
    last = np.ones(len(pmid), dtype=bool)
    last[:-1] = pmid[1:] != pmid[:-1]
    group = np.cumsum(np.r_[True, last[:-1]]) - 1 if len(pmid) else np.zeros(0, dtype=np.int64)
    winner_kind = kind[last][group]
    losers = (~last) & (kind == 0)
    # A deletion with no citation of its PMID before it in these files.
    first = np.r_[True, pmid[1:] != pmid[:-1]] if len(pmid) else np.zeros(0, dtype=bool)
    unmatched = int(np.sum((kind == 1) & first))

    skip: dict[int, dict[int, list]] = {}
    for p, k, w in zip(pmid[losers].tolist(), key[losers].tolist(), winner_kind[losers].tolist()):
        entry = skip.setdefault(k >> 32, {}).setdefault(p, ["deleted" if w else "superseded", 0])
        entry[1] += 1
    by_file = {
        path: FileIndex(
            {p: (reason, n) for p, (reason, n) in skip.get(ordinal, {}).items()},
            len(citations),
            pmid_digest(citations.tolist()),
            len(deleted),
            pmid_digest(deleted.tolist()),
        )
        for ordinal, (path, (citations, deleted)) in enumerate(zip(files, scans))
    }
    superseded = int(np.sum(losers & (winner_kind == 0)))
    return PubmedIndex(
        files,
        by_file,
        citations=sum(len(c) for c, _ in scans),
        superseded=superseded,
        deleted=int(np.sum(losers)) - superseded,
        deletions_unmatched=unmatched,
    )


def build_index(
    files: list[str], workers: int | None = None, declared: str | None = None
) -> PubmedIndex | None:
    """The index of a source's PubMed XML files (None: it has none). Files are scanned in parallel processes
    (spawned: this runs inside a rank that may hold CUDA and communication threads)."""
    pubmed = ordered(files, declared)
    if not pubmed:
        return None
    workers = max(1, min(workers or os.cpu_count() or 1, len(pubmed), 16))
    if workers == 1 or sum(os.path.getsize(path) for path in pubmed) < _PARALLEL_BYTES:
        scans = [file_events(path) for path in pubmed]
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            scans = list(pool.map(file_events, pubmed))
    return _resolve(pubmed, scans)


# ---- saved with the run ------------------------------------------------------------------------------------


def _stamp(files: list[str]) -> np.ndarray:
    stats = [os.stat(path) for path in files]
    return np.asarray([[s.st_size, s.st_mtime_ns] for s in stats], dtype=np.int64).reshape(-1, 2)


def save(index: PubmedIndex, path: Path) -> None:
    """Plain arrays (no pickle), written to a temporary name and renamed: never a half-written index."""
    rows = [
        (ordinal, pmid, 1 if reason == "deleted" else 0, n)
        for ordinal, name in enumerate(index.files)
        for pmid, (reason, n) in index.by_file[name].skip.items()
    ]
    skips = np.asarray(rows, dtype=np.int64).reshape(-1, 4)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name of its own: ranks that rebuild at once (a node-local run directory) never share a partial file.
    partial = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.partial")
    with open(partial, "wb") as fh:
        np.savez(
            fh,
            files=np.asarray(index.files, dtype=str),
            stamp=_stamp(index.files),
            skips=skips,
            citations=np.asarray([index.by_file[f].citations for f in index.files], dtype=np.int64),
            digests=np.asarray([index.by_file[f].digest for f in index.files], dtype=np.uint64),
            deletions=np.asarray([index.by_file[f].deletions for f in index.files], dtype=np.int64),
            deletion_digests=np.asarray(
                [index.by_file[f].deletions_digest for f in index.files], dtype=np.uint64
            ),
            totals=np.asarray(
                [index.citations, index.superseded, index.deleted, index.deletions_unmatched], dtype=np.int64
            ),
        )
    os.replace(partial, path)


_SAVED = {
    "skips": ("iu", 2),
    "citations": ("iu", 1),
    "digests": ("u", 1),
    "deletions": ("iu", 1),
    "deletion_digests": ("u", 1),
    "totals": ("iu", 1),
    "stamp": ("iu", 2),
    "files": ("U", 1),
}


def load(path: Path, files: list[str], declared: str | None = None) -> PubmedIndex | None:
    """The saved index when it covers exactly these files as they are now (name, size, mtime), else None.
    A damaged, foreign or tampered-looking file is None too (every array's kind, shape and range checked):
    the index is then built again, never trusted."""
    pubmed = ordered(files, declared)
    try:
        with np.load(path, allow_pickle=False) as saved:
            arrays = {name: saved[name] for name in _SAVED}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    if any(
        arrays[k].dtype.kind not in kinds or arrays[k].ndim != ndim for k, (kinds, ndim) in _SAVED.items()
    ):
        return None
    n = len(pubmed)
    skips, citations, totals = arrays["skips"], arrays["citations"], arrays["totals"]
    if (
        [str(name) for name in arrays["files"]] != pubmed
        or arrays["stamp"].shape != (n, 2)
        or not np.array_equal(arrays["stamp"], _stamp(pubmed))
        or skips.shape[1] != 4
        or any(arrays[k].shape != (n,) for k in ("citations", "digests", "deletions", "deletion_digests"))
        or totals.shape != (4,)
        or (citations < 0).any()
        or (arrays["deletions"] < 0).any()
        or (totals < 0).any()
    ):
        return None
    if len(skips):
        ordinal, pmid, kind, count = skips.T
        if ordinal.min() < 0 or ordinal.max() >= n or pmid.min() <= 0 or kind.min() < 0 or kind.max() > 1:
            return None
        if count.min() <= 0 or (count > citations[ordinal]).any():
            return None
    per_file: dict[int, dict[int, tuple[str, int]]] = {}
    for ordinal, pmid, deleted, count in skips.tolist():
        per_file.setdefault(ordinal, {})[pmid] = ("deleted" if deleted else "superseded", count)
    by_file = {
        name: FileIndex(
            per_file.get(i, {}),
            int(citations[i]),
            int(arrays["digests"][i]),
            int(arrays["deletions"][i]),
            int(arrays["deletion_digests"][i]),
        )
        for i, name in enumerate(pubmed)
    }
    return PubmedIndex(pubmed, by_file, *(int(t) for t in totals.tolist()))


def index_path(directory: Path, source: str) -> Path:
    return directory / f"{source}.npz"


def prepare(
    files: list[str], directory: Path | None, source: str, declared: str | None = None, reuse: bool = True
) -> PubmedIndex | None:
    """The index of a source's PubMed files (`declared`: the source's format): loaded from `directory` when
    `reuse` and it is current, else built (and saved there when a directory is given). Rank 0 builds it anew
    at every start (`reuse` False): a saved index is only ever read back by the ranks of the same start."""
    if not ordered(files, declared):
        return None
    if reuse and directory is not None:
        if (index := load(index_path(directory, source), files, declared)) is not None:
            return index
    index = build_index(files, declared=declared)
    assert index is not None
    log.info("source %s: PubMed update rule applied over %s", source, index.describe())
    if directory is not None:
        save(index, index_path(directory, source))
    return index
