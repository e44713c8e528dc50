"""One corpus as an endless (or single-pass), resumable stream of encoded records for one data-parallel rank.

A record is a text (pretraining: one document, encoded to BOS + tokens + EOS and handed out in chunks by
`take`) or a whole record dict (instruction tuning: encoded to one training example, handed out whole by
`next_item`). The encoder is passed in; this module only decides which record comes next.

Order: each epoch visits the source's files in a seeded permutation (the same on every rank), and each file's
records in file order. Rank sharding is a round-robin over the epoch: the n-th record of the epoch (counting
through the files in that order, malformed records included) belongs to rank n % world. Every record has
exactly one owner, so across ranks no document is duplicated or dropped, every rank gets its share as long as
the source has at least one record per rank, and one-document-per-file sources (MIMIC-CXR reports) spread
evenly. Each rank scans every file anyway (to find its records), so counting the records of earlier files
costs nothing extra.

The position is coordinates, never text: epoch, file (its place in the epoch's order), record index, and the
number of tokens of the current document already handed out. A checkpoint therefore holds no token of any
document. At resume the current document is read again and encoded again, and the stream continues at the
exact same token; its saved length and short digest of its token ids catch a different tokenizer or cleaner.

Data changes are detected by content, and cost one read of what the position has passed in this epoch:
- the file list: the files' names (relative to their common directory, so a corpus moved as a whole is the
  same corpus) define each epoch's order, so a list with a file added, removed or renamed is a change;
- the current file: an order-dependent digest of its records before the position (digests.RecordDigest,
  fed every record while streaming: every rank reads every record anyway) is recomputed while the resumed
  reader reads up to the position, and compared at load time, before step 1;
- files finished earlier in this epoch: a digest of the raw bytes the reader pulled from the file (below any
  decompressor) with their count, checked by re-hashing that many bytes (I/O-bound: xxh3 hashes at ~18
  GB/s); a file whose reading failed part-way keeps the digest of the records read before the failure, and
  parquet / save_to_disk files (read by seeking) the digest of all their records. Every rank reads every
  file, so these digests are the same on every rank and each file is checked once, by one rank (CheckShare):
  the resume re-reads what the epoch has read so far once in total, split over the ranks, not once per rank.
So a file unchanged up to what was read of it (a truncated file restored, a file that grew, a re-compressed
JSONL file, for record digests) resumes exactly, and a change before the position (an edit, a reorder, a
replacement, same size or not) is refused in one line naming the source and the file. The refusal names the
way on: `--accept-data-change` (data.accept_changes) continues from the same coordinates (epoch, file
number, record number, token offset) over the changed files, and each change continued over is logged and
returned to the caller, which records it in trainer.json (`data_changes`). What "the same coordinates" gives
is only as good as the change: documents around an edit may be repeated or skipped.

Faults while streaming are counted skips, never the end of a run: a file that turns out truncated or corrupt
part-way (or vanishes) is an `unreadable_remainder` skip of what is left of it, logged with its file and
record position, and the stream goes on with the next file.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mellama_train import watchdog
from mellama_train.config import Config, DataConfig, SourceConfig
from mellama_train.data import pubmed
from mellama_train.data.digests import ByteTap, RecordDigest, short_digest
from mellama_train.data.files import (
    DEFAULT_MAX_RECORD_BYTES,
    DataFileError,
    ReadOptions,
    Skip,
    UnreadableFile,
)
from mellama_train.data.instruction_format import not_an_instruction
from mellama_train.data.readers import byte_digest, check_unit, iter_records, iter_texts, prefix_digest
from mellama_train.data.reasons import FILTER_REASONS, REASONS
from mellama_train.data.selection import declared_format, describe_left_out, of_source

log = logging.getLogger(__name__)

# Skips are logged with their location only (file:line), never their content: the text may be clinical.
MAX_SKIP_WARNINGS = 20
# Skips the recipe asked for (where, require_abstract, min_chars, `data.overflow: drop`, decontamination):
# counted in the metrics as filtered, but not bad data, so never limited.
CHOSEN_SKIPS = frozenset(FILTER_REASONS)
# Parallel reads when verifying finished files at resume: they are I/O-bound on a shared filesystem.
_VERIFY_THREADS = 8


@dataclass(frozen=True)
class SkipLimit:
    """Bad records a source may hold before the run stops: `allowance + fraction x records read`.

    Each rank checks its own share (the records it read), so no collective is needed; with round-robin
    sharding every rank sees about the same fraction. Checked as records are read, so a file whose bad lines
    cluster at its start stops a run that the whole-file fraction would have allowed: raise the fields then."""

    fraction: float
    """data.max_skip_fraction."""
    allowance: int
    """data.skip_allowance."""

    @classmethod
    def of(cls, data: DataConfig) -> SkipLimit:
        return cls(data.max_skip_fraction, data.skip_allowance)


@dataclass
class SourceState:
    epoch: int = 0
    """Epochs started so far minus one: 0 during the first pass over the files."""
    file_pos: int = 0
    """Index into this epoch's file permutation."""
    record: int = 0
    """Next record index to read in the current file (record - 1 is the current document)."""
    records_before: int = 0
    """Records (of all ranks) in the files of this epoch before the current one: the round-robin offset."""
    offset: int = 0
    """Tokens of the current document already handed out (text sources; it may span sequences)."""
    documents: int = 0
    """Documents this rank has read from this source (all epochs)."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Records skipped by reason (bad_json, missing_field, empty, not_text, too_large, ...)."""
    first_skip: str = ""
    """Location (file:line) of the first record this rank skipped: the one to look at first. Never content."""
    finished: list[list[Any]] = field(default_factory=list)
    """Files this rank read to their end in this epoch: [file_pos, "bytes" | "records", count, digest]. Ranks'
    lists differ at file boundaries (and a file of one document is only in its owner's): see CheckShare."""


def finished_claim(state: dict[str, Any]) -> tuple[int, bytes]:
    """(epoch, bitmap of the file positions) of the files a saved source position finished in its epoch: what
    one rank tells the others so that they can share out the checks of those files (CheckShare). One bit per
    file: gathering every rank's costs world_size x files / 8 bytes per source."""
    positions = [int(entry[0]) for entry in state.get("finished", [])]
    held = np.zeros(max(positions, default=-1) + 1, dtype=bool)
    held[positions] = True
    return int(state.get("epoch", 0)), np.packbits(held).tobytes()


@dataclass(frozen=True)
class CheckShare:
    """Which files finished earlier in the epoch this rank re-hashes at resume: about 1/world_size of them.

    Every rank reads every file, so a file's byte digest is the same on every rank that read it to its end,
    and one check of it is enough. The ranks' `finished` lists are not identical, though: at a file boundary
    one rank has finished a file that another is still reading or has not reached (ranks consume documents at
    different rates), ranks may even be in different epochs, and a file of one document is opened only by the
    rank that owns it. So the checks are assigned over the union of the lists: file p of epoch e is checked by
    the first rank, counting cyclically from p % world_size, whose own list holds it. Every file that any rank
    read to its end is checked exactly once, by a rank that read it. (If ranks read one file at different
    times of the run and saw different bytes, only the checking rank's reading is compared.)

    Built by the caller from every rank's claims (Mixture.finished_claims, gathered across ranks): the data
    layer does no collectives. train.py gathers every rank's verdict, so a change one rank finds stops all."""

    rank: int
    claims: list[dict[str, tuple[int, bytes]]]
    """Every rank's claims ({source: finished_claim(its saved position)}), in rank order."""

    def checks(self, source: str, epoch: int, positions: list[int]) -> list[bool]:
        """For each file position of this rank's list (epoch `epoch`): whether this rank checks it."""
        world = len(self.claims)
        if not positions:
            return []
        width = max(positions) + 1
        held = np.zeros((world, width), dtype=bool)  # held[q, p]: rank q finished file p of this epoch
        for q, claims in enumerate(self.claims):
            claim_epoch, bitmap = claims.get(source, (-1, b""))
            if claim_epoch == epoch:
                bits = np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8))[:width].astype(bool)
                held[q, : len(bits)] = bits
        mine = []
        for p in positions:
            start = p % world
            ring = np.roll(held[:, p], -start)  # ranks in the order start, start + 1, ..., start - 1
            # Our own claim is in the ring, so a holder is always found; were it not, check it ourselves.
            mine.append(not ring.any() or (start + int(ring.argmax())) % world == self.rank)
        return mine


def ids_digest(ids: list[int]) -> str:
    """Short digest of a token id sequence: checks a re-encoded document without storing its tokens."""
    return short_digest(np.asarray(ids, dtype=np.int64).tobytes())


def names_digest(names: list[str]) -> str:
    return short_digest("\0".join(names).encode("utf-8", "surrogatepass"))


def relative_names(files: list[str]) -> list[str]:
    """The files' paths relative to their common directory: what identifies a corpus wherever it is mounted."""
    if not files:
        return []
    root = os.path.commonpath([os.path.dirname(path) for path in files])
    return [os.path.relpath(path, root) for path in files]


class Exhausted(Exception):
    """A single-pass stream (held-out data) has handed out every record of this rank."""


class SourceStream:
    """One source's stream: `take(n)` returns up to n tokens of the current document (text sources);
    `next_item()` returns the next encoded record whole (instruction examples)."""

    def __init__(
        self,
        cfg: SourceConfig,
        encode: Callable[[Any], Any],
        rank: int,
        world_size: int,
        seed: int,
        *,
        records: bool = False,
        paths: list[str] | None = None,
        passes: int | None = None,
        skip_limit: SkipLimit | None = None,
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
        accept_changes: bool = False,
        index_dir: Path | None = None,
    ):
        """`encode(text or record) -> item | Skip`; `records`: read whole records (dicts) instead of the text
        field; `paths`: read these instead of cfg.paths (held-out files); `passes`: stop (Exhausted) after
        this many epochs instead of wrapping forever; `skip_limit`: raise ValueError past it (None: no limit);
        `max_record_bytes`: larger records are skipped ("too_large"); `accept_changes`: continue over data
        changes found at resume instead of refusing (data.accept_changes); `index_dir`: where the PubMed update
        index of the training files is kept (data/pubmed.py; None: built here, kept in memory)."""
        self.name = cfg.name
        self.text_field = cfg.text_field
        self.records = records
        self.filters = source_filters(cfg)
        self.format = declared_format(cfg)
        chosen = of_source(cfg, "paths" if paths is None else "eval_paths", records=records, patterns=paths)
        self.files = chosen.files
        if chosen.excluded and rank == 0:
            log.info("source %s: %s", cfg.name, describe_left_out(chosen))
        for glob in chosen.unmatched if rank == 0 and paths is None else []:
            log.warning("source %s: %s matched no file found; check the glob", cfg.name, glob)
        if all(_unit_size(f) == 0 for f in self.files):  # caught here, before a model is built, not at step 1
            raise ValueError(
                f"data.sources[{cfg.name}]: its {len(self.files)} file(s) are all empty ({self.files[0]}, ...);"
                " point its paths at the data, or drop the source"
            )
        self.names = relative_names(self.files)
        # PubMed baseline + update files: later versions and deletions applied (held-out files read as they are)
        self.pubmed = (
            pubmed.prepare(self.files, index_dir, cfg.name, self.format)
            if paths is None and not records
            else None
        )
        self.encode = encode
        self.passes = passes
        self.skip_limit = skip_limit
        self.max_record_bytes = max_record_bytes
        self.accept_changes = accept_changes
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.state = SourceState()
        self._records: Iterator[tuple[int, Any]] | None = None
        self._path = ""
        self._last_index = -1  # highest record index of the current file the reader has passed, wanted or not
        self._digest = RecordDigest()  # records of the current file read so far
        self._tap = ByteTap()  # raw bytes of the current file read so far
        self._broken = False  # the current file failed part-way: its remainder was skipped
        self._doc: list[int] | None = None  # text sources: the current document's token ids
        self._reread: tuple[int, Any] | None = None  # the record before the position, read again at load
        self._warned = 0
        self.changes: list[dict[str, str]] = []
        """Data changes continued over at the last load (data.accept_changes): {source, file, what}."""

    # ---- ordering and sharding ------------------------------------------------------------------------
    def _epoch_files(self, epoch: int) -> list[str]:
        order = list(self.files)
        # str seeds hash deterministically in `random` (unlike hash()), so every rank and every restart agree.
        random.Random(f"{self.seed}:{self.name}:{epoch}").shuffle(order)
        return order

    def _open_current(self, start: int | None = None) -> None:
        s = self.state
        self._path = self._epoch_files(s.epoch)[s.file_pos]
        start = s.record if start is None else start
        self._last_index = start - 1
        self._digest, self._tap, self._broken = RecordDigest(), ByteTap(), False
        before, world, rank = s.records_before, self.world_size, self.rank

        def want(index: int) -> bool:
            # Readers ask about every index >= start, in order: the last one asked is the file's last record.
            self._last_index = index
            return (before + index) % world == rank

        # Every record before `start` is still read and digested: that is what checks the file at resume.
        index = self.pubmed.for_file(self._path) if self.pubmed is not None else None
        options = ReadOptions(
            self.max_record_bytes, digest=self._digest, tap=self._tap, pubmed=index, **self.filters
        )
        if self.records:
            self._records = iter_records(self._path, want=want, start=start, options=options)
        else:
            self._records = iter_texts(self._path, self.text_field, want=want, start=start, options=options)

    def _pull(self) -> tuple[int, Any] | None:
        """The next record of this rank in the current file, or None at its end. A file that cannot be read
        further (truncated, corrupt, vanished) ends here: the rest of it is one counted skip."""
        assert self._records is not None
        try:
            return next(self._records, None)
        except UnreadableFile as err:
            self._broken = True
            self._records = iter(())
            where = f"{self._path}:record {self._digest.count + 1}"
            log.warning(
                "source %s: %s cannot be read past record %d (%s); skipping the rest of the file",
                self.name,
                self._path,
                self._digest.count,
                err.cause,
            )
            # PubMed: as many records as the update scan saw past the damage (else one: the remainder)
            self._count_skip(
                Skip("unreadable_remainder", f"{where} ({err.cause})"), logged=True, count=max(err.lost, 1)
            )
            return None

    def _finish_file(self) -> None:
        """The current file is done: remember what was read of it (for the resume check), move to the next."""
        s = self.state
        if entry := self._file_fingerprint():
            s.finished.append([s.file_pos, *entry])
        self._records = None
        s.records_before += self._last_index + 1
        s.file_pos, s.record = s.file_pos + 1, 0

    def _file_fingerprint(self) -> list[Any] | None:
        if self._tap.attached and not self._broken:
            try:
                self._tap.finish(self._path)
                return ["bytes", self._tap.count, self._tap.hexdigest()]
            except OSError:  # gone right after it was read: its records' digest still identifies it
                pass
        if self._digest.count:
            return ["records", self._digest.count, self._digest.hexdigest()]
        return None  # not read by this rank (a one-document file another rank owns)

    def next_item(self) -> Any:
        """The next encoded record of this rank (advancing over skips, files and epochs)."""
        s = self.state
        wraps = 0  # two epoch ends in one call means a whole epoch held nothing for this rank
        while True:
            if self._records is None:
                self._open_current()
            item = self._pull()
            if item is None:  # file exhausted: next file, or next epoch
                self._finish_file()
                if s.file_pos == len(self.files):
                    s.epoch, s.file_pos, s.records_before, wraps = s.epoch + 1, 0, 0, wraps + 1
                    s.finished = []
                    if self.passes is not None and s.epoch >= self.passes:
                        raise Exhausted(self.name)
                    if wraps >= 2:
                        raise ValueError(
                            f"data.sources[{self.name}]: rank {self.rank} of {self.world_size} found no usable "
                            f"document in {len(self.files)} file(s); a source needs at least one document per rank"
                        )
                continue
            index, text = item
            s.record = index + 1
            if isinstance(text, Skip):
                self._count_skip(text)
                continue
            item = self.encode(text)
            if isinstance(item, Skip):  # the encoder knows why, the stream knows where
                self._count_skip(Skip(item.reason, f"{self._path}:record {index + 1} ({item.where})"))
                continue
            s.documents += 1
            return item

    def _count_skip(self, skip: Skip, logged: bool = False, count: int = 1) -> None:
        s = self.state
        s.skipped[skip.reason] = s.skipped.get(skip.reason, 0) + count
        if skip.reason in CHOSEN_SKIPS:  # the recipe's choice: counted in the metrics, not a warning each
            return
        if self._warned < MAX_SKIP_WARNINGS and not logged:
            self._warned += 1
            log.warning("source %s: skipped a record (%s) at %s", self.name, skip.reason, skip.where)
        s.first_skip = s.first_skip or skip.where
        if self.skip_limit is not None:
            self._check_skip_limit(self.skip_limit)

    def _check_skip_limit(self, limit: SkipLimit) -> None:
        bad = sum(n for reason, n in self.state.skipped.items() if reason not in CHOSEN_SKIPS)
        # Filtered records are neither good nor bad: a `where` keeping 1% must not allow 100x the bad fraction.
        read = self.state.documents + bad
        allowed = limit.allowance + limit.fraction * read
        if bad > allowed:
            reasons = ", ".join(
                f"{n} {r}" for r, n in sorted(self.state.skipped.items()) if r not in CHOSEN_SKIPS
            )
            raise ValueError(
                f"data.sources[{self.name}]: {bad} of {read} records read on rank {self.rank} (filtered ones aside)"
                " were skipped"
                f" ({reasons}), over the limit of {limit.allowance} + {limit.fraction:g} x {read} = {allowed:g};"
                f" first at {self.state.first_skip}; clean the file(s), or raise data.max_skip_fraction /"
                " data.skip_allowance"
            )

    # ---- the stream ------------------------------------------------------------------------------------
    def take(self, max_tokens: int) -> list[int]:
        """Up to `max_tokens` tokens of the current document (a new document once the last one is used up)."""
        s = self.state
        if self._doc is None or s.offset >= len(self._doc):
            self._doc, s.offset = self.next_item(), 0
        chunk = self._doc[s.offset : s.offset + max_tokens]
        s.offset += len(chunk)
        return chunk

    @property
    def epochs_completed(self) -> int:
        return self.state.epoch

    # ---- resume ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Coordinates and digests only: no token or text of any document."""
        s = self.state
        in_progress = self._doc is not None and s.offset < len(self._doc)
        return {
            **s.__dict__,
            "offset": s.offset if in_progress else 0,
            "skipped": dict(s.skipped),
            "finished": [list(entry) for entry in s.finished],
            "doc_tokens": len(self._doc) if in_progress else 0,
            "doc_digest": ids_digest(self._doc) if in_progress else "",
            "prefix_digest": self._digest.hexdigest() if s.record else "",
            "files": len(self.names),
            "names_digest": names_digest(self.names),
        }

    def load_state_dict(self, state: dict[str, Any], share: CheckShare | None = None) -> list[dict[str, str]]:
        """Continue at the saved position, after checking that the data before it is what was read (module
        docstring). Reads eagerly, before step 1. Returns the changes continued over (data.accept_changes);
        without that setting a change is a ValueError naming the source, the file and the way on.
        `share`: check only this rank's share of the files finished earlier in the epoch (None: all of them;
        with data.accept_changes every rank checks all of its own, so that each updates what it holds)."""
        state = dict(state)
        files, names = state.pop("files", None), state.pop("names_digest", None)
        doc_tokens, doc_digest = state.pop("doc_tokens", 0), state.pop("doc_digest", "")
        prefix = state.pop("prefix_digest", None)
        legacy_pending = state.pop("pending", None)  # older checkpoints: the document's unread tokens
        self.state = s = SourceState(**state)
        self._records, self._doc, self._reread, self.changes = None, None, None, []
        if legacy_pending is not None:
            log.warning(
                "data.sources[%s]: this checkpoint's data position was written by an older version (it holds"
                " tokens, and no digests): its files cannot be checked, and the next checkpoint will not hold"
                " tokens",
                self.name,
            )
            s.finished = []
        elif names != names_digest(self.names):
            self._list_changed(files)
        else:
            self._check_finished(None if self.accept_changes else share)
        if s.file_pos >= len(self.files):  # (a shorter file list, continued over): the epoch is over
            s.epoch, s.file_pos, s.record, s.records_before, s.finished = s.epoch + 1, 0, 0, 0, []
        if s.record:
            self._check_current(prefix if legacy_pending is None else None)
            if legacy_pending:
                self._resume_legacy_document(legacy_pending)
            elif doc_tokens:
                self._doc = self.restore_last(doc_tokens, doc_digest, ids_digest)
                s.offset = min(s.offset, len(self._doc)) if self._doc is not None else 0
        return self.changes

    def _changed(self, path: str, what: str) -> None:
        s = self.state
        where = f"epoch {s.epoch}, file {s.file_pos + 1} of {len(self.files)}, record {s.record}"
        if not self.accept_changes:
            raise ValueError(
                f"data.sources[{self.name}]: {path} {what} since the checkpoint (saved at {where}), so resuming"
                " there would repeat or skip documents; restore the file(s) as they were, or continue from the"
                " same position anyway with --accept-data-change (data.accept_changes=true; recorded in"
                " trainer.json as data_changes)"
            )
        log.warning(
            "data.sources[%s]: %s %s since the checkpoint; continuing from the same position (%s) as"
            " data.accept_changes asks",
            self.name,
            path,
            what,
            where,
        )
        earlier = next((c for c in self.changes if c["file"] == path), None)
        if earlier is not None:  # one entry per file: a changed record also fails its re-encoding check
            earlier["what"] += f"; {what}"
        else:
            self.changes.append({"source": self.name, "file": path, "what": what})

    def _list_changed(self, saved_count: int | None) -> None:
        what = (
            f"changed ({len(self.names)} files now, {saved_count} at the checkpoint; the run records'"
            " data_manifest lists each start's files): the list sets each epoch's file order"
        )
        self._changed("its file list", what)
        self.state.finished = []  # they described files of the old order

    def _check_finished(self, share: CheckShare | None) -> None:
        """Files read to their end earlier in this epoch (this rank's share of them) must still start with
        what was read of them."""
        order = self._epoch_files(self.state.epoch)
        finished = self.state.finished
        if share is not None:
            mine = share.checks(self.name, self.state.epoch, [int(entry[0]) for entry in finished])
            finished = [entry for entry, checked in zip(finished, mine) if checked]
        done = itertools.count(1)  # (next() on it is atomic: the checks run on several threads)

        def check(entry: list[Any]) -> tuple[list[Any], str | None, tuple[int, str]]:
            pos, kind, count, digest = entry
            path = order[pos]
            try:
                if kind == "bytes":
                    got = byte_digest(path, count)
                else:
                    d = prefix_digest(
                        path,
                        self.text_field,
                        count,
                        record_mode=self.records,
                        max_record_bytes=self.max_record_bytes,
                    )
                    got = (d.count, d.hexdigest())
            except DataFileError as err:
                return entry, f"cannot be read ({getattr(err, 'cause', err)})", (0, "")
            finally:
                # A resume over many TB hashes for a long time: each file done is progress to the watchdog.
                watchdog.progress(
                    f"resume check of source {self.name}: {next(done)} of {len(finished)} files"
                )
            unit = "bytes" if kind == "bytes" else "records"
            if got[0] < count:
                return entry, f"holds {got[0]} {unit}, fewer than the {count} read before", got
            if got[1] != digest:
                return (
                    entry,
                    f"changed in its first {count} {unit} (read to its end earlier in this epoch)",
                    got,
                )
            return entry, None, got

        if not finished:
            return
        with ThreadPoolExecutor(min(_VERIFY_THREADS, len(finished))) as pool:
            results = list(pool.map(check, finished))
        for entry, problem, got in results:
            if problem is not None:
                self._changed(order[entry[0]], problem)
                entry[2:] = list(got)  # continued over: the file as it is now is what was read

    def _check_current(self, prefix: str | None) -> None:
        """Read the current file up to the position again (digesting it) and keep the record before the
        position for `restore_last`. `prefix` None: an older checkpoint without a digest (not checked)."""
        s = self.state
        self._open_current(start=s.record - 1)
        try:
            assert self._records is not None
            item = next(self._records, None)
        except UnreadableFile as err:
            self._changed(self._path, f"cannot be read up to the saved record ({err.cause})")
            self._records, self._broken = (
                iter(()),
                True,
            )  # continued over: the rest is an unreadable remainder
            self._count_skip(Skip("unreadable_remainder", f"{self._path}:record {self._digest.count + 1}"))
            return
        if prefix is not None and (item is None or self._digest.hexdigest() != prefix):
            have = f"holds only {self._digest.count} records" if item is None else "changed"
            self._changed(self._path, f"{have} before the saved record {s.record}")
        self._reread = item

    def restore_last(self, tokens: int, digest: str, digest_of: Callable[[Any], str]) -> Any:
        """The record before the position (the document in progress, or a tuning example carried to the next
        row), encoded again and checked against its saved length and digest; None when it is no longer a
        usable record (a change, continued over: the next record takes its place)."""
        item = self._reread
        encoded = None if item is None or isinstance(item[1], Skip) else self.encode(item[1])
        if encoded is None or isinstance(encoded, Skip):
            self._changed(self._path, f"no longer holds a usable record {self.state.record}")
            return None  # continued over: the next record takes its place
        if len(encoded) != tokens or digest_of(encoded) != digest:
            self._changed(
                self._path,
                f"record {self.state.record} now encodes to {len(encoded)} tokens (digest"
                f" {digest_of(encoded)}), not {tokens} ({digest}): the record, the tokenizer or the"
                " cleaners changed",
            )
        return encoded

    def _resume_legacy_document(self, pending: list[int]) -> None:
        """An older checkpoint saved the document's unread tokens: continue inside the re-encoded document
        where they begin (checked), so that the next checkpoint holds coordinates only."""
        item = self._reread
        doc = None if item is None or isinstance(item[1], Skip) else self.encode(item[1])
        tail = len(pending)
        if not isinstance(doc, list) or len(doc) < tail or doc[len(doc) - tail :] != list(pending):
            self._changed(self._path, f"record {self.state.record} no longer ends with the saved tokens")
            doc = list(pending)  # continued over: the saved tokens, as that version would have
        self._doc, self.state.offset = doc, len(doc) - tail


def _unit_size(path: str) -> int:
    """Bytes of a file, or of every file under a directory unit (a `save_to_disk` dataset)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def reason_counts(streams: list[SourceStream]) -> list[float]:
    """This rank's counts of every source by reason (source-major, REASONS order; unknown reasons under
    "other"), then the documents each source gave: the vector the metrics all-reduce."""
    counts: list[float] = []
    for stream in streams:
        by: Counter[str] = Counter()
        for reason, n in stream.state.skipped.items():
            by[reason if reason in REASONS else "other"] += n
        counts += [float(by[reason]) for reason in REASONS]
    return counts + [float(stream.state.documents) for stream in streams]


def data_counts(names: list[str], total: list[float]) -> dict[str, float]:
    """Metrics from reason_counts summed over ranks: per source `data/documents/`, `data/skipped/` (records
    that could not be used), `data/filtered/` (records the recipe left out), and `data/reasons/<source>/<reason>`
    for every reason seen."""
    values: dict[str, float] = {}
    width = len(REASONS)
    for i, name in enumerate(names):
        by = dict(zip(REASONS, total[i * width : (i + 1) * width]))
        values[f"data/documents/{name}"] = total[len(names) * width + i]
        values[f"data/skipped/{name}"] = sum(n for reason, n in by.items() if reason not in CHOSEN_SKIPS)
        values[f"data/filtered/{name}"] = sum(by[reason] for reason in FILTER_REASONS)
        values.update({f"data/reasons/{name}/{reason}": n for reason, n in by.items() if n})
    return values


def source_filters(src: SourceConfig) -> dict[str, Any]:
    """The ReadOptions fields a source sets: its record filters (where, require_abstract) and its format."""
    return {
        "where": {name: frozenset(values) for name, values in src.where.items()} or None,
        "require_abstract": src.require_abstract,
        "format": declared_format(src),
    }


def check_sources(cfg: Config) -> list[str]:
    """Every problem with the files of every source (training and held-out), one line each naming the file
    and the fix, found by opening each file as a run will read it (readers.check_unit): a path or glob that
    matches nothing, a file that does not open or decompress, a CSV header / parquet schema / dataset without
    the text column, first records without the text field (tuning: that are not instruction records).

    Start-up validation and `--dry-run` call it, so a bad file is named before a model is built. It reads a
    few records of each file, on several threads (opening files is latency-bound on shared filesystems)."""
    problems: list[str] = []
    jobs: list[tuple[str, str, SourceConfig]] = []
    for src in cfg.data.sources:
        for key in ("paths", "eval_paths"):
            patterns = getattr(src, key)
            if not patterns or (key == "paths" and src.prepared):  # prepared: checked against its manifest
                continue
            try:
                units = of_source(src, key, records=cfg.kind.records).files
            except DataFileError as err:
                problems.append(str(err))
                continue
            jobs += [(f"data.sources[{src.name}].{key}", unit, src) for unit in units]
    record_mode = cfg.kind.records

    def check(job: tuple[str, str, SourceConfig]) -> str | None:
        label, unit, src = job
        filters = source_filters(src)
        problem = check_unit(
            unit,
            src.text_field,
            record_mode=record_mode,
            is_record=lambda record: not_an_instruction(record, src.columns, label),
            max_record_bytes=cfg.data.max_record_bytes,
            where=filters["where"],
            require_abstract=filters["require_abstract"],
            declared=filters["format"],
        )
        return None if problem is None else f"{label}: {problem}"

    if jobs:
        with ThreadPoolExecutor(min(_VERIFY_THREADS, len(jobs))) as pool:
            found = [
                (job[1], problem) for job, problem in zip(jobs, pool.map(check, jobs)) if problem is not None
            ]
        problems += _collapsed(found)
    return problems


SAME_PROBLEM_SHOWN = 3
"""Files listed with the same problem before the rest are counted: a tree of 40,000 reports under a wrong
setting gives four lines, not 40,000."""


def _collapsed(found: list[tuple[str, str]]) -> list[str]:
    """Problems in order, where more than SAME_PROBLEM_SHOWN files share one (its text with the file's path
    taken out), the first ones and a count of the others."""
    by_kind: dict[str, list[str]] = {}
    for unit, problem in found:
        by_kind.setdefault(problem.replace(unit, "{file}"), []).append(problem)
    out = []
    for kind, problems in by_kind.items():
        out += problems[:SAME_PROBLEM_SHOWN]
        if len(problems) > SAME_PROBLEM_SHOWN:
            label = kind.split(": ", 1)[0]
            out.append(
                f"{label}: and {len(problems) - SAME_PROBLEM_SHOWN} more file(s) with the same problem"
            )
    return out
