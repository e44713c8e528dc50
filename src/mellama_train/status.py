"""`mellama-train status RUN_DIR`: where a run stands, from its files alone (no GPU, no process group).

Whether a process is working on it (rank 0's heartbeat.json, watchdog.py) or it is finished, stopped or dead,
the newest complete checkpoint (and whether its files match its manifest), the step against the total, the
mixture ledger (what each source was meant to give and what it gave, and the epochs completed), speed and the
time left from metrics.jsonl, the fault counters as last logged, and the latest held-out losses with the
forgetting probe. It reads run_record*.json, heartbeat.json, the checkpoint's trainer.json and metrics.jsonl;
nothing it prints is training text.

Dead or alive: a run is alive while its heartbeat is fresh (rewritten every HEARTBEAT_EVERY_S by rank 0), or,
on the host that wrote it, while that process exists. A run that is not finished, has no live process and has
made no progress (a logged step, a heartbeat's last beat, a checkpoint) for STALL_STEP_TIMES logging intervals
(at least STALL_MIN_S) is "stalled or dead": an alarm, exit 1, with what to do.
"""

from __future__ import annotations

import json
import math
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mellama_train import checkpoint
from mellama_train.config import KINDS, PRETRAIN
from mellama_train.data.mixture import drift
from mellama_train.data.reasons import is_filter
from mellama_train.metrics import finite_number, read_metric_lines
from mellama_train.outputs import latest_run_record
from mellama_train.watchdog import HEARTBEAT, HEARTBEAT_EVERY_S, read_heartbeat

SPEED_WINDOW = 50
"""Training lines of metrics.jsonl (from the latest start) the speed and ETA are measured over."""
STALL_STEP_TIMES = 5
"""A run with no live process is stalled or dead once it has made no progress for this many logging intervals
(train.log_every steps at the recent speed)..."""
STALL_MIN_S = 120.0
"""...and for at least this long: a heartbeat goes stale after three missed writes (30 s) plus a shared
filesystem's attribute caching, and a job being requeued takes a minute to start again."""
CLOCK_SKEW_S = 300.0
"""A time read back that is further ahead of this host's clock than this is not believed (a planted one);
less is clock skew between the node that wrote it and this one."""


def _count(value: Any) -> int | None:
    """A counter read back (metrics, trainer.json): a finite number, as an int; else None."""
    number = finite_number(value)
    return int(number) if number is not None else None


def _recent_speed(lines: list[dict[str, Any]]) -> tuple[float, float] | None:
    """(seconds per step, tokens per second) over the last training lines of one uninterrupted stretch."""
    train = [x for x in lines if "train/loss" in x and finite_number(x.get("time")) is not None]
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
    tokens = sum(finite_number(x.get("train/tokens_per_sec")) or 0.0 for x in stretch) / len(stretch)
    return seconds, tokens


def _faults(logged: dict[int, dict[str, Any]], guard: dict[str, Any], names: list[str]) -> str:
    """The fault counters as last logged (metrics.jsonl: up to the latest logged step, also past the newest
    checkpoint), else the checkpoint's."""
    steps = [s for s, v in logged.items() if _count(v.get("train/skipped_steps")) is not None]
    if not steps:
        return (
            f"faults      (at the checkpoint) skipped steps {_count(guard.get('skipped_steps')) or 0},"
            f" loss spikes {_count(guard.get('loss_spikes')) or 0}"
        )
    at = max(steps)
    values = logged[at]
    text = (
        f"faults      (step {at:,}) skipped steps {_count(values['train/skipped_steps'])},"
        f" loss spikes {_count(values.get('train/loss_spikes')) or 0}"
    )
    for key, what in (("data/skipped/", "records skipped"), ("data/truncated/", "truncated")):
        counts = {n: c for n in names if (c := _count(values.get(key + n))) is not None}
        if counts:
            text += f"; {what}: " + ", ".join(f"{n} {c:,}" for n, c in counts.items())
    return text


def _documents(logged: dict[int, dict[str, Any]], names: list[str]) -> str | None:
    """Documents each source gave and every reason a record was not trained on, as last logged (run totals
    over all ranks): e.g. `pubmed 1,790 (skipped 1 empty; filtered 9 no_abstract)`."""
    steps = [s for s, v in logged.items() if any(k.startswith("data/documents/") for k in v)]
    if not steps:
        return None
    at = max(steps)
    values = logged[at]
    parts = []
    for name in names:
        documents = _count(values.get(f"data/documents/{name}"))
        if documents is None:
            continue
        prefix = f"data/reasons/{name}/"
        reasons = {
            k.removeprefix(prefix): n for k, v in values.items() if k.startswith(prefix) and (n := _count(v))
        }
        kinds = [
            f"{kind} " + ", ".join(f"{reasons[r]:,} {r}" for r in sorted(reasons) if is_filter(r) == chosen)
            for kind, chosen in (("skipped", False), ("filtered", True))
            if any(is_filter(r) == chosen for r in reasons)
        ]
        parts.append(f"{name} {documents:,}" + (f" ({'; '.join(kinds)})" if kinds else ""))
    return f"documents   (step {at:,}) " + ", ".join(parts) if parts else None


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):  # a product of numbers read back (steps left x seconds per step)
        return "unknown"
    minutes = round(seconds / 60)
    return f"{minutes // 60}h {minutes % 60:02d}m" if minutes >= 60 else f"{max(minutes, 1)} min"


def _stamp(when: float) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))
    except (OverflowError, OSError, ValueError):  # a finite time read back, but beyond the calendar
        return f"time {when:g} (not a date)"


def _process_alive(beat: dict[str, Any]) -> bool | None:
    """On the host that wrote the heartbeat: whether its process still exists (a pid reused by a process
    started later does not count). None on another host: only the heartbeat's age can tell there. False can
    also mean a process this one cannot see: the same hostname in another PID namespace (a container)."""
    if beat.get("host") != socket.gethostname() or not isinstance(beat.get("pid"), int):
        return None
    import psutil  # DeepSpeed's own dependency

    try:
        started = psutil.Process(beat["pid"]).create_time()
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True  # it exists, owned by someone else
    return started <= float(beat.get("started", started)) + 5.0


def _liveness(
    run_dir: Path, raw: list[dict[str, Any]], seconds_per_step: float | None, log_every: int, done: bool
) -> tuple[str, str | None, bool]:
    """(the state line, an alarm or None, whether a process is running the run)."""
    beat = read_heartbeat(run_dir)
    state = beat.get("state", "running") if beat else None
    if state == "finished" or (beat is None and done):
        return "finished", None, False
    now = time.time()
    # Times read back (metrics lines, the heartbeat, file dates) count only when finite and not in the future:
    # a time planted ahead (1e12) would otherwise make a dead run look alive or just active for ever.
    times = [t for x in raw if (t := finite_number(x.get("time"))) is not None]
    if beat:
        times.append(beat.get("last_progress", 0.0))
    newest = checkpoint.complete_checkpoints(run_dir / "checkpoints")
    if newest:
        try:  # the marker may have been removed or made unreadable since: then the save is no progress
            times.append((newest[-1] / checkpoint.COMPLETE).stat().st_mtime)
        except OSError:
            pass
    last_progress = max((t for t in times if t <= now + CLOCK_SKEW_S), default=None)
    ago = f"{_duration(now - last_progress)} ago" if last_progress else "never"

    alive = False
    if beat and state == "running":
        try:
            written = [beat.get("time", 0.0), (run_dir / HEARTBEAT).stat().st_mtime]
        except OSError:  # removed since it was read
            written = [beat.get("time", 0.0)]
        newest_beat = max((t for t in written if t <= now + CLOCK_SKEW_S), default=0.0)
        every = min(beat.get("every_s", HEARTBEAT_EVERY_S), 6 * HEARTBEAT_EVERY_S)  # a planted 1e300: no
        fresh = now - newest_beat <= 3 * every + 30.0
        # A fresh heartbeat is a live process whatever the pid lookup says: on the same hostname, a process in
        # another PID namespace (a container) is invisible here. The lookup only adds a live process whose
        # heartbeat went stale (a stuck rank 0 keeps its pid: that is the watchdog's business, not a death).
        alive = fresh or _process_alive(beat) is True
    if alive:
        where = f"{beat.get('host', 'an unnamed host')} (pid {beat.get('pid', 'unknown')})"
        line = (
            f"running on {where}; last progress {ago}: {beat.get('last_completed', 'unknown')},"
            f" in {beat.get('phase', 'an unknown phase')}"
        )
        return line, None, True

    interval = (seconds_per_step or 0.0) * log_every
    stall_after = max(STALL_STEP_TIMES * interval, STALL_MIN_S)
    newest_name = newest[-1].name if newest else None
    resume = f"--resume auto continues from {newest_name}" if newest_name else "nothing was saved yet"
    if beat is None:
        why = "no process has reported on it (no heartbeat.json)"
        todo = "check the job (squeue/sacct, the end of logs/rank-*.log): if it is gone, relaunch the same command"
    elif state.startswith("hung"):
        why = "the watchdog ended it (exit 76)"
        todo = "read logs/hang-rank-*.txt, then relaunch the same command"
    elif state == "stopped (exit 75)":
        why = "it stopped on request (exit 75) and has not been restarted"
        todo = "if it was requeued it may be pending (squeue); else relaunch the same command"
    elif state.startswith("stopped"):
        why = f"it was {state} by the numerical guard or the forgetting monitor"
        todo = "see docs/FAULTS.md for the fix, then relaunch"
    elif state.startswith("failed"):
        why = f"it {state}"
        todo = "read the end of logs/rank-*.log or the job's output, fix, then relaunch the same command"
    else:
        who = f" ({beat['host']} pid {beat['pid']})" if "host" in beat and "pid" in beat else ""
        why = f"its process{who} is gone without a word"
        why += f" (last heartbeat {_stamp(beat['time'])})" if "time" in beat else ""
        todo = (
            "it was killed (out of memory, node lost, SIGKILL?): check the job (squeue/sacct, dmesg, the end"
            " of logs/rank-*.log); a requeued job may be pending; else relaunch the same command"
        )
    if last_progress is not None and now - last_progress <= stall_after:
        return f"not running: {why} (last progress {ago})", None, False
    since = _stamp(last_progress) if last_progress else "its start"
    alarm = f"stalled or dead since {since} ({ago}): {why}; {todo} ({resume})"
    return f"STALLED OR DEAD since {since}", alarm, False


def resumes_on(run_dir: Path, world_size: int) -> str | None:
    """Why the run in `run_dir` cannot go on with `world_size` data-parallel ranks, or None when it can.

    What slurm/launch.sh asks when a node is lost: start again at once on the nodes left, or requeue the job for
    as many as before. From the newest run record (untrusted JSON: anything unexpected is a reason, never an
    exception): a run over a prepared corpus under ZeRO-3, not pinned to a world size, whose global batch
    divides into micro-batches over the new ranks moves (checkpoint.load is the authority and checks again); a
    streamed run does not. Without a readable record there is nothing to judge by, and the answer is no.
    """
    record = latest_run_record(run_dir)
    if record is None:
        return f"no readable run record in {run_dir}"
    cfg = record["config"]
    data, train = cfg.get("data"), cfg.get("train")
    sources = data.get("sources") if isinstance(data, dict) else None
    if not isinstance(sources, list) or not sources:
        return "its run record names no sources"
    if not all(isinstance(s, dict) and s.get("prepared") for s in sources):
        return "its sources are streamed: a streamed run resumes on the number of ranks that wrote it"
    ds = record.get("ds_config")
    zero = ds.get("zero_optimization") if isinstance(ds, dict) else None
    if not isinstance(zero, dict) or zero.get("stage") != 3:
        return "it does not run ZeRO-3: a checkpoint moves to another number of ranks under ZeRO-3 only"
    train = train if isinstance(train, dict) else {}
    if train.get("world_size") not in (None, 0):
        return f"it sets train.world_size={str(train.get('world_size'))[:20]}"
    batch, micro = train.get("global_batch_size"), train.get("micro_batch_size")
    if (
        type(batch) is not int
        or type(micro) is not int
        or batch <= 0
        or micro <= 0
        or batch % (micro * world_size)
    ):
        return (
            f"its global batch ({str(batch)[:20]}) is not a whole number of micro-batches ({str(micro)[:20]}) on"
            f" each of {world_size} ranks"
        )
    return None


@dataclass
class RunRecord:
    """The fields of a run's newest run record that `status` and `report` read, each of the type written (the
    record is read back untrusted: edited, or from another tool)."""

    task: str
    profile: str
    total_steps: int | None
    log_every: int
    weights: dict[str, float]
    """Source name -> its weight in the mixture (finite, > 0)."""
    seq_len: int
    mixture_tolerance: float
    forgetting_source: str | None
    forgetting_margin: float

    @property
    def targets(self) -> dict[str, float]:
        """Source name -> its target share of the mixture."""
        total = sum(self.weights.values())
        return {name: weight / total for name, weight in self.weights.items()}


def read_run_record(run_dir: Path) -> RunRecord:
    """The newest run record's fields (outputs.latest_run_record), or ValueError: one line naming the field."""
    record = latest_run_record(run_dir)
    if record is None:
        raise ValueError(
            f"{run_dir}: no readable run_record.json; pass a run directory (--output-dir of a run)"
        )
    config = record["config"]
    derived = record.get("derived") if isinstance(record.get("derived"), dict) else {}

    def field(path: str, kind: type, default: Any = ...) -> Any:
        """config's value at the dotted `path`, of type `kind` (float: any finite number); `default` when it
        is missing (or null, where the default is None)."""
        value: Any = config
        for key in path.split("."):
            value = value.get(key, ...) if isinstance(value, dict) else ...
        if default is not ... and (value is ... or (value is None and default is None)):
            return default
        if kind is float:
            ok = finite_number(value) is not None
        else:
            ok = type(value) is kind  # not a bool for an int
        if not ok:
            got = "missing" if value is ... else type(value).__name__
            raise ValueError(
                f"{run_dir}: the run record's {path} is not a {kind.__name__} ({got}); pass a run directory"
                " this trainer wrote"
            )
        return value

    sources = config.get("data", {}).get("sources") if isinstance(config.get("data"), dict) else None
    weights = {}
    for index, source in enumerate(sources if isinstance(sources, list) else [None]):
        name = source.get("name") if isinstance(source, dict) else None
        weight = finite_number(source.get("weight")) if isinstance(source, dict) else None
        if not isinstance(name, str) or weight is None or weight <= 0:
            raise ValueError(
                f"{run_dir}: the run record's data.sources[{index}] has no name and positive weight; pass a run"
                " directory this trainer wrote"
            )
        weights[name] = weight
    total_steps = derived.get("total_steps")
    return RunRecord(
        task=field("task", str),
        profile=field("profile", str),
        total_steps=total_steps if type(total_steps) is int and total_steps > 0 else None,
        log_every=max(field("train.log_every", int, 1), 1),
        weights=weights,
        seq_len=field("data.seq_len", int),
        mixture_tolerance=float(field("data.mixture_tolerance", float, 0.01)),
        forgetting_source=field("train.forgetting_source", str, None),
        forgetting_margin=float(field("train.forgetting_margin", float, 0.1)),
    )


def _by_source(value: Any) -> dict[str, float]:
    """A {source: number} map of trainer.json (counts, losses), keeping only finite numbers not below 0."""
    if not isinstance(value, dict):
        return {}
    return {k: n for k, v in value.items() if (n := finite_number(v)) is not None and n >= 0}


def report(run_dir: Path, verify: bool = False) -> tuple[list[str], list[str]]:
    """(lines to print, alarms). ValueError when run_dir is not a run directory. `verify`: hash every file of
    every checkpoint against its manifest (reads them all: minutes for a 70B run's checkpoints). Every file is
    read back untrusted: a number that is not a finite one of its type is passed over, never a traceback."""
    record = read_run_record(run_dir)
    total_steps = record.total_steps
    unit = KINDS.get(record.task, PRETRAIN).unit
    lines = [f"run         {run_dir} ({record.task}, profile {record.profile})"]
    alarms: list[str] = []

    complete = checkpoint.complete_checkpoints(run_dir / "checkpoints")
    trainer: dict[str, Any] = {}
    if complete:
        newest = complete[-1]
        problem = checkpoint.verify(newest, deep=verify)
        try:
            trainer = json.loads((newest / checkpoint.TRAINER_STATE).read_text())
        except (OSError, ValueError, RecursionError) as exc:  # read back untrusted: never a traceback
            problem = problem or f"{checkpoint.TRAINER_STATE} is unreadable ({exc.__class__.__name__})"
        if not isinstance(trainer, dict):
            trainer, problem = {}, problem or f"{checkpoint.TRAINER_STATE} is not a JSON object"
        intact = "every file matches its SHA-256 in the manifest" if verify else "files match its manifest"
        verdict = intact if problem is None else f"DAMAGED: {problem}"
        lines.append(f"checkpoint  {newest.name} ({verdict})")
        if problem:
            alarms.append(f"the newest checkpoint is damaged: {problem}")
        if verify:
            for older in reversed(complete[:-1]):  # what a resume would fall back to
                older_problem = checkpoint.verify(older, deep=True)
                lines.append(
                    f"            {older.name} ({'intact' if older_problem is None else 'DAMAGED: ' + older_problem})"
                )
                if older_problem:
                    alarms.append(f"checkpoint {older.name} is damaged: {older_problem}")
    else:
        lines.append("checkpoint  none complete yet")
    step = max(_count(trainer.get("step")) or 0, 0)
    share = f" ({step / total_steps:.1%})" if total_steps else ""
    lines.append(
        f"step        {step:,} of {total_steps:,}{share}" if total_steps else f"step        {step:,}"
    )

    metrics_path = run_dir / "metrics.jsonl"
    raw = read_metric_lines(metrics_path) if metrics_path.is_file() else []
    logged: dict[int, dict[str, Any]] = {}
    for line in raw:  # as metrics.read_metrics: later lines of a step win
        logged.setdefault(line["step"], {}).update(line)
    speed = _recent_speed(raw)
    done = (run_dir / "final" / "config.json").is_file() or (
        run_dir / "adapter" / "adapter_config.json"
    ).is_file()
    run_state, dead, running = _liveness(run_dir, raw, speed[0] if speed else None, record.log_every, done)
    lines.insert(1, f"state       {run_state}")
    if dead:
        alarms.append(dead)
    if logged:
        last = max(logged)
        when = finite_number(logged[last].get("time"))
        stamp = f" at {_stamp(when)}" if when else ""
        lines.append(f"last logged step {last:,}{stamp}")
        if speed and total_steps:
            seconds, tokens = speed
            left = max(total_steps - last, 0)
            eta = "finished" if not left else f"{_duration(left * seconds)} for {left:,} steps"
            if left and not running:
                eta = f"{_duration(left * seconds)} for {left:,} steps once it runs again"
            lines.append(f"speed       {seconds:.2f} s/step, {tokens:,.0f} tokens/s; time left: {eta}")

    targets = record.targets
    taken = _by_source(trainer.get("mixture_taken"))
    tolerance = record.mixture_tolerance
    per_take = 1 if unit == "examples" else record.seq_len
    world_size = max(_count(trainer.get("world_size")) or 1, 1)
    mix = drift([taken.get(n, 0) for n in targets], list(targets.values()), world_size * per_take, tolerance)
    shares = dict(zip(targets, mix[0])) if mix else {}
    lines += ["", f"mixture (weights count {unit}; at the checkpoint)"]
    lines.append(f"  {'source':<16} {'target':>7} {'achieved':>9} {'off':>7} {'tokens':>14} {'epochs':>6}")
    tokens_by_source = _by_source(trainer.get("tokens_by_source"))
    epochs_by_source = _by_source(trainer.get("epochs_by_source"))
    for name, target in targets.items():
        got = shares.get(name)
        off = f"{(got - target) * 100:+.2f}" if got is not None else "-"
        tokens = tokens_by_source.get(name)
        epochs = int(epochs_by_source[name]) if name in epochs_by_source else "-"
        got_text = f"{got:.2%}" if got is not None else "-"
        tokens_text = f"{int(tokens):,}" if tokens is not None else "-"
        lines.append(f"  {name:<16} {target:>7.2%} {got_text:>9} {off:>7} {tokens_text:>14} {epochs!s:>6}")
    if mix and mix[2]:
        alarms.append(
            f"mixture drift: {mix[1]:.2%} from the target shares (data.mixture_tolerance {tolerance:g})"
        )
    elif mix and mix[1] > tolerance:
        lines.append(f"  (off by up to {mix[1]:.2%}: expected this early, the mix converges as 1/{unit})")
    guard = trainer.get("guard") if isinstance(trainer.get("guard"), dict) else {}
    lines += ["", _faults(logged, guard, list(targets))]
    if documents := _documents(logged, list(targets)):
        lines.append(documents)
    prefix = "data/decontaminated/"
    dropped = [v for _, v in sorted(logged.items()) if any(k.startswith(prefix) for k in v)]
    if dropped:  # data.decontamination: what the benchmark n-gram filter took out, per source (run totals)
        counts = {
            k.removeprefix(prefix): c
            for k, n in dropped[-1].items()
            if k.startswith(prefix) and (c := _count(n)) is not None
        }
        lines.append("decontam.   " + ", ".join(f"{name} {n:,} dropped" for name, n in counts.items()))

    evals = [s for s, v in logged.items() if "eval/loss" in v]
    if evals:
        at = max(evals)
        values = logged[at]
        losses = {
            k.removeprefix("eval/loss/"): loss
            for k, v in values.items()
            if k.startswith("eval/loss/") and (loss := finite_number(v)) is not None
        }
        baseline = _by_source(trainer.get("eval_baseline"))
        parts = []
        for name, loss in losses.items():
            rise = f", {loss - baseline[name]:+.3f} vs step 0" if name in baseline else ""
            parts.append(f"{name} {loss:.3f}{rise}")
        lines.append(f"held-out    step {at:,}: " + "; ".join(parts))
        probe, margin = record.forgetting_source, record.forgetting_margin
        if probe in losses and probe in baseline and losses[probe] - baseline[probe] > margin:
            alarms.append(
                f"forgetting: {probe}'s held-out loss is {losses[probe] - baseline[probe]:.3f} above step 0"
                f" (margin {margin:g})"
            )
    lines += ["", "alarms      " + ("; ".join(alarms) if alarms else "none")]
    return lines, alarms
