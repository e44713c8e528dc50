"""Benchmark decontamination: n-gram sets built from evaluation files, and the check that drops training
documents sharing any n-gram with them (GPT-3's 13-gram rule), so PubMedQA / MedQA / MedMCQA scores stay honest.

Words are lowercase runs of letters and digits (`\\w+`), so punctuation, case and spacing do not hide an
overlap. An n-gram is n consecutive words, identified by a 64-bit hash: each word's blake2b-64 digest (stable
across processes and machines, unlike Python's hash()) combined by a polynomial over the n words, vectorised in
numpy. The index is the sorted array of the benchmarks' n-gram hashes (8 bytes each; MedMCQA's 194k questions
give a few million); a document is checked with one `searchsorted` over its own n-grams. A false match needs a
64-bit collision: with 10^7 indexed n-grams, one per ~2 x 10^12 words of training text (Me-LLaMA's 129B tokens
are ~10^11 words: an expected 0.05 documents dropped wrongly).

Hand-written rather than a library: the dedup tools on PyPI (datasketch's MinHash, text-dedup) estimate
near-duplicate similarity, not the exact shared-n-gram test that decontamination reports use.

    mellama-train decontaminate --benchmarks pubmedqa.jsonl medqa.jsonl medmcqa.jsonl --out decontam/
    (recipe)  data: {decontamination: decontam/}

A benchmark record's text is every string inside it (question, options, contexts, answers: any JSON layout),
joined; a record shorter than n words cannot be matched and is counted in the index's manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_N = 13
INDEX_FILE = "ngrams.npy"
MANIFEST = "manifest.json"
_WORD = re.compile(r"\w+")
_BASE = np.uint64(0x100000001B3)  # an odd multiplier (FNV-64's prime): the polynomial's base


@lru_cache(maxsize=1 << 20)
def _word_hash(word: str) -> int:
    # surrogatepass: a lone surrogate (valid JSON) hashes like any other word instead of raising.
    return int.from_bytes(
        hashlib.blake2b(word.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little"
    )


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngram_hashes(text: str, n: int) -> np.ndarray:
    """The 64-bit hashes of every n-gram of `text`'s words (empty when it has fewer than n words)."""
    ws = words(text)
    if len(ws) < n:
        return np.empty(0, dtype=np.uint64)
    h = np.fromiter((_word_hash(w) for w in ws), dtype=np.uint64, count=len(ws))
    count = len(ws) - n + 1
    out = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):  # arithmetic mod 2^64 is the point
        for k in range(n):
            out = out * _BASE + h[k : k + count]
    return out


def record_text(record: Any) -> str:
    """Every string inside a JSON value, in order, joined by newlines (keys are not text)."""
    # An explicit stack, not recursion: a record nested as deep as the JSON parser allows must not overflow.
    parts: list[str] = []
    stack = [record]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, dict):
            stack.extend(reversed(list(value.values())))
        elif isinstance(value, list | tuple):
            stack.extend(reversed(value))
    return "\n".join(parts)


def _benchmark_records(path: Path) -> Iterator[Any]:
    """Records of a benchmark file: JSON lines, or one JSON array / object of records (PubMedQA's
    ori_pqal.json maps ids to records)."""
    try:
        with open(path, encoding="utf-8") as fh:
            head = fh.read(1 << 16).lstrip()
        if path.suffix == ".json" or head.startswith("["):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except UnicodeDecodeError:
                raise
            except (ValueError, RecursionError) as exc:
                problem = "nested too deeply" if isinstance(exc, RecursionError) else exc
                raise ValueError(
                    f"{path}: not valid JSON ({problem}); give JSON lines or one JSON array"
                ) from None
            if not isinstance(data, dict | list):
                raise ValueError(
                    f"{path}: holds one JSON {type(data).__name__}; give JSON lines or one JSON array"
                )
            yield from (data.values() if isinstance(data, dict) else data)
            return
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    raise ValueError(f"{path}:{number}: not a JSON line ({exc}); fix or remove it") from None
                except RecursionError:
                    raise ValueError(f"{path}:{number}: JSON nested too deeply; fix or remove it") from None
                yield record
    except UnicodeDecodeError:  # (the file is decoded in blocks: there is no line number to give)
        raise ValueError(f"{path}: not UTF-8 text; convert it to UTF-8") from None


@dataclass
class FileStats:
    path: str
    records: int = 0
    too_short: int = 0
    """Records with fewer than n words: they cannot be matched (lower n to cover them)."""
    ngrams: int = 0


@dataclass
class IndexInfo:
    n: int
    ngrams: int = 0
    """Distinct n-grams in the index."""
    files: list[FileStats] = field(default_factory=list)


def build_index(paths: Iterable[Path], n: int = DEFAULT_N) -> tuple[np.ndarray, IndexInfo]:
    if n < 1:
        raise ValueError(f"--n must be >= 1 (got {n}); 13 is the usual choice")
    info = IndexInfo(n)
    chunks: list[np.ndarray] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise ValueError(f"--benchmarks {path}: no such file")
        stats = FileStats(str(path))
        for record in _benchmark_records(path):
            stats.records += 1
            hashes = ngram_hashes(record_text(record), n)
            if hashes.size == 0:
                stats.too_short += 1
            stats.ngrams += int(hashes.size)
            chunks.append(hashes)
        if stats.records == 0:
            raise ValueError(f"--benchmarks {path}: holds no records")
        info.files.append(stats)
    index = np.unique(np.concatenate(chunks)) if chunks else np.empty(0, dtype=np.uint64)
    info.ngrams = int(index.size)
    return index, info


def write_index(out_dir: Path, index: np.ndarray, info: IndexInfo) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / INDEX_FILE, index, allow_pickle=False)
    manifest = {
        "n": info.n,
        "ngrams": info.ngrams,
        "files": [stats.__dict__ for stats in info.files],
        "hash": "blake2b-64 per lowercase \\w+ word, polynomial base 0x100000001B3 mod 2^64",
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out_dir


class Index:
    """A loaded index: `overlaps(text)` is True when text shares at least one n-gram with the benchmarks."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        try:
            manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
            self.n = int(manifest["n"])
            self.hashes = np.load(directory / INDEX_FILE, allow_pickle=False)  # numbers only: a safe load
            if self.n < 1 or self.hashes.dtype != np.uint64 or self.hashes.ndim != 1:
                raise ValueError(f"n {self.n}, {self.hashes.dtype} array of {self.hashes.ndim} dimensions")
        # Read back from a shared directory: any JSON (nested past the parser's depth too), any array.
        except (OSError, ValueError, RecursionError, KeyError, TypeError) as exc:
            raise ValueError(
                f"data.decontamination: {directory} is not an index written by `mellama-train decontaminate`"
                f" ({exc}); build one with `mellama-train decontaminate --benchmarks ... --out {directory}`"
            ) from exc
        self.directory = directory

    def overlaps(self, text: str) -> bool:
        if self.hashes.size == 0:
            return False
        hashes = ngram_hashes(text, self.n)
        if hashes.size == 0:
            return False
        at = np.searchsorted(self.hashes, hashes)
        at[at == self.hashes.size] = 0  # past the end: compare with any entry (it will not match)
        return bool((self.hashes[at] == hashes).any())


def load_index(directory: str | None) -> Index | None:
    return Index(directory) if directory else None


def screened(encode: Any, index: Index | None, text_of: Any = None) -> Any:
    """`encode` with the decontamination check in front: a record sharing an n-gram with the benchmarks is a
    Skip("contaminated"), counted per source like other skips but never limited (source.CHOSEN_SKIPS)."""
    if index is None:
        return encode
    from mellama_train.data.files import Skip

    text_of = text_of or (lambda record: record if isinstance(record, str) else record_text(record))

    def encode_clean(record: Any) -> Any:
        if index.overlaps(text_of(record)):
            return Skip("contaminated", f"shares a {index.n}-gram with the benchmarks in {index.directory}")
        return encode(record)

    return encode_clean


def scan(index: Index, paths: list[str], text_field: str = "text") -> dict[str, tuple[int, int]]:
    """{file: (records read, records overlapping)} for training files, read as a run reads them. Records a
    run would skip are skipped here too, counted and located in the log (never quoted)."""
    from mellama_train.data.files import Skip
    from mellama_train.data.readers import iter_texts
    from mellama_train.data.selection import expand_paths

    counts = {}
    for path in expand_paths(paths, "--scan"):
        read = hits = 0
        skipped: Counter[str] = Counter()
        first = ""
        for _, text in iter_texts(path, text_field):
            if isinstance(text, Skip):
                skipped[text.reason] += 1
                first = first or text.where
                continue
            read += 1
            hits += index.overlaps(text)
        if skipped:
            reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
            log.warning("decontaminate --scan %s: skipped %s (first at %s)", path, reasons, first)
        counts[path] = (read, hits)
    return counts
