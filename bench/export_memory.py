"""Host memory of `mellama-train export` against the bound its design states (src/mellama_train/hf_export.py).

CPU only. Trains one step of a LLaMA of the given shape with the real entry point (launch/pretrain.py, ZeRO-3,
one rank, the tiny profile's data), which writes a ZeRO checkpoint, then exports it twice, as bf16 with a small
shard size and as bf16 with one big shard, and prints, per export: parameters, model size in fp32, shard size,
the stated bound (shard + largest tensor in fp32), the measured peak anonymous memory during conversion, and
the process's peak RSS (which also counts the mapped optimizer pages and the probe check's model load).

    python bench/export_memory.py --workdir /tmp/mellama-export-bench              # ~560M parameters
    python bench/export_memory.py --workdir /tmp/x --hidden 256 --layers 4 --intermediate 688   # a quick one

Training needs ~20 bytes per parameter of host RAM (weights, gradients, fp32 Adam states under ZeRO-3), so the
default shape is about the largest a 24 GiB machine trains; the export itself needs far less (the table).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3


def train_one_step(work: Path, hidden: int, layers: int, intermediate: int, vocab: int) -> Path:
    run = work / "run"
    if (run / "checkpoints").is_dir() and any((run / "checkpoints").glob("step_*/COMPLETE")):
        return run
    heads = max(hidden // 128, 1)
    overrides = [
        f"model.arch.hidden_size={hidden}",
        f"model.arch.num_layers={layers}",
        f"model.arch.intermediate_size={intermediate}",
        f"model.arch.num_heads={heads}",
        f"model.arch.num_kv_heads={heads}",
        f"model.arch.vocab_size={vocab}",
        "model.gradient_checkpointing=true",
        "train.global_batch_size=1",
        "train.micro_batch_size=1",
        "data.seq_len=64",
        "train.eval_every=0",
    ]
    env = dict(
        os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29641"
    )
    cmd = [
        sys.executable,
        "launch/pretrain.py",
        "--max-steps",
        "1",
        "--save-every",
        "1",
        "--output-dir",
        str(run),
    ]
    for o in overrides:
        cmd += ["--set", o]
    print("training one step:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    return run


def export(run: Path, out: Path, shard: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)
    cmd = [sys.executable, "-m", "mellama_train", "export", str(run), str(out), "--max-shard-size", shard]
    print("exporting:", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "export.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--hidden", type=int, default=1280)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--intermediate", type=int, default=3456)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shards", default="200MB,5GB", help="comma-separated --max-shard-size values")
    p.add_argument("--keep", action="store_true", help="keep the run and the exports")
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    run = train_one_step(args.workdir, args.hidden, args.layers, args.intermediate, args.vocab)
    rows = []
    for i, shard in enumerate(args.shards.split(",")):
        r = export(run, args.workdir / f"export-{i}", shard)
        rows.append((shard, r))
        if not args.keep:
            shutil.rmtree(args.workdir / f"export-{i}")
    if not args.keep:
        shutil.rmtree(run)
    print()
    print(
        "| parameters | fp32 model GiB | max shard | shards | bound GiB | peak anon GiB | peak RSS GiB"
        " | probe mean diff / tolerance | s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for shard, r in rows:
        probe = r["probe"]
        print(
            f"| {r['parameters'] / 1e6:.0f}M | {4 * r['parameters'] / GIB:.2f} | {shard} | {r['shards']} |"
            f" {r['memory_bound_bytes'] / GIB:.2f} | {r['peak_anon_bytes'] / GIB:.2f} |"
            f" {r['peak_rss_bytes'] / GIB:.2f} | {probe['mean_diff_over_std']:.3%} /"
            f" {probe['tolerance_mean_over_std']:.2%} | {r['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
