"""`mellama-train status RUN_DIR`: where a run stands, from its files alone (no GPU, no process group).

The newest complete checkpoint (and whether its files match its manifest), the step against the total, the
mixture ledger (what each source was meant to give and what it gave, and the epochs completed), speed and the
time left from metrics.jsonl, the fault counters, and the latest held-out losses with the forgetting probe.
It reads run_record*.json, the checkpoint's trainer.json and metrics.jsonl; nothing it prints is training text.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from mellama_train import checkpoint
from mellama_train.data.mixture import drift
from mellama_train.metrics import read_metrics
from mellama_train.outputs import latest_run_record

SPEED_WINDOW = 50
"""Training lines of metrics.jsonl (from the latest start) the speed and ETA are measured over."""


def _recent_speed(lines: list[dict[str, Any]]) -> tuple[float, float] | None:
    """(seconds per step, tokens per second) over the last training lines of one uninterrupted stretch."""
    train = [x for x in lines if "train/loss" in x and "time" in x]
    stretch: list[dict[str, Any]] = []
    for line in reversed(train):  # walk back while steps and times both decrease: the latest start only
        if stretch and not (line["step"] < stretch[-1]["step"] and line["time"] <= stretch[-1]["time"]):
            break
        stretch.append(line)
        if len(stretch) > SPEED_WINDOW:
            break
    if len(stretch) < 2:
        return None
    newest, oldest = stretch[0], stretch[-1]
    seconds = (newest["time"] - oldest["time"]) / (newest["step"] - oldest["step"])
    tokens = sum(x.get("train/tokens_per_sec", 0.0) for x in stretch) / len(stretch)
    return seconds, tokens


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60}h {minutes % 60:02d}m" if minutes >= 60 else f"{max(minutes, 1)} min"


def report(run_dir: Path) -> tuple[list[str], list[str]]:
    """(lines to print, alarms). ValueError when run_dir is not a run directory."""
    record = latest_run_record(run_dir)
    if record is None or "config" not in record:
        raise ValueError(
            f"{run_dir}: no readable run_record.json; pass a run directory (--output-dir of a run)"
        )
    config, derived = record["config"], record.get("derived", {})
    total_steps = derived.get("total_steps")
    unit = "examples" if config["task"] == "tune" else "tokens"
    lines = [f"run         {run_dir} ({config['task']}, profile {config['profile']})"]
    alarms: list[str] = []

    complete = checkpoint.complete_checkpoints(run_dir / "checkpoints")
    trainer: dict[str, Any] = {}
    if complete:
        newest = complete[-1]
        problem = checkpoint.verify(newest)
        trainer = json.loads((newest / checkpoint.TRAINER_STATE).read_text())
        state = "files match its manifest" if problem is None else f"DAMAGED: {problem}"
        lines.append(f"checkpoint  {newest.name} ({state})")
        if problem:
            alarms.append(f"the newest checkpoint is damaged: {problem}")
    else:
        lines.append("checkpoint  none complete yet")
    step = trainer.get("step", 0)
    share = f" ({step / total_steps:.1%})" if total_steps else ""
    lines.append(
        f"step        {step:,} of {total_steps:,}{share}" if total_steps else f"step        {step:,}"
    )

    metrics_path = run_dir / "metrics.jsonl"
    logged = read_metrics(metrics_path) if metrics_path.is_file() else {}
    raw = []
    if metrics_path.is_file():
        for text in metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                raw.append(json.loads(text))
            except ValueError:
                continue
    if logged:
        last = max(logged)
        when = logged[last].get("time")
        stamp = time.strftime(" at %Y-%m-%d %H:%M:%S", time.localtime(when)) if when else ""
        lines.append(f"last logged step {last:,}{stamp}")
        speed = _recent_speed(raw)
        if speed and total_steps:
            seconds, tokens = speed
            left = max(total_steps - last, 0)
            eta = "finished" if not left else f"{_duration(left * seconds)} for {left:,} steps"
            lines.append(f"speed       {seconds:.2f} s/step, {tokens:,.0f} tokens/s; time left: {eta}")

    sources = config["data"]["sources"]
    weights = {s["name"]: s["weight"] for s in sources}
    targets = {n: w / sum(weights.values()) for n, w in weights.items()}
    taken = trainer.get("mixture_taken") or {}
    tolerance = config["data"].get("mixture_tolerance", 0.01)
    per_take = 1 if unit == "examples" else config["data"]["seq_len"]
    mix = drift(
        [taken.get(n, 0) for n in targets],
        list(targets.values()),
        trainer.get("world_size", 1) * per_take,
        tolerance,
    )
    shares = dict(zip(targets, mix[0])) if mix else {}
    lines += ["", f"mixture (weights count {unit}; at the checkpoint)"]
    lines.append(f"  {'source':<16} {'target':>7} {'achieved':>9} {'off':>7} {'tokens':>14} {'epochs':>6}")
    for name, target in targets.items():
        got = shares.get(name)
        off = f"{(got - target) * 100:+.2f}" if got is not None else "-"
        tokens = trainer.get("tokens_by_source", {}).get(name)
        epochs = trainer.get("epochs_by_source", {}).get(name, "-")
        got_text = f"{got:.2%}" if got is not None else "-"
        tokens_text = f"{tokens:,}" if tokens is not None else "-"
        lines.append(f"  {name:<16} {target:>7.2%} {got_text:>9} {off:>7} {tokens_text:>14} {epochs!s:>6}")
    if mix and mix[2]:
        alarms.append(
            f"mixture drift: {mix[1]:.2%} from the target shares (data.mixture_tolerance {tolerance:g})"
        )
    elif mix and mix[1] > tolerance:
        lines.append(f"  (off by up to {mix[1]:.2%}: expected this early, the mix converges as 1/{unit})")
    guard = trainer.get("guard", {})
    lines += [
        "",
        f"faults      skipped steps {guard.get('skipped_steps', 0)}, loss spikes {guard.get('loss_spikes', 0)}",
    ]
    dropped = [v for _, v in sorted(logged.items()) if any(k.startswith("data/decontaminated/") for k in v)]
    if dropped:  # data.decontamination: what the benchmark n-gram filter took out, per source (run totals)
        counts = {
            k.removeprefix("data/decontaminated/"): int(n)
            for k, n in dropped[-1].items()
            if k.startswith("data/decontaminated/")
        }
        lines.append("decontam.   " + ", ".join(f"{name} {n:,} dropped" for name, n in counts.items()))

    evals = [s for s, v in logged.items() if "eval/loss" in v]
    if evals:
        at = max(evals)
        values = logged[at]
        losses = {k.removeprefix("eval/loss/"): v for k, v in values.items() if k.startswith("eval/loss/")}
        baseline = trainer.get("eval_baseline", {})
        parts = []
        for name, loss in losses.items():
            rise = f", {loss - baseline[name]:+.3f} vs step 0" if name in baseline else ""
            parts.append(f"{name} {loss:.3f}{rise}")
        lines.append(f"held-out    step {at:,}: " + "; ".join(parts))
        probe = config["train"].get("forgetting_source")
        margin = config["train"].get("forgetting_margin", 0.1)
        if probe in losses and probe in baseline and losses[probe] - baseline[probe] > margin:
            alarms.append(
                f"forgetting: {probe}'s held-out loss is {losses[probe] - baseline[probe]:.3f} above step 0"
                f" (margin {margin:g})"
            )
    lines += ["", "alarms      " + ("; ".join(alarms) if alarms else "none")]
    return lines, alarms
