"""What knowing a corpus before the run costs (issue 15): the PubMed update scan and `data inspect`.

    python bench/data_inspect.py --gb 8 --pubmed-mb 200

1. PubMed update index: the byte scan (data/pubmed.py scan_file) against the reader's full XML parse
   (readers.pubmed_records) over the same gzipped PubMed-shaped file (`--pubmed-mb` MB of XML, citations
   shaped like NCBI's: authors, MeSH, references, labelled abstracts). Reported as MB/s of XML and as the
   ratio scan/parse, both measured in this run; extrapolated to the 2025 baseline (~36M citations, taken as
   the file's bytes per citation x 36M).
2. `data inspect` at scale: a JSONL corpus of `--gb` GB of text in 256 MB zstd shards, inspected with the
   default sample (256 MiB of files) on `--workers` processes, against the same inspection of a corpus a
   quarter that size (both larger than the sample). A sampled inspection reads the sample and only lists the
   rest, so its time should not grow with the corpus: the ratio large/small is the figure; a 100 GB corpus
   adds only the listing of its files.

Prints every figure with what it means; docs/PERFORMANCE.md records the numbers of a run.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import zstandard  # noqa: E402

from mellama_train.config import resolve  # noqa: E402
from mellama_train.data import inspection, pubmed  # noqa: E402
from mellama_train.data.files import _options  # noqa: E402
from mellama_train.data.pubmed_xml import pubmed_records  # noqa: E402

WORDS = "patients treatment outcome cohort trial dose response risk ratio interval analysis clinical".split()


def citation(rng: random.Random, pmid: int) -> str:
    words = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    authors = "".join(
        f"<Author ValidYN='Y'><LastName>N{i}</LastName><Initials>A</Initials><AffiliationInfo><Affiliation>"
        f"{words(8)}</Affiliation></AffiliationInfo></Author>"
        for i in range(6)
    )
    mesh = "".join(
        f"<MeshHeading><DescriptorName UI='D{i:06d}' MajorTopicYN='N'>{words(2)}</DescriptorName></MeshHeading>"
        for i in range(12)
    )
    refs = "".join(
        f"<Reference><Citation>{words(10)}</Citation><ArticleIdList><ArticleId IdType='pubmed'>{i}</ArticleId>"
        "</ArticleIdList></Reference>"
        for i in range(20)
    )
    abstract = "".join(
        f"<AbstractText Label='{label}'>{words(50)} 10<sup>6</sup>.</AbstractText>"
        for label in ("BACKGROUND", "METHODS", "RESULTS", "CONCLUSIONS")
    )
    return (
        f"<PubmedArticle><MedlineCitation Status='MEDLINE' Owner='NLM'><PMID Version='1'>{pmid}</PMID><Article>"
        f"<ArticleTitle>{words(12)}</ArticleTitle><Abstract>{abstract}</Abstract><AuthorList>{authors}"
        f"</AuthorList></Article><MeshHeadingList>{mesh}</MeshHeadingList></MedlineCitation><PubmedData>"
        f"<ReferenceList>{refs}</ReferenceList></PubmedData></PubmedArticle>\n"
    )


def pubmed_case(root: Path, megabytes: int) -> dict:
    rng = random.Random(0)
    path = root / "pubmed25n0001.xml.gz"
    raw, n = 0, 0
    with gzip.open(path, "wt", compresslevel=6) as fh:
        fh.write("<?xml version='1.0'?>\n<PubmedArticleSet>\n")
        while raw < megabytes * 2**20:
            text = citation(rng, 10_000_000 + n)
            fh.write(text)
            raw, n = raw + len(text), n + 1
        fh.write("</PubmedArticleSet>\n")
    started = time.perf_counter()
    citations, _, unsure = pubmed.scan_file(str(path))
    scan = time.perf_counter() - started
    started = time.perf_counter()
    parsed = sum(1 for _ in pubmed_records(str(path), _options(None)))
    parse = time.perf_counter() - started
    assert len(citations) == parsed == n and not unsure
    per_citation = raw / n
    return {
        "citations": n,
        "xml_mb": raw / 2**20,
        "scan_mb_per_s": raw / 2**20 / scan,
        "parse_mb_per_s": raw / 2**20 / parse,
        "scan_over_parse": parse / scan,
        "baseline_scan_core_minutes": 36e6 * per_citation / (raw / scan) / 60,
    }


def corpus(root: Path, gigabytes: float) -> Path:
    """`gigabytes` of JSONL in 256 MB zstd shards: a pool of 5,000 random documents, repeated (fast to write;
    inspect's cost does not depend on whether documents repeat)."""
    rng = random.Random(1)
    pool = [
        (
            json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(50, 800)))}) + "\n"
        ).encode()
        for _ in range(5000)
    ]
    block = b"".join(pool)
    root.mkdir(parents=True)
    compressor = zstandard.ZstdCompressor(level=3)
    shard, written, target = 0, 0, int(gigabytes * 2**30)
    while written < target:
        size = min(256 * 2**20, target - written)
        data = block * (size // len(block)) + b"".join(pool[: (size % len(block)) // 700])
        (root / f"part-{shard:05d}.jsonl.zst").write_bytes(compressor.compress(data))
        shard, written = shard + 1, written + len(data)
    return root


def inspect_case(root: Path, gigabytes: float, workers: int) -> dict:
    figures = {}
    for label, size in (("small", gigabytes / 4), ("large", gigabytes)):
        data = corpus(root / label, size)
        recipe = root / f"{label}.yaml"
        recipe.write_text(f"data:\n  sources:\n    - {{name: web, paths: [{data}]}}\n")
        cfg = resolve("tiny", str(recipe))
        started = time.perf_counter()
        (report,) = inspection.inspect(cfg, inspection.DEFAULT_SAMPLE_BYTES, workers)
        seconds = time.perf_counter() - started
        figures[label] = {
            "corpus_bytes": report.bytes_total,
            "files": len(report.selection.files),
            "sample_bytes": report.bytes_read,
            "seconds": seconds,
            "estimated_tokens": report.total(report.counts.tokens),
        }
        shutil.rmtree(data)
    figures["large_over_small"] = figures["large"]["seconds"] / figures["small"]["seconds"]
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=2.0, help="JSONL corpus size for the inspect case (default 2)")
    p.add_argument(
        "--pubmed-mb", type=int, default=200, help="MB of PubMed XML for the scan case (default 200)"
    )
    p.add_argument("--workers", type=int, default=None, help="inspect processes (default: cores)")
    p.add_argument(
        "--case", choices=["all", "pubmed", "inspect"], default="all", help="which case (default all)"
    )
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-inspect-"))
    try:
        if args.case in ("all", "pubmed"):
            print(json.dumps({"pubmed_scan": pubmed_case(root, args.pubmed_mb)}, indent=2))
        if args.case in ("all", "inspect"):
            print(json.dumps({"inspect": inspect_case(root, args.gb, args.workers)}, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
