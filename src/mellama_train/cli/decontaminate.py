"""`mellama-train decontaminate`: the benchmark n-gram index that data.decontamination reads."""

from __future__ import annotations

import argparse
from pathlib import Path

from mellama_train.cli.common import error, os_error


def decontaminate_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mellama-train decontaminate",
        description="Build the n-gram index of benchmark files (PubMedQA, MedQA, MedMCQA: JSON lines or a JSON"
        " array/object of records; every string of a record is its text). A run with"
        " data.decontamination=OUT drops each training document or example that shares an n-gram with them,"
        " counted per source as data/decontaminated/<source>. With --scan, report how many records of"
        " training files overlap, without training.",
    )
    p.add_argument("--benchmarks", nargs="+", required=True, metavar="FILE", help="benchmark files")
    p.add_argument(
        "--out", required=True, metavar="DIR", help="where to write the index (ngrams.npy, manifest)"
    )
    p.add_argument("--n", type=int, default=13, help="words per n-gram (default 13, as GPT-3's filter)")
    p.add_argument(
        "--scan",
        nargs="+",
        default=[],
        metavar="FILE",
        help="training files to check against the index (their text field: --text-field)",
    )
    p.add_argument("--text-field", default="text", help="the text field of --scan's JSON/CSV files")
    args = p.parse_args(argv)

    from mellama_train.data import decontam

    try:
        index, info = decontam.build_index([Path(b) for b in args.benchmarks], args.n)
        out = decontam.write_index(Path(args.out), index, info)
        print(f"index {out}: {info.ngrams:,} distinct {info.n}-grams")
        for f in info.files:
            short = f" ({f.too_short} shorter than {info.n} words: not matchable)" if f.too_short else ""
            print(f"  {f.path}: {f.records:,} records, {f.ngrams:,} n-grams{short}")
        if args.scan:
            loaded = decontam.Index(out)
            for path, (read, hits) in decontam.scan(loaded, args.scan, args.text_field).items():
                print(f"scan {path}: {hits:,} of {read:,} records overlap the benchmarks")
    except ValueError as exc:
        return error(str(exc))
    except OSError as exc:  # e.g. --out names a file: one line, not a traceback
        return error(os_error(exc))
    print(f"use it: --set data.decontamination={out}")
    return 0
