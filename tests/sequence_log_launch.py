"""Test-only entry point: launch/pretrain.py that also logs which global sequences each rank trained on.

    MELLAMA_SEQUENCE_LOG=DIR deepspeed --num_gpus N tests/sequence_log_launch.py [pretrain flags]

Every rank appends one line per micro-batch to DIR/rank_<r>.jsonl: {"rows": [global sequence ids]} (the
prepared path's ids, data/ordered.py), when the loop takes it to train. The product code has no logging hook:
this wraps the batch iterator and the loop's feed.
Under SLURM the file is DIR/rank_<r>.restart_<n>.step_<s>.jsonl: one per job step of each start of the job.
MELLAMA_BATCH_PAUSE=S sleeps S seconds after each micro-batch taken, so a test can act on a run that is still
training. With MELLAMA_FORCE_UNIVERSAL=1 a resume goes through DeepSpeed's universal checkpoint even on the
world size that wrote it (to show the conversion itself changes nothing).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mellama_train import feed  # noqa: E402
from mellama_train.cli import pretrain_main  # noqa: E402
from mellama_train.data import ordered  # noqa: E402


def _install(log_dir: Path) -> None:
    init, step = ordered.OrderedBatches.__init__, ordered.OrderedBatches.__next__
    take = feed.StepFeed.take
    log_dir.mkdir(parents=True, exist_ok=True)
    # Under SLURM, each job step of each start of the job logs to its own files.
    restart = ""
    if "SLURM_STEP_ID" in os.environ:
        restart = f".restart_{os.environ.get('SLURM_RESTART_COUNT', '0')}.step_{os.environ['SLURM_STEP_ID']}"
    pause = float(os.environ.get("MELLAMA_BATCH_PAUSE", "0"))
    made: list[object] = []
    drawn: dict[int, list[int]] = {}  # id(batch) -> its rows, from the draw until the loop takes it

    def counted(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    def remembered(self):
        batch = step(self)
        if self is made[0]:  # the training stream, not the final export's probe (built later)
            drawn[id(batch)] = self.last_rows
        return batch

    def logged(self):
        # Logged when the loop takes a step's batches to train (feed.py draws them a step earlier: a run
        # stopped in between never trained the ones it drew ahead).
        batches = take(self)
        for batch in batches:
            if (rows := drawn.pop(id(batch), None)) is None:
                continue
            with open(log_dir / f"rank_{os.environ.get('RANK', '0')}{restart}.jsonl", "a") as fh:
                fh.write(json.dumps({"rows": rows}) + "\n")
            if pause:
                time.sleep(pause)
        return batches

    ordered.OrderedBatches.__init__ = counted
    ordered.OrderedBatches.__next__ = remembered
    feed.StepFeed.take = logged


def _force_universal() -> None:
    from mellama_train.backends.deepspeed import engine

    load = engine.DeepSpeedBackend.load
    engine.DeepSpeedBackend.load = lambda self, directory, tag, reshape=False: load(
        self, directory, tag, True
    )


if __name__ == "__main__":
    _install(Path(os.environ["MELLAMA_SEQUENCE_LOG"]))
    if os.environ.get("MELLAMA_FORCE_UNIVERSAL"):
        _force_universal()
    sys.exit(pretrain_main())
