"""bench/gpu_suite.py, the one command a lent GPU machine runs, tested here on the CPU (--smoke) so that its few
minutes there are not spent finding the suite's own bugs: every check runs and reports, caps kill, the budget
skips, and the figures it reads back from the runs are there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import gpu_suite  # noqa: E402

SUITE = [sys.executable, str(REPO / "bench" / "gpu_suite.py")]


def suite(out: Path, *args: str, timeout: int = 900) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run(
        [*SUITE, "--out", str(out), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    return proc, json.loads((out / "results.json").read_text())


def statuses(report: dict) -> dict[str, str]:
    return {c["name"]: c["status"] for c in report["checks"]}


def test_a_check_past_its_cap_is_killed_with_its_children(tmp_path):
    ctx = gpu_suite.Ctx(True, tmp_path, tmp_path / "suite.log", dict(os.environ))
    pid_file = tmp_path / "child.pid"
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="after 1 s"):
        gpu_suite.call(ctx, ["bash", "-c", f"sleep 60 & echo $! > {pid_file}; wait"], cap=1)
    assert time.monotonic() - started < 20
    child = int(pid_file.read_text())
    for _ in range(
        50
    ):  # the grandchild was in the killed process group: gone, or a zombie awaiting its reaper
        status = Path(f"/proc/{child}/status")
        if not status.exists() or "zombie" in status.read_text():
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"sleep {child} outlived the cap")
    assert "$ bash -c" in ctx.log.read_text()


def test_the_budget_clips_a_cap_to_what_is_left_and_skips_what_no_longer_fits(tmp_path, monkeypatch):
    """Checks that ran use up the budget: the next gets what is left as its cap, and once less than the minimum
    slice is left the rest are skipped, each saying so; a check's figures from before a failure are kept."""

    def sleeps(seconds: float):
        return lambda ctx, cap: time.sleep(seconds) or {"slept": seconds, "cap": cap}

    def fails_after_figures(ctx, cap):
        ctx.results["c"] = {"partial": 1}
        raise gpu_suite.CheckFailed("broke after its first figure")

    monkeypatch.setattr(gpu_suite, "MIN_SLICE_S", 2)
    monkeypatch.setattr(
        gpu_suite,
        "CHECKS",
        [
            gpu_suite.Check("a", 5, 5, sleeps(2)),
            gpu_suite.Check("c", 5, 5, fails_after_figures),
            gpu_suite.Check("b", 10, 10, sleeps(3)),
            gpu_suite.Check("d", 10, 10, sleeps(0)),
        ],
    )
    monkeypatch.setattr(sys, "argv", ["gpu_suite.py", "--out", str(tmp_path), "--budget", "6", "--smoke"])
    assert gpu_suite.main() == 1  # c failed
    got = {c["name"]: c for c in json.loads((tmp_path / "results.json").read_text())["checks"]}
    assert got["a"]["status"] == "ok" and got["a"]["cap_s"] == 5
    assert got["c"]["status"] == "failed" and got["c"]["result"] == {"partial": 1}
    assert got["b"]["status"] == "ok" and 2 <= got["b"]["cap_s"] <= 4  # clipped from 10 to what was left
    assert got["d"]["status"] == "skipped" and "budget left" in got["d"]["why"]


def test_without_out_it_says_so(tmp_path):
    proc = subprocess.run(SUITE, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "--out DIR is required" in proc.stderr


@pytest.mark.slow
def test_the_whole_suite_runs_on_the_cpu(tmp_path):
    """Every check in --smoke: the GPU tests on the CPU, ours against HF Trainer doing the same work (equal final
    losses), the checkpoint figures read back from the run's metrics, the 8gb profile's QLoRA path."""
    proc, report = suite(tmp_path / "out", "--smoke", "--workdir", str(tmp_path / "work"))
    assert proc.returncode == 0, proc.stdout[-3000:]
    smoke = {"peers_4096": "skipped", "zero3": "skipped"}
    assert statuses(report) == {c.name: smoke.get(c.name, "ok") for c in gpu_suite.CHECKS}
    assert "matmul float32 n=512" in proc.stdout  # the summary, last in the output
    got = {c["name"]: c.get("result", {}) for c in report["checks"]}
    assert got["kernels"]["tests"] >= 3 and got["kernels"]["failures"] == got["kernels"]["errors"] == 0
    assert got["env"]["versions"]["deepspeed"][0].isdigit() and got["env"]["device"] == "cpu"
    assert got["matmul"]["tflops"] > 0 and got["matmul"]["error_vs_fp64"] < 1e-4
    peers = got["peers_2048"]["summary"]
    ours, hf = peers["ours"], peers["hf"]
    assert ours["tokens_per_s"] > 0 and hf["tokens_per_s"] > 0 and peers["ratio_ours_over_hf"]["median"] > 0
    # HF's ranks were handed exactly the sequences ours trained, in order; the same model, optimizer and
    # schedule then give the same loss after the same steps.
    assert hf["same_sequences"] is True
    assert abs(ours["final_loss"] - hf["final_loss"]) <= 0.002 * hf["final_loss"], (ours, hf)
    assert ours["peak_rss_mib"] > 100 and hf["peak_rss_mib"] > 100
    checkpoint = got["checkpoint"]
    assert checkpoint["save_s"] > 0 and checkpoint["load_s"] > 0 and checkpoint["export_s"] > 0
    assert 0 < checkpoint["save_share_at_500_steps"] < 1
    assert got["qlora_8gb"]["tokens_per_sec_median"] > 0 and got["qlora_8gb"]["planned_gib"] > 0
    log = (tmp_path / "out" / "suite.log").read_text()
    assert all(f"=== {c.name} " in log for c in gpu_suite.CHECKS if c.name not in smoke)


# ---- bench/peers.py: one side's crash costs a round, not the benchmark -------------------------------------


def test_peers_keeps_a_side_that_dies_after_its_results_and_reruns_a_round_without_them(tmp_path, capsys):
    """HF's side once aborted in its teardown at the 25m shape, after writing every result: that run counts
    (its exit status recorded). A side that leaves no results fails its round, which is kept apart with the
    reason and the log's tail, and another round is run, so the medians still get --pairs complete rounds."""
    import peers

    log = tmp_path / "hf.log"
    log.write_text("step 20\nterminate called without an active exception\n")

    def hf_teardown_abort() -> dict:
        return peers.judged("hf", log, {"wall_s": 1.0, "exit_code": -6}, lambda: {"tokens_per_s": 9.0})

    assert hf_teardown_abort() == {"wall_s": 1.0, "exit_code": -6, "tokens_per_s": 9.0}
    assert "hf exited -6 after writing complete results" in capsys.readouterr().out
    with pytest.raises(
        peers.SideFailed, match=r"(?s)hf: no usable results.*exit status -6.*without an active"
    ):
        peers.judged(
            "hf", log, {"exit_code": -6}, lambda: json.loads((tmp_path / "missing.json").read_text())
        )

    # Our own trainer's non-zero exit is a failure even with its metrics written (a crash in the final save or
    # export); a side that exited 0 without results is a bug or an impossible flag: it stops the benchmark.
    with pytest.raises(peers.SideFailed, match="ours exited 1 after training"):
        peers.judged("ours", log, {"exit_code": 1}, lambda: {"tokens_per_s": 9.0}, keep_failed_exit=False)
    with pytest.raises(SystemExit, match="exit status 0"):
        peers.judged("hf", log, {}, lambda: peers.window_rate({1: 0.0}, 1, 2, 1))

    calls: list[tuple[str, int]] = []

    def side(name: str, fail_on: set[int]):
        def run(port: int) -> dict:
            calls.append((name, port))
            if len([c for c in calls if c[0] == name]) in fail_on:
                raise peers.SideFailed(f"{name}: no usable results")
            return {
                "tokens_per_s": 2.0 if name == "ours" else 1.0,
                "wall_s": 1,
                "peak_rss_mib": 1,
                "final_loss": 0,
            }

        return run

    saved: list[dict] = []
    sides = [("ours", side("ours", set())), ("hf", side("hf", {2}))]
    runs, failed = peers.play(sides, 3, lambda run, port: run(port), saved.append)
    assert [r["ratio"] for r in runs] == [2.0, 2.0, 2.0]
    assert (
        len(failed) == 1
        and failed[0]["round"] == 2
        and failed[0]["hf"] == {"failed": "hf: no usable results"}
    )
    # Four rounds: complete ones alternate the side that goes first (ours, hf, ours), the failed one is run
    # again in its order (hf first); a port of its own for every run.
    assert [c[0] for c in calls] == ["ours", "hf", "hf", "hf", "ours", "ours", "hf"]
    assert len({c[1] for c in calls}) == len(calls)
    assert saved[-1]["failed_rounds"] == failed
    # A side that never has results: --pairs failed rounds are run again, the next one stops the benchmark.
    runs, failed = peers.play(
        [("ours", side("ours", set())), ("hf", lambda port: peers.window_rate({}, 1, 2, 1))],
        2,
        lambda run, port: run(port),
    )
    assert runs == [] and len(failed) == 3
