"""What a change gave: our trainer at two revisions on the same work, alternating, on this machine.

    git worktree add /tmp/before <revision>
    python bench/ab.py --before /tmp/before --pairs 5 [--shape tiny|25m] [--steps 30 --warmup 5]

Both sides run `launch/pretrain.py` of their own checkout (each inserts its own src/ first) in this venv, under
DeepSpeed's launcher with the same ranks, threads per rank, ZeRO JSON and recipe (bench/peers.py's shapes and
overrides), the side that goes first alternating. Each side's tokens/s comes from its metrics.jsonl timestamps
over steps (--warmup, --steps]; wall and peak RSS (the largest process: a rank) as bench/peers.py measures them.
Prints one line per pair and the median after / before with its range; --out writes the runs as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import (  # noqa: E402
    REPO,
    SideFailed,
    fresh,
    hide_mlflow,
    judged,
    launched,
    overrides,
    shape_arguments,
    window_rate,
)


def run(
    checkout: Path, args: argparse.Namespace, port: int, env: dict[str, str], out: Path
) -> dict[str, Any]:
    cmd = [str(checkout / "launch" / "pretrain.py"), "--ds", args.ds, "--output-dir", str(fresh(out))]
    cmd += ["--resume", "never", *[a for o in overrides(args) for a in ("--set", o)]]
    log = out.with_suffix(".log")
    result = launched(cmd, args.ranks, port, env, log)

    def read() -> dict[str, Any]:
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        times = {r["step"]: r["time"] for r in rows if "train/loss" in r}
        tokens_per_step = args.global_batch * args.seq_len
        return {
            "tokens_per_s": window_rate(times, args.warmup, args.steps, tokens_per_step),
            "final_loss": [r["train/loss"] for r in rows if "train/loss" in r][-1],
        }

    try:
        return judged(checkout.name, log, result, read)
    except SideFailed as e:
        raise SystemExit(str(e)) from None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", type=Path, required=True, help="the other checkout (git worktree add)")
    p.add_argument("--after", type=Path, default=REPO, help="default: this checkout")
    shape_arguments(p, shape="tiny", steps=30, ranks=2, precision="fp32")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    threads = max(1, (os.cpu_count() or 1) // args.ranks)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    work = Path(tempfile.mkdtemp(prefix="mellama-ab-"))
    hide_mlflow(work, env)  # the revision before load() would pay for DeepSpeed's import of it
    sides = [("before", args.before.resolve()), ("after", args.after.resolve())]
    pairs = []
    for pair in range(args.pairs):
        row = {}
        for i, (name, checkout) in enumerate(sides if pair % 2 == 0 else sides[::-1]):
            row[name] = run(checkout, args, 29800 + 2 * pair + i, env, work / f"{name}{pair}")
        row["ratio"] = row["after"]["tokens_per_s"] / row["before"]["tokens_per_s"]
        pairs.append(row)
        print(
            f"pair {pair}: before {row['before']['tokens_per_s']:.0f} tok/s, after {row['after']['tokens_per_s']:.0f}"
            f" -> {row['ratio']:.3f}; peak RSS {row['before']['peak_rss_mib']:.0f} / {row['after']['peak_rss_mib']:.0f}"
            f" MiB; final loss {row['before']['final_loss']:.6f} / {row['after']['final_loss']:.6f}",
            flush=True,
        )
        if args.out:
            args.out.write_text(
                json.dumps({"args": vars(args) | {"before": str(args.before)}, "pairs": pairs}, default=str)
            )
    ratios = [r["ratio"] for r in pairs]
    print(
        f"after / before tokens/s: median {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}),"
        f" {len(ratios)} pairs, {args.shape}, {args.ranks} ranks x {threads} threads"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
