"""`mellama-train data inspect`: what every source of a recipe holds, counted the way a run reads it, before
a cluster is booked.

Per source: the files read and left out; records, documents and tokens; every reason a record would not be
trained on (data/reasons.py); document lengths in tokens (percentiles, and the share longer than seq_len);
and, against the run's planned tokens and weights, how many times the run will go through the source.

A file is read exactly as a run reads it (the source's selection, format, where, require_abstract, cleaners,
min_chars, size limit, and for a full read the PubMed update rule), and tokenized with the run's tokenizer,
in parallel processes over the files. A large corpus is sampled: whole files, picked in a seeded order until
`sample_bytes` of a source are read (of a file larger than what is left of that, its first bytes), and the
totals are that sample's counts scaled by file bytes (so estimated, and said to be). A source no larger than the sample is read whole (exact), as is every source with
`full`. The PubMed update rule needs every file's PMIDs, so a sampled PubMed source counts every version of a
citation (said in the output).
"""

from __future__ import annotations

import math
import os
import random
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any

import numpy as np

from mellama_train.config import Config, SourceConfig
from mellama_train.data import pubmed
from mellama_train.data.digests import ByteTap
from mellama_train.data.files import ReadOptions, Skip, UnreadableFile, detect_format
from mellama_train.data.readers import count_records, iter_texts
from mellama_train.data.reasons import is_filter
from mellama_train.data.selection import Selection, declared_format, of_source

DEFAULT_SAMPLE_BYTES = 256 * 2**20
"""File bytes read per source by default: all of a smaller source."""
REPEAT_WARNING = 4.0
"""Epochs of one source past which inspect warns: returns from repeating data fall off past about four
passes (Muennighoff et al., "Scaling Data-Constrained Language Models", 2023)."""
PERCENTILES = (10, 50, 90, 99)
_PREFIX_MIN = 1 << 20
"""The smallest prefix of a file a sample reads: less says little about the file."""


@dataclass
class Counts:
    """What reading some files of a source gave."""

    records: int = 0
    documents: int = 0
    tokens: int = 0
    longer: int = 0
    """Documents longer than seq_len (BOS + tokens + EOS): packing splits them across sequences."""
    reasons: Counter = field(default_factory=Counter)
    lengths: list[np.ndarray] = field(default_factory=list)
    """Tokens per document (BOS and EOS included), one array per file."""

    def add(self, other: Counts) -> None:
        self.records += other.records
        self.documents += other.documents
        self.tokens += other.tokens
        self.longer += other.longer
        self.reasons.update(other.reasons)
        self.lengths += other.lengths


@dataclass
class SourceReport:
    name: str
    weight_share: float
    selection: Selection
    bytes_total: int
    bytes_read: int
    files_read: int
    counts: Counts
    planned_tokens: int | None
    """Tokens the run's plan takes from this source (pretraining: train tokens x its weight share)."""
    update_rule: str | None = None
    """How the PubMed update rule was applied: a summary, or why it was not; None: no PubMed files."""

    @property
    def exact(self) -> bool:
        return self.bytes_read >= self.bytes_total

    @property
    def scale(self) -> float:
        return self.bytes_total / self.bytes_read if self.bytes_read else 0.0

    def total(self, value: int) -> int:
        return value if self.exact else round(value * self.scale)

    @property
    def epochs(self) -> float | None:
        tokens = self.total(self.counts.tokens)
        return self.planned_tokens / tokens if self.planned_tokens is not None and tokens else None


# ---- reading one file (in a worker process) ----------------------------------------------------------------

_WORKER: dict[str, Any] = {}


@dataclass(frozen=True)
class Cap:
    """How much of a file larger than what is left of the sample to read: its first `bytes` (byte-stream
    formats), or its first `rows` of `of_rows` (parquet, save_to_disk: read by rows)."""

    bytes: int
    rows: int | None = None
    of_rows: int | None = None


Job = tuple[str, int, Any, Cap | None]
"""(file, source number, its PubMed update index entry or None, its cap or None)."""


def _start_worker(cfg: Config) -> None:
    from mellama_train.data.decontam import load_index
    from mellama_train.data.tokenizer import load_tokenizer

    _WORKER["tokenizer"] = load_tokenizer(cfg)
    _WORKER["cfg"] = cfg
    _WORKER["decontamination"] = load_index(cfg.data.decontamination)


def _read_file(job: Job) -> tuple[Counts, int]:
    """Read one file of source number `index` as a run would (only its first part when capped), and tokenize
    what it would train on. Returns the counts and the file bytes they stand for."""
    from mellama_train.data.decontam import screened
    from mellama_train.data.encoding import document_encoder
    from mellama_train.data.source import source_filters

    path, index, update, cap = job
    cfg: Config = _WORKER["cfg"]
    src = cfg.data.sources[index]
    encode = screened(
        document_encoder(_WORKER["tokenizer"], src.cleaners, src.min_chars), _WORKER["decontamination"]
    )
    byte_cap = cap.bytes if cap is not None and cap.rows is None else None
    tap = ByteTap(limit=byte_cap)  # a byte-capped file reads as ending after its first bytes
    options = ReadOptions(cfg.data.max_record_bytes, tap=tap, pubmed=update, **source_filters(src))
    counts, lengths = Counts(), []
    last: str | None = None  # what the last record gave: a reason, or "" for a document
    cut_short = False
    try:
        for _, text in iter_texts(path, src.text_field, options=options):
            counts.records += 1
            item = text if isinstance(text, Skip) else encode(text)
            last = item.reason if isinstance(item, Skip) else ""
            if isinstance(item, Skip):
                counts.reasons[item.reason] += 1
            else:
                lengths.append(len(item))
            if cap is not None and cap.rows is not None and counts.records >= cap.rows:
                break
    except UnreadableFile as err:
        cut_short = True  # a compressed or XML prefix ends in an error, after its last whole record
        if not (byte_cap is not None and tap.count >= byte_cap):
            counts.reasons["unreadable_remainder"] += max(err.lost, 1)
    size = _size(path)
    read = size
    if byte_cap is not None and tap.attached and tap.count < size:
        read = tap.count
        if not cut_short and last is not None:
            # A plain prefix ends inside its last record, which was read cut: it is not counted.
            counts.records -= 1
            if last:
                counts.reasons[last] -= 1
                counts.reasons += Counter()  # drops a reason whose count fell to 0
            else:
                lengths.pop()
    elif cap is not None and cap.rows is not None and cap.of_rows:
        read = round(size * min(counts.records, cap.of_rows) / cap.of_rows)
    array = np.asarray(lengths, dtype=np.int64)
    counts.documents, counts.tokens = len(array), int(array.sum())
    counts.longer = int(np.sum(array > cfg.data.seq_len))
    counts.lengths = [array]
    return counts, read


# ---- the whole recipe -------------------------------------------------------------------------------------


def _sample(
    files: list[str], budget: int | None, seed: int, src: SourceConfig
) -> list[tuple[str, Cap | None]]:
    """Whole files in a seeded order until `budget` bytes (None: all of them), each with its cap: None, or for
    a file larger than what is left of the budget, how much of it to read. A one-document text file is read
    whole (a prefix of it is no document)."""
    if budget is None:
        return [(path, None) for path in files]
    order = list(files)
    random.Random(f"inspect:{seed}:{src.name}").shuffle(order)
    picked: list[tuple[str, Cap | None]] = []
    size = 0
    for path in order:
        if size >= budget:
            break
        left, file_size = budget - size, _size(path)
        if file_size <= left:
            picked.append((path, None))
        elif picked and left < _PREFIX_MIN:
            break  # too little left for a prefix to say much: the sample ends here
        else:
            picked.append((path, _cap(path, left, file_size, declared_format(src))))
        size += min(file_size, left)
    return sorted(picked, key=lambda pair: pair[0])


def _cap(path: str, left: int, file_size: int, declared: str | None) -> Cap | None:
    fmt = detect_format(path, declared)
    if fmt == "text":
        return None
    if fmt in ("parquet", "hf_dataset"):  # read by seeking, not as a byte stream: by rows
        rows = count_records(path, declared)
        return Cap(left, max(1, math.ceil(rows * left / file_size)), rows)
    return Cap(left)


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def inspect(
    cfg: Config, sample_bytes: int | None = DEFAULT_SAMPLE_BYTES, workers: int | None = None
) -> list[SourceReport]:
    """Read every pretraining source of `cfg` (`sample_bytes` None: every file) and count what it holds.
    Raises ValueError with one line for what stops it (the tokenizer, a reading process that died)."""
    if cfg.kind.records:
        raise ValueError("data inspect counts pretraining corpora; for instruction data use --dry-run")
    if sample_bytes is not None and sample_bytes <= 0:
        raise ValueError(f"the sample must be larger than 0 bytes (got {sample_bytes})")
    if prepared := [src.name for src in cfg.data.sources if src.prepared]:
        raise ValueError(
            f"data.sources{prepared} are prepared: their exact counts are in the prepared manifest, and"
            " --dry-run prints their tokens, epochs and wrap steps"
        )
    _check_tokenizer(cfg)
    planned = cfg.derived().get("tokens_per_source", {})
    shares = cfg.source_fractions()
    jobs: list[Job] = []
    reports = []
    for index, src in enumerate(cfg.data.sources):
        selection = of_source(src)
        files = selection.files
        picked = _sample(files, sample_bytes, cfg.data.seed, src)
        total = sum(_size(path) for path in files)
        whole = len(picked) == len(files) and all(cap is None for _, cap in picked)
        update, rule = _update_rule(src, files, exact=whole)
        jobs += [(path, index, update.for_file(path) if update else None, cap) for path, cap in picked]
        report = SourceReport(
            src.name, shares[src.name], selection, total, 0, len(picked), Counts(), None, rule
        )
        report.planned_tokens = planned.get(src.name)
        reports.append(report)
    for (_, index, _, _), (counts, read) in zip(jobs, _run(cfg, jobs, workers)):
        reports[index].counts.add(counts)
        reports[index].bytes_read += read
    return reports


def _check_tokenizer(cfg: Config) -> None:
    """The run's tokenizer loads (here, before any worker starts), or one line naming the setting."""
    from mellama_train.data.tokenizer import load_tokenizer

    path = cfg.model.tokenizer or cfg.model.path
    if not path:
        raise ValueError(
            "data inspect counts tokens with the run's tokenizer: set model.path or model.tokenizer"
        )
    try:
        load_tokenizer(cfg)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(
            f"model.tokenizer: {path} cannot be loaded ({type(err).__name__}); give a local tokenizer directory"
            " (model.path or model.tokenizer)"
        ) from None


def _update_rule(src: SourceConfig, files: list[str], exact: bool) -> tuple[Any, str | None]:
    if not pubmed.ordered(files, declared_format(src)):
        return None, None
    if not exact:
        return None, "not applied to a sample (the rule needs every file's PMIDs): every version counted"
    index = pubmed.build_index(files, declared=declared_format(src))
    assert index is not None
    return index, index.describe()


def _run(cfg: Config, jobs: list[Job], workers: int | None) -> list[tuple[Counts, int]]:
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1, 16))
    if workers == 1:
        _start_worker(cfg)
        return [_read_file(job) for job in jobs]
    # Spawned, not forked: the parent may hold tokenizer threads. Each worker loads the tokenizer once.
    try:
        with ProcessPoolExecutor(
            workers, get_context("spawn"), initializer=_start_worker, initargs=(cfg,)
        ) as pool:
            return list(pool.map(_read_file, jobs, chunksize=1))
    except BrokenProcessPool:
        raise ValueError(
            f"a reading process died (killed, or out of memory) with {workers} workers; rerun with fewer"
            " --workers or a smaller --sample-mb"
        ) from None


# ---- output -----------------------------------------------------------------------------------------------


def percentiles(counts: Counts) -> dict[str, int]:
    lengths = np.concatenate(counts.lengths) if counts.lengths else np.zeros(0, dtype=np.int64)
    if not len(lengths):
        return {}
    values = np.percentile(lengths, PERCENTILES, method="nearest")
    return {**{f"p{p}": int(v) for p, v in zip(PERCENTILES, values)}, "max": int(lengths.max())}


def as_dict(report: SourceReport, seq_len: int) -> dict[str, Any]:
    """One source's figures for `--json`: numbers and reason names only, never text."""
    c = report.counts
    return {
        "source": report.name,
        "exact": report.exact,
        "files_read": report.files_read,
        "files": len(report.selection.files),
        "files_left_out": len(report.selection.excluded),
        "bytes": report.bytes_total,
        "bytes_read": report.bytes_read,
        "records": report.total(c.records),
        "documents": report.total(c.documents),
        "tokens": report.total(c.tokens),
        "skipped": {r: report.total(n) for r, n in sorted(c.reasons.items()) if not is_filter(r)},
        "filtered": {r: report.total(n) for r, n in sorted(c.reasons.items()) if is_filter(r)},
        "document_tokens": percentiles(c),
        "longer_than_seq_len": c.longer / c.documents if c.documents else 0.0,
        "seq_len": seq_len,
        "planned_tokens": report.planned_tokens,
        "epochs": report.epochs,
        "update_rule": report.update_rule,
    }


def render(reports: list[SourceReport], cfg: Config, repeat_warning: float = REPEAT_WARNING) -> list[str]:
    seq_len = cfg.data.seq_len
    lines = [
        f"# data inspect (seq_len {seq_len}; the plan: {cfg.derived().get('total_tokens', 0):,} training tokens)"
    ]
    warnings = []
    budget = "train.max_steps" if cfg.train.max_steps else "train.train_tokens"
    for r in reports:
        c, how = r.counts, "exact" if r.exact else "estimated"
        lines.append(f"{r.name}  (weight share {r.weight_share:.1%})")
        sample = (
            ""
            if r.exact
            else f"; sampled {r.files_read} of them, {r.bytes_read:,} of {r.bytes_total:,} bytes"
        )
        lines.append(
            f"  files       {len(r.selection.files):,} read, {len(r.selection.excluded):,} left out{sample}"
        )
        lines += [
            f"  warning     {glob} matched no file found; check the glob" for glob in r.selection.unmatched
        ]
        per_doc = f", {c.tokens / c.documents:,.1f} per document" if c.documents else ""
        lines.append(
            f"  records     {r.total(c.records):,} -> {r.total(c.documents):,} documents,"
            f" {r.total(c.tokens):,} tokens{per_doc} ({how})"
        )
        for kind, chosen in (("skipped", False), ("filtered", True)):
            seen = {
                reason: r.total(n) for reason, n in sorted(c.reasons.items()) if is_filter(reason) == chosen
            }
            if seen:
                lines.append(f"  {kind:<11} " + ", ".join(f"{n:,} {reason}" for reason, n in seen.items()))
        if r.update_rule:
            lines.append(f"  updates     {r.update_rule}")
        if stats := percentiles(c):
            spread = ", ".join(f"{k} {v:,}" for k, v in stats.items())
            longer = c.longer / c.documents
            lines.append(f"  length      {spread} tokens; {longer:.1%} longer than seq_len ({seq_len})")
        if (epochs := r.epochs) is not None:
            lines.append(
                f"  epochs      the plan takes {r.planned_tokens:,} tokens from it: {epochs:,.2f} passes"
            )
            if epochs > repeat_warning:
                warnings.append(
                    f"{r.name} is repeated {epochs:,.1f} times over the plan (past {repeat_warning:g}, returns from"
                    f" repeated data fall off); add data to it, lower its weight, or lower {budget}"
                )
        elif r.planned_tokens and not c.tokens:
            warnings.append(f"{r.name} gave no tokens: check its paths and filters")
    if warnings:
        lines += ["", "# warnings"] + [f"  - {w}" for w in warnings]
    return lines


def sample_size(mebibytes: float | None) -> int | None:
    """--sample-mb as bytes (None: every file); zero or less stays so, for inspect() to refuse."""
    return None if mebibytes is None else math.ceil(mebibytes * 2**20)
