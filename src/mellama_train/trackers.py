"""Experiment trackers beside metrics.jsonl: Weights & Biases and MLflow (`train.report_to`).

Rank 0 alone reports, and only what metrics.jsonl holds (the same numeric scalars at the same steps) plus the
resolved config as parameters: no text, no samples, no console capture, no code or git diff upload. A resumed run
continues the same tracker run: each tracker's run id is kept in the run record, and the next start reads it
back. metrics.jsonl stays the source of truth: a tracker that cannot be reached (no server, no API key, a network
drop mid-run) is warned about once and dropped, and training goes on.

Endpoints and credentials come from the environment only, as the tools themselves read them: WANDB_API_KEY,
WANDB_MODE (offline), WANDB_PROJECT; MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME, MLFLOW_TRACKING_TOKEN.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

KNOWN = ("tensorboard", "wandb", "mlflow")
EXTERNAL = ("wandb", "mlflow")  # the optional extras: pip install 'mellama-train[wandb]' / '[mlflow]'
PROJECT = (
    "mellama-train"  # the W&B project and MLflow experiment unless WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME
)


class Tracker(Protocol):
    run_id: str

    def log(self, step: int, scalars: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def config_problems(report_to: list[str]) -> list[str]:
    """Start-up problems of train.report_to: unknown names, and trackers whose package is not installed."""
    problems = []
    for name in report_to:
        if name not in KNOWN:
            problems.append(f"train.report_to: unknown tracker {name!r}; choose from {', '.join(KNOWN)}")
        elif name in EXTERNAL and importlib.util.find_spec(name) is None:
            problems.append(
                f"train.report_to: {name} is not installed; pip install 'mellama-train[{name}]' (or drop {name})"
            )
    return problems


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """The config as dotted keys (optim.lr, data.sources.0.weight): what trackers show as parameters."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list) and tree:
        items = ((str(i), v) for i, v in enumerate(tree))
    else:
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


# Nothing but the scalars and the config: no console capture, code, git state, system stats or package list.
WANDB_QUIET = {
    "console": "off",
    "save_code": False,
    "disable_git": True,
    "x_disable_stats": True,
    "x_save_requirements": False,
}


def _known(settings_class: Any, wanted: dict[str, Any]) -> dict[str, Any]:
    """The settings this wandb version has (the x_ ones come and go between releases)."""
    fields = getattr(settings_class, "model_fields", None)
    return {k: v for k, v in wanted.items() if fields is None or k in fields}


class WandbTracker:
    def __init__(self, run_dir: Path, config: dict[str, Any], run_id: str | None):
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", PROJECT),
            name=run_dir.name,
            id=run_id,  # None: W&B makes one, kept in the run record for the next start
            resume="allow",  # the same id continues the same run (a resume), else starts it
            config=config,
            dir=str(run_dir),  # its files under <run>/wandb/, beside the run's own
            settings=wandb.Settings(
                console="off",
                save_code=False,
                disable_git=True,
                x_disable_stats=True,
                x_save_requirements=False,
            ),
        )
        self.run_id = self.run.id

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    def __init__(self, run_dir: Path, config: dict[str, Any], run_id: str | None):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        # A dead server should cost seconds, not MLflow's default of minutes of retries on every call.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        self.client = MlflowClient()
        if run_id:
            try:
                self.run_id = self.client.get_run(run_id).info.run_id
                self.client.update_run(self.run_id, status="RUNNING")
                return
            except Exception as exc:  # noqa: BLE001 - deleted, or another server: a new run, said so
                log.warning(
                    "mlflow: the earlier run %s cannot be continued (%s); starting a new one", run_id, exc
                )
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        # MLflow caps a parameter value at 6000 characters and a batch at 100 parameters.
        params = [
            Param(key, json.dumps(v) if not isinstance(v, str) else v) for key, v in flatten(config).items()
        ]
        for start in range(0, len(params), 100):
            self.client.log_batch(
                self.run_id, params=[Param(p.key, p.value[:6000]) for p in params[start : start + 100]]
            )

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


FACTORIES = {"wandb": WandbTracker, "mlflow": MlflowTracker}


class Guarded:
    """One tracker whose failures never reach the training loop: the first one is logged, the tracker dropped."""

    def __init__(self, name: str, tracker: Tracker | None):
        self.name, self.tracker = name, tracker

    @property
    def run_id(self) -> str | None:
        return self.tracker.run_id if self.tracker else None

    def _drop(self, what: str, exc: Exception) -> None:
        log.warning(
            "%s: %s failed (%s: %s); reporting to %s stops here, metrics.jsonl goes on",
            self.name,
            what,
            type(exc).__name__,
            str(exc).splitlines()[0][:300] if str(exc) else "",
            self.name,
        )
        self.tracker = None

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if self.tracker:
            try:
                self.tracker.log(step, scalars)
            except Exception as exc:  # noqa: BLE001 - a tracker never stops training
                self._drop("logging", exc)

    def close(self) -> None:
        if self.tracker:
            try:
                self.tracker.close()
            except Exception as exc:  # noqa: BLE001
                self._drop("closing", exc)


def previous_ids(run_dir: Path) -> dict[str, str]:
    """The tracker run ids an earlier start of this run kept in its run record (the newest that has any)."""
    for path in [*sorted(run_dir.glob("run_record.*.json"), reverse=True), run_dir / "run_record.json"]:
        try:
            ids = json.loads(path.read_text(encoding="utf-8")).get("trackers")
        except (OSError, ValueError, AttributeError, RecursionError):
            continue
        if isinstance(ids, dict) and ids:
            return {k: v for k, v in ids.items() if k in EXTERNAL and isinstance(v, str) and len(v) < 200}
    return {}


def open_trackers(report_to: list[str], run_dir: Path, config: dict[str, Any]) -> list[Guarded]:
    """Rank 0: the external trackers of train.report_to, each continuing its earlier run when there is one."""
    earlier = previous_ids(run_dir)
    opened = []
    for name in report_to:
        if name not in FACTORIES:
            continue
        try:
            opened.append(Guarded(name, FACTORIES[name](run_dir, config, earlier.get(name))))
        except Exception as exc:  # noqa: BLE001 - an unreachable tracker never stops training
            Guarded(name, None)._drop("starting", exc)
    return opened
