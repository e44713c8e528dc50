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

State (a few integers plus the unconsumed tail of the current document) is enough to continue at the exact next
token: a resumed reader reopens the same file and skips to the saved record index.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from mellama_train.config import DataConfig, SourceConfig
from mellama_train.data.readers import Skip, expand_paths, iter_records, iter_texts

log = logging.getLogger(__name__)

# Skips are logged with their location only (file:line), never their content: the text may be clinical.
MAX_SKIP_WARNINGS = 20
# Skips the user asked for (`data.overflow: drop`, `data.decontamination`): counted in the metrics, but not bad
# data, so never limited.
CHOSEN_SKIPS = frozenset({"too_long", "contaminated"})


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
    """Next record index to read in the current file."""
    records_before: int = 0
    """Records (of all ranks) in the files of this epoch before the current one: the round-robin offset."""
    pending: list[int] = field(default_factory=list)
    """Tokens of the current document not yet handed out (it may span sequences)."""
    documents: int = 0
    """Documents this rank has read from this source (all epochs)."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Records skipped by reason (bad_json, missing_field, empty, not_text)."""
    first_skip: str = ""
    """Location (file:line) of the first record this rank skipped: the one to look at first. Never content."""


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
    ):
        """`encode(text or record) -> item | Skip`; `records`: read whole records (dicts) instead of the text
        field; `paths`: read these instead of cfg.paths (held-out files); `passes`: stop (Exhausted) after
        this many epochs instead of wrapping forever; `skip_limit`: raise ValueError past it (None: no limit)."""
        self.name = cfg.name
        self.text_field = cfg.text_field
        self.records = records
        self.files = expand_paths(paths if paths is not None else cfg.paths, cfg.name)
        if all(_unit_size(f) == 0 for f in self.files):  # caught here, before a model is built, not at step 1
            raise ValueError(
                f"data.sources[{cfg.name}]: its {len(self.files)} file(s) are all empty ({self.files[0]}, ...);"
                " point its paths at the data, or drop the source"
            )
        self.encode = encode
        self.passes = passes
        self.skip_limit = skip_limit
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.state = SourceState()
        self._records: Iterator[tuple[int, str | Skip]] | None = None
        self._path = ""
        self._last_index = -1  # highest record index of the current file the reader has passed, wanted or not
        self._warned = 0

    # ---- ordering and sharding ------------------------------------------------------------------------
    def _epoch_files(self, epoch: int) -> list[str]:
        order = list(self.files)
        # str seeds hash deterministically in `random` (unlike hash()), so every rank and every restart agree.
        random.Random(f"{self.seed}:{self.name}:{epoch}").shuffle(order)
        return order

    def _open_current(self) -> None:
        s = self.state
        self._path = self._epoch_files(s.epoch)[s.file_pos]
        self._last_index = s.record - 1
        before, world, rank = s.records_before, self.world_size, self.rank

        def want(index: int) -> bool:
            # Readers ask about every index >= start, in order: the last one asked is the file's last record.
            self._last_index = index
            return (before + index) % world == rank

        if self.records:
            self._records = iter_records(self._path, want=want, start=s.record)
        else:
            self._records = iter_texts(self._path, self.text_field, want=want, start=s.record)

    def next_item(self) -> Any:
        """The next encoded record of this rank (advancing over skips, files and epochs)."""
        s = self.state
        wraps = 0  # two epoch ends in one call means a whole epoch held nothing for this rank
        while True:
            if self._records is None:
                self._open_current()
            item = next(self._records, None)
            if item is None:  # file exhausted: next file, or next epoch
                self._records = None
                s.records_before += self._last_index + 1
                s.file_pos, s.record = s.file_pos + 1, 0
                if s.file_pos == len(self.files):
                    s.epoch, s.file_pos, s.records_before, wraps = s.epoch + 1, 0, 0, wraps + 1
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

    def _count_skip(self, skip: Skip) -> None:
        s = self.state
        s.skipped[skip.reason] = s.skipped.get(skip.reason, 0) + 1
        if self._warned < MAX_SKIP_WARNINGS:
            self._warned += 1
            log.warning("source %s: skipped a record (%s) at %s", self.name, skip.reason, skip.where)
        if skip.reason in CHOSEN_SKIPS:
            return
        s.first_skip = s.first_skip or skip.where
        if self.skip_limit is not None:
            self._check_skip_limit(self.skip_limit)

    def _check_skip_limit(self, limit: SkipLimit) -> None:
        bad = sum(n for reason, n in self.state.skipped.items() if reason not in CHOSEN_SKIPS)
        read = self.state.documents + sum(self.state.skipped.values())
        allowed = limit.allowance + limit.fraction * read
        if bad > allowed:
            reasons = ", ".join(
                f"{n} {r}" for r, n in sorted(self.state.skipped.items()) if r not in CHOSEN_SKIPS
            )
            raise ValueError(
                f"data.sources[{self.name}]: {bad} of {read} records read on rank {self.rank} were skipped"
                f" ({reasons}), over the limit of {limit.allowance} + {limit.fraction:g} x {read} = {allowed:g};"
                f" first at {self.state.first_skip}; clean the file(s), or raise data.max_skip_fraction /"
                " data.skip_allowance"
            )

    # ---- the stream ------------------------------------------------------------------------------------
    def take(self, max_tokens: int) -> list[int]:
        """Up to `max_tokens` tokens of the current document (a new document once the last one is used up)."""
        s = self.state
        if not s.pending:
            s.pending = self.next_item()
        chunk, s.pending = s.pending[:max_tokens], s.pending[max_tokens:]
        return chunk

    @property
    def epochs_completed(self) -> int:
        return self.state.epoch

    # ---- resume ----------------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """Identifies the file list: resuming over different files cannot continue at the same position."""
        h = hashlib.sha256()
        for path in self.files:
            h.update(f"{path}\0{_unit_size(path)}\0".encode())
        return h.hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        s = self.state
        return {
            **s.__dict__,
            "pending": list(s.pending),
            "skipped": dict(s.skipped),
            "files": self.fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        saved = state.pop("files", None)
        if saved is not None and saved != self.fingerprint():
            raise ValueError(
                f"data.sources[{self.name}]: its files changed since the checkpoint (names or sizes), so the "
                "saved position no longer points at the same documents; restore the files or start a new run"
            )
        self.state = SourceState(**state)
        self._records = None


def _unit_size(path: str) -> int:
    """Bytes of a file, or of every file under a directory unit (a `save_to_disk` dataset)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def skip_totals(streams: list[SourceStream], reason: str | None = None) -> dict[str, int]:
    """Skipped records per source (all reasons, or one), for metrics."""
    if reason is not None:
        return {s.name: s.state.skipped.get(reason, 0) for s in streams}
    return {s.name: sum(Counter(s.state.skipped).values()) for s in streams}
