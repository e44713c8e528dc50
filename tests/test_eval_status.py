"""Evaluation during training (step 0 baseline, perplexity, the forgetting monitor and its stop), the mixture
ledger and drift alarm, and `mellama-train status`."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from test_train_e2e import LAUNCH, REPO, TINY, clean_env, run

from mellama_train.cli import report_main, status_main
from mellama_train.data.mixture import drift
from mellama_train.evaluation import EXIT_FORGETTING, ForgettingMonitor
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

    # The report: a self-contained page with its plots embedded, and the same PNGs beside it.
    assert report_main([str(out), "--out", str(tmp_path / "report")]) == 0
    assert "report: " in capsys.readouterr().out
    pngs = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert pngs == ["loss.png", "lr.png", "mixture.png", "skipped.png", "throughput.png"]
    assert all((tmp_path / "report" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    page = (tmp_path / "report" / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 5 and "step_00000012" in page
    # The model card beside final/ records the last held-out loss of each source.
    card = (out / "final" / "README.md").read_text()
    assert f"| {metrics[12]['eval/loss/mimic']:.4f} |" in card and "evaluation at step 12" in card


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
