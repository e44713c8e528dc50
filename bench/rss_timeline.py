"""Where our peak RSS comes from: each rank's resident memory over one run, split into its phases.

    python bench/rss_timeline.py --shape 25m [--steps 20] [--checkout PATH] [--side hf]

Runs `launch/pretrain.py` (of --checkout, default this one), or with --side hf bench/peers_hf.py (HF Trainer on
the same sequences), under DeepSpeed's launcher like bench/peers.py (the same shapes, overrides, threads, and
mlflow hidden), samples every rank's RSS every 50 ms (psutil over the launcher's process tree), and prints each
rank's peak in three phases read from the side's own step timestamps: start-up (before step 1 is logged),
training (steps 1 to the last), and the end (ours: the final checkpoint, final/ and exit), with a rough tokens/s
over the steps after the first. bench/peers.py reports only the whole run's peak (and measures the rate properly).
An allocator preloaded for the command (LD_PRELOAD) reaches every rank through the launcher's environment.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import REPO, fresh, hide_mlflow, overrides, shape_arguments, write_inputs  # noqa: E402


def sample(root_pid: int, samples: list[tuple[float, int, int]], done: threading.Event) -> None:
    """(time, pid, rss bytes) of every python process under the launcher, every 50 ms."""
    import psutil

    root = psutil.Process(root_pid)
    while not done.is_set():
        try:
            procs = root.children(recursive=True)
        except psutil.Error:
            break
        now = time.time()
        for proc in procs:
            try:
                if "python" in proc.name():
                    samples.append((now, proc.pid, proc.memory_info().rss))
            except psutil.Error:
                pass
        time.sleep(0.05)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkout", type=Path, default=REPO)
    shape_arguments(p, shape="25m", steps=20, ranks=2, precision="fp32")
    p.add_argument("--side", choices=["ours", "hf"], default="ours")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mellama-rss-"))
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.ranks)),
    }
    hide_mlflow(work, env)
    out = fresh(work / "run")
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        f"--num_gpus={args.ranks}",
        "--master_port=29870",
    ]
    if args.side == "hf":
        write_inputs(args, args.ranks, work / "data")
        cmd += ["bench/peers_hf.py", "--data", str(work / "data"), "--ds", args.ds, "--out", str(out)]
    else:
        cmd += [str(args.checkout / "launch" / "pretrain.py"), "--ds", args.ds, "--output-dir", str(out)]
        cmd += ["--resume", "never", *[a for o in overrides(args) for a in ("--set", o)]]
    samples: list[tuple[float, int, int]] = []
    done = threading.Event()
    with open(work / "run.log", "w") as log:
        child = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        watcher = threading.Thread(target=sample, args=(child.pid, samples, done), daemon=True)
        watcher.start()
        child.wait()
        done.set()
        watcher.join()
    if child.returncode:
        print((work / "run.log").read_text()[-3000:])
        return child.returncode
    if args.side == "hf":
        steps = {int(k): t for k, t in json.loads((out / "hf_result.json").read_text())["times"].items()}
    else:
        steps = {
            r["step"]: r["time"]
            for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "train/loss" in r
        }
    first, last = steps[min(steps)], steps[max(steps)]
    # Every step after the first: a rough rate beside the memory (bench/peers.py measures it properly).
    rate = (
        (max(steps) - min(steps)) * args.global_batch * args.seq_len / (last - first) if last > first else 0.0
    )
    by_pid: dict[int, list[tuple[float, int]]] = {}
    for t, pid, rss in samples:
        by_pid.setdefault(pid, []).append((t, rss))
    ranks = sorted(by_pid.items(), key=lambda kv: -max(r for _, r in kv[1]))[: args.ranks]
    print(
        f"{args.side}, {args.shape}, {args.ranks} ranks, {args.steps} steps: peak RSS MiB by phase"
        f" (start-up | training | end); {rate:.0f} tokens/s after step {min(steps)}"
    )
    for pid, series in ranks:
        phases = [
            max((r for t, r in series if t < first), default=0),
            max((r for t, r in series if first <= t <= last), default=0),
            max((r for t, r in series if t > last), default=0),
        ]
        print(f"  pid {pid}: " + " | ".join(f"{v / 2**20:7.0f}" for v in phases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
