"""Reads at scale over a prepared corpus (issue 17, item 5).

    python bench/prepared_reads.py [--copies 8] [--billions 1.0]

1. `prepare` throughput: the tiny profile's three sample sources, each file copied `--copies` times, tokenized
   with 1 worker and with every core: tokens per second, and per core.
2. Start-up to the first batch: synthetic prepared corpora of 10M and `--billions` x 1e9 tokens (uint16 shards
   of 100M tokens, documents of ~300 tokens, the tiny tokenizer's manifest), each opened in a fresh process:
   open_prepared + the order + the first micro-batch. The goal is under 10 s, independent of the corpus size.
3. A late resume: the first batch at step 0 against the first batch at step 10^9 (a global batch of 1024): the
   position is the step, so both cost the same (no scan).
4. Bytes read per rank per step against the bytes it trains on, at seq_len 4096 and world size 64 over the
   large corpus: the token bytes it asks for (logical), and the distinct 4 KiB pages those reads and the offset
   lookups touch (what a page cache or a filesystem reads at least).
Files sit in the page cache here (the corpora were just written), so 2-3 measure the CPU side of start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from mellama_train.config import resolve  # noqa: E402
from mellama_train.data.ordered import GlobalOrder, OrderedBatches  # noqa: E402
from mellama_train.data.prepared import (  # noqa: E402
    FORMAT,
    INDEX_STRIDE,
    MANIFEST,
    open_prepared,
    prepare,
    tokenizer_identity,
)
from mellama_train.data.selection import of_source  # noqa: E402
from mellama_train.data.tokenizer import load_tokenizer  # noqa: E402

SHARD_TOKENS = 100_000_000
PAGE = 4096


def prepare_speed(root: Path, copies: int) -> dict:
    """Tokens per second of `prepare` with 1 worker and with every core, over copies of the sample files."""
    cfg = resolve("tiny")
    sources = []
    for src in cfg.data.sources:
        folder = root / "raw" / src.name
        folder.mkdir(parents=True)
        for path in of_source(src).files:
            for c in range(copies):
                shutil.copy(path, folder / f"{c:03d}_{Path(path).name}")
        sources.append(f"    - {{name: {src.name}, paths: [{folder}], weight: {src.weight}}}")
    recipe = root / "recipe.yaml"
    recipe.write_text("data:\n  sources:\n" + "\n".join(sources) + "\n")
    cfg = resolve("tiny", str(recipe))
    out = {}
    for workers in sorted({1, os.cpu_count() or 1}):
        target = root / f"prepared_{workers}"
        started = time.perf_counter()
        manifest = prepare(cfg, target, workers=workers)
        elapsed = time.perf_counter() - started
        tokens = sum(s["tokens"] for s in manifest["sources"].values())
        out[f"workers_{workers}"] = {
            "tokens": tokens,
            "seconds": round(elapsed, 2),
            "tokens_per_s": round(tokens / elapsed),
            "tokens_per_s_per_core": round(tokens / elapsed / workers),
        }
    return out


def synthetic_corpus(root: Path, tokens: int, seed: int = 0) -> Path:
    """A prepared corpus of `tokens` random ids (one source), with the tiny tokenizer's identity."""
    tokenizer = load_tokenizer(resolve("tiny"))
    rng = np.random.default_rng(seed)
    (root / "web").mkdir(parents=True)
    files, left, n = [], tokens, 0
    while left > 0:
        size = min(SHARD_TOKENS, left)
        ids = rng.integers(3, len(tokenizer), size=size, dtype=np.uint16)
        lengths = rng.geometric(1 / 300, size=size // 100 + 10)
        ends = np.cumsum(lengths)
        ends = ends[ends < size]
        offsets = np.concatenate([[0], ends, [size]]).astype(np.int64)
        np.save(root / "web" / f"{n:05d}.tokens.npy", ids)
        np.save(root / "web" / f"{n:05d}.docs.npy", offsets)
        np.save(root / "web" / f"{n:05d}.index.npy", offsets[::INDEX_STRIDE])
        files.append(
            {
                "shard": f"web/{n:05d}",
                "file": f"/synthetic/{n}",
                "documents": offsets.size - 1,
                "tokens": size,
            }
        )
        left, n = left - size, n + 1
    manifest = {
        "format": FORMAT,
        "tokenizer": tokenizer_identity(tokenizer),
        "dtype": "uint16",
        "sources": {
            "web": {
                "weight": 1.0,
                "files": files,
                "documents": sum(f["documents"] for f in files),
                "tokens": tokens,
                "skipped": {},
            }
        },
    }
    (root / MANIFEST).write_text(json.dumps(manifest))
    return root


def first_batch(
    corpus: Path, step: int, seq_len: int = 4096, world: int = 64, global_batch: int = 1024
) -> float:
    """Seconds from nothing to rank 0's first micro-batch at `step` (opened here, in this process)."""
    tokenizer = load_tokenizer(resolve("tiny"))
    started = time.perf_counter()
    sources = open_prepared(corpus, tokenizer)
    order = GlobalOrder([sources["web"]], [1.0], seq_len, 1234)
    batches = OrderedBatches(order, 0, world, 1, global_batch // world, 0.01)
    if step:
        batches.load_state_dict({"prepared": {**batches.state_dict()["prepared"], "step": step}})
    next(batches)
    return time.perf_counter() - started


def startup(corpus: Path, step: int) -> float:
    """first_batch in a fresh interpreter (imports excluded: they are the same for any corpus)."""
    code = f"import sys; sys.path.insert(0, {str(REPO / 'bench')!r}); import prepared_reads as b; from pathlib import Path; print(b.first_batch(Path({str(corpus)!r}), {step}))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(proc.stdout.strip().splitlines()[-1])


class _Tracked:
    """An array whose slice reads are recorded as the 4 KiB pages of its file they touch."""

    def __init__(self, array: np.ndarray, key: str, pages: set):
        self.array, self.key, self.pages = array, key, pages
        self.size = array.size

    def __getitem__(self, item: slice) -> np.ndarray:
        start, stop, _ = item.indices(self.array.size)
        width = self.array.itemsize
        if stop > start:
            self.pages.update(
                (self.key, p) for p in range(start * width // PAGE, (stop * width - 1) // PAGE + 1)
            )
        return self.array[item]


def bytes_per_step(
    corpus: Path, steps: int = 20, seq_len: int = 4096, world: int = 64, batch: int = 1024
) -> dict:
    """Rank 0's reads over `steps` steps, through the real reader (PreparedSource.span) with its token and
    offset arrays recorded page by page: the token bytes it asks for, and the distinct 4 KiB pages it touches
    each step (the shards' coarse indexes counted whole, once), against the token bytes it trains on."""
    tokenizer = load_tokenizer(resolve("tiny"))
    source = open_prepared(corpus, tokenizer)["web"]
    touched: set = set()
    source.tokens = [_Tracked(t, f"t{i}", touched) for i, t in enumerate(source.tokens)]
    source.offsets = [_Tracked(d, f"d{i}", touched) for i, d in enumerate(source.offsets)]
    index_pages = sum(-(-index.nbytes // PAGE) for index in source.indexes or [])
    order = GlobalOrder([source], [1.0], seq_len, 1234)
    batches = OrderedBatches(order, 0, world, 1, batch // world, 0.01)
    trained = pages = 0
    for _ in range(steps):
        touched.clear()
        for _ in range(batches.accum):
            batch_ = next(batches)
            trained += batch_["input_ids"].numel() * 2
        pages += len(touched)
    return {
        "trained_bytes": trained,
        "asked_over_trained": 1.0,  # span asks for exactly the window's seq_len tokens
        "pages_over_trained": round(pages * PAGE / trained, 3),
        "index_bytes_per_rank_once": index_pages * PAGE,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--copies", type=int, default=8, help="copies of each sample file for the prepare speed")
    p.add_argument("--billions", type=float, default=1.0, help="tokens of the large synthetic corpus, x 1e9")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        results = {"prepare": prepare_speed(root / "speed", args.copies)}
        small = synthetic_corpus(root / "small", 10_000_000)
        large = synthetic_corpus(root / "large", int(args.billions * 1e9), seed=1)
        results["startup_s"] = {
            "10M tokens": round(min(startup(small, 0) for _ in range(3)), 3),
            f"{args.billions:g}B tokens": round(min(startup(large, 0) for _ in range(3)), 3),
        }
        results["resume_s"] = {
            "step 0": round(min(first_batch(large, 0) for _ in range(3)), 4),
            "step 1e9": round(min(first_batch(large, 10**9) for _ in range(3)), 4),
        }
        results["reads_seq4096_world64"] = bytes_per_step(large)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
