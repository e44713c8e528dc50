"""`mellama-train prepare [RECIPE] --out DIR`: tokenize a recipe's pretraining sources once (data/prepared.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mellama_train.cli.common import error, fail, traceback_if
from mellama_train.config import ConfigError, resolve
from mellama_train.preflight import validate


def prepare_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mellama-train prepare",
        description="Tokenize every pretraining source of a recipe once, into memory-mapped token shards and a"
        " manifest (docs/DATA.md). Run it again after a kill: finished shards of unchanged files are kept.",
    )
    p.add_argument("recipe", nargs="?", help="recipe YAML applied over the profile (same as --config)")
    p.add_argument("--config", metavar="PATH", help="recipe YAML (alternative to the positional RECIPE)")
    p.add_argument("--profile", default="tiny", help="named pretraining profile (default tiny)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any field")
    p.add_argument("--out", required=True, metavar="DIR", help="where the shards and manifest.json go")
    p.add_argument("--workers", type=int, default=None, help="processes (default: every core)")
    p.add_argument(
        "--part",
        default="0/1",
        metavar="K/N",
        help="only this task's share of the files, task K of N (a SLURM array: slurm/prepare.sh); the task"
        " that finds every shard finished writes the manifest",
    )
    p.add_argument("--debug", action="store_true", help="print the traceback of an error too")
    args = p.parse_args(argv)
    from mellama_train.data.prepared import prepare

    if args.workers is not None and args.workers < 1:
        return error(f"--workers {args.workers}: give 1 or more processes")
    try:
        k, n = (int(x) for x in args.part.split("/"))
        if not 0 <= k < n:
            raise ValueError
    except ValueError:
        return error(f"--part {args.part}: give K/N with 0 <= K < N, e.g. --part 0/8")
    try:
        cfg = resolve(args.profile, args.recipe or args.config, args.set)
        problems, _ = validate(cfg)
        if problems:
            return fail(problems)
        manifest = prepare(cfg, Path(args.out), args.workers, (k, n))
    except ConfigError as exc:
        traceback_if(args.debug)
        return fail(exc.problems)
    except (ValueError, OSError) as exc:
        traceback_if(args.debug)
        return error(str(exc))
    if manifest is None:
        print(f"part {k}/{n} done; the manifest is written by the task that finishes last")
        return 0
    for name, entry in manifest["sources"].items():
        skipped = sum(entry["skipped"].values())
        print(
            f"{name}: {len(entry['files'])} file(s), {entry['documents']:,} documents, {entry['tokens']:,} tokens"
            f" ({manifest['dtype']}), {skipped:,} records skipped"
        )
    print(f"prepared: {Path(args.out) / 'manifest.json'}")
    return 0
