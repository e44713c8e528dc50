"""`mellama-train status RUN` and `mellama-train report RUN`: what a run is doing, and its HTML report."""

from __future__ import annotations

import argparse
from pathlib import Path

from mellama_train.cli.common import error, traceback_if, unreadable_run


def status_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mellama-train status",
        description="Where a run stands: newest complete checkpoint, step, mixture ledger, speed and time left,"
        " fault counters, held-out losses. Exit 0, or 1 when an alarm (mixture drift, forgetting, a damaged"
        " checkpoint) is raised.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run's output directory")
    p.add_argument(
        "--verify",
        action="store_true",
        help="also hash every file of every checkpoint against its manifest's SHA-256 (reads them all)",
    )
    p.add_argument(
        "--resumes-on",
        type=int,
        metavar="RANKS",
        help="only answer whether the run can go on with RANKS data-parallel ranks: exit 0, or 1 with the"
        " reason (what slurm/launch.sh asks when a node is lost)",
    )
    p.add_argument("--debug", action="store_true", help="print the traceback of an error too")
    args = p.parse_args(argv)

    from mellama_train.status import report, resumes_on

    if args.resumes_on is not None:
        if args.resumes_on < 1:
            return error("--resumes-on takes a number of ranks, 1 or more")
        if why := resumes_on(Path(args.run_dir), args.resumes_on):
            print(why)
            return 1
        print(f"{args.run_dir} can go on with {args.resumes_on} ranks")
        return 0

    try:
        lines, alarms = report(Path(args.run_dir), verify=args.verify)
    except Exception as exc:  # noqa: BLE001 (a run directory is read back untrusted: any failure is one line)
        traceback_if(args.debug)
        return error(unreadable_run(args.run_dir, exc))
    print("\n".join(lines))
    return 1 if alarms else 0


def report_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mellama-train report",
        description="A self-contained HTML page and PNG plots of a run (loss per source, lr, throughput,"
        " mixture against its target, skipped records), from its files; no TensorBoard server needed.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run's output directory")
    p.add_argument("--out", metavar="DIR", help="where to write (default RUN_DIR/report/)")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error too")
    args = p.parse_args(argv)

    from mellama_train.report import write_report

    try:
        page, summary = write_report(Path(args.run_dir), Path(args.out) if args.out else None)
    except Exception as exc:  # noqa: BLE001 (a run directory is read back untrusted: any failure is one line)
        traceback_if(args.debug)
        return error(unreadable_run(args.run_dir, exc))
    print("\n".join(summary))
    print(f"\nreport: {page}")
    return 0
