"""`mellama-train prepare`: tokenize a recipe's pretraining sources once, into memory-mapped token shards.

    OUT/
      manifest.json                 written last: the tokenizer's identity, every source's files with their
                                    fingerprints, exact documents and tokens, skips by reason
      <source>/<NNNNN>.tokens.npy   one shard per input file: its documents' token ids, back to back (uint16
                                    when the vocabulary fits, else uint32), each document BOS ... EOS
      <source>/<NNNNN>.docs.npy     int64 offsets: document d is tokens[docs[d]:docs[d + 1]]
      <source>/<NNNNN>.index.npy    every INDEX_STRIDE-th offset: a reader finds a window's documents in it
                                    and one 4 KiB page of .docs.npy, not a binary search over the whole file
      <source>/<NNNNN>.json         the shard's record, written after its arrays: the file it came from (path,
                                    size, modification time, a digest of its bytes), documents, tokens, skips
      index/<source>.npz            the PubMed update index the shards were read with (data/pubmed.py)

A shard is finished only once its record exists: the arrays are written under a temporary name and renamed,
then the record is written atomically, so a killed `prepare` leaves no partial shard that counts. Run again, it
keeps every finished shard whose input file is unchanged (size and modification time; the byte digest is
checked when a run reads the corpus) and redoes the rest.

Documents are read and encoded exactly as the streaming path reads them (data/source.py): the same file
selection, record filters, PubMed update rule, cleaners, min_chars, decontamination and BOS/EOS convention, so
a prepared corpus holds the documents a streaming run would train on, in file order. Files are tokenized in
parallel processes, one file per task; order inside a shard is the file's record order.

Reading a prepared corpus (`open_prepared`) trusts nothing: the manifest must parse and name this tokenizer,
every shard must exist with the dtype, shape and totals its record and the manifest state, and offsets must
rise from 0 to the token count. Anything else is one line naming the file and the fix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from mellama_train.config import Config, SourceConfig
from mellama_train.data import pubmed
from mellama_train.data.decontam import load_index, screened
from mellama_train.data.digests import ByteTap
from mellama_train.data.encoding import document_encoder  # the streaming path's own encoder
from mellama_train.data.files import ReadOptions, Skip, UnreadableFile
from mellama_train.data.readers import iter_texts
from mellama_train.data.reasons import FILTER_REASONS
from mellama_train.data.selection import declared_format, of_source
from mellama_train.data.tokenizer import load_tokenizer
from mellama_train.integrity import atomic_write

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
INDEX_STRIDE = 512
"""Offsets per entry of a shard's coarse index: 512 int64 offsets are one 4 KiB page of .docs.npy."""
FORMAT = 1
"""The layout's version: a reader refuses a manifest of another."""
INDEX = "index"
_REDO = "delete its .json and prepare again"
"""The fix for a damaged shard: without its record it is not finished, so `prepare` makes it again."""


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """What makes two tokenizers encode alike: class, vocabulary size, special ids, and a digest of the whole
    vocabulary (token -> id). A prepared corpus made with another tokenizer is refused by it."""
    vocab = sorted(tokenizer.get_vocab().items())
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()
    return {
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "vocab_sha256": digest,
    }


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _stat(path: str) -> dict[str, int]:
    st = os.stat(path)
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def source_recipe(src: SourceConfig, cfg: Config) -> dict[str, Any]:
    """What a recipe says about how a source's files become documents: its filters, cleaners and limits, and
    the decontamination index. Kept in the manifest, so a recipe that says otherwise is refused at start-up."""
    from mellama_train.data.source import source_filters

    decontam = cfg.data.decontamination
    filters = source_filters(src)
    return {
        "where": sorted([k, sorted(v)] for k, v in (filters["where"] or {}).items()),
        "require_abstract": filters["require_abstract"],
        "format": filters["format"],
        "text_field": src.text_field,
        "cleaners": list(src.cleaners),
        "min_chars": src.min_chars,
        "max_record_bytes": cfg.data.max_record_bytes,
        "decontamination": _file_sha256(Path(decontam) / "manifest.json") if decontam else None,
    }


def _settings(src: SourceConfig, cfg: Config, identity: dict[str, Any], file_index: Any) -> str:
    """A digest of everything besides the file's bytes that decides what its shard holds: the tokenizer, the
    source's recipe (`source_recipe`), and the PubMed update rule's skips for this file (a new update file
    changes them). A finished shard made under other settings is made again."""
    settings = {
        "tokenizer": identity["vocab_sha256"],
        **source_recipe(src, cfg),
        "pubmed_skips": sorted((pmid, list(v)) for pmid, v in file_index.skip.items())
        if file_index
        else None,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _file_sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


@dataclass(frozen=True)
class _Job:
    """One input file of one source, for a worker process."""

    source: SourceConfig
    path: str
    number: int
    out_dir: str
    tokenizer_dir: str
    trust_remote_code: bool
    decontamination: str | None
    max_record_bytes: int
    index_path: str | None
    files: tuple[str, ...]
    """The source's files: only the PubMed index needs them (it checks it still covers them), else empty."""
    vocab_size: int
    settings: str


_TOKENIZERS: dict[str, Any] = {}
_INDEXES: dict[tuple[str, int], Any] = {}


def _worker_tokenizer(path: str, trust_remote_code: bool) -> Any:
    if path not in _TOKENIZERS:  # one load per worker process, not one per file
        from transformers import AutoTokenizer

        _TOKENIZERS[path] = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return _TOKENIZERS[path]


def _file_index(job: _Job) -> Any:
    """This file's entry of the source's PubMed update index, loaded once per worker process (keyed by the
    index file's mtime: prepare rebuilds it at every start)."""
    if job.index_path is None:
        return None
    key = (job.index_path, os.stat(job.index_path).st_mtime_ns)
    if key not in _INDEXES:
        _INDEXES[key] = pubmed.load(Path(job.index_path), list(job.files), declared_format(job.source))
    if _INDEXES[key] is None:
        raise ValueError(f"{job.index_path}: the PubMed update index no longer matches the source's files")
    return _INDEXES[key].for_file(job.path)


def _prepare_file(job: _Job) -> dict[str, Any]:
    """Worker: tokenize one file into its shard, return its record (also written beside the shard)."""
    from mellama_train.data.source import source_filters

    tokenizer = _worker_tokenizer(job.tokenizer_dir, job.trust_remote_code)
    src = job.source
    encode = screened(
        document_encoder(tokenizer, src.cleaners, src.min_chars), load_index(job.decontamination)
    )
    tap = ByteTap()
    options = ReadOptions(job.max_record_bytes, tap=tap, pubmed=_file_index(job), **source_filters(src))
    dtype = token_dtype(job.vocab_size)
    pieces: list[np.ndarray] = []
    offsets = [0]
    skipped: Counter[str] = Counter()
    try:
        for _, text in iter_texts(job.path, src.text_field, options=options):
            item = text if isinstance(text, Skip) else encode(text)
            if isinstance(item, Skip):
                skipped[item.reason] += 1
                continue
            pieces.append(np.asarray(item, dtype=dtype))
            offsets.append(offsets[-1] + len(item))
    except UnreadableFile as err:  # the rest of a damaged file: counted, as a run counts it
        skipped["unreadable_remainder"] += max(err.lost, 1)
    else:
        if tap.attached:
            tap.finish(job.path)
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    base = Path(job.out_dir) / src.name / f"{job.number:05d}"
    docs = np.asarray(offsets, dtype=np.int64)
    for suffix, array in ((".tokens.npy", tokens), (".docs.npy", docs), (".index.npy", docs[::INDEX_STRIDE])):
        tmp = base.with_name(f".{base.name}{suffix}.tmp")
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, base.with_name(base.name + suffix))
    record = {
        "file": os.path.abspath(job.path),
        **_stat(job.path),
        "read_bytes": tap.count,
        "bytes_digest": tap.hexdigest() if tap.attached else None,
        "documents": len(offsets) - 1,
        "tokens": int(tokens.size),
        "skipped": dict(sorted(skipped.items())),
        "settings": job.settings,
    }
    atomic_write(base.with_name(base.name + ".json"), json.dumps(record, indent=1))
    return record


def _finished(record_path: Path, path: str, settings: str) -> dict[str, Any] | None:
    """The record of a finished shard whose input file is unchanged (size, mtime) and which was made under the
    same settings (`_settings`), else None: it is made again."""
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        base = record_path.with_suffix("")
        if (
            isinstance(record, dict)
            and record.get("file") == os.path.abspath(path)
            and record.get("settings") == settings
            and {k: record.get(k) for k in ("bytes", "mtime_ns")} == _stat(path)
            and base.with_name(base.name + ".tokens.npy").is_file()
            and _shapes(base) == (record.get("tokens"), record.get("documents"))
        ):
            return record
    except (OSError, ValueError, RecursionError):
        pass
    return None


def _shapes(base: Path) -> tuple[int, int] | None:
    """(tokens, documents) a finished shard's arrays hold, read from their headers (None: missing, damaged or
    inconsistent), so a shard whose arrays no longer match its record is made again."""
    try:
        tokens, docs, index = (
            np.load(base.with_name(base.name + suffix), mmap_mode="r", allow_pickle=False)
            for suffix in (".tokens.npy", ".docs.npy", ".index.npy")
        )
        if docs.ndim != 1 or tokens.ndim != 1 or index.size != -(-docs.size // INDEX_STRIDE):
            return None
        return int(tokens.size), int(docs.size) - 1
    except (OSError, ValueError, EOFError, RuntimeError):
        return None


def prepare(
    cfg: Config, out_dir: Path, workers: int | None = None, part: tuple[int, int] = (0, 1)
) -> dict[str, Any] | None:
    """Tokenize every pretraining source of `cfg` into `out_dir`; returns the manifest (also written there).
    Finished shards of unchanged files are kept; ValueError (one line) when a source cannot be prepared.

    `part` (k, n): only the files whose number over all sources is k modulo n (task k of a SLURM array of n,
    slurm/prepare.sh). Whichever task finds every shard finished writes the manifest; the others return None."""
    if cfg.kind.records:
        raise ValueError(
            "prepare tokenizes pretraining corpora; instruction data is read as records at run time"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir}: is a file, not a directory; pass a directory")
    tokenizer = load_tokenizer(cfg)
    identity = tokenizer_identity(tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / MANIFEST).is_file():
        try:
            _check_tokenizer(out_dir / MANIFEST, identity)  # never mix two tokenizers' corpora in one --out
        except _Unreadable as exc:  # rewritten at the end anyway; each shard is judged by its own record
            log.warning("%s; it is written again when this prepare finishes", exc)
    jobs, kept, plan, settings = [], {}, {}, {}
    k, n = part
    overall = -1  # the file's number over all sources: what `part` divides
    for src in cfg.data.sources:
        files = of_source(src).files
        (out_dir / src.name).mkdir(exist_ok=True)
        index = pubmed.prepare(files, out_dir / INDEX, src.name, declared_format(src), reuse=False)
        index_path = str(pubmed.index_path(out_dir / INDEX, src.name)) if index is not None else None
        plan[src.name] = files
        for number, path in enumerate(files):
            overall += 1
            key = (src.name, number)
            settings[key] = _settings(src, cfg, identity, index.for_file(path) if index else None)
            if (
                record := _finished(out_dir / src.name / f"{number:05d}.json", path, settings[key])
            ) is not None:
                kept[key] = record
            elif overall % n == k:  # else another task's file
                jobs.append(
                    _Job(
                        src,
                        path,
                        number,
                        str(out_dir),
                        str(cfg.model.tokenizer or cfg.model.path),
                        cfg.model.trust_remote_code,
                        cfg.data.decontamination,
                        cfg.data.max_record_bytes,
                        index_path,
                        tuple(files) if index_path else (),
                        len(tokenizer),
                        settings[key],
                    )
                )
    log.info("prepare: %d file(s) to tokenize, %d finished before", len(jobs), len(kept))
    done = dict(kept)
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    if workers == 1:
        for job in jobs:
            done[(job.source.name, job.number)] = _prepare_file(job)
    else:
        try:
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                for job, record in zip(jobs, pool.map(_prepare_file, jobs)):
                    done[(job.source.name, job.number)] = record
        except BrokenProcessPool:
            raise ValueError(
                "a tokenizing process died (out of memory? killed?); run prepare again: finished shards are kept"
            ) from None
    for (name, number), expected in settings.items():  # the other array tasks' files, finished meanwhile
        path = plan[name][number]
        if (name, number) not in done and (
            record := _finished(out_dir / name / f"{number:05d}.json", path, expected)
        ):
            done[(name, number)] = record
    if missing := len(settings) - len(done):
        log.info("prepare: part %d of %d done; %d file(s) remain for the other parts", k, n, missing)
        return None
    manifest = _manifest(cfg, identity, plan, done)
    atomic_write(out_dir / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def _manifest(
    cfg: Config, identity: dict[str, Any], plan: dict[str, list[str]], done: dict[tuple[str, int], Any]
) -> dict[str, Any]:
    sources = {}
    for src in cfg.data.sources:
        records = [done[(src.name, n)] for n in range(len(plan[src.name]))]
        skipped: Counter[str] = Counter()
        for record in records:
            skipped.update(record["skipped"])
        bad = sum(n for reason, n in skipped.items() if reason not in FILTER_REASONS)
        read = sum(r["documents"] for r in records) + bad
        allowed = cfg.data.skip_allowance + cfg.data.max_skip_fraction * read
        if bad > allowed:
            raise ValueError(
                f"data.sources[{src.name}]: {bad} of {read} records were skipped as unusable, over the limit of"
                f" {allowed:g} (data.skip_allowance + data.max_skip_fraction x records); clean the files, or"
                " raise the limits"
            )
        sources[src.name] = {
            "weight": src.weight,
            "files": [{"shard": f"{src.name}/{n:05d}", **r} for n, r in enumerate(records)],
            "documents": sum(r["documents"] for r in records),
            "tokens": sum(r["tokens"] for r in records),
            "skipped": dict(sorted(skipped.items())),
            "recipe": source_recipe(src, cfg),
        }
    return {
        "format": FORMAT,
        "tokenizer": identity,
        "dtype": token_dtype(identity["vocab_size"]).name,
        "sources": sources,
    }


# ---- reading a prepared corpus back -------------------------------------------------------------------


@dataclass
class PreparedSource:
    """One source of a prepared corpus: its shards, memory-mapped, never read whole. Its token stream is the
    shards back to back, in file order; `span` reads any stretch of it."""

    name: str
    tokens: list[np.ndarray]
    offsets: list[np.ndarray]
    documents: int
    total_tokens: int
    vocab_size: int
    settings: dict[str, Any] | None = None
    """What the source was prepared with (the manifest's `recipe`: filters, cleaners, limits), to compare a
    recipe against; None in a manifest written before it was recorded."""
    files: list[dict[str, Any]] | None = None
    """The manifest's record of each input file (path, bytes, mtime_ns, digest)."""
    indexes: list[np.ndarray] | None = None
    """Each shard's coarse index: every INDEX_STRIDE-th offset (None: search the offsets themselves)."""

    def __post_init__(self) -> None:
        self.starts = np.concatenate([[0], np.cumsum([t.size for t in self.tokens], dtype=np.int64)])
        """Where each shard begins in the source's token stream."""

    def span(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [start, start + length) of the source's stream (int64), and the positions in the span where
        a segment starts: 0, and every document start inside it. Offsets and ids are checked here, where
        they are read, not over the whole corpus at open (a 129B-token corpus would take minutes to scan)."""
        end = start + length
        if start < 0 or end > self.total_tokens:
            raise IndexError(f"{self.name}: tokens [{start}, {end}) lie outside its {self.total_tokens}")
        pieces, starts = [], [np.zeros(1, dtype=np.int64)]
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        pos = start
        while pos < end:
            base = int(self.starts[shard])
            lo, hi = pos - base, min(end, int(self.starts[shard + 1])) - base
            first, last = self._documents_between(shard, lo, hi)
            inside = np.asarray(self.offsets[shard][first:last], dtype=np.int64)
            if inside.size and (np.any(np.diff(inside) <= 0) or inside[0] < lo or inside[-1] >= hi):
                raise ValueError(
                    f"{self.name} shard {shard:05d}: document offsets do not rise; the shard is damaged:"
                    " delete its .json and prepare again"
                )
            pieces.append(np.asarray(self.tokens[shard][lo:hi], dtype=np.int64))
            starts.append(inside - lo + (pos - start))
            pos += hi - lo
            shard += 1
        ids = np.concatenate(pieces)
        if ids.size and (int(ids.max()) >= self.vocab_size or int(ids.min()) < 0):
            raise ValueError(
                f"{self.name} shard {shard - 1:05d}: holds token id {int(ids.max())}, past the tokenizer's"
                f" {self.vocab_size}; the shard is damaged: delete its .json and prepare again"
            )
        return ids, np.unique(np.concatenate(starts))

    def _documents_between(self, shard: int, lo: int, hi: int) -> tuple[int, int]:
        """The range of document numbers of `shard` whose start lies in [lo, hi): found in its coarse index (in
        memory after the first read) and then in the one page of offsets it points to."""
        offs = self.offsets[shard]
        if self.indexes is None:
            first, last = np.searchsorted(offs, [lo, hi], side="left")
            return int(first), int(last)
        index = self.indexes[shard]
        found = []
        for target in (lo, hi):
            block = max(int(np.searchsorted(index, target, side="left")) - 1, 0)
            start = block * INDEX_STRIDE
            page = np.asarray(offs[start : start + INDEX_STRIDE + 1])
            # The page must rise and meet the index at both ends, or the search below finds the wrong documents.
            following = index[block + 1] if block + 1 < index.size else None
            if (
                page.size == 0
                or page[0] != index[block]
                or (following is not None and (page.size != INDEX_STRIDE + 1 or page[-1] != following))
            ):
                raise ValueError(
                    f"{self.name} shard {shard:05d}: its index disagrees with its offsets; the shard is damaged:"
                    f" {_REDO}"
                )
            if np.any(np.diff(page) <= 0):
                raise ValueError(
                    f"{self.name} shard {shard:05d}: document offsets do not rise; the shard is damaged: {_REDO}"
                )
            found.append(start + int(np.searchsorted(page, target, side="left")))
        return found[0], found[1]

    def document(self, shard: int, index: int) -> np.ndarray:
        """Document `index` of shard `shard`. Its token ids are checked against the vocabulary here, where they
        are read, rather than the whole corpus at open (a 129B-token corpus would take minutes): an id past the
        vocabulary would end a GPU run in a device assert."""
        start, end = int(self.offsets[shard][index]), int(self.offsets[shard][index + 1])
        doc = self.tokens[shard][start:end]
        if doc.size and int(doc.max()) >= self.vocab_size:
            raise ValueError(
                f"{self.name} shard {shard:05d}: document {index} holds token id {int(doc.max())}, past the"
                f" tokenizer's {self.vocab_size}; the shard is damaged: delete its .json and prepare again"
            )
        return doc


class _Unreadable(ValueError):
    """A manifest that cannot be read as one (as opposed to one that names another tokenizer)."""


def _check_tokenizer(manifest_path: Path, identity: dict[str, Any]) -> None:
    manifest = _read_manifest(manifest_path)
    if manifest.get("tokenizer") != identity:
        raise ValueError(
            f"{manifest_path}: prepared with another tokenizer (not this one's {identity['vocab_size']}-token"
            " vocabulary and ids); prepare again into a new --out with this tokenizer"
        )


def _read_manifest(path: Path) -> dict[str, Any]:
    rewrite = "run `mellama-train prepare` into the same --out again to rewrite it"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _Unreadable(
            f"{path.parent}: no {MANIFEST}; run `mellama-train prepare` into it (again)"
        ) from None
    except (OSError, ValueError, RecursionError) as exc:
        raise _Unreadable(f"{path}: not a readable manifest ({type(exc).__name__}); {rewrite}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _Unreadable(f"{path}: not a prepared corpus manifest of format {FORMAT}; {rewrite}")
    return manifest


def _count(value: Any, what: str) -> int:
    """A count from the manifest: a non-negative integer (JSON also parses NaN, Infinity, strings, floats)."""
    if type(value) is not int or value < 0:
        raise ValueError(f"{what} is {str(value)[:40]!r}, not a count")
    return value


def open_prepared(directory: Path, tokenizer: Any) -> dict[str, PreparedSource]:
    """Every source of a prepared corpus, checked against its manifest and `tokenizer` (module docstring)."""
    manifest_path = directory / MANIFEST
    _check_tokenizer(manifest_path, tokenizer_identity(tokenizer))
    manifest = _read_manifest(manifest_path)
    sources = manifest.get("sources")
    if not isinstance(sources, dict):
        raise ValueError(f"{manifest_path}: lists no sources; prepare again")
    out = {}
    for name, entry in sources.items():
        try:
            out[name] = _open_source(directory, str(name), entry, len(tokenizer))
        except (
            KeyError,
            TypeError,
            IndexError,
            OverflowError,
            ValueError,
            AttributeError,
            OSError,
            RuntimeError,
        ) as exc:
            detail = str(exc) if isinstance(exc, ValueError) else type(exc).__name__
            if str(directory) in detail:  # already names the file and the fix
                raise ValueError(detail) from None
            raise ValueError(f"{manifest_path}: source {str(name)[:40]!r}: {detail}; prepare again") from None
    return out


def _open_source(directory: Path, name: str, entry: Any, vocab_size: int) -> PreparedSource:
    dtype = token_dtype(vocab_size)
    root = directory.resolve()
    tokens, offsets, indexes = [], [], []
    for f in list(entry["files"]):
        shard = str(f["shard"])
        arrays = []
        for suffix, kind in (
            (".tokens.npy", dtype),
            (".docs.npy", np.dtype(np.int64)),
            (".index.npy", np.dtype(np.int64)),
        ):
            path = directory / f"{shard[:300]}{suffix}"
            if root not in path.resolve().parents:  # `../`, an absolute path, or a link out of the corpus
                raise ValueError(f"{directory / MANIFEST}: shard {shard[:60]!r} lies outside {directory}")
            arrays.append(_load(path, kind))
        t, d, index = arrays
        if t.ndim != 1 or d.ndim != 1 or d.size < 1:
            raise ValueError(f"{directory / shard}: its arrays are not token and offset vectors; {_REDO}")
        if d.size != _count(f["documents"], "documents") + 1 or t.size != _count(f["tokens"], "tokens"):
            raise ValueError(
                f"{directory / shard}: its arrays disagree with the manifest (documents or tokens); {_REDO}"
            )
        # Only the ends here: that the offsets rise is checked where they are read (PreparedSource.span).
        if d[0] != 0 or d[-1] != t.size:
            raise ValueError(
                f"{directory / shard}.docs.npy: document offsets do not run from 0 to the token count; {_REDO}"
            )
        if (
            index.ndim != 1
            or index.size != -(-d.size // INDEX_STRIDE)
            or index[0] != 0
            or index[-1] > t.size
            or np.any(np.diff(index) <= 0)
        ):
            raise ValueError(f"{directory / shard}.index.npy: does not index its offsets; {_REDO}")
        tokens.append(t)
        offsets.append(d)
        indexes.append(index)
    documents, total = _count(entry["documents"], "documents"), _count(entry["tokens"], "tokens")
    if documents != sum(d.size - 1 for d in offsets) or total != sum(t.size for t in tokens):
        raise ValueError(
            f"{directory / MANIFEST}: source {name!r}'s totals disagree with its shards; prepare again"
        )
    settings = entry.get("recipe")
    return PreparedSource(
        name,
        tokens,
        offsets,
        documents,
        total,
        vocab_size,
        settings if isinstance(settings, dict) else None,
        [{k: f.get(k) for k in ("file", "bytes", "mtime_ns", "bytes_digest")} for f in entry["files"]],
        indexes,
    )


def _load(path: Path, dtype: np.dtype) -> np.ndarray:
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or device would block or never end
            raise ValueError(f"{path}: not a regular file; {_REDO}")
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise ValueError(f"{path}: missing; prepare again into the same --out to redo it") from None
    except ValueError as exc:
        if str(path) in str(exc):
            raise
        raise ValueError(f"{path}: damaged ({type(exc).__name__}); {_REDO}") from None
    except (OSError, EOFError, RuntimeError) as exc:  # an empty file, a directory on the way, a link loop
        raise ValueError(f"{str(path)[:300]}: cannot be read ({type(exc).__name__}); {_REDO}") from None
    if not isinstance(array, np.ndarray) or array.dtype != dtype:  # an .npz archive loads as NpzFile
        raise ValueError(
            f"{path}: holds {getattr(array, 'dtype', type(array).__name__)}, not {dtype}; {_REDO}"
        )
    return array


# ---- a recipe over prepared corpora ------------------------------------------------------------------


def prepared_sources(cfg: Config) -> list[SourceConfig]:
    return [src for src in cfg.data.sources if src.prepared]


def open_sources(cfg: Config, tokenizer: Any) -> list[PreparedSource]:
    """Every source of the recipe, from the prepared corpus it names (each directory opened once)."""
    corpora: dict[str, dict[str, PreparedSource]] = {}
    out = []
    for src in cfg.data.sources:
        directory = str(src.prepared)
        if directory not in corpora:
            corpora[directory] = open_prepared(Path(directory), tokenizer)
        corpus = corpora[directory]
        if src.name not in corpus:
            raise ValueError(
                f"data.sources[{src.name}].prepared: {directory} holds the sources {sorted(corpus)[:8]}, not"
                f" {src.name!r}; name one of them, or prepare this source into it"
            )
        out.append(corpus[src.name])
    return out


def check_prepared(cfg: Config, tokenizer: Any) -> list[str]:
    """Problems of a recipe whose sources name prepared corpora, one line each with its fix: a mix of prepared
    and streamed sources, a corpus that cannot be trusted (open_prepared), a source it does not hold, and a
    source whose files or filters are no longer those it was prepared from."""
    chosen = prepared_sources(cfg)
    if not chosen:
        return []
    if cfg.kind.records:
        return [
            "data.sources[].prepared: prepared corpora are for pretraining; tuning reads its records as they are"
        ]
    if streamed := [src.name for src in cfg.data.sources if not src.prepared]:
        return [
            f"data.sources{streamed}: not prepared while {[s.name for s in chosen]} are; the prepared order"
            " covers the whole mixture: run `mellama-train prepare` over every source, or drop `prepared`"
        ]
    try:
        sources = open_sources(cfg, tokenizer)
    except ValueError as exc:
        return [str(exc)]
    problems = []
    for src, prepared in zip(cfg.data.sources, sources):
        label = f"data.sources[{src.name}]"
        fix = f"prepare again (`mellama-train prepare RECIPE --out {src.prepared}`) or drop {label}.paths"
        recipe = source_recipe(src, cfg)
        if prepared.settings is None:
            problems.append(f"{src.prepared}/{MANIFEST}: records no recipe for {src.name!r}; prepare again")
            continue
        if recipe["decontamination"] != prepared.settings.get("decontamination"):
            problems.append(
                f"{label}: data.decontamination is not the index {src.prepared} was screened with; prepare"
                " again with this index, or set data.decontamination as it was"
            )
        if not src.paths:  # the prepared source as it is
            continue
        if changed := sorted(
            k for k, v in recipe.items() if prepared.settings.get(k) != v and k != "decontamination"
        ):
            problems.append(
                f"{label}: {', '.join(changed)} differ from what {src.prepared} was prepared with; {fix}"
            )
            continue
        try:
            files = [os.path.abspath(f) for f in of_source(src).files]
        except ValueError as exc:
            problems.append(str(exc))
            continue
        recorded = {f["file"]: f for f in prepared.files or []}
        if set(files) != set(recorded):
            added, gone = sorted(set(files) - set(recorded)), sorted(set(recorded) - set(files))
            problems.append(
                f"{label}.paths: {len(added)} file(s) not in {src.prepared} (e.g. {(added or ['-'])[0]}) and"
                f" {len(gone)} prepared file(s) no longer listed (e.g. {(gone or ['-'])[0]}); {fix}"
            )
            continue
        for path in files:
            if {k: recorded[path].get(k) for k in ("bytes", "mtime_ns")} != _stat(path):
                problems.append(f"{path}: changed since {src.prepared} was prepared from it; {fix}")
                break
    return problems
