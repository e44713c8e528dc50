"""Test-only entry point: launch/pretrain.py with a fault injected into the training loop of one rank.

    MELLAMA_FAULT='KIND:RANK:CALLS[;KIND:RANK:CALLS...]' python tests/fault_launch.py [pretrain flags]

KIND is `nan` (the loss and the per-source sums of those forward passes become NaN, as a numerical fault in the
model would make them), `spike` (they become 10 times larger, finite: a loss spike) or `sleep` (the rank stops
making progress there, as on a stuck device or a dead peer). KIND `forget` counts held-out evaluations instead
of forward passes: in those, every source's held-out loss reads 1 nat higher (as if the model had forgotten).
CALLS are 1-based indices of the training loop's forward passes, comma-separated (step s, micro-batch m of
accumulation a is call (s - 1) * a + m). With MELLAMA_FAULT_RESTART=N the fault happens only in SLURM restart N
of the job (a requeued job then runs clean). The product code has no fault hooks: this wraps its loss function.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mellama_train import train as train_module  # noqa: E402
from mellama_train.cli import pretrain_main  # noqa: E402


def _install() -> None:
    faults: dict[int, str] = {}  # this rank's forward-pass number -> fault kind
    for spec in os.environ["MELLAMA_FAULT"].split(";"):
        kind, rank, calls = spec.split(":")
        if rank == os.environ.get("RANK", "0"):
            faults.update({int(c): kind for c in calls.split(",")})
    restart = os.environ.get("MELLAMA_FAULT_RESTART")
    if not faults or (restart is not None and os.environ.get("SLURM_RESTART_COUNT", "0") != restart):
        return
    real = train_module.forward_loss
    count = 0

    def faulty(*args, **kwargs):
        nonlocal count
        count += 1
        loss_sum, sums, counts = real(*args, **kwargs)
        kind = faults.get(count)
        if kind == "sleep":
            time.sleep(3600)
        if kind in ("nan", "spike"):
            factor = 10.0 if kind == "spike" else float("nan")
            loss_sum, sums = loss_sum * factor, sums * factor
        return loss_sum, sums, counts

    train_module.forward_loss = faulty

    real_evaluate = train_module.evaluate
    evaluations = 0

    def forgetful(*args, **kwargs):
        nonlocal evaluations
        evaluations += 1
        values = real_evaluate(*args, **kwargs)
        if faults.get(evaluations) == "forget":
            values = {k: v + 1.0 if k.startswith("eval/loss/") else v for k, v in values.items()}
        return values

    train_module.evaluate = forgetful


if __name__ == "__main__":
    _install()
    sys.exit(pretrain_main())
