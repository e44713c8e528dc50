"""GPU benchmark of the 8gb profile: peak memory and tokens/s of QLoRA on a Llama-3-8B-shaped model.

Needs a CUDA GPU (any size: the figure that matters is torch.cuda.max_memory_allocated, target <= 7.0 GiB).
No download: the model has random weights of Llama-3-8B's shape, written once to --workdir (16 GB of bf16
safetensors) and then loaded through the trainer's own path (NF4 on load). Training runs through the real
entry point, `launch/tune.py --profile 8gb`, on the sample instructions packed to 1024 tokens, batch 1.

    python bench/qlora_8gb.py --workdir /scratch/mellama-bench --steps 6 --out bench/results/qlora_8gb.json

Reported: peak GiB (train/gpu_peak_gib, max over steps), the planner's prediction for the same settings and
their ratio, and tokens/s (median over the steps after the first two: warm-up and allocator growth).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

RECIPE = """
model:
  tokenizer: ${{sample_data}}/tokenizer      # 2048 tokens: a subset of the model's 128k vocabulary
data:
  seq_len: 1024
  pack: true                                # every row a full 1024 tokens, as the recipe's cutoff
  sources:
    - {{name: medqa, paths: ["${{sample_data}}/instruct/medinstruct_alpaca.jsonl"]}}
train:
  max_steps: {steps}                        # each step: the profile's 16 micro-batches of 1 x 1024 tokens
  log_every: 1
  save_every: 100000
"""


def make_model(path: Path) -> None:
    if (path / "config.json").is_file():
        return
    import torch
    from transformers import AutoModelForCausalLM

    from mellama_train.config import resolve
    from mellama_train.model import model_config

    cfg = resolve("8gb", task="tune", overrides=["model.init=random"])  # its arch is Llama-3-8B's shape
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        model_config(cfg, cfg.model.arch.vocab_size), dtype=torch.bfloat16
    )
    model.save_pretrained(path, safe_serialization=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/mellama-bench"))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "qlora_8gb.json")
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("bench/qlora_8gb.py needs a CUDA GPU", file=sys.stderr)
        return 2
    base = args.workdir / "llama3-8b-random"
    make_model(base)
    recipe = args.workdir / "recipe.yaml"
    recipe.write_text(RECIPE.format(steps=args.steps))
    run_dir = args.workdir / "run"
    cmd = [sys.executable, str(REPO / "launch" / "tune.py"), "--profile", "8gb", "--base", str(base)]
    cmd += ["--config", str(recipe), "--output-dir", str(run_dir), "--resume", "never"]
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    subprocess.run(cmd, check=True, cwd=REPO)

    from mellama_train.config import resolve
    from mellama_train.metrics import read_metrics
    from mellama_train.plan import make_plan

    metrics = [v for _, v in sorted(read_metrics(run_dir / "metrics.jsonl").items()) if "train/loss" in v]
    peak = max(v["train/gpu_peak_gib"] for v in metrics)
    speeds = [v["train/tokens_per_sec"] for v in metrics[2:]] or [metrics[-1]["train/tokens_per_sec"]]
    cfg = resolve("8gb", str(recipe), [f"model.path={base}", "model.init=pretrained"], task="tune")
    predicted = make_plan(cfg).peak / 2**30
    result = {
        "device": torch.cuda.get_device_name(0),
        "model": "Llama-3-8B shape, random weights, NF4 + double quant, LoRA r16 all linear, paged AdamW 8-bit",
        "seq_len": 1024,
        "micro_batch": 1,
        "steps": len(metrics),
        "peak_gib": round(peak, 3),
        "target_gib": 7.0,
        "planned_gib": round(predicted, 3),
        "peak_over_plan": round(peak / predicted, 3),
        "tokens_per_sec_median": round(statistics.median(speeds), 1),
        "command": " ".join(["python", "bench/qlora_8gb.py", *sys.argv[1:]]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if peak <= 7.0 else 1


if __name__ == "__main__":
    sys.exit(main())
