"""Our trainer against HF Trainer on the same work, side by side: steady-state tokens/s, MFU, wall, peak memory.

Both sides run under DeepSpeed's launcher with the project's ds_configs/zero3.json unchanged, the same model
(one config, random weights), the same global batch, precision, optimizer and schedule, and the same packed
sequences: this script draws them from our pipeline, rank by rank, and hands them to HF Trainer's side
(bench/peers_hf.py, the run_clm recipe) in the order each rank of ours reads them. Runs alternate in pairs, the
side that goes first alternating too (shared machines drift); threads per rank are set equal on both sides
(cores / ranks unless --threads). Each side's tokens/s comes from its own rank-0 step timestamps over steps
(--warmup, --steps]; wall is the whole launcher process; peak RSS is the largest process's (os.wait4 over the
launcher's tree); the final loss shows both did the same work.

LLaMA-Factory is an optional third side (bench/peers_llamafactory.py, its own `run_exp` with stage pt) when
its venv is there: --llamafactory-python, else $LLAMAFACTORY_PYTHON, else .venv-llamafactory/ (built by
tools/llamafactory_venv.sh; it pins older transformers and datasets than ours, so it cannot share this venv).
The three sides then take turns in each round, the first one rotating; ours / LLaMA-Factory is reported too.

    python bench/peers.py --shape tiny --pairs 5                 # CPU: 2 ranks over gloo, fp32
    python bench/peers.py --shape 25m --pairs 5
    python bench/peers.py --shape 1b --seq-len 2048 --ranks 1 --precision bf16 --pairs 2   # one GPU

Shapes: tiny = the demo's model (2 layers, hidden 64); 25m = hidden 512, 8 layers (25M in the blocks);
1b = TinyLlama-1.1B's shape (22 layers, hidden 2048, GQA 32/4, vocab 32000). Writes --out (JSON) and prints a
table: ours / HF (and ours / LLaMA-Factory) per pair, median (range). MFU = PaLM's 6N + attention FLOPs
(mellama_train.model) over the device's bf16 peak, and over --matmul-tflops when given (a rate measured in the
same call: bench/gpu_suite.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

SHAPES = {
    "tiny": [],
    "25m": [
        "model.arch.hidden_size=512",
        "model.arch.intermediate_size=1376",
        "model.arch.num_layers=8",
        "model.arch.num_heads=8",
        "model.arch.num_kv_heads=8",
    ],
    "1b": [
        "model.arch.vocab_size=32000",
        "model.arch.hidden_size=2048",
        "model.arch.intermediate_size=5632",
        "model.arch.num_layers=22",
        "model.arch.num_heads=32",
        "model.arch.num_kv_heads=4",
    ],
}


def shape_arguments(
    p: argparse.ArgumentParser, *, shape: str, steps: int, ranks: int | None, precision: str | None
) -> None:
    """The flags of the work every side trains (read by overrides() and write_inputs()), shared by peers.py,
    ab.py and rss_timeline.py so the three benchmarks mean the same thing by them."""
    p.add_argument("--shape", choices=sorted(SHAPES), default=shape)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument(
        "--ranks", type=int, default=ranks, help=f"default: {ranks or 'the GPUs here, or 2 CPU ranks'}"
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default=precision,
        help=f"default: {precision or 'bf16 on GPU, fp32 on CPU'}",
    )
    p.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument(
        "--save-every", type=int, default=0, help="ours saves at this interval (0: only at the end)"
    )
    p.add_argument("--ds", default="ds_configs/zero3.json")


def overrides(args: argparse.Namespace) -> list[str]:
    """The tiny profile, reshaped: what both sides train (ours reads them as --set, HF through spec.json)."""
    return [
        *SHAPES[args.shape],
        f"model.arch.max_position_embeddings={max(512, args.seq_len)}",
        f"model.gradient_checkpointing={str(args.grad_ckpt).lower()}",
        f"data.seq_len={args.seq_len}",
        f"train.global_batch_size={args.global_batch}",
        f"train.micro_batch_size={args.micro_batch}",
        f"train.max_steps={args.steps}",
        f"train.precision={args.precision}",
        f"train.log_every={args.log_every}",
        f"train.save_every={args.save_every or 10 * args.steps}",
        # The same math on both sides: HF's warmup starts at lr 0 where ours starts at 1/W of it, and HF's
        # DeepSpeed optimizer decays every parameter where ours spares norms and biases. Neither costs time.
        "optim.warmup_ratio=0.0",
        "optim.weight_decay=0.0",
        # No held-out evaluation: HF's side evaluates nothing either.
        *[f"data.sources.{i}.eval_paths=[]" for i in range(3)],
        "train.forgetting_source=null",
    ]


def write_inputs(args: argparse.Namespace, ranks: int, data: Path) -> dict[str, Any]:
    """Our packed sequences for every rank and step, laid out for HF's sequential sampler, its model config, and
    spec.json (what the HF side needs of our resolved config)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from mellama_train.config import resolve
    from mellama_train.data.pipeline import build_train_batches
    from mellama_train.data.tokenizer import load_tokenizer
    from mellama_train.model import count_params, flops_per_token, model_config

    cfg = resolve("tiny", None, [*overrides(args), f"train.world_size={ranks}"], task="pretrain")
    if args.global_batch % (args.micro_batch * ranks):
        sys.exit(f"--global-batch {args.global_batch} must divide into --micro-batch x {ranks} ranks")
    accum = args.global_batch // (args.micro_batch * ranks)
    tokenizer = load_tokenizer(cfg)
    streams = [build_train_batches(cfg, tokenizer, r, ranks) for r in range(ranks)]
    columns: dict[str, list] = {"input_ids": [], "position_ids": [], "labels": []}
    # accelerate hands sequential micro-batch b to rank b % ranks: step by step, accumulation step by
    # accumulation step, one micro-batch of each rank in turn.
    for _ in range(args.steps * accum):
        for stream in streams:
            batch = next(stream)
            for key, rows in columns.items():
                rows.append(batch[key].numpy().astype(np.int32))
    data.mkdir(parents=True, exist_ok=True)
    for key, rows in columns.items():
        np.save(data / f"{key}.npy", np.concatenate(rows))
    # Which sequences each rank trains, in order: micro-batch b is rank b % ranks's (HF's side is checked on it).
    ids = np.concatenate(columns["input_ids"]).astype(np.int64)
    per_rank: list[list[str]] = [[] for _ in range(ranks)]
    for b in range(len(ids) // args.micro_batch):
        rows_b = ids[b * args.micro_batch : (b + 1) * args.micro_batch]
        per_rank[b % ranks].extend(hashlib.sha1(row.tobytes()).hexdigest() for row in rows_b)
    (data / "rows.json").write_text(json.dumps(per_rank))
    config = model_config(cfg, cfg.model.arch.vocab_size)
    config.save_pretrained(data)
    with torch.device("meta"):
        n_params = count_params(AutoModelForCausalLM.from_config(config))
    spec = {
        "micro_batch_size": args.micro_batch,
        "grad_accum_steps": accum,
        "steps": args.steps,
        "lr": cfg.optim.lr,
        "min_lr_ratio": cfg.optim.min_lr_ratio,
        "warmup_steps": cfg.warmup_steps,
        "betas": list(cfg.optim.betas),
        "eps": cfg.optim.eps,
        "weight_decay": cfg.optim.weight_decay,
        "grad_clip": cfg.optim.grad_clip,
        "precision": args.precision,
        "gradient_checkpointing": args.grad_ckpt,
        "log_every": args.log_every,
        "seed": cfg.train.seed,
        "params": n_params,
        "flops_per_token": flops_per_token(config, n_params, args.seq_len),
        "tokens_per_step": args.global_batch * args.seq_len,
        "ranks": ranks,
        "ours_overrides": overrides(args),  # bench/gpu_suite.py's checkpoint check resumes our run with them
    }
    (data / "spec.json").write_text(json.dumps(spec, indent=1))
    return spec


def write_lf_inputs(args: argparse.Namespace, ranks: int, data: Path) -> None:
    """What LLaMA-Factory reads that HF's side does not: a saved dataset for tokenized_path and a pretrained
    model directory (random weights with the run's seed, our tokenizer). Written by its venv's python, so that
    its own (older) datasets and transformers write them."""
    from mellama_train.config import resolve

    cfg = resolve("tiny", None, [*overrides(args), f"train.world_size={ranks}"], task="pretrain")
    tokenizer = cfg.model.tokenizer or cfg.model.path
    cmd = [args.llamafactory_python, "bench/peers_llamafactory.py", "--prepare", "--data", str(data)]
    done = subprocess.run([*cmd, "--tokenizer", str(tokenizer)], cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"preparing LLaMA-Factory's inputs failed:\n{done.stderr[-3000:]}")


def llamafactory_python(given: str | None) -> str | None:
    """The LLaMA-Factory venv's python, or None (the side is skipped): --llamafactory-python, else
    $LLAMAFACTORY_PYTHON, else .venv-llamafactory/bin/python where it exists. An empty value turns it off."""
    path = given if given is not None else os.environ.get("LLAMAFACTORY_PYTHON")
    if path is None:
        default = REPO / ".venv-llamafactory" / "bin" / "python"
        path = str(default) if default.exists() else ""
    if path and not Path(path).exists():
        sys.exit(f"LLaMA-Factory's python {path} does not exist (tools/llamafactory_venv.sh builds one)")
    return path or None


class SideFailed(Exception):
    """A side's run left no usable results (it died before its last timed step, or wrote nothing readable).
    The round is kept in the results JSON with the reason and left out of the ratios; the benchmark goes on."""


def log_tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def launched(
    command: list[str], ranks: int, port: int, env: dict[str, str], log: Path, python: str = sys.executable
) -> dict[str, Any]:
    """One side's run under DeepSpeed's launcher (python's: the ranks run with the launcher's interpreter):
    exit status, wall seconds, peak RSS of its largest process. A non-zero exit is recorded, not raised: a
    side can die in its teardown after writing every result (HF's did, with SIGABRT, at the 25m shape), and
    whether its results are usable is for the caller to judge from them."""
    launcher = [
        python,
        "-m",
        "deepspeed.launcher.runner",
        f"--num_gpus={ranks}",
        f"--master_port={port}",
    ]
    started = time.perf_counter()
    with log.open("w") as out:
        child = subprocess.Popen(
            [*launcher, *command], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        )
        # wait4 reports the child and every descendant it waited for: ru_maxrss is the largest one's (a rank).
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    result = {"wall_s": round(wall, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}
    if child.returncode:
        result["exit_code"] = child.returncode
    return result


def judged(
    name: str, log: Path, result: dict[str, Any], read, keep_failed_exit: bool = True
) -> dict[str, Any]:
    """result updated with what read() finds in the side's own records.

    - A side that crashed (non-zero exit) without complete results: SideFailed, naming the exit status and the
      log's last lines (the round is run again).
    - A side that exited 0 without readable results: SystemExit. That is this script's bug or a flag that cannot
      work (say, --steps not a multiple of --log-every), and every round would fail the same way.
    - A non-zero exit after complete results is kept and said when keep_failed_exit (a peer that dies in its
      teardown); our own trainer's is not (a crash in its final save or export is a failure)."""
    code = result.get("exit_code", 0)
    try:
        result.update(read())
    except (OSError, ValueError, KeyError, IndexError, SideFailed) as e:
        message = f"{name}: no usable results ({e}); exit status {code}; last lines of {log}:\n" + log_tail(
            log
        )
        if not code:
            raise SystemExit(message) from None
        raise SideFailed(message) from None
    if code and not keep_failed_exit:
        raise SideFailed(f"{name} exited {code} after training; last lines of {log}:\n" + log_tail(log))
    if code:
        print(f"{name} exited {code} after writing complete results; kept (see {log})")
    return result


def fresh(path: Path) -> Path:
    """Each run starts from nothing (ours would refuse an output directory holding checkpoints)."""
    shutil.rmtree(path, ignore_errors=True)
    return path


def window_rate(times: dict[int, float], warmup: int, steps: int, tokens_per_step: int) -> float:
    if warmup not in times or steps not in times:
        raise SideFailed(
            f"no timestamp at steps {warmup} and {steps} (both must be multiples of --log-every)"
        )
    return (steps - warmup) * tokens_per_step / (times[steps] - times[warmup])


def run_ours(args, spec, ranks, port, env, work: Path) -> dict[str, Any]:
    from mellama_train.metrics import read_metric_lines

    out = fresh(work / "ours")
    cmd = ["launch/pretrain.py", "--ds", args.ds, "--output-dir", str(out), "--resume", "never"]
    for override in overrides(args):
        cmd += ["--set", override]
    log = work / "ours.log"
    result = launched(cmd, ranks, port, env, log)

    def read() -> dict[str, Any]:
        rows = [r for r in read_metric_lines(out / "metrics.jsonl") if "train/loss" in r]
        times = {r["step"]: r["time"] for r in rows}
        peaks = [r["train/gpu_peak_gib"] for r in rows if "train/gpu_peak_gib" in r]
        return {
            "tokens_per_s": window_rate(times, args.warmup, args.steps, spec["tokens_per_step"]),
            "final_loss": rows[-1]["train/loss"],
            "gpu_peak_gib": max(peaks) if peaks else None,
            "step_s": (times[args.steps] - times[args.warmup]) / (args.steps - args.warmup),
        }

    judged("ours", log, result, read, keep_failed_exit=False)
    if not args.keep_checkpoints:  # ZeRO states: 15 GB at 1B, and nothing reads them
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        shutil.rmtree(out / "final", ignore_errors=True)
    return result


def peer_result(args, spec, work: Path, out: Path, side: str, result: dict[str, Any]) -> dict[str, Any]:
    """A peer side's own record (SIDE_result.json, SIDE_rows_rankR.json) read into its run's result."""

    def read() -> dict[str, Any]:
        got = json.loads((out / f"{side}_result.json").read_text())
        times = {int(k): v for k, v in got["times"].items()}
        losses = {int(k): v for k, v in got["losses"].items()}
        want = json.loads((work / "data" / "rows.json").read_text())
        handed = [json.loads((out / f"{side}_rows_rank{r}.json").read_text()) for r in range(len(want))]
        return {
            "tokens_per_s": window_rate(times, args.warmup, args.steps, spec["tokens_per_step"]),
            "final_loss": losses[max(losses)],
            "gpu_peak_gib": got["gpu_peak_gib"],
            # A prefix: accelerate's loader may fetch one batch past the last step.
            "same_sequences": all(h[: len(w)] == w for h, w in zip(handed, want)),
            **({"versions": got["versions"]} if "versions" in got else {}),
        }

    return judged(side, work / f"{side}.log", result, read)


def run_hf(args, spec, ranks, port, env, work: Path) -> dict[str, Any]:
    out = fresh(work / "hf")
    cmd = ["bench/peers_hf.py", "--data", str(work / "data"), "--ds", args.ds, "--out", str(out)]
    return peer_result(args, spec, work, out, "hf", launched(cmd, ranks, port, env, work / "hf.log"))


def run_lf(args, spec, ranks, port, env, work: Path) -> dict[str, Any]:
    out = fresh(work / "lf")
    cmd = ["bench/peers_llamafactory.py", "--data", str(work / "data"), "--ds", args.ds, "--out", str(out)]
    # DeepSpeed's JIT-built ops (CPU Adam, shared-memory comm) go in a directory of their own: built against
    # the other venv's paths, ninja would rebuild them over ours at every turn (100 s each on 2 cores).
    ext = (
        Path(env.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions") / "llamafactory"
    )
    env = {**env, "TORCH_EXTENSIONS_DIR": str(ext)}
    result = launched(cmd, ranks, port, env, work / "lf.log", python=args.llamafactory_python)
    return peer_result(args, spec, work, out, "lf", result)


def hide_mlflow(work: Path, env: dict[str, str]) -> None:
    """Every side's `import deepspeed` imports mlflow when it is installed (DeepSpeed's autotuner: ~160 MB and
    ~0.8 s a rank here). Ours keeps it out (backends/deepspeed/load); the peers would pay it only because this
    venv has the [mlflow] extra. A stand-in that fails to import, first on every side's path, makes them equal."""
    stub = work / "hidden" / "mlflow"
    stub.mkdir(parents=True, exist_ok=True)
    (stub / "__init__.py").write_text(
        'raise ImportError("hidden by bench/peers.py: no side reports to MLflow")\n'
    )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(stub.parent), env.get("PYTHONPATH")]))


def peak_flops() -> tuple[float | None, str]:
    import torch

    from mellama_train.model import device_peak_flops

    if not torch.cuda.is_available():
        return None, "cpu"
    return device_peak_flops(torch.device("cuda", 0)), torch.cuda.get_device_name(0)


def play(
    sides: list[tuple[str, Any]],
    pairs: int,
    run: Any,
    save: Any = lambda partial: None,
    max_failed: int | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The alternating rounds: (complete rounds, each with every side's result and the ratios; failed rounds).

    Each complete round starts with the next side (with two: ours first, then HF first, ...), a port per run. A
    round in which a side crashed without results (SideFailed) is kept apart with the reason and run again in the
    same order, up to `max_failed` failed rounds (default `pairs`): the medians need `pairs` complete ones, and
    one crash (a peer's teardown, a busy machine) must not throw away the rounds before it."""
    runs: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    max_failed = pairs if max_failed is None else max_failed
    attempt = -1
    while len(runs) < pairs and len(failed) <= max_failed:
        attempt += 1
        row: dict[str, Any] = {}
        turn = len(runs) % len(sides)
        for name, side in sides[turn:] + sides[:turn]:
            port = 29700 + len(sides) * attempt + [n for n, _ in sides].index(name)
            try:
                row[name] = run(side, port)
            except SideFailed as e:
                row[name] = {"failed": str(e)}
                print(f"round {attempt + 1} {name:4s} FAILED: {e}", flush=True)
                break
            finally:
                save({"partial": True, "runs": runs, "in_progress": row, "failed_rounds": failed})
            print(
                f"round {attempt + 1} {name:4s} {row[name]['tokens_per_s']:10.1f} tokens/s  "
                f"wall {row[name]['wall_s']:6.1f} s  rss {row[name]['peak_rss_mib']:7.1f} MiB  "
                f"loss {row[name]['final_loss']:.4f}",
                flush=True,
            )
        if any("failed" in r for r in row.values()):
            failed.append({"round": attempt + 1, **row})
            save({"partial": True, "runs": runs, "failed_rounds": failed})
            continue
        row["ratio"] = row["ours"]["tokens_per_s"] / row["hf"]["tokens_per_s"]
        if "lf" in row:
            row["ratio_lf"] = row["ours"]["tokens_per_s"] / row["lf"]["tokens_per_s"]
        runs.append(row)
    return runs, failed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shape_arguments(p, shape="tiny", steps=30, ranks=None, precision=None)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the timed window")
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="OMP threads per rank (default: cores / ranks)")
    p.add_argument("--matmul-tflops", type=float, default=None, help="a measured bf16 matmul rate, for MFU")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument(
        "--keep-checkpoints", action="store_true", help="keep our last run's checkpoints and final/"
    )
    p.add_argument("--out", type=Path, default=None, help="results JSON")
    p.add_argument(
        "--max-failed-rounds",
        type=int,
        default=None,
        help="rounds a side may crash in, each run again, before the benchmark stops (default: --pairs)",
    )
    p.add_argument(
        "--llamafactory-python",
        default=None,
        help="LLaMA-Factory's venv python, the third side (default: $LLAMAFACTORY_PYTHON, else "
        ".venv-llamafactory/bin/python if it exists; '' turns it off)",
    )
    args = p.parse_args()
    if args.warmup % args.log_every or args.steps % args.log_every or not 0 <= args.warmup < args.steps:
        p.error("--warmup and --steps must be multiples of --log-every, --warmup below --steps")
    args.llamafactory_python = llamafactory_python(args.llamafactory_python)
    if not args.llamafactory_python:
        print("LLaMA-Factory side skipped (its venv: tools/llamafactory_venv.sh, or --llamafactory-python)")
    import torch

    gpus = torch.cuda.device_count()
    ranks = args.ranks or gpus or 2
    args.precision = args.precision or ("bf16" if gpus else "fp32")
    threads = args.threads or max(1, (os.cpu_count() or 1) // ranks)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mellama-peers-"))
    hide_mlflow(work, env)
    spec = write_inputs(args, ranks, work / "data")
    sides = [("ours", run_ours), ("hf", run_hf)]
    if args.llamafactory_python:
        write_lf_inputs(args, ranks, work / "data")
        sides.append(("lf", run_lf))
    peak, device = peak_flops()

    def save(partial: dict[str, Any]) -> None:  # after every run: a kill (a device call's limit) keeps them
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(partial, indent=2) + "\n")

    runs, failed = play(
        sides,
        args.pairs,
        lambda side, port: side(args, spec, ranks, port, env, work),
        save,
        args.max_failed_rounds,
    )
    if not runs:
        print(f"no complete round in {len(failed)}: every one had a side fail (failed_rounds in --out)")
        save({"partial": True, "runs": [], "failed_rounds": failed})
        return 1

    def stat(values: list[float]) -> dict[str, float]:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    summary: dict[str, Any] = {"ratio_ours_over_hf": stat([r["ratio"] for r in runs])}
    if args.llamafactory_python:
        summary["ratio_ours_over_lf"] = stat([r["ratio_lf"] for r in runs])
    for name, _ in sides:
        rate = statistics.median(r[name]["tokens_per_s"] for r in runs)
        summary[name] = {
            "tokens_per_s": rate,
            "wall_s": statistics.median(r[name]["wall_s"] for r in runs),
            "peak_rss_mib": max(r[name]["peak_rss_mib"] for r in runs),
            "final_loss": runs[-1][name]["final_loss"],
            **({"same_sequences": all(r[name]["same_sequences"] for r in runs)} if name != "ours" else {}),
            "gpu_peak_gib": runs[-1][name]["gpu_peak_gib"],
            # Per device: every rank trains tokens_per_s / ranks of them.
            "mfu": rate * spec["flops_per_token"] / (peak * ranks) if peak else None,
            "mfu_vs_matmul": rate * spec["flops_per_token"] / (args.matmul_tflops * 1e12 * ranks)
            if args.matmul_tflops
            else None,
        }
    result = {
        "command": " ".join(["python", "bench/peers.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
        "device": device,
        "ranks": ranks,
        "threads_per_rank": threads,
        # Every side inherits them; peak RSS on CPU depends on them (docs/PERFORMANCE.md, "Peak RSS at the 25M
        # shape"): a preloaded library (an allocator, or another) and glibc's malloc settings.
        "allocator": {
            k: v
            for k, v in os.environ.items()
            if k in ("LD_PRELOAD", "GLIBC_TUNABLES") or k.startswith("MALLOC_")
        },
        "shape": args.shape,
        "params": spec["params"],
        "seq_len": args.seq_len,
        "global_batch": args.global_batch,
        "micro_batch": args.micro_batch,
        "precision": args.precision,
        "steps": args.steps,
        "timed_steps": [args.warmup, args.steps],
        "summary": summary,
        "rounds": len(runs),
        "runs": runs,
        "failed_rounds": failed,
    }
    if args.llamafactory_python:
        versions = runs[-1]["lf"].get("versions")
        result["llamafactory"] = {"python": args.llamafactory_python, "versions": versions}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    r = summary["ratio_ours_over_hf"]
    print(
        f"{args.shape} seq {args.seq_len} {args.precision} x{ranks}: ours / HF Trainer tokens/s median "
        f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f}) over {len(runs)} rounds"
        f"{f' ({len(failed)} more left out: a side failed)' if failed else ''}; peak RSS ours "
        f"{summary['ours']['peak_rss_mib']:.0f} MiB, HF {summary['hf']['peak_rss_mib']:.0f} MiB"
    )
    if args.llamafactory_python:
        r, lf = summary["ratio_ours_over_lf"], summary["lf"]
        print(
            f"ours / LLaMA-Factory tokens/s median {r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f}); "
            f"peak RSS LLaMA-Factory {lf['peak_rss_mib']:.0f} MiB, final loss {lf['final_loss']:.4f} "
            f"(ours {summary['ours']['final_loss']:.4f}), same sequences: {lf['same_sequences']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
