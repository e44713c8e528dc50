"""Trainer overhead on CPU: our `launch/pretrain.py` against a bare DeepSpeed loop, same model, batches and ZeRO-3.

Both sides run 2 ranks over gloo under DeepSpeed's launcher, alternating A B A B ... (this machine is shared and
noisy), and report steps/s over the same window of steps (after --warmup steps; start-up, the end-of-run save
and the export are outside it). The bare side is what a user would write without this project:
`deepspeed.initialize` on the same LLaMA (built from the same config under the same ZeRO-3 JSON, which the
trainer resolves and this script hands to both) and `forward -> backward -> step` over pre-built batches, so
everything the trainer adds (its data pipeline, loss accounting, guard, metrics every --log-every steps,
watchdog, and the step-0 evaluation's effect on ZeRO-3's parameter prefetching) counts against it.

    python bench/trainer_overhead.py --pairs 7 --steps 60 --warmup 10 [--log-every 1]

Prints one line per run, then the median ratio ours / bare with its range. Goal (issue 7): >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The tiny profile's model at a size where a step is mostly compute, not launch overhead.
SHAPE = ["data.seq_len=256", "train.global_batch_size=8", "train.micro_batch_size=2", "train.eval_every=0"]


def launcher(port: int) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port)]


def clean_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def ours(work: Path, steps: int, warmup: int, log_every: int) -> float:
    out = work / "ours"
    cmd = [*launcher(29811), "launch/pretrain.py", "--ds", "ds_configs/zero3.json", "--output-dir", str(out)]
    cmd += ["--max-steps", str(steps), "--save-every", str(10 * steps)]
    # The 13b/70b profiles' logging cadence (the tiny profile logs every step): steps --warmup and --steps are
    # both logged, so the window is timed from metrics.jsonl. --log-every 1 measures the every-step cost.
    for override in [*SHAPE, f"train.log_every={log_every}"]:
        cmd += ["--set", override]
    _run(cmd)
    times = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            times[row["step"]] = row["time"]
    return (steps - warmup) / (times[steps] - times[warmup])


def bare(work: Path, steps: int, warmup: int) -> float:
    work.mkdir(parents=True, exist_ok=True)
    result = work / "bare.json"
    cmd = [
        *launcher(29812),
        __file__,
        "--bare-worker",
        str(result),
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
    ]
    _run(cmd)
    return json.loads(result.read_text())["steps_per_s"]


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"exit {proc.returncode}: {' '.join(cmd[3:7])}\n{proc.stderr[-3000:]}")


def bare_worker(result: Path, steps: int, warmup: int) -> None:
    """Runs on each rank under the launcher: the loop a user would write with DeepSpeed alone."""
    sys.path.insert(0, str(REPO / "src"))
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from mellama_train.config import resolve
    from mellama_train.data.pipeline import build_train_batches
    from mellama_train.ds_config import resolve_ds_config
    from mellama_train.model import load_tokenizer, model_config, param_groups

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    cfg = resolve("tiny", overrides=SHAPE)
    cfg.train.world_size = world
    ds_config = resolve_ds_config("ds_configs/zero3.json", cfg)
    ds_config.setdefault("optimizer", {}).setdefault("params", {})["torch_adam"] = (
        True  # as the trainer on CPU
    )
    tokenizer = load_tokenizer(cfg)
    data = build_train_batches(cfg, tokenizer, rank, world)
    accum = cfg.grad_accum_steps
    batches = [next(data) for _ in range(steps * accum)]  # built before the clock starts: no data cost here
    keep = HfDeepSpeedConfig(ds_config)  # noqa: F841 - ZeRO-3 construction, as transformers documents it
    model = AutoModelForCausalLM.from_config(model_config(cfg, len(tokenizer)))
    # The trainer's checkpointing: non-reentrant (transformers' recommended kind, and the one ZeRO-3's hooks need).
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    # The recipe's AdamW decays matrices only (as the HF Trainer and Megatron do): the same two parameter groups,
    # so the optimizer and ZeRO-3's partitions are the trainer's, and only what the trainer adds is compared.
    groups = param_groups(model, cfg.optim.weight_decay)
    eng, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    stamps = []
    for step in range(steps):
        for micro in range(accum):
            b = batches[step * accum + micro]
            out = eng(input_ids=b["input_ids"], position_ids=b["position_ids"], labels=b["labels"])
            eng.backward(out.loss)
            eng.step()
        float(out.loss)  # the host reads the loss once a step, as any loop that logs it does
        stamps.append(time.perf_counter())
    if rank == 0:
        rate = (steps - warmup) / (stamps[steps - 1] - stamps[warmup - 1])
        result.write_text(json.dumps({"steps_per_s": rate}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--log-every", type=int, default=10, help="ours: train.log_every (a divisor of both)")
    p.add_argument("--bare-worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.steps % args.log_every or args.warmup % args.log_every:
        p.error("--log-every must divide --steps and --warmup (the window is timed from logged steps)")
    if args.bare_worker:
        bare_worker(args.bare_worker, args.steps, args.warmup)
        return
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(args.pairs):
            a = ours(Path(tmp) / f"a{pair}", args.steps, args.warmup, args.log_every)
            b = bare(Path(tmp) / f"b{pair}", args.steps, args.warmup)
            ratios.append(a / b)
            print(
                f"pair {pair + 1}: ours {a:.3f} steps/s, bare {b:.3f} steps/s, ratio {a / b:.3f}", flush=True
            )
    print()
    print("| pairs | median ours / bare | min | max |")
    print("| --- | --- | --- | --- |")
    print(f"| {len(ratios)} | {statistics.median(ratios):.3f} | {min(ratios):.3f} | {max(ratios):.3f} |")


if __name__ == "__main__":
    main()
