"""Metrics sinks: metrics.jsonl (one JSON object per line, each with `step`, flushed as written), TensorBoard
scalars, and the trackers of train.report_to (trackers.py). Rank 0 writes; other ranks get a no-op logger.

Only numbers pass through here: decoded training text never reaches a metric, a log line or TensorBoard.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class MetricsLogger:
    def __init__(
        self, run_dir: Path, enabled: bool, tensorboard: bool = True, trackers: list[Any] | None = None
    ):
        """`trackers`: trackers.Guarded instances (W&B, MLflow) that get the same scalars; rank 0's only."""
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        self._trackers = trackers or []
        if enabled:
            # Append: a resumed run continues the same file; readers merge lines of the same step.
            path = run_dir / "metrics.jsonl"
            self._jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115
            if path.stat().st_size and not _ends_with_newline(path):
                self._jsonl.write("\n")  # a run killed mid-line: keep its fragment on a line of its own
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: v for k, v in values.items() if isinstance(v, numbers.Number) and math.isfinite(v)}
        # Non-finite values (a nan loss) are kept in the JSON line as strings so they are seen, not dropped.
        odd = {k: str(v) for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)}
        # `time` (Unix seconds) lets `mellama-train status` and reports time steps without TensorBoard.
        self._jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **clean, **odd}) + "\n")
        self._jsonl.flush()
        if self._tb:
            for key, value in clean.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        # Floats only: MLflow refuses a bool (one would drop the tracker for the rest of the run).
        scalars = {k: float(v) for k, v in clean.items()}
        for tracker in self._trackers:
            tracker.log(step, scalars)

    def close(self, outcome: str = "finished") -> None:
        """Flush and close every sink, each whatever the others do; `outcome` (finished, stopped, failed) is how
        trackers mark the run. A second close does nothing. Raises the first sink's error, after all closed."""
        sinks, self._jsonl, self._tb = [self._jsonl, self._tb], None, None
        trackers, self._trackers = self._trackers, []
        errors = []
        for sink in sinks:
            try:
                if sink:
                    sink.close()
            except Exception as exc:  # noqa: BLE001 - the trackers still close
                errors.append(exc)
        for tracker in trackers:  # Guarded: never raises, and gives up on a close that hangs
            tracker.close(outcome)
        if errors:
            raise errors[0]

    def close_quietly(self, outcome: str) -> None:
        """close() while another error is on its way out: a sink that fails to close is logged, not raised."""
        try:
            self.close(outcome)
        except Exception as exc:  # noqa: BLE001
            log.warning("closing the metrics sinks failed (%s: %s)", type(exc).__name__, exc)


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(-1, 2)
        return fh.read(1) == b"\n"


def read_metric_lines(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records in file order: JSON objects with an integer `step`. The file is read back
    untrusted (a shared run directory): a fragment left by a run killed mid-write, a line nested too deeply for
    the parser, invalid UTF-8 or a `step` that is no integer is not a record and is passed over."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                record = json.loads(line) if line.strip() else None
            except (ValueError, RecursionError):
                continue
            if isinstance(record, dict) and type(record.get("step")) is int:
                records.append(record)
    return records


def read_metrics(path: Path) -> dict[int, dict[str, Any]]:
    """metrics.jsonl -> {step: merged values}; later lines of a step win (steps recomputed after a resume are
    logged again, and an eval line may share a step with a train line). Values are as logged: a reader that
    computes with one checks that it is a finite number (finite_number)."""
    merged: dict[int, dict[str, Any]] = {}
    for record in read_metric_lines(path):
        merged.setdefault(record["step"], {}).update(record)
    return merged


def finite_number(value: Any) -> float | None:
    """`value` as a float when it is a finite JSON number (not a boolean), else None: a file read back may hold
    1e999 (inf), "nan" (how log() keeps non-finite values), strings or nulls where a number was written."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None
