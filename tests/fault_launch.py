"""Test-only entry point: launch/pretrain.py with a fault injected into the training loop of one rank.

    MELLAMA_FAULT='KIND:RANK:CALLS[;KIND:RANK:CALLS...]' python tests/fault_launch.py [pretrain flags]
    MELLAMA_FAULT='hang_merge:0:1' python tests/fault_launch.py merge [merge flags]   (any mellama-train command)

KIND is `nan` (the loss and the per-source sums of those forward passes become NaN, as a numerical fault in the
model would make them), `spike` (they become 10 times larger, finite: a loss spike) or `sleep` (the rank stops
making progress there, as on a stuck device or a dead peer). KIND `forget` counts held-out evaluations instead
of forward passes: in those, every source's held-out loss reads 1 nat higher (as if the model had forgotten).
CALLS are 1-based indices of the training loop's forward passes, comma-separated (step s, micro-batch m of
accumulation a is call (s - 1) * a + m). With MELLAMA_FAULT_RESTART=N the fault happens only in SLURM restart N
of the job (a requeued job then runs clean). The product code has no fault hooks: this wraps the backends' loss method.

Planted hangs, one per phase the watchdog covers outside the loop (the rank sleeps there, as on a hung filesystem
or a peer that never comes; CALLS is 1): `hang_load` in the model's construction, `hang_eval` in held-out
evaluation number CALLS (1 = the step-0 evaluation), `hang_export` in writing final/, `hang_merge` in loading the
base of a merge. A rendezvous that never completes needs no plant: start one rank of a world of two.
"""

from __future__ import annotations

import functools
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
    from mellama_train.backends.deepspeed.engine import DeepSpeedBackend
    from mellama_train.backends.single import SingleDeviceBackend

    count = 0

    def faulty(backend, real, *args, **kwargs):
        nonlocal count
        loss_sum, sums, counts = real(backend, *args, **kwargs)
        if not backend.module.training:  # held-out evaluation: not a training forward pass
            return loss_sum, sums, counts
        count += 1
        kind = faults.get(count)
        if kind == "sleep":
            time.sleep(3600)
        if kind in ("nan", "spike"):
            factor = 10.0 if kind == "spike" else float("nan")
            loss_sum, sums = loss_sum * factor, sums * factor
        return loss_sum, sums, counts

    for cls in (DeepSpeedBackend, SingleDeviceBackend):
        cls.forward_loss = functools.partialmethod(faulty, cls.forward_loss)

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
    _plant_hangs(faults)


def planted_hang(*args, **kwargs):
    time.sleep(3600)  # the watchdog's dump names this function


def _plant_hangs(faults: dict[int, str]) -> None:
    from mellama_train.export import final as export

    kinds = set(faults.values())
    if "hang_load" in kinds:
        train_module.build_model = planted_hang
    if "hang_export" in kinds:
        export.write_hf_model = planted_hang
    if "hang_merge" in kinds:
        import transformers

        transformers.AutoModelForCausalLM.from_pretrained = planted_hang
    if "hang_eval" in kinds:
        real_evaluate, evaluations = train_module.evaluate, 0

        def hanging(*args, **kwargs):
            nonlocal evaluations
            evaluations += 1
            if faults.get(evaluations) == "hang_eval":
                planted_hang()
            return real_evaluate(*args, **kwargs)

        train_module.evaluate = hanging


if __name__ == "__main__":
    _install()
    if sys.argv[1:2] and not sys.argv[1].startswith("-"):  # a mellama-train command: merge, export, tune...
        from mellama_train.cli import main

        sys.exit(main(sys.argv[1:]))
    sys.exit(pretrain_main())
