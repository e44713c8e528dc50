"""Experiment trackers (train.report_to, trackers.py): Weights & Biases in offline mode, read back from its own
files, and MLflow against a real tracking server on 127.0.0.1 (SQLite store), read back through MLflow's
client. Both get metrics.jsonl's scalars, the config as parameters, and a resumed run continues their runs; a
tracker that cannot be reached never stops training; a missing extra is one line naming it."""

from __future__ import annotations

import json
import logging
import re
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from test_train_e2e import REPO, run

from mellama_train import trackers
from mellama_train.metrics import MetricsLogger, read_metric_lines

wandb = pytest.importorskip("wandb")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (SQLite store) on 127.0.0.1."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    command += [
        "--backend-store-uri",
        f"sqlite:///{root}/store.db",
        "--default-artifact-root",
        str(root / "art"),
    ]
    command += ["--workers", "1"]
    with open(root / "server.log", "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None, (root / "server.log").read_text()[-2000:]
                time.sleep(0.5)
        else:
            pytest.fail("the MLflow server did not start in 60 s")
        yield uri
    finally:
        server.terminate()
        server.wait(timeout=30)


def wandb_records(run_file: Path) -> list:
    """The protobuf records of a W&B run file (`run-<id>.wandb`): its header, then records in 32 KiB blocks,
    each with a 7-byte header (CRC, length, type: full / first / middle / last), as W&B's own reader walks it.
    Written here because wandb 0.31 ships no Python reader of its own files."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", run_file
    pos, block, pieces, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        pieces += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            records.append(record)
            pieces = b""
    return records


def wandb_history(run_dir: Path) -> tuple[set[str], list[tuple[int, float]]]:
    """(run ids, [(train/step, train/loss)] in the order logged) over every W&B run file of the run directory
    (one per start)."""
    ids, rows = set(), []
    for run_file in sorted(
        (run_dir / "wandb").glob("offline-run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime
    ):
        for record in wandb_records(run_file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
            elif kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                if "train/loss" in row:
                    rows.append((row["train/step"], row["train/loss"]))
    return ids, rows


@pytest.mark.slow
def test_wandb_and_mlflow_get_the_runs_scalars_and_config_and_a_resume_continues_their_runs(
    tmp_path, mlflow_server
):
    out = tmp_path / "run"
    env = {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "MLFLOW_TRACKING_URI": mlflow_server,
        "MLFLOW_EXPERIMENT_NAME": "trackers-test",
    }
    args = [
        sys.executable,
        str(REPO / "launch" / "pretrain.py"),
        "--output-dir",
        str(out),
        "--save-every",
        "2",
    ]
    args += ["--set", "train.report_to=[tensorboard,wandb,mlflow,wandb]", "--set", "train.eval_every=0"]
    run([*args, "--max-steps", "4"], env=env)
    first_ids = json.loads((out / "run_record.json").read_text())["trackers"]
    assert set(first_ids) == {"wandb", "mlflow"}
    # The resumed start, from the older checkpoint: steps 3 and 4 are trained again, into the same tracker runs.
    run([*args, "--max-steps", "6", "--resume", str(out / "checkpoints" / "step_00000002")], env=env)
    records = [json.loads(p.read_text()) for p in out.glob("run_record*.json")]
    assert len(records) == 2 and all(r["trackers"] == first_ids for r in records)

    want = [
        (r["step"], r["train/loss"]) for r in read_metric_lines(out / "metrics.jsonl") if "train/loss" in r
    ]
    assert [step for step, _ in want] == [1, 2, 3, 4, 3, 4, 5, 6]
    ids, got = wandb_history(out)
    assert ids == {first_ids["wandb"]}
    assert [s for s, _ in got] == [s for s, _ in want]  # none dropped: W&B's x axis is our step metric
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)
    # Scalars and config only: no host/argv metadata, package list, code or console output went to W&B.
    uploaded = {p.name for p in (out / "wandb").rglob("*") if p.is_file()}
    runs = [
        r.run for f in (out / "wandb").rglob("run-*.wandb") for r in wandb_records(f) if r.HasField("run")
    ]
    assert runs and all(r.host == "" for r in runs)  # not this machine's name
    assert not uploaded & {"wandb-metadata.json", "requirements.txt", "output.log", "diff.patch"}, uploaded

    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    history = client.get_metric_history(first_ids["mlflow"], "train/loss")
    logged = sorted((m.step, m.value) for m in history)
    assert [s for s, _ in logged] == sorted(s for s, _ in want)
    assert [v for _, v in logged] == pytest.approx([v for _, v in sorted(want)], rel=1e-6)
    mlflow_run = client.get_run(first_ids["mlflow"])
    params = mlflow_run.data.params
    assert params["optim.lr"] == "0.003" and params["task"] == "pretrain"
    assert params["data.sources.mimic.weight"] == json.dumps(
        records[0]["config"]["data"]["sources"][1]["weight"]
    )
    assert mlflow_run.info.status == "FINISHED"
    experiment = client.get_experiment_by_name("trackers-test")
    assert len(client.search_runs([experiment.experiment_id])) == 1  # one run for both starts
    # Only numbers: every logged key is one metrics.jsonl has.
    jsonl_keys = {k for r in read_metric_lines(out / "metrics.jsonl") for k in r} - {"step", "time"}
    assert set(mlflow_run.data.metrics) <= jsonl_keys


def test_an_unreachable_tracker_warns_once_and_metrics_jsonl_goes_on(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with caplog.at_level(logging.WARNING):
        opened = trackers.open_trackers(["tensorboard", "mlflow"], tmp_path, {"optim": {"lr": 1.0}})
    assert opened == []
    assert [r.message.split(" failed")[0] for r in caplog.records if r.name == "mellama_train.trackers"] == [
        "mlflow: starting"
    ]

    class Flaky:  # reachable at first, then the network drops
        run_id, calls = "r1", 0

        def log(self, step, scalars):
            self.calls += 1
            if self.calls > 1:
                raise ConnectionError("connection reset by peer")

        def close(self):
            raise AssertionError("a dropped tracker is not closed")

    caplog.clear()
    flaky = Flaky()
    metrics = MetricsLogger(tmp_path, True, tensorboard=False, trackers=[trackers.Guarded("mlflow", flaky)])
    for step in range(1, 5):
        metrics.log(step, {"train/loss": 1.0 / step})
    metrics.close()
    assert flaky.calls == 2  # dropped after its first failure
    warnings = [r for r in caplog.records if r.name == "mellama_train.trackers"]
    assert len(warnings) == 1 and "mlflow: logging failed (ConnectionError" in warnings[0].message
    assert [r["step"] for r in read_metric_lines(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    assert not (tmp_path / "tensorboard").exists()  # report_to without tensorboard writes none


def test_an_unknown_tracker_or_a_missing_extra_is_one_line_naming_the_fix(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    assert trackers.config_problems(["tensorboard", "wandb", "neptune"]) == [
        "train.report_to: wandb is not installed; pip install 'mellama-train[wandb]' (or drop wandb)",
        "train.report_to: unknown tracker 'neptune'; choose from tensorboard, wandb, mlflow or none",
    ]


def test_earlier_tracker_ids_are_read_back_newest_per_tracker(tmp_path):
    (tmp_path / "run_record.json").write_text(json.dumps({"trackers": {"wandb": "a1", "mlflow": "m1"}}))
    # A start on which MLflow was unreachable recorded W&B's id alone: MLflow's run is still m1.
    (tmp_path / "run_record.20261207-010101.json").write_text(json.dumps({"trackers": {"wandb": "a2"}}))
    (tmp_path / "run_record.20261207-020202.json").write_text("{not json")  # damaged: passed over
    assert trackers.previous_ids(tmp_path) == {"wandb": "a2", "mlflow": "m1"}
    (tmp_path / "run_record.20261207-030303.json").write_text(
        json.dumps({"trackers": {"x": "y", "wandb": 5, "mlflow": "z" * 500}})
    )
    assert trackers.previous_ids(tmp_path) == {"wandb": "a2", "mlflow": "m1"}  # hostile values are no ids
    (tmp_path / "run_record.20261207-040404.json").write_text(json.dumps({"trackers": ["wandb"]}))
    assert trackers.previous_ids(tmp_path) == {"wandb": "a2", "mlflow": "m1"}


def test_report_to_none_and_a_name_listed_twice(tmp_path, monkeypatch):
    assert trackers.config_problems(["none"]) == []
    assert trackers.config_problems(["none", "wandb"]) == [
        "train.report_to: `none` cannot be listed with trackers; give either, not both"
    ]
    opened = []
    monkeypatch.setitem(
        trackers.FACTORIES, "wandb", lambda *a: opened.append(a) or type("T", (), {"run_id": "w"})()
    )
    assert [g.name for g in trackers.open_trackers(["wandb", "tensorboard", "wandb"], tmp_path, {})] == [
        "wandb"
    ]
    assert len(opened) == 1


def test_online_wandb_without_an_api_key_is_skipped_with_a_warning_not_a_prompt(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setattr(
        wandb, "init", lambda **kw: pytest.fail("wandb.init would ask for a key on the terminal")
    )
    with caplog.at_level(logging.WARNING):
        assert trackers.open_trackers(["wandb"], tmp_path, {}) == []
    assert "WANDB_API_KEY" in caplog.text and "metrics.jsonl goes on" in caplog.text


def test_credentials_never_reach_a_warning(monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "s3cr3t-token-value")
    text = trackers.redact(
        "POST https://alice:hunter2@mlflow.example.org/api failed; Authorization: Bearer abc.def; "
        "api_key=XYZ123 token s3cr3t-token-value"
    )
    for secret in ("hunter2", "alice", "abc.def", "XYZ123", "s3cr3t-token-value"):
        assert secret not in text, text
    assert "mlflow.example.org" in text

    class Leaky:
        run_id = "r"

        def log(self, step, scalars):
            raise ConnectionError("https://bob:pa55@host/ refused (token=s3cr3t-token-value)")

    with caplog.at_level(logging.WARNING):
        trackers.Guarded("mlflow", Leaky()).log(1, {"train/loss": 1.0})
    message = caplog.records[-1].getMessage()
    assert "pa55" not in message and "s3cr3t" not in message and "ConnectionError" in message


def test_mlflow_marks_how_the_run_ended_and_keeps_metrics_when_parameters_fail(
    tmp_path, monkeypatch, mlflow_server
):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "outcomes")
    client = MlflowClient(mlflow_server)
    for outcome, status in [("finished", "FINISHED"), ("stopped", "KILLED"), ("failed", "FAILED")]:
        tracker = trackers.Guarded(
            "mlflow", trackers.MlflowTracker(tmp_path / outcome, {"a": {"b": 1}}, None)
        )
        # A source name MLflow would refuse as a key (it allows letters, digits, _ - . space : /).
        tracker.log(1, {"train/loss/pub(med)#1": 2.5})
        tracker.close(outcome)
        run_info = client.get_run(tracker_id_of(client, outcome))
        assert run_info.info.status == status
        (key,) = run_info.data.metrics
        assert key.startswith("train/loss/pub_med__1_") and run_info.data.metrics[key] == 2.5
        assert run_info.data.params == {"a.b": "1"}

    def refuse(self, config):
        raise RuntimeError("params rejected")

    monkeypatch.setattr(trackers.MlflowTracker, "_log_params", refuse)
    kept = trackers.MlflowTracker(tmp_path / "noparams", {"a": 1}, None)
    kept.log(3, {"train/loss": 1.5})
    kept.close("finished")
    assert client.get_run(kept.run_id).data.metrics == {"train/loss": 1.5}


def tracker_id_of(client, run_name: str) -> str:
    experiment = client.get_experiment_by_name("outcomes")
    (found,) = [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name == run_name]
    return found.info.run_id


def test_a_crash_or_a_stop_reaches_the_trackers_as_the_runs_outcome(tmp_path):
    seen = []

    class Recorder:
        run_id = "r"

        def log(self, step, scalars):
            pass

        def close(self, outcome):
            seen.append(outcome)

    metrics = MetricsLogger(
        tmp_path, True, tensorboard=False, trackers=[trackers.Guarded("mlflow", Recorder())]
    )
    metrics.close("failed")
    metrics.close("finished")  # a second close (the loop's, after a stop's) changes nothing
    assert seen == ["failed"]


@pytest.mark.parametrize(
    "leak",
    [
        '{"api_key": "SEKRET1"}',
        "{'Authorization': 'Bearer SEKRET1'}",
        "Authorization: Basic SEKRET1",
        "access_token=SEKRET1&x=1",
        "MLFLOW_TRACKING_TOKEN=SEKRET1",
        "password: SEKRET1",
        "https://user:SEKRET1@host/api",
    ],
)
def test_redact_masks_credentials_in_the_forms_errors_echo_them(leak):
    assert "SEKRET1" not in trackers.redact(f"request failed: {leak} (status 401)")


def test_a_secret_crossing_the_cut_of_a_warning_is_masked_whole(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "abcd1234efgh5678")
    message = trackers._short(RuntimeError("x" * 290 + " key abcd1234efgh5678 refused"))
    assert "abcd1234" not in message


def test_tracker_ids_come_only_from_regular_run_records_of_our_names(tmp_path):
    import os

    (tmp_path / "run_record.json").write_text(json.dumps({"trackers": {"wandb": "good1", "mlflow": "m\nX"}}))
    os.mkfifo(tmp_path / "run_record.20261207-050505.json")  # would block a plain read forever
    (tmp_path / "run_record.20261207-060606.json").symlink_to("/dev/zero")  # would never end
    (tmp_path / "run_record.zzz.json").write_text(json.dumps({"trackers": {"wandb": "stray"}}))
    (tmp_path / "run_record.20261207-040404.json").write_text(json.dumps({"trackers": {"wandb": "a/b?c"}}))
    assert trackers.previous_ids(tmp_path) == {"wandb": "good1"}


def test_a_wandb_run_that_cannot_be_continued_starts_a_new_one(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_MODE", "offline")
    calls = []

    def init(**kwargs):
        calls.append(kwargs["id"])
        if kwargs["id"] is not None:
            raise RuntimeError("run gone1 was deleted")
        return type("Run", (), {"id": "fresh1", "define_metric": lambda *a, **k: None})()

    monkeypatch.setattr(wandb, "init", init)
    with caplog.at_level(logging.WARNING):
        tracker = trackers.WandbTracker(tmp_path, {}, "gone1")
    assert calls == ["gone1", None] and tracker.run_id == "fresh1"
    assert "cannot be continued" in caplog.text


def test_a_wandb_lacking_a_privacy_setting_is_refused(monkeypatch):
    class Old:
        model_fields = {k: None for k in trackers.WANDB_QUIET if k != "x_disable_meta"}

    with pytest.raises(RuntimeError, match="lacks the settings x_disable_meta"):
        trackers._quiet_settings(Old)


def test_a_tracker_whose_close_hangs_is_left_behind_after_the_limit(monkeypatch, caplog):
    import threading

    release = threading.Event()

    class Hanging:
        run_id = "h1"

        def close(self, outcome):
            release.wait(30)

    monkeypatch.setattr(trackers, "CLOSE_SECONDS", 0.2)
    with caplog.at_level(logging.WARNING):
        started = time.monotonic()
        trackers.Guarded("wandb", Hanging()).close("finished")
    release.set()
    assert time.monotonic() - started < 5 and "closing did not finish" in caplog.text


def test_a_sink_that_fails_to_close_still_closes_the_trackers(tmp_path, caplog):
    ended = []

    class Recorder:
        run_id = "r"

        def close(self, outcome):
            ended.append(outcome)

    metrics = MetricsLogger(
        tmp_path, True, tensorboard=False, trackers=[trackers.Guarded("mlflow", Recorder())]
    )

    class BadFile:
        def close(self):
            raise OSError("disk gone")

    metrics._jsonl.close()
    metrics._jsonl = BadFile()
    with caplog.at_level(logging.WARNING):
        metrics.close_quietly("failed")
    assert ended == ["failed"] and "disk gone" in caplog.text


def test_mlflow_keys_stay_apart_when_names_differ_only_in_characters_mlflow_refuses():
    import posixpath

    names = ["data/a+b", "data/a_b", "data/a b", "x" * 300, "x" * 299 + "y", "a//b", "a/b/", "/a/../b", "."]
    keys = [trackers.mlflow_key(n) for n in names]
    assert len(set(keys)) == len(names)
    assert keys[1] == names[1] and keys[2] == names[2]  # valid names are kept as they are
    # MLflow's own rules: its characters, 250 at most, and a path normalising leaves alone.
    assert all(len(k) <= 250 and re.fullmatch(r"[\w\-. :/]+", k) and posixpath.normpath(k) == k for k in keys)
