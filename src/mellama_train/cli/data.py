"""`mellama-train data inspect`: every source counted before the run."""

from __future__ import annotations

import argparse
import json
import logging

from mellama_train.cli.common import error, fail, os_error
from mellama_train.config import ConfigError, resolve
from mellama_train.preflight import validate


def data_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mellama-train data",
        description="Inspect a recipe's corpora: per source, the files read and left out, records, documents"
        " and tokens, every reason a record is not trained on, document lengths, and how many times the"
        " planned run goes through it. Reads a sample of a large corpus (estimates, said to be), all of a small"
        " one (exact). No text is printed.",
    )
    p.add_argument("action", choices=["inspect"])
    p.add_argument("--profile", default="tiny", help="named profile (default tiny)")
    p.add_argument("--config", metavar="PATH", help="recipe YAML applied over the profile")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any field")
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--full", action="store_true", help="read every file (exact counts)")
    amount.add_argument(
        "--sample-mb",
        type=float,
        default=None,
        metavar="MB",
        help="file MiB read per source (default 256); a smaller source is read whole",
    )
    p.add_argument(
        "--workers", type=int, default=None, metavar="N", help="reading processes (default: cores)"
    )
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from mellama_train.data import inspection
    from mellama_train.data.files import DataFileError

    try:
        cfg = resolve(args.profile, args.config, args.set)
        problems, _ = validate(cfg)
        if problems:
            return fail(problems)
        if args.json:  # an unwritable path is named before the reading, not after it
            with open(args.json, "a"):
                pass
        budget = (
            None if args.full else inspection.sample_size(256 if args.sample_mb is None else args.sample_mb)
        )
        reports = inspection.inspect(cfg, budget, args.workers)
    except ConfigError as exc:
        return fail(exc.problems)
    except OSError as exc:
        return error(f"--json: {os_error(exc)}")
    except (DataFileError, ValueError) as exc:
        return error(str(exc))
    print("\n".join(inspection.render(reports, cfg)))
    if args.json:
        figures = [inspection.as_dict(r, cfg.data.seq_len) for r in reports]
        with open(args.json, "w") as out:
            out.write(json.dumps(figures, indent=2) + "\n")
    return 0
