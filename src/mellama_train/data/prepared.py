"""`mellama-train prepare`: tokenize a recipe's pretraining sources once, into memory-mapped token shards.

    OUT/
      manifest.json                 written last: the tokenizer's identity, every source's files with their
                                    fingerprints, exact documents and tokens, skips by reason
      <source>/<NNNNN>.tokens.npy   one shard per input file: its documents' token ids, back to back (uint16
                                    when the vocabulary fits, else uint32), each document BOS ... EOS
      <source>/<NNNNN>.docs.npy     int64 offsets: document d is tokens[docs[d]:docs[d + 1]]
      <source>/<NNNNN>.json         the shard's record, written after both arrays: the file it came from (path,
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
import tempfile
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
from mellama_train.data.files import ReadOptions, Skip, UnreadableFile
from mellama_train.data.readers import iter_texts
from mellama_train.data.reasons import FILTER_REASONS
from mellama_train.data.selection import declared_format, of_source
from mellama_train.data.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = 1
"""The layout's version: a reader refuses a manifest of another."""
INDEX = "index"


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


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


def _settings(src: SourceConfig, cfg: Config, identity: dict[str, Any], file_index: Any) -> str:
    """A digest of everything besides the file's bytes that decides what its shard holds: the tokenizer, the
    source's filters and cleaners, the size limit, the decontamination index, and the PubMed update rule's skips
    for this file (a new update file changes them). A finished shard made under other settings is made again."""
    from mellama_train.data.source import source_filters

    decontam = cfg.data.decontamination
    filters = source_filters(src)
    settings = {
        "tokenizer": identity["vocab_sha256"],
        "where": sorted((k, sorted(v)) for k, v in (filters["where"] or {}).items()),
        "require_abstract": filters["require_abstract"],
        "format": filters["format"],
        "text_field": src.text_field,
        "cleaners": list(src.cleaners),
        "min_chars": src.min_chars,
        "max_record_bytes": cfg.data.max_record_bytes,
        "decontamination": _file_sha256(Path(decontam) / "manifest.json") if decontam else None,
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
    from mellama_train.data.pipeline import document_encoder  # the streaming path's own encoder
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
    for suffix, array in ((".tokens.npy", tokens), (".docs.npy", np.asarray(offsets, dtype=np.int64))):
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
    _atomic_write(base.with_name(base.name + ".json"), json.dumps(record, indent=1))
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
            and base.with_name(base.name + ".docs.npy").is_file()
        ):
            return record
    except (OSError, ValueError, RecursionError):
        pass
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
    _atomic_write(out_dir / MANIFEST, json.dumps(manifest, indent=1))
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
    """One source of a prepared corpus: its shards, memory-mapped, never read whole."""

    name: str
    tokens: list[np.ndarray]
    offsets: list[np.ndarray]
    documents: int
    total_tokens: int
    vocab_size: int

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
        except (KeyError, TypeError, IndexError, OverflowError, ValueError, AttributeError) as exc:
            detail = str(exc) if isinstance(exc, ValueError) else type(exc).__name__
            if str(directory) in detail:  # already names the file and the fix
                raise ValueError(detail) from None
            raise ValueError(f"{manifest_path}: source {str(name)[:40]!r}: {detail}; prepare again") from None
    return out


def _open_source(directory: Path, name: str, entry: Any, vocab_size: int) -> PreparedSource:
    dtype = token_dtype(vocab_size)
    root = directory.resolve()
    tokens, offsets = [], []
    for f in list(entry["files"]):
        shard = str(f["shard"])
        arrays = []
        for suffix, kind in ((".tokens.npy", dtype), (".docs.npy", np.dtype(np.int64))):
            path = directory / f"{shard}{suffix}"
            if root not in path.resolve().parents:  # `../`, an absolute path, or a link out of the corpus
                raise ValueError(f"{directory / MANIFEST}: shard {shard[:60]!r} lies outside {directory}")
            arrays.append(_load(path, kind))
        t, d = arrays
        if t.ndim != 1 or d.ndim != 1 or d.size < 1:
            raise ValueError(
                f"{directory / shard}: its arrays are not token and offset vectors; prepare again"
            )
        if d.size != _count(f["documents"], "documents") + 1 or t.size != _count(f["tokens"], "tokens"):
            raise ValueError(
                f"{directory / shard}: its arrays disagree with the manifest (documents or tokens)"
            )
        if d[0] != 0 or d[-1] != t.size or (d.size > 1 and np.any(np.diff(d) < 0)):
            raise ValueError(
                f"{directory / shard}.docs.npy: document offsets do not rise from 0 to the token count"
            )
        tokens.append(t)
        offsets.append(d)
    documents, total = _count(entry["documents"], "documents"), _count(entry["tokens"], "tokens")
    if documents != sum(d.size - 1 for d in offsets) or total != sum(t.size for t in tokens):
        raise ValueError(
            f"{directory / MANIFEST}: source {name!r}'s totals disagree with its shards; prepare again"
        )
    return PreparedSource(name, tokens, offsets, documents, total, vocab_size)


def _load(path: Path, dtype: np.dtype) -> np.ndarray:
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or device would block or never end
            raise ValueError(f"{path}: not a regular file; prepare again")
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise ValueError(f"{path}: missing; prepare again into the same --out to redo it") from None
    except (OSError, ValueError) as exc:
        if str(path) in str(exc):
            raise
        raise ValueError(
            f"{path}: damaged ({type(exc).__name__}); delete its .json and prepare again"
        ) from None
    if not isinstance(array, np.ndarray) or array.dtype != dtype:  # an .npz archive loads as NpzFile
        raise ValueError(
            f"{path}: holds {getattr(array, 'dtype', type(array).__name__)}, not {dtype}; prepare again"
        )
    return array
