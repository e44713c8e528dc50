"""Evaluation during training (step 0 baseline, perplexity, the forgetting monitor and its stop), the mixture
ledger and drift alarm, and `mellama-train status`."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from test_train_e2e import LAUNCH, REPO, TINY, clean_env, run

from mellama_train.cli import report_main, status_main
from mellama_train.data.mixture import drift
from mellama_train.evaluation import ForgettingMonitor
from mellama_train.exit_codes import EXIT_FORGETTING
from mellama_train.metrics import read_metrics

FAULT_LAUNCH = str(REPO / "tests" / "fault_launch.py")


def test_drift_alarms_only_past_what_the_scheduler_can_explain():
    fractions = [0.75, 0.05, 0.20]
    shares, distance, alarm = drift([7400, 640, 1960], fractions, error_bound=256, tolerance=0.01)
    assert shares == pytest.approx([0.74, 0.064, 0.196]) and distance == pytest.approx(0.014)
    assert not alarm  # 256 / 10,000 tokens: one packed sequence per source explains 2.6%
    _, _, alarm = drift([740_000, 64_000, 196_000], fractions, error_bound=256, tolerance=0.01)
    assert alarm  # a million tokens in, 1.4 points off cannot be the scheduler's rounding
    assert not drift([751_000, 49_500, 199_500], fractions, error_bound=256, tolerance=0.01)[2]
    assert drift([0, 0, 0], fractions, 256, 0.01) is None


def test_forgetting_monitor_compares_with_step_0_and_keeps_its_baseline():
    monitor = ForgettingMonitor("general", margin=0.1, stop=False)
    first = monitor.observe(0, {"eval/loss/general": 2.0, "eval/loss/medical": 3.0})
    assert first == {"eval/rise/general": 0.0, "eval/rise/medical": 0.0, "eval/forgetting_alarm": 0.0}
    later = monitor.observe(10, {"eval/loss/general": 2.05, "eval/loss/medical": 2.5})
    assert later["eval/rise/general"] == pytest.approx(0.05) and not monitor.alarm
    resumed = ForgettingMonitor("general", margin=0.1, stop=True)
    resumed.baseline = dict(monitor.baseline)  # from the checkpoint's eval_baseline
    out = resumed.observe(20, {"eval/loss/general": 2.2, "eval/loss/medical": 2.4})
    assert out["eval/rise/general"] == pytest.approx(0.2) and out["eval/forgetting_alarm"] == 1.0
    assert resumed.alarm


@pytest.mark.slow
def test_held_out_eval_at_step_0_and_every_10_steps_with_perplexity_ledger_and_status(tmp_path, capsys):
    out = tmp_path / "run"
    run(
        [
            sys.executable,
            str(REPO / "launch" / "pretrain.py"),
            "--output-dir",
            str(out),
            *TINY,
            "--max-steps",
            "12",
        ]
    )
    metrics = read_metrics(out / "metrics.jsonl")
    evals = sorted(s for s, v in metrics.items() if "eval/loss" in v)
    assert evals == [0, 10, 12]  # the tiny profile evaluates every 10 steps, before the first and at the end
    for step in evals:
        for name in ("pubmed", "mimic", "redpajama"):
            loss = metrics[step][f"eval/loss/{name}"]
            assert metrics[step][f"eval/ppl/{name}"] == pytest.approx(math.exp(loss))
            assert metrics[step][f"eval/rise/{name}"] == pytest.approx(loss - metrics[0][f"eval/loss/{name}"])
    assert metrics[12]["eval/rise/redpajama"] < 0 and metrics[12]["eval/forgetting_alarm"] == 0.0
    assert 0.0 < metrics[12]["data/drift"] < 0.05 and sum(
        metrics[12][f"data/share/{n}"] for n in ("pubmed", "mimic", "redpajama")
    ) == pytest.approx(1.0)

    trainer = json.loads((out / "checkpoints" / "step_00000012" / "trainer.json").read_text())
    assert trainer["eval_baseline"] == {
        n: metrics[0][f"eval/loss/{n}"] for n in ("pubmed", "mimic", "redpajama")
    }
    assert trainer["epochs_by_source"] == {"pubmed": 0, "mimic": 0, "redpajama": 0}
    assert trainer["mixture_taken"] == trainer["tokens_by_source"]  # pretraining weights count tokens
    assert sum(trainer["tokens_by_source"].values()) == 12 * 4 * 64

    assert status_main([str(out)]) == 0
    text = capsys.readouterr().out
    assert "checkpoint  step_00000012 (files match its manifest)" in text
    assert "step        12 of 12 (100.0%)" in text and "time left: finished" in text
    pubmed = next(line for line in text.splitlines() if line.strip().startswith("pubmed"))
    assert "75.00%" in pubmed and f"{trainer['tokens_by_source']['pubmed']:,}" in pubmed
    assert "alarms      none" in text

    # The report: a self-contained page with its plots embedded, and the same PNGs beside it, with the modes
    # the user's umask gives (group-writable under 002, as on a shared project directory).
    old_mask = os.umask(0o002)
    try:
        assert report_main([str(out), "--out", str(tmp_path / "report")]) == 0
    finally:
        os.umask(old_mask)
    written = [tmp_path / "report", *(tmp_path / "report").iterdir()]
    assert {oct(p.stat().st_mode & 0o777) for p in written} == {oct(0o775), oct(0o664)}
    assert "report: " in capsys.readouterr().out
    pngs = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert pngs == ["loss.png", "lr.png", "mixture.png", "skipped.png", "throughput.png"]
    assert all((tmp_path / "report" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    page = (tmp_path / "report" / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 5 and "step_00000012" in page
    # The model card beside final/ records the last held-out loss of each source.
    card = (out / "final" / "README.md").read_text()
    assert f"| {metrics[12]['eval/loss/mimic']:.4f} |" in card and "evaluation at step 12" in card


@pytest.mark.slow
def test_the_forgetting_alarm_stops_the_run_and_a_resume_keeps_the_step_0_baseline(tmp_path, capsys):
    out = tmp_path / "run"
    args = [FAULT_LAUNCH, "--output-dir", str(out), *TINY, "--max-steps", "12"]
    # the 2nd evaluation (step 10) reads every held-out loss 1 nat higher than it is
    env = {**clean_env(), "MELLAMA_FAULT": "forget:0:2"}
    proc = subprocess.run(
        [sys.executable, *args, "--set", "train.stop_on_forgetting=true"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == EXIT_FORGETTING, proc.stderr[-3000:]
    assert "held-out loss of redpajama (the forgetting probe) rose" in proc.stderr
    assert "past train.forgetting_margin 0.1" in proc.stderr
    metrics = read_metrics(out / "metrics.jsonl")
    assert max(metrics) == 10 and metrics[10]["eval/forgetting_alarm"] == 1.0
    assert (out / "checkpoints" / "step_00000010" / "COMPLETE").is_file()
    assert status_main([str(out)]) == 1  # the alarm shows in the status too
    assert "forgetting: redpajama's held-out loss is" in capsys.readouterr().out

    # Relaunched without the fault and without the stop (a key that may differ on a resume): it continues
    # from step 10 and measures the rise against the first start's step-0 losses.
    run([sys.executable, LAUNCH, *args[1:]])
    resumed = read_metrics(out / "metrics.jsonl")
    base = resumed[0]["eval/loss/redpajama"]
    assert resumed[12]["eval/rise/redpajama"] == pytest.approx(resumed[12]["eval/loss/redpajama"] - base)
    assert resumed[12]["eval/forgetting_alarm"] == 0.0
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps.count(0) == 1  # the step-0 evaluation is not repeated by the resumed start


def test_status_and_report_of_a_directory_that_is_no_run_say_so_in_one_line(tmp_path, capsys):
    assert status_main([str(tmp_path)]) == 2
    assert f"{tmp_path}: no readable run_record.json; pass a run directory" in capsys.readouterr().err
    assert report_main([str(tmp_path)]) == 2
    assert "pass a run directory (its --output-dir)" in capsys.readouterr().err


# ---- dead or alive: fabricated run directories -------------------------------------------------------------


def fabricated_run(tmp_path, minutes_ago: float, heartbeat: dict | None = None, **last_values) -> Path:
    """A run directory as a 100-step run leaves it after logging steps 1-20 at 1 s/step, the last one
    `minutes_ago` minutes ago; no checkpoint. `heartbeat`: fields over a running rank 0's."""
    from mellama_train.config import resolve
    from mellama_train.outputs import write_run_record

    run = tmp_path / "run"
    run.mkdir(parents=True)
    write_run_record(
        run, resolve("tiny", overrides=["train.max_steps=100", "train.log_every=1"]), {}, {}, None
    )
    end = time.time() - minutes_ago * 60
    with open(run / "metrics.jsonl", "w") as fh:
        for step in range(1, 21):
            values = {"train/loss": 3.0, "train/tokens_per_sec": 100.0, "train/skipped_steps": 0}
            values.update(last_values if step == 20 else {})
            fh.write(json.dumps({"step": step, "time": end - (20 - step), **values}) + "\n")
    if heartbeat is not None:
        beat = {"host": socket.gethostname(), "pid": os.getpid(), "state": "running", "time": end}
        started = psutil.Process().create_time()  # the watchdog of this (test) process started after it
        beat.update(
            started=started, phase="training", last_completed="step 20", last_progress=end, every_s=10
        )
        beat.update(heartbeat)
        (run / "heartbeat.json").write_text(json.dumps(beat))
        os.utime(run / "heartbeat.json", (beat["time"], beat["time"]))  # as last written
    return run


def a_dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def stamp(run: Path) -> str:
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["time"]
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last))


@pytest.mark.parametrize(
    "heartbeat, why",
    [
        ({"pid": "dead"}, "is gone without a word"),  # this host: its process no longer exists
        ({"host": "another-node"}, "is gone without a word"),  # another host: its heartbeat is 8 min old
        (None, "no process has reported on it (no heartbeat.json)"),  # a run from before heartbeats
        ({"state": "failed (RuntimeError)"}, "it failed (RuntimeError)"),
        ({"state": "hung (exit 76)"}, "the watchdog ended it (exit 76); read logs/hang-rank-*.txt"),
        ({"state": "stopped (exit 75)"}, "it stopped on request (exit 75) and has not been restarted"),
    ],
)
def test_a_run_without_a_live_process_or_progress_is_stalled_or_dead(tmp_path, capsys, heartbeat, why):
    if heartbeat and heartbeat.get("pid") == "dead":
        heartbeat = {"pid": a_dead_pid()}
    run = fabricated_run(tmp_path, minutes_ago=8, heartbeat=heartbeat)
    assert status_main([str(run)]) == 1
    out = capsys.readouterr().out
    assert f"state       STALLED OR DEAD since {stamp(run)}" in out
    alarm = next(line for line in out.splitlines() if line.startswith("alarms"))
    assert f"stalled or dead since {stamp(run)} (8 min ago)" in alarm and why in alarm
    assert "relaunch" in alarm and "(nothing was saved yet)" in alarm
    assert "time left: 1 min for 80 steps once it runs again" in out  # not a countdown of a dead run


@pytest.mark.parametrize(
    "heartbeat",
    [
        {},  # this host, this (live) process, stuck for 8 minutes: the watchdog's business, not dead
        {"host": "another-node", "time": "now"},  # another host whose heartbeat is fresh
    ],
)
def test_a_live_run_is_not_called_dead_even_without_progress(tmp_path, capsys, heartbeat):
    if heartbeat.get("time") == "now":
        heartbeat["time"] = time.time()
    run = fabricated_run(tmp_path, minutes_ago=8, heartbeat=heartbeat)
    assert status_main([str(run)]) == 0
    out = capsys.readouterr().out
    host = heartbeat.get("host", socket.gethostname())
    assert f"state       running on {host} (pid {os.getpid()}); last progress 8 min ago: step 20" in out
    assert "alarms      none" in out


def test_a_finished_run_and_a_stop_moments_ago_are_not_dead(tmp_path, capsys):
    run = fabricated_run(tmp_path, minutes_ago=600, heartbeat={"state": "finished"})
    assert status_main([str(run)]) == 0
    assert "state       finished" in capsys.readouterr().out
    (run / "heartbeat.json").unlink()
    (run / "final").mkdir()
    (run / "final" / "config.json").write_text("{}")  # a run from before heartbeats, with its final model
    assert status_main([str(run)]) == 0
    assert "state       finished" in capsys.readouterr().out

    stopped = fabricated_run(tmp_path / "b", minutes_ago=0.1, heartbeat={"state": "stopped (exit 75)"})
    assert status_main([str(stopped)]) == 0  # a requeue is restarting it: no alarm yet
    assert "state       not running: it stopped on request (exit 75)" in capsys.readouterr().out


def test_fault_counters_come_from_the_metrics_also_past_the_newest_checkpoint(tmp_path, capsys):
    values = {
        "train/skipped_steps": 3,
        "train/loss_spikes": 1,
        "data/skipped/mimic": 7,
        "data/skipped/pubmed": 0,
    }
    run = fabricated_run(tmp_path, minutes_ago=0.1, heartbeat={"time": time.time()}, **values)
    assert status_main([str(run)]) == 0
    out = capsys.readouterr().out
    assert "checkpoint  none complete yet" in out
    assert "faults      (step 20) skipped steps 3, loss spikes 1; records skipped: pubmed 0, mimic 7" in out


def test_status_shows_documents_per_source_and_every_reason_by_kind(tmp_path, capsys):
    values = {
        "data/documents/pubmed": 1790,
        "data/documents/mimic": 300,
        "data/reasons/pubmed/no_abstract": 9,
        "data/reasons/pubmed/empty": 1,
        "data/reasons/pubmed/not_available": 2,
        "data/reasons/mimic/not_selected": 40,
        "data/reasons/mimic/<b>": "x",  # a hostile value: not a count, left out
    }
    run = fabricated_run(tmp_path, minutes_ago=0.1, heartbeat={"time": time.time()}, **values)
    assert status_main([str(run)]) == 0
    out = capsys.readouterr().out
    assert (
        "documents   (step 20) pubmed 1,790 (skipped 1 empty; filtered 9 no_abstract, 2 not_available),"
        " mimic 300 (filtered 40 not_selected)"
    ) in out


def test_a_fresh_heartbeat_is_a_live_run_even_when_its_pid_is_not_visible_here(tmp_path, capsys):
    """Rank 0 in a container on this host (same hostname, its own PID namespace): its pid names no process here,
    or another one. The heartbeat it rewrites every 10 s is what says it is alive."""
    invisible = a_dead_pid()
    run = fabricated_run(tmp_path, minutes_ago=8, heartbeat={"pid": invisible, "time": time.time()})
    assert status_main([str(run)]) == 0
    out = capsys.readouterr().out
    host = socket.gethostname()
    assert f"state       running on {host} (pid {invisible}); last progress 8 min ago: step 20" in out
    assert "alarms      none" in out


# ---- hostile run files: status and report never show a traceback -------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000  # valid JSON, nested deeper than the parser's recursion limit


def _append_metrics(run: Path, text: str) -> None:
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write(text + "\n")


def _step_dir(run: Path) -> Path:
    step = run / "checkpoints" / "step_00000010"
    step.mkdir(parents=True)
    return step


def _heartbeat(run: Path, text: str) -> None:
    (run / "heartbeat.json").write_text(text)
    written = (
        time.time() - 8 * 60
    )  # as a rank 0 that died 8 minutes ago left it: the file's date is stale too
    os.utime(run / "heartbeat.json", (written, written))


HOSTILE = {
    # A step directory whose marker was removed, one whose marker cannot be stat'ed (a symlink loop: ELOOP, as
    # root too), and one that cannot be listed (not as root: root reads it anyway).
    "marker-removed": lambda run: _step_dir(run),
    "marker-unreadable": lambda run: (_step_dir(run) / "COMPLETE").symlink_to("COMPLETE"),
    "step-dir-unreadable": lambda run: _step_dir(run).chmod(0),
    # Numbers that parse but are no finite number of their type.
    "metrics-time-inf": lambda run: _append_metrics(run, '{"step": 21, "time": 1e999, "train/loss": 3.0}'),
    "heartbeat-progress-inf": lambda run: _heartbeat(
        run, '{"state": "running", "last_progress": 1e999, "time": 0}'
    ),
    "skipped-steps-inf": lambda run: _append_metrics(run, '{"step": 21, "train/skipped_steps": 1e999}'),
    "metrics-wrong-types": lambda run: _append_metrics(
        run, '{"step": "21", "time": "x"}\n{"step": 22, "eval/loss": 1, "eval/loss/pubmed": "nan"}'
    ),
    "heartbeat-time-far-ahead": lambda run: _heartbeat(run, '{"state": "running", "time": 1e300}'),
    "metrics-far-apart": lambda run: _append_metrics(  # finite, but the plots' axis arithmetic overflows
        run,
        '{"step": 21, "train/lr": 1e308}\n{"step": 22, "train/lr": -1e308, "train/tokens_per_sec": 1e308}',
    ),
    # Nested deeper than the JSON parser goes (RecursionError).
    "metrics-nested": lambda run: _append_metrics(run, DEEP),
    "heartbeat-nested": lambda run: _heartbeat(run, DEEP),
    "run-record-nested": lambda run: (run / "run_record.99999999-000000.json").write_text(
        '{"config": ' + DEEP + "}"
    ),
}


@pytest.mark.parametrize("plant", list(HOSTILE), ids=list(HOSTILE))
def test_hostile_run_files_give_a_status_and_a_report_never_a_traceback(tmp_path, capsys, plant):
    """A run directory in shared scratch, with one file planted: `status` still reports (this run is dead: exit
    1, with its alarm), and `report` still writes its page; nothing reaches stderr."""
    run = fabricated_run(tmp_path, minutes_ago=8)
    HOSTILE[plant](run)
    try:
        assert status_main([str(run)]) == 1
        captured = capsys.readouterr()
        assert captured.err == "" and "state       STALLED OR DEAD since" in captured.out
        if "step-dir" in plant or "marker" in plant:
            assert "checkpoint  step_00000010 (DAMAGED: " in captured.out
        assert report_main([str(run), "--out", str(tmp_path / "report")]) == 0
        captured = capsys.readouterr()
        assert captured.err == "" and (tmp_path / "report" / "report.html").is_file()
    finally:
        for step in (run / "checkpoints").glob("step_*"):
            step.chmod(0o755)


def test_an_unexpected_failure_reading_a_run_is_one_line_naming_it_and_debug_shows_where(
    tmp_path, capsys, monkeypatch
):
    """Whatever the readers do not foresee is one line naming the run directory, never a traceback."""
    run = fabricated_run(tmp_path, minutes_ago=8)

    def unforeseen(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr("mellama_train.status.read_metric_lines", unforeseen)
    monkeypatch.setattr("mellama_train.report.read_metrics", unforeseen)
    for main in (status_main, report_main):
        assert main([str(run)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(
            f"error: {run}: a file of this run directory could not"
        )
        assert "(RecursionError)" in err and "--debug prints the traceback" in err
        assert main([str(run), "--debug"]) == 2
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and "in unforeseen" in err


def test_a_nested_newer_run_record_is_passed_over_at_training_start(tmp_path):
    """Rank 0 compares the run record before resuming (outputs.same_run): a record it cannot parse is passed
    over, as an invalid one is, rather than a traceback on rank 0 while the other ranks wait."""
    from mellama_train.config import resolve
    from mellama_train.outputs import check_same_run, latest_run_record, same_run

    run = fabricated_run(tmp_path, minutes_ago=8)
    HOSTILE["run-record-nested"](run)
    (run / "run_record.99999998-000000.json").write_text('{"config": {"data": {"sources": [1, "x"]}}}')
    cfg = resolve("tiny", overrides=["train.max_steps=100", "train.log_every=1"])
    assert latest_run_record(run)["config"]["data"]["sources"] == [1, "x"]  # not nested: it is the newest
    assert not same_run(run, cfg)  # a config of another run, compared without a traceback
    (run / "run_record.99999998-000000.json").unlink()
    assert same_run(run, cfg)  # the nested one is passed over: the first start's record is compared
    check_same_run(run, cfg, run / "checkpoints" / "step_00000010")
    # Only the names write_run_record gives are records (the same rule as trackers.previous_ids): a planted
    # run_record.zzz.json would otherwise sort first and stand for the newest start.
    (run / "run_record.zzz.json").write_text('{"config": {"data": {"sources": [1, "x"]}}}')
    assert same_run(run, cfg)


# ---- whether a run can go on with fewer ranks (slurm/launch.sh asks when a node is lost) ------------------


def test_resumes_on_moves_a_prepared_zero3_run_and_says_why_it_will_not_move_the_others(tmp_path, capsys):
    from mellama_train.config import resolve
    from mellama_train.outputs import write_run_record

    prepared = [f"data.sources.{n}.prepared={tmp_path}" for n in ("pubmed", "mimic", "redpajama")]
    zero3, zero2 = {"zero_optimization": {"stage": 3}}, {"zero_optimization": {"stage": 2}}

    def answer(run: Path, ranks: int) -> tuple[int, str]:
        code = status_main([str(run), "--resumes-on", str(ranks)])
        return code, capsys.readouterr().out.strip()

    def recorded(name: str, ds: dict, overrides: list[str]) -> Path:
        run = tmp_path / name
        run.mkdir()
        write_run_record(run, resolve("tiny", overrides=overrides), ds, {}, None)
        return run

    # Global batch 8 in micro-batches of 4: 1 or 2 ranks, not 3.
    run = recorded("prepared", zero3, prepared)
    assert answer(run, 1) == (0, f"{run} can go on with 1 ranks")
    assert answer(run, 2)[0] == 0
    assert answer(run, 3) == (
        1,
        "its global batch (8) is not a whole number of micro-batches (4) on each of 3 ranks",
    )
    assert answer(recorded("streamed", zero3, []), 1) == (
        1,
        "its sources are streamed: a streamed run resumes on the number of ranks that wrote it",
    )
    assert answer(recorded("zero2", zero2, prepared), 1)[1].startswith("it does not run ZeRO-3")
    assert answer(recorded("pinned", zero3, [*prepared, "train.world_size=2"]), 1)[1].startswith(
        "it sets train.world_size=2"
    )

    # A record read back untrusted: missing, damaged, or with the wrong types or values, is a reason, never a
    # traceback, and never a yes.
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "run_record.json").write_text("{not json")
    assert answer(tmp_path / "damaged", 1) == (1, f"no readable run record in {tmp_path / 'damaged'}")
    assert answer(tmp_path / "not-started", 1)[0] == 1
    hostile = json.loads((run / "run_record.json").read_text())
    cases = [
        (("config", "data"), "x"),
        (("config", "data", "sources"), []),
        (("config", "train"), [1]),
        (("config", "train", "global_batch_size"), 0),
        (("config", "train", "global_batch_size"), -8),
        (("config", "train", "micro_batch_size"), 4.0),
        (("ds_config",), "3"),
    ]
    for path, value in cases:
        tree = json.loads(json.dumps(hostile))
        node = tree
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        (run / "run_record.json").write_text(json.dumps(tree))
        code, why = answer(run, 1)
        assert code == 1 and why and "Traceback" not in why, (path, why)
    assert status_main([str(run), "--resumes-on", "0"]) == 2
