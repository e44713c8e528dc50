"""Every GPU check of this project in one command, for the few minutes a lent GPU machine gives.

    python3 bench/gpu_suite.py --out DIR            # on the GPU machine (about 8 minutes on one H100/H200)
    python bench/gpu_suite.py --smoke --out DIR     # on a CPU: tiny shapes, a few steps (tests/test_gpu_suite.py)

Runs the checks below in order, each as its own process with its own time cap (a hang or a CUDA error ends that
check, not the suite), and skips a check whose cap no longer fits in --budget. Writes DIR/results.json (every
check's status, seconds and figures; the environment) and DIR/suite.log (every check's output, in order): two
files, well inside what the device tool brings back.

Checks:
  install      deepspeed, bitsandbytes and datasets from wheelhouse/ (tools/gpu_wheels.sh) when missing
  env          versions, device, driver
  matmul       bf16 matrix-product rate and device-memory copy bandwidth, measured: the ceilings MFU is read against
  kernels      tests/test_gpu.py's packed-document tests (SDPA, eager, FlashAttention-2 where installed)
  peers_2048   bench/peers.py: ours against HF Trainer, ~1B LLaMA (TinyLlama's shape), seq 2048, ZeRO-3 bf16
  checkpoint   the blocking save and the export of that run (from its metrics), a resume's load, and their share
               of wall time at the 13b/70b profiles' save interval (500 steps)
  qlora_8gb    bench/qlora_8gb.py: the 8gb profile on Llama-3-8B's shape, peak memory against 7.0 GiB and the plan
  peers_4096   the same comparison at seq 4096
  zero3        tests/test_gpu.py's DeepSpeed tests: bf16 against fp32 losses, a ZeRO-3 save and resume

In --smoke mode every check runs on the CPU with the tiny model, except peers_4096 (one sequence length proves
the script) and zero3 (its two tests run on the CPU by hand: MELLAMA_GPU_TESTS_ON_CPU=1 pytest -m gpu
tests/test_gpu.py); the figures mean nothing, the statuses do.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PROFILE_SAVE_EVERY = 500  # the 13b and 70b profiles' train.save_every
MIN_SLICE_S = 60  # a check starts only with this much budget left (or its whole cap, if smaller)
NEEDED = ("deepspeed", "bitsandbytes", "datasets")


@dataclass
class Ctx:
    smoke: bool
    work: Path
    log: Path
    env: dict[str, str]
    results: dict[str, Any] = field(default_factory=dict)  # each finished check's figures, by name


@dataclass
class Check:
    name: str
    cap_s: int  # on a GPU; --smoke uses smoke_cap_s
    smoke_cap_s: int
    run: Callable[[Ctx, int], dict[str, Any]]  # returns the check's figures; raises on failure


class CheckFailed(Exception):
    pass


def call(ctx: Ctx, command: list[str], cap: int, env: dict[str, str] | None = None) -> None:
    """One command, its output appended to the suite's log, killed with its whole process group at `cap`."""
    with ctx.log.open("a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        proc = subprocess.Popen(
            command,
            cwd=REPO,
            env=env or ctx.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=cap)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise TimeoutError(f"still running after {cap} s") from None
    if code:
        raise CheckFailed(f"{command[1] if len(command) > 1 else command[0]} exited {code} (see suite.log)")


def py(ctx: Ctx, args: list[str], cap: int, env: dict[str, str] | None = None) -> None:
    call(ctx, [sys.executable, *args], cap, env)


def inline(ctx: Ctx, name: str, cap: int) -> dict[str, Any]:
    """A check written in this file, in a child process of its own (a CUDA hang stays capped)."""
    out = ctx.work / f"{name}.json"
    py(ctx, [__file__, "--inline", name, "--inline-out", str(out), *(["--smoke"] if ctx.smoke else [])], cap)
    return json.loads(out.read_text())


# --- the checks -----------------------------------------------------------------------------------------------


def install(ctx: Ctx, cap: int) -> dict[str, Any]:
    # src/ on the path whatever happens below: the checks import mellama_train without relying on an install
    # (a rerun after the --no-deps fallback, or an image whose setuptools cannot build the project).
    ctx.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), ctx.env.get("PYTHONPATH")]))
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if not missing:
        return {"installed": [], "how": "nothing missing"}
    wheels = REPO / "wheelhouse"
    if not wheels.is_dir():
        raise CheckFailed(
            f"missing {', '.join(missing)} and no wheelhouse/: build it with tools/gpu_wheels.sh"
        )
    pip = ["-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels), "--no-build-isolation"]
    try:  # the documented way (docs/PERFORMANCE.md): the project itself, its dependencies from the wheelhouse
        py(ctx, [*pip, "-e", str(REPO)], cap // 2)
        return {"installed": missing, "how": "pip install -e . from wheelhouse/"}
    except (CheckFailed, TimeoutError):
        # An older setuptools in the image cannot build the project: the wheels alone (src/ is on the path).
        py(ctx, [*pip, "--no-deps", *map(str, sorted(wheels.glob("*.whl")))], cap // 2)
        return {"installed": missing, "how": "the wheels with --no-deps; src/ on PYTHONPATH"}


def env_figures(smoke: bool) -> dict[str, Any]:
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "deepspeed", "peft", "bitsandbytes", "datasets", "accelerate", "flash_attn"):
        try:
            versions[name] = __import__(name).__version__
        except Exception as exc:  # not installed, or its import failed: say which
            versions[name] = f"unavailable ({type(exc).__name__})"
    got: dict[str, Any] = {"versions": versions, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        got.update(
            device=props.name,
            memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            capability=".".join(map(str, torch.cuda.get_device_capability(0))),
        )
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
        got["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    else:
        got.update(device="cpu", cores=os.cpu_count())
    return got


def matmul_figures(smoke: bool) -> dict[str, Any]:
    """bf16 n x n products (median of timed repeats, fresh random inputs, never zeros) and a device-to-device
    copy (bytes read + written): the two ceilings the throughput figures are read against."""
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    n, repeats, copy_bytes = (512, 5, 2**24) if smoke or not cuda else (8192, 30, 2**31)
    dtype = torch.bfloat16 if cuda else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    reference = (a.double() @ b.double()) if not cuda else (a[:256].double() @ b.double())
    got = a @ b
    error = (got[: len(reference)].double() - reference).norm() / reference.norm()
    if not torch.isfinite(error) or error > 2e-2:
        raise CheckFailed(f"matmul error {error:.2e} against float64")

    def timed(fn: Callable[[], Any]) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(repeats):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    seconds = timed(lambda: torch.mm(a, b, out=got))
    src = torch.randn(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src))
    return {
        "n": n,
        "dtype": str(dtype).replace("torch.", ""),
        "tflops": round(2 * n**3 / seconds / 1e12, 2),
        "copy_gb_per_s": round(2 * copy_bytes / copy_s / 1e9, 1),
        "error_vs_fp64": float(error),
    }


INLINE = {"env": env_figures, "matmul": matmul_figures}


def env_check(ctx: Ctx, cap: int) -> dict[str, Any]:
    return inline(ctx, "env", cap)


def matmul(ctx: Ctx, cap: int) -> dict[str, Any]:
    return inline(ctx, "matmul", cap)


def gpu_tests(selection: str, smoke_selection: str | None = None) -> Callable[[Ctx, int], dict[str, Any]]:
    """tests/test_gpu.py's tests matching `selection` (-k); in --smoke, `smoke_selection` if given."""

    def check(ctx: Ctx, cap: int) -> dict[str, Any]:
        env = {**ctx.env, **({"MELLAMA_GPU_TESTS_ON_CPU": "1"} if ctx.smoke else {})}
        chosen = smoke_selection if ctx.smoke and smoke_selection else selection
        report = ctx.work / f"pytest-{chosen.replace(' ', '_')}.xml"
        args = ["-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "-k", chosen, f"--junitxml={report}"]
        try:
            py(ctx, args, cap, env)
        except CheckFailed as exc:
            raise CheckFailed(f"{exc}; {junit_counts(report)}") from None
        counts = junit_counts(report)
        if counts.get("tests", 0) - counts.get("skipped", 0) <= 0:  # e.g. CUDA not visible in the child
            raise CheckFailed(f"no test ran: {counts}")
        return counts

    return check


def junit_counts(report: Path) -> dict[str, Any]:
    import xml.etree.ElementTree as ET  # our own pytest's report, written a moment ago

    if not report.is_file():
        return {}
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    keys = ("tests", "failures", "errors", "skipped")
    return {k: int(suite.get(k, 0)) for k in keys} if suite is not None else {}


def peers(seq_len: int) -> Callable[[Ctx, int], dict[str, Any]]:
    def check(ctx: Ctx, cap: int) -> dict[str, Any]:
        out = ctx.work / f"peers_{seq_len}.json"
        if ctx.smoke:
            shape = ["--shape", "tiny", "--seq-len", "256", "--steps", "3", "--warmup", "1"]
        else:  # 32 sequences a step on one GPU, micro-batches of 16k tokens
            micro = 8 * 2048 // seq_len
            shape = ["--shape", "1b", "--seq-len", str(seq_len), "--global-batch", str(4 * micro)]
            shape += ["--micro-batch", str(micro), "--steps", "12", "--warmup", "4"]
        rate = ctx.results.get("matmul", {}).get("tflops")
        # Named by the check, not the shape: checkpoint reads peers_2048's run in --smoke too.
        args = [
            "bench/peers.py",
            *shape,
            "--pairs",
            "1",
            "--max-failed-rounds",
            "0",
            "--workdir",
            str(ctx.work / f"peers_{seq_len}"),
        ]
        args += ["--out", str(out), *(["--matmul-tflops", str(rate)] if rate and not ctx.smoke else [])]
        args += [
            "--llamafactory-python",
            "",
        ]  # HF Trainer only: the budget holds no third side (nor its venv)
        if seq_len == 2048:
            args.append("--keep-checkpoints")  # the checkpoint check resumes that run, then deletes it
        py(ctx, args, cap)
        got = json.loads(out.read_text())
        return {k: got[k] for k in ("device", "params", "seq_len", "global_batch", "precision", "summary")}

    return check


def checkpoint_cost(ctx: Ctx, cap: int) -> dict[str, Any]:
    """The run peers_2048 left (ours): its blocking final save and its export, from its metrics; then a resume
    that loads that checkpoint and trains two more steps, for the load. The run is deleted afterwards (disk)."""
    sys.path.insert(0, str(REPO / "src"))
    from mellama_train.checkpoint import verify
    from mellama_train.metrics import read_metric_lines

    run = ctx.work / "peers_2048" / "ours"
    if not (run / "metrics.jsonl").is_file():
        raise CheckFailed("no run of peers_2048 to read: that check did not finish")
    spec = json.loads((ctx.work / "peers_2048" / "data" / "spec.json").read_text())
    steps = spec["steps"]

    def first(key: str) -> float:
        values = [r[key] for r in read_metric_lines(run / "metrics.jsonl") if key in r]
        if not values:
            raise CheckFailed(f"{run}/metrics.jsonl has no {key}")
        return values[0]

    rows = read_metric_lines(run / "metrics.jsonl")
    times = {r["step"]: r["time"] for r in rows if "train/loss" in r}
    step_s = (times[steps] - times[steps // 3]) / (steps - steps // 3)
    save_s = first("checkpoint/save_seconds")
    got: dict[str, Any] = {
        "step_s": round(step_s, 3),
        "save_s": round(save_s, 2),
        "export_s": round(first("export/seconds"), 2),
        "save_share_at_500_steps": round(save_s / (PROFILE_SAVE_EVERY * step_s + save_s), 5),
        "goal_share": 0.02,
    }
    ctx.results["checkpoint"] = got  # kept if the resume below fails or runs out of time
    last = run / "checkpoints" / f"step_{steps:08d}"
    if problem := verify(last):
        raise CheckFailed(f"the checkpoint to resume does not verify: {problem}")
    # Two more steps than the run had: a changed config, so the checkpoint is named (--resume auto refuses).
    cmd = [
        "launch/pretrain.py",
        "--ds",
        "ds_configs/zero3.json",
        "--output-dir",
        str(run),
        "--resume",
        str(last),
    ]
    for override in spec["ours_overrides"]:
        cmd += ["--set", override]
    cmd += ["--set", f"train.max_steps={steps + 2}"]
    launcher = ["-m", "deepspeed.launcher.runner", f"--num_gpus={spec['ranks']}", "--master_port=29771"]
    py(ctx, [*launcher, *cmd], cap)
    got["load_s"] = round(first("checkpoint/load_seconds"), 2)
    shutil.rmtree(run, ignore_errors=True)  # ~15 GB of ZeRO states at 1B: the disk is 64 GiB
    return got


def qlora_8gb(ctx: Ctx, cap: int) -> dict[str, Any]:
    out = ctx.work / "qlora_8gb.json"
    args = ["bench/qlora_8gb.py", "--workdir", str(ctx.work / "qlora"), "--out", str(out), "--steps", "4"]
    try:
        py(ctx, [*args, *(["--smoke"] if ctx.smoke else [])], cap)
    finally:
        shutil.rmtree(ctx.work / "qlora", ignore_errors=True)  # the 16 GB base
    return json.loads(out.read_text())


CHECKS = [
    Check("install", 120, 60, install),
    Check("env", 60, 60, env_check),
    Check("matmul", 60, 60, matmul),
    Check("kernels", 90, 120, gpu_tests("packed")),
    Check("peers_2048", 200, 300, peers(2048)),
    Check("checkpoint", 90, 150, checkpoint_cost),
    Check("qlora_8gb", 200, 200, qlora_8gb),
    Check("peers_4096", 200, 0, peers(4096)),  # smoke cap 0: not in --smoke
    # Not in --smoke: CI's time goes to the checks above; these two tests ran on the CPU when written
    # (MELLAMA_GPU_TESTS_ON_CPU=1 pytest -m gpu tests/test_gpu.py runs them there by hand).
    Check("zero3", 180, 0, gpu_tests("not packed")),
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="results.json and suite.log go here (required)")
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="runs and models, tens of GB on a GPU (default: a "
        "new temporary directory; never under --out, which the device tool brings back)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny shapes on any device, to test the suite itself")
    p.add_argument(
        "--budget",
        type=int,
        default=480,
        help="seconds for all checks; a check that no longer fits is skipped",
    )
    p.add_argument("--only", nargs="*", default=None, help="run these checks only (names above)")
    p.add_argument("--inline", choices=sorted(INLINE), help=argparse.SUPPRESS)
    p.add_argument("--inline-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.inline:
        args.inline_out.write_text(json.dumps(INLINE[args.inline](args.smoke)))
        return 0
    if args.out is None:
        p.error("--out DIR is required")
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mellama-gpu-suite-"))
    work.mkdir(parents=True, exist_ok=True)
    log = args.out / "suite.log"
    log.write_text("")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    ctx = Ctx(args.smoke, work, log, env)
    started = time.monotonic()
    report: dict[str, Any] = {"mode": "smoke" if args.smoke else "gpu", "budget_s": args.budget, "checks": []}
    results_path = args.out / "results.json"
    for check in CHECKS:
        cap = check.smoke_cap_s if args.smoke else check.cap_s
        left = args.budget - (time.monotonic() - started)
        entry: dict[str, Any] = {"name": check.name, "cap_s": cap}
        if args.only is not None and check.name not in args.only:
            entry.update(status="skipped", why="not in --only")
        elif cap == 0:
            entry.update(status="skipped", why="not in --smoke")
        elif left < min(cap, MIN_SLICE_S):
            entry.update(status="skipped", why=f"{left:.0f} s of the budget left, cap {cap} s")
        else:
            cap = entry["cap_s"] = int(min(cap, left))  # what is left of the budget, if less than the cap
            entry["status"] = "running"  # seen in results.json if the whole call is killed meanwhile
            results_path.write_text(json.dumps({**report, "checks": [*report["checks"], entry]}, indent=2))
            with log.open("a") as out:
                out.write(f"\n=== {check.name} (cap {cap} s) ===\n")
            t0 = time.monotonic()
            try:
                ctx.results[check.name] = entry["result"] = check.run(ctx, cap)
                entry["status"] = "ok"
            except TimeoutError as exc:
                entry.update(status="timeout", why=str(exc))
            except Exception as exc:  # noqa: BLE001 - a failed check is recorded, the suite goes on
                entry.update(status="failed", why=f"{type(exc).__name__}: {exc}")
            if entry["status"] != "ok" and check.name in ctx.results:  # figures it had before it failed
                entry["result"] = ctx.results[check.name]
            entry["seconds"] = round(time.monotonic() - t0, 1)
        report["checks"].append(entry)
        print(
            f"{check.name:12s} {entry['status']:8s} {entry.get('seconds', 0):6.1f} s  {entry.get('why', '')}",
            flush=True,
        )
        results_path.write_text(
            json.dumps(report, indent=2) + "\n"
        )  # after each check: a kill keeps the rest
    report["seconds"] = round(time.monotonic() - started, 1)
    results_path.write_text(json.dumps(report, indent=2) + "\n")
    print(summary(report))
    return 0 if all(c["status"] in ("ok", "skipped") for c in report["checks"]) else 1


def summary(report: dict[str, Any]) -> str:
    """The figures that matter, last in the output (the device tool returns the output's end)."""
    lines = [f"suite: {report['mode']}, {report['seconds']} s"]
    by_name = {c["name"]: c.get("result", {}) for c in report["checks"]}
    if by_name.get("matmul"):
        m = by_name["matmul"]
        lines.append(f"matmul {m['dtype']} n={m['n']}: {m['tflops']} TFLOP/s; copy {m['copy_gb_per_s']} GB/s")
    for seq in (2048, 4096):
        s = by_name.get(f"peers_{seq}", {}).get("summary")
        if s:
            r, ours, hf = s["ratio_ours_over_hf"], s["ours"], s["hf"]
            mfu = f"MFU ours {ours['mfu']:.1%} HF {hf['mfu']:.1%}; " if ours.get("mfu") else ""
            lines.append(
                f"peers seq {seq}: ours/HF {r['median']:.2f}; {mfu}tokens/s ours {ours['tokens_per_s']:.0f}"
            )
    if by_name.get("checkpoint"):
        c = by_name["checkpoint"]
        lines.append(
            f"checkpoint: save {c['save_s']} s load {c.get('load_s', '-')} s export {c['export_s']} s, "
            f"save share at 500 steps {c['save_share_at_500_steps']:.2%}"
        )
    if by_name.get("qlora_8gb"):
        q = by_name["qlora_8gb"]
        lines.append(
            f"qlora_8gb: peak {q.get('peak_gib')} GiB (plan {q.get('planned_gib')}), "
            f"{q.get('tokens_per_sec_median')} tokens/s"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
