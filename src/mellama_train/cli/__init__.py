"""Command line: `mellama-train <command>`, one module per command.

    cli/
      run.py             pretrain and tune (launch/pretrain.py, launch/tune.py): parse -> resolve -> preflight -> train
      data.py            data inspect          plan.py       plan           merge.py        merge
      prepare.py         prepare (tokenize once)
      launch.py          launch (signals, exit codes)        status.py     status, report
      export.py          export                eval_harness.py eval-harness  decontaminate.py decontaminate
      common.py          one-line failures, --debug, a rank's closing line, leaving every rank together

Every failure a user can fix is one line naming the fix (exit 2, exit_codes.py); `--debug` adds the traceback.
"""

from __future__ import annotations

import sys
from typing import Any

from mellama_train.cli.common import rank_line
from mellama_train.cli.data import data_main
from mellama_train.cli.decontaminate import decontaminate_main
from mellama_train.cli.eval_harness import eval_harness_main
from mellama_train.cli.export import export_main
from mellama_train.cli.launch import launch_main
from mellama_train.cli.merge import merge_main
from mellama_train.cli.plan import plan_main
from mellama_train.cli.prepare import prepare_main
from mellama_train.cli.run import pretrain_main, run_main, tune_main
from mellama_train.cli.status import report_main, status_main
from mellama_train.exit_codes import EXIT_CONFIG

__all__ = ["EXIT_CONFIG", "rank_line", "main", "pretrain_main", "run_main", "sys", "tune_main"]


def main(argv: list[str] | None = None) -> Any:
    """`mellama-train <command> ...`"""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "pretrain": pretrain_main,
        "tune": tune_main,
        "merge": merge_main,
        "launch": launch_main,
        "plan": plan_main,
        "status": status_main,
        "report": report_main,
        "export": export_main,
        "eval-harness": eval_harness_main,
        "decontaminate": decontaminate_main,
        "data": data_main,
        "prepare": prepare_main,
    }
    if not argv or argv[0] not in commands:
        print(
            f"usage: mellama-train {{{','.join(commands)}}} [options]  (see --help of each)", file=sys.stderr
        )
        return EXIT_CONFIG
    return commands[argv[0]](argv[1:])
