"""Test-only entry point: launch/pretrain.py that also counts ZeRO-3's parameter all-gathers per training step.

    MELLAMA_GATHER_LOG=out.json deepspeed --num_gpus 2 tests/zero3_gather_launch.py [pretrain flags]

Rank 0 writes {"per_step": [all-gathers of each training step this process ran, in order], "ours_per_step":
[[the loop's own collectives from each step's start to the next's]]}. With
MELLAMA_KEEP_EVAL_TRACE=1 the engine keeps a parameter trace that an evaluation pass recorded (DeepSpeed's own
behaviour), to see what `DeepSpeedBackend._forget_forward_only_trace` prevents. The product code has no counting hooks:
this wraps torch.distributed's all-gather, the package's collectives and the loop's step function.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mellama_train import train as train_module  # noqa: E402
from mellama_train.backends import collectives  # noqa: E402
from mellama_train.backends.deepspeed import engine as engine_module  # noqa: E402
from mellama_train.cli import pretrain_main  # noqa: E402

PER_STEP: list[int] = []
OURS: list[list[str]] = []
IN_STEP = [False]


def _counted(function, name: str):
    def counting(*args, **kwargs):
        if OURS:
            OURS[-1].append(name)
        return function(*args, **kwargs)

    return counting


def _install() -> None:
    all_gather = dist.all_gather_into_tensor  # what DeepSpeed's comm layer calls for every ZeRO-3 gather

    def counting_all_gather(*args, **kwargs):
        if IN_STEP[0]:
            PER_STEP[-1] += 1
        return all_gather(*args, **kwargs)

    dist.all_gather_into_tensor = counting_all_gather
    step = train_module.train_step

    # The loop's own collectives all go through backends/collectives.py (tests/test_architecture.py): each
    # call from one step's start to the next step's start (its logging, evaluation and saving included).
    for name in ("all_reduce_sum", "all_reduce_min", "all_reduce_max", "gather_objects", "broadcast_object"):
        setattr(collectives, name, _counted(getattr(collectives, name), name))
    collectives.barrier = _counted(collectives.barrier, "barrier")

    def counting_step(*args, **kwargs):
        PER_STEP.append(0)
        OURS.append([])
        IN_STEP[0] = True
        try:
            return step(*args, **kwargs)
        finally:
            IN_STEP[0] = False
            if os.environ.get("RANK", "0") == "0":
                log = {"per_step": PER_STEP, "ours_per_step": OURS}
                Path(os.environ["MELLAMA_GATHER_LOG"]).write_text(json.dumps(log))

    train_module.train_step = counting_step
    if os.environ.get("MELLAMA_KEEP_EVAL_TRACE"):
        engine_module.DeepSpeedBackend._forget_forward_only_trace = lambda self: None


if __name__ == "__main__":
    _install()
    sys.exit(pretrain_main())
