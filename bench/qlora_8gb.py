"""GPU benchmark of the 8gb profile: peak memory and tokens/s of QLoRA on a Llama-3-8B-shaped model.

Needs a CUDA GPU (any size: the figure that matters is torch.cuda.max_memory_allocated, target <= 7.0 GiB).
No download: the model has random weights of Llama-3-8B's shape, written once to --workdir (16 GB of bf16
safetensors) and then loaded through the trainer's own path (NF4 on load). Training runs through the real
entry point, `launch/tune.py --profile 8gb`, on the sample instructions packed to 1024 tokens, batch 1.

    python bench/qlora_8gb.py --workdir /scratch/mellama-bench --steps 6 --out bench/results/qlora_8gb.json

`--smoke` runs the same path on any device (the CPU too) with a tiny model of shapes bitsandbytes' CPU layout
accepts, seq 128 and 4 sequences a step: bench/gpu_suite.py --smoke, so the script is known to work before a GPU.

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
data:
  seq_len: {seq_len}
  pack: true                                # every row a full seq_len tokens (1024: the recipe's cutoff)
  sources:
    - {{name: medqa, paths: ["${{sample_data}}/instruct/medinstruct_alpaca.jsonl"]}}
train:
  max_steps: {steps}                        # each step: the profile's 16 micro-batches of 1 x 1024 tokens
  log_every: 1
  save_every: 100000
"""
# A tiny model for --smoke: every 4-bit layer's shape one that bitsandbytes' packed CPU layout accepts.
SMOKE = [
    "model.arch.vocab_size=2048",
    "model.arch.hidden_size=64",
    "model.arch.intermediate_size=192",
    "model.arch.num_layers=2",
    "model.arch.num_heads=4",
    "model.arch.num_kv_heads=2",
    "model.arch.max_position_embeddings=512",
]


def make_model(path: Path, arch: list[str]) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from mellama_train.config import resolve
    from mellama_train.data.tokenizer import load_tokenizer
    from mellama_train.model import model_config

    if not (path / "config.json").is_file():
        cfg = resolve("8gb", task="tune", overrides=["model.init=random", *arch])  # Llama-3-8B's shape
        torch.manual_seed(0)
        # Built on the GPU where there is one: random init of 8B parameters on the host takes minutes.
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = AutoModelForCausalLM.from_config(
                model_config(cfg, cfg.model.arch.vocab_size), dtype=torch.bfloat16
            )
        model.save_pretrained(path, safe_serialization=True)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the 16 GB stay reserved in this process while the run trains otherwise
    if not (path / "tokenizer_config.json").is_file():
        # A base directory carries its tokenizer (--base trains with it): the sample one, 2048 tokens of the
        # model's vocabulary.
        load_tokenizer(resolve("tiny", task="tune")).save_pretrained(path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/mellama-bench"))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "qlora_8gb.json")
    p.add_argument("--smoke", action="store_true", help="a tiny model on any device: tests the script itself")
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print("bench/qlora_8gb.py needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    arch = SMOKE if args.smoke else []
    seq_len = 128 if args.smoke else 1024
    base = args.workdir / ("tiny-random" if args.smoke else "llama3-8b-random")
    make_model(base, arch)
    recipe = args.workdir / "recipe.yaml"
    recipe.write_text(RECIPE.format(steps=args.steps, seq_len=seq_len))
    run_dir = args.workdir / "run"
    cmd = [sys.executable, str(REPO / "launch" / "tune.py"), "--profile", "8gb", "--base", str(base)]
    cmd += ["--config", str(recipe), "--output-dir", str(run_dir), "--resume", "never"]
    if args.smoke:
        cmd += ["--set", "train.global_batch_size=4", "--set", "train.gpu_memory_gib=0"]
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    subprocess.run(cmd, check=True, cwd=REPO)

    from mellama_train.config import resolve
    from mellama_train.metrics import read_metrics
    from mellama_train.plan import make_plan

    metrics = [v for _, v in sorted(read_metrics(run_dir / "metrics.jsonl").items()) if "train/loss" in v]
    peaks = [v["train/gpu_peak_gib"] for v in metrics if "train/gpu_peak_gib" in v]  # none on the CPU
    peak = max(peaks) if peaks else None
    speeds = [v["train/tokens_per_sec"] for v in metrics[2:]] or [metrics[-1]["train/tokens_per_sec"]]
    cfg = resolve("8gb", str(recipe), [f"model.path={base}", "model.init=pretrained"], task="tune")
    predicted = make_plan(cfg).peak / 2**30
    result = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "model": ("tiny (smoke)" if args.smoke else "Llama-3-8B shape")
        + ", random weights, NF4 + double quant, LoRA r16 all linear, paged AdamW 8-bit",
        "seq_len": seq_len,
        "micro_batch": 1,
        "steps": len(metrics),
        "peak_gib": round(peak, 3) if peak is not None else None,
        "target_gib": 7.0,
        "planned_gib": round(predicted, 3),
        "peak_over_plan": round(peak / predicted, 3) if peak is not None else None,
        "tokens_per_sec_median": round(statistics.median(speeds), 1),
        "command": " ".join(["python", "bench/qlora_8gb.py", *sys.argv[1:]]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if peak is None and not args.smoke:
        print("bench/qlora_8gb.py: the run logged no train/gpu_peak_gib", file=sys.stderr)
        return 1
    return 0 if peak is None or peak <= 7.0 else 1


if __name__ == "__main__":
    sys.exit(main())
