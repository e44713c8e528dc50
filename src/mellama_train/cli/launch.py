"""`mellama-train launch LAUNCHER ...`: run a launcher (deepspeed, torchrun) so that a stop signal reaches every
rank and its exit code survives (preemption.supervise).
"""

from __future__ import annotations

import argparse

from mellama_train.cli.common import error


def launch_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mellama-train launch",
        description="Run a launcher so that a stop reaches every rank: SIGTERM, SIGINT (Ctrl-C), SIGUSR2 or"
        " SIGHUP sent to this process goes to each rank directly, which saves a checkpoint at its next step"
        " and exits 75; a second SIGTERM/SIGINT ends every process at once. Exits with the ranks' own code"
        " (75, 76, ...), which DeepSpeed's per-node launcher and torchrun would turn into 1. DeepSpeed and"
        " torchrun still start and place the ranks.",
        usage="mellama-train launch LAUNCHER [ARGS...]   e.g. mellama-train launch deepspeed --num_gpus 8"
        " launch/pretrain.py --ds ds_configs/zero3.json ...",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, help="the launcher command line, as you would run it")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    from mellama_train.preemption import supervise

    try:
        return supervise(command)
    except ValueError as exc:
        return error(str(exc))
