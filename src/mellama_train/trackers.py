"""Experiment trackers beside metrics.jsonl: Weights & Biases and MLflow (`train.report_to`).

Rank 0 alone reports, and only what metrics.jsonl holds (the same numeric scalars at the same steps) plus the
resolved config as parameters: no text, no samples, no console capture, no code, git state, host or machine
metadata. A resumed run continues the same tracker run: each tracker's run id is kept in the run record, and the
next start reads it back. metrics.jsonl stays the source of truth: a tracker that cannot be reached (no server,
no API key, a network drop mid-run) is warned about once and dropped, and training goes on.

Endpoints and credentials come from the environment only, as the tools themselves read them: WANDB_API_KEY,
WANDB_MODE (offline), WANDB_PROJECT; MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME, MLFLOW_TRACKING_TOKEN.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from .outputs import flatten_config, run_records

log = logging.getLogger(__name__)

KNOWN = ("tensorboard", "wandb", "mlflow")
EXTERNAL = ("wandb", "mlflow")  # the optional extras: pip install 'mellama-train[wandb]' / '[mlflow]'
NONE = "none"  # report_to: [none], as HF Trainer spells "metrics.jsonl only"
PROJECT = (
    "mellama-train"  # the W&B project and MLflow experiment unless WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME
)
STEP_METRIC = "train/step"
"""Our step, sent as a metric of its own and used as W&B's x axis: W&B drops a row whose `step=` is below the
last one it saw, which is every step re-trained after a resume from an older checkpoint."""
OUTCOMES = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}
"""How a run ended (MetricsLogger.close) -> MLflow's run status. `stopped`: a signal or a stop rule checkpointed
and ended it, to be resumed."""


class Tracker(Protocol):
    run_id: str

    def log(self, step: int, scalars: dict[str, float]) -> None: ...

    def close(self, outcome: str) -> None: ...


def config_problems(report_to: list[str]) -> list[str]:
    """Start-up problems of train.report_to: unknown names, and trackers whose package is not installed."""
    problems = []
    for name in report_to:
        if name not in (*KNOWN, NONE):
            problems.append(
                f"train.report_to: unknown tracker {name!r}; choose from {', '.join(KNOWN)} or none"
            )
        elif name in EXTERNAL and importlib.util.find_spec(name) is None:
            problems.append(
                f"train.report_to: {name} is not installed; pip install 'mellama-train[{name}]' (or drop {name})"
            )
    if NONE in report_to and len(set(report_to)) > 1:
        problems.append("train.report_to: `none` cannot be listed with trackers; give either, not both")
    return problems


_SECRET_IN_URL = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]+@")
_SECRET_FIELD = re.compile(
    r"""(?ix)(?<![a-z])(token|api[_-]?key|password|passwd|secret|authorization)  # the field, also in x_token
    (["']?\s*[=:]\s*["']?)                                                    # = or : maybe quoted (JSON)
    (?:(?:bearer|basic|token)\s+)?                                              # an auth scheme
    [^\s"',}]+"""
)
SECRET_ENV = ("WANDB_API_KEY", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD", "DATABRICKS_TOKEN")


def redact(text: str) -> str:
    """An error message with what could be a credential masked: the values of the trackers' secret environment
    variables, a URL's user:password@, and token=/api_key=/password=/Authorization: values, quoted or not
    (errors often echo the request)."""
    for name in SECRET_ENV:
        if (secret := os.environ.get(name)) and len(secret) >= 4:
            text = text.replace(secret, "***")
    return _SECRET_FIELD.sub(r"\1\2***", _SECRET_IN_URL.sub(r"\1***@", text))


# Nothing but the scalars and the config: no console capture, code, git state, system stats, package list,
# host/user/argv metadata or machine info, and neither the host name nor the program path with the run. W&B
# still adds its own telemetry to the run's config (`_wandb`: Python and wandb versions, frameworks imported).
WANDB_QUIET = {
    "console": "off",
    "save_code": False,
    "disable_git": True,
    "x_disable_stats": True,
    "x_disable_meta": True,
    "x_disable_machine_info": True,
    "x_save_requirements": False,
    "host": "",
    "program": PROJECT,
}


def _quiet_settings(settings_class: Any) -> dict[str, Any]:
    """WANDB_QUIET, refused whole on a wandb that lacks one of them: a privacy setting silently dropped would
    upload what it keeps back."""
    fields = getattr(settings_class, "model_fields", None)
    missing = [k for k in WANDB_QUIET if fields is not None and k not in fields]
    if missing:
        raise RuntimeError(
            f"this wandb lacks the settings {', '.join(missing)} that keep host and code data back;"
            " pip install -U 'mellama-train[wandb]'"
        )
    return dict(WANDB_QUIET)


class WandbTracker:
    def __init__(self, run_dir: Path, config: dict[str, Any], run_id: str | None):
        import wandb

        mode = os.environ.get("WANDB_MODE", "online").lower()
        if mode not in ("offline", "dryrun", "disabled") and not os.environ.get("WANDB_API_KEY"):
            # Online without a key, wandb asks for one on the terminal (a batch job waits forever) or reads
            # ~/.netrc; secrets come from the environment only.
            raise RuntimeError("online W&B needs WANDB_API_KEY in the environment (or WANDB_MODE=offline)")
        settings = wandb.Settings(**_quiet_settings(wandb.Settings))

        def start(run_id: str | None) -> Any:
            return wandb.init(
                project=os.environ.get("WANDB_PROJECT", PROJECT),
                name=run_dir.name,
                id=run_id,  # None: W&B makes one, kept in the run record for the next start
                resume="allow",  # the same id continues the same run (a resume), else starts it
                config=config,
                dir=str(run_dir),  # its files under <run>/wandb/, beside the run's own
                settings=settings,
            )

        try:
            self.run = start(run_id)
        except Exception as exc:  # noqa: BLE001 - deleted on the server, say: a new run, said so
            if run_id is None:
                raise
            log.warning(
                "wandb: the earlier run %s cannot be continued (%s); starting a new one", run_id, _short(exc)
            )
            self.run = start(None)
        self.run.define_metric(STEP_METRIC)
        self.run.define_metric("*", step_metric=STEP_METRIC)
        self.run_id = self.run.id

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log({**scalars, STEP_METRIC: step})  # W&B's own _step counts calls; ours is STEP_METRIC

    def close(self, outcome: str) -> None:
        if outcome == "stopped" and hasattr(self.run, "mark_preempting"):
            self.run.mark_preempting()  # to be resumed, not a failure
        self.run.finish(exit_code=1 if outcome == "failed" else 0)


def mlflow_key(key: str) -> str:
    """A metric or parameter name MLflow accepts: letters, digits, _ - . space : / at most 250 characters, and
    a path that normalising leaves as it is (no empty, "." or ".." segment). A key that had to change ends in a
    digest of the original, so two config keys that differ only where MLflow refuses them ("a+b", "a_b") stay
    two parameters instead of failing the batch as duplicates."""
    safe = re.sub(r"[^\w\-. :/]", "_", key)
    safe = "/".join(part if part not in (".", "..") else "_" for part in safe.split("/") if part) or "_"
    if safe == key and len(key) <= 250:
        return key
    return f"{safe[:241]}_{hashlib.sha256(key.encode()).hexdigest()[:8]}"


class MlflowTracker:
    def __init__(self, run_dir: Path, config: dict[str, Any], run_id: str | None):
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
                    "mlflow: the earlier run %s cannot be continued (%s); starting a new one",
                    run_id,
                    _short(exc),
                )
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        try:
            self._log_params(config)
        except Exception as exc:  # noqa: BLE001 - parameters lost are no reason to lose the metrics too
            log.warning("mlflow: the config was not recorded as parameters (%s); metrics go on", _short(exc))

    def _log_params(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        # The dotted keys `--set` takes (sources by name). MLflow caps a value at 6000 characters and a batch
        # at 100 parameters.
        params = {
            mlflow_key(key): (v if isinstance(v, str) else json.dumps(v))[:6000]
            for key, v in flatten_config(config).items()
        }
        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_key(k), v, now, step) for k, v in scalars.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, outcome: str) -> None:
        self.client.set_terminated(self.run_id, status=OUTCOMES.get(outcome, "FAILED"))


FACTORIES = {"wandb": WandbTracker, "mlflow": MlflowTracker}


def _short(exc: BaseException) -> str:
    """An error in one line for a warning: masked first (a secret cut in two would no longer be recognised)."""
    text = redact(str(exc))
    first = text.splitlines()[0][:300] if text.strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


CLOSE_SECONDS = 60


class Guarded:
    """One tracker whose failures never reach the training loop: the first one is logged, the tracker dropped."""

    def __init__(self, name: str, tracker: Tracker | None):
        self.name, self.tracker = name, tracker

    @property
    def run_id(self) -> str | None:
        return self.tracker.run_id if self.tracker else None

    def _drop(self, what: str, exc: Exception) -> None:
        log.warning(
            "%s: %s failed (%s); reporting to %s stops here, metrics.jsonl goes on",
            self.name,
            what,
            _short(exc),
            self.name,
        )
        self.tracker = None

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if self.tracker:
            try:
                self.tracker.log(step, scalars)
            except Exception as exc:  # noqa: BLE001 - a tracker never stops training
                self._drop("logging", exc)

    def close(self, outcome: str = "finished") -> None:
        """Close within CLOSE_SECONDS: W&B's finish can wait on an unreachable server for a long time, and a run
        that has written everything must not hang on it (nor a second Ctrl-C lose the error that ended it)."""
        tracker, self.tracker = self.tracker, None
        if tracker is None:
            return
        failed: list[Exception] = []

        def close() -> None:
            try:
                tracker.close(outcome)
            except Exception as exc:  # noqa: BLE001
                failed.append(exc)

        closing = threading.Thread(target=close, name=f"close-{self.name}", daemon=True)
        closing.start()
        closing.join(CLOSE_SECONDS)
        if closing.is_alive():
            log.warning(
                "%s: closing did not finish in %d s; left to finish in the background",
                self.name,
                CLOSE_SECONDS,
            )
        elif failed:
            self.tracker = tracker
            self._drop("closing", failed[0])


_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
"""A tracker run id as W&B and MLflow make them (W&B: 8 of [a-z0-9]; MLflow: 32 hex digits): anything else in a
run record is not one (W&B refuses / # ? % :, and a log line must not carry a newline from a hostile file)."""


def previous_ids(run_dir: Path) -> dict[str, str]:
    """Each tracker's run id from the newest run record that has one for it. Per tracker: a start on which one
    tracker was unreachable records only the others, and the next start still continues the first one's run.
    Records are read back untrusted (outputs.run_records), and so are the ids in them: only the form trackers
    make."""
    ids: dict[str, str] = {}
    for record in run_records(run_dir):
        recorded = record.get("trackers")
        if isinstance(recorded, dict):
            for tracker, value in recorded.items():
                if (
                    tracker in EXTERNAL
                    and tracker not in ids
                    and isinstance(value, str)
                    and _RUN_ID.match(value)
                ):
                    ids[tracker] = value
    return ids


def open_trackers(report_to: list[str], run_dir: Path, config: dict[str, Any]) -> list[Guarded]:
    """Rank 0: the external trackers of train.report_to (each once), each continuing its earlier run."""
    earlier = previous_ids(run_dir)
    opened = []
    for name in dict.fromkeys(report_to):  # a name listed twice opens one tracker
        if name not in FACTORIES:
            continue
        try:
            opened.append(Guarded(name, FACTORIES[name](run_dir, config, earlier.get(name))))
        except Exception as exc:  # noqa: BLE001 - an unreachable tracker never stops training
            Guarded(name, None)._drop("starting", exc)
    return opened
