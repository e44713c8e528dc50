"""What checking the data by content costs (issue 14, item 5): while training reads, at resume, at start-up.

    python bench/data_fingerprint.py --gb 2

Writes a synthetic JSONL corpus (`--gb` GB of text in 256 MB shards, plain and zstd-compressed) into a temp
dir, then measures on one core, each case `--repeats` times (the best run is reported):
1. streaming: one rank's reader (world size 8: every 8th record decoded, the others only scanned, as a rank
   reads) with and without the digests (RecordDigest of every record + ByteTap of the raw bytes): what the
   fingerprint adds to the reading every rank does anyway;
2. resume, files finished earlier in the epoch: `byte_digest` of whole shards (the raw bytes re-hashed).
   Each finished file is re-hashed once over all ranks, shared out among them (data/source.py CheckShare),
   so the report gives the total (bytes read from the filesystem, summed over ranks: the measured time per
   TB) and the wall time per rank at `--world` ranks (each hashes about 1/world of the files, in parallel;
   on a shared filesystem the aggregate read bandwidth then bounds it);
3. resume, the current file: `prefix_digest` of a whole shard (the worst case: the position at its end),
   which every rank does for its own current file of each source (it re-reads up to its position anyway);
4. start-up: `check_unit` per file (open, start decompressing, read the first records).
The files are in the page cache here, so 2-3 measure the CPU side; on a cold parallel filesystem the read
bandwidth is the bound instead (a rank reads the compressed bytes once). Prints each number and its
extrapolation to 1 TB of text.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from mellama_train.data.digests import ByteTap, RecordDigest  # noqa: E402
from mellama_train.data.files import ReadOptions  # noqa: E402
from mellama_train.data.readers import byte_digest, check_unit, iter_texts, prefix_digest  # noqa: E402

SHARD = 256 * 2**20
WORLD = 8
WORDS = (
    "patient admitted with chest pain troponin negative echocardiogram showed preserved ejection fraction "
    "started on aspirin and atorvastatin discharged home stable follow up in clinic renal function normal "
    "blood pressure controlled cough fever resolved antibiotics completed imaging unremarkable"
).split()


def write_corpus(root: Path, gb: float) -> tuple[list[Path], list[Path], int]:
    """(plain shards, zstd shards, text bytes): ~2 KB notes, each line distinct."""
    import zstandard

    rng = random.Random(0)
    pool = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(150, 450))) for _ in range(997)]
    plain, packed, total, n = [], [], 0, 0
    while total < gb * 1e9:
        path = root / f"shard-{len(plain):04d}.jsonl"
        size = 0
        with open(path, "w", encoding="utf-8") as fh:
            while size < SHARD and total + size < gb * 1e9:
                line = json.dumps({"text": f"note {n}: {pool[n % len(pool)]}"}) + "\n"
                fh.write(line)
                size += len(line)
                n += 1
        total += size
        zst = path.with_suffix(".jsonl.zst")
        with open(path, "rb") as src, open(zst, "wb") as dst:
            zstandard.ZstdCompressor(level=3).copy_stream(src, dst)
        plain.append(path)
        packed.append(zst)
    return plain, packed, total


def best(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def read_as_a_rank(paths: list[Path], digests: bool) -> None:
    for path in paths:
        options = ReadOptions(digest=RecordDigest(), tap=ByteTap()) if digests else None
        for _ in iter_texts(str(path), None, want=lambda i: i % WORLD == 0, options=options):
            pass


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gb", type=float, default=2.0, help="GB of JSONL text to generate (default 2)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--world",
        type=int,
        default=64,
        help="ranks the finished-file checks are shared over, for the per-rank figure (default 64)",
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fingerprint-bench-"))
    try:
        plain, packed, text_bytes = write_corpus(root, args.gb)
        zst_bytes = sum(p.stat().st_size for p in packed)
        gb, per_tb = text_bytes / 1e9, 1e12 / text_bytes  # extrapolations are per TB of (uncompressed) text
        print(f"corpus: {gb:.2f} GB of JSONL text in {len(plain)} shards; zstd {zst_bytes / 1e9:.2f} GB")
        rows = []
        for label, files in (("jsonl", plain), ("jsonl.zst", packed)):
            bare = best(args.repeats, lambda files=files: read_as_a_rank(files, False))
            fingerprinted = best(args.repeats, lambda files=files: read_as_a_rank(files, True))
            rows.append((f"streaming {label}: one rank's read, no digests", bare, f"{gb / bare:.2f} GB/s"))
            rows.append(
                (
                    f"streaming {label}: with digests (+{(fingerprinted - bare) / bare:.1%})",
                    fingerprinted,
                    f"{gb / fingerprinted:.2f} GB/s; +{(fingerprinted - bare) * per_tb / 60:.1f} min/TB",
                )
            )
        for label, files, size in (("jsonl", plain, text_bytes), ("jsonl.zst", packed, zst_bytes)):
            seconds = best(args.repeats, lambda files=files: [byte_digest(str(p), 2**62) for p in files])
            total = seconds * per_tb / 60  # min per TB of text, all ranks together (each file hashed once)
            rows.append(
                (
                    f"resume, finished files ({label}): byte_digest",
                    seconds,
                    f"{size / 1e9 / seconds:.2f} GB/s of file; per TB of text: {total:.1f} min in total,"
                    f" {total / args.world:.2f} min per rank at {args.world} ranks",
                )
            )
        for label, files in (("jsonl", plain), ("jsonl.zst", packed)):
            with open(plain[0], "rb") as fh:  # the same records in both forms
                records = sum(1 for _ in fh)
            shard_gb = plain[0].stat().st_size / 1e9
            seconds = best(args.repeats, lambda p=files[0], r=records: prefix_digest(str(p), None, r))
            rows.append(
                (
                    f"resume, current file ({label}, a whole {shard_gb:.2f} GB shard): prefix_digest",
                    seconds,
                    f"{shard_gb / seconds:.2f} GB/s of text",
                )
            )
        for label, files in (("jsonl", plain), ("jsonl.zst", packed)):
            seconds = best(args.repeats, lambda files=files: [check_unit(str(p), None) for p in files])
            rows.append(
                (
                    f"start-up, check_unit ({label})",
                    seconds / len(files),
                    f"per file; {seconds / len(files) * 1000:.0f} s per 1000 files",
                )
            )
        width = max(len(r[0]) for r in rows)
        for name, seconds, note in rows:
            print(f"{name:<{width}}  {seconds:8.3f} s  {note}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
