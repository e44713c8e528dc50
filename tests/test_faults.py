"""Numerical faults and hangs: a NaN on one rank skips the step on every rank with the weights unchanged, too many
in a row stop the run with the last good weights saved; a rank that stops making progress anywhere (start-up, the
step-0 evaluation, the loop, the final export, a merge) is dumped and ended by the watchdog. Faults are injected
by tests/fault_launch.py (the product has no fault hooks)."""

from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_train_e2e import LAUNCH, REPO, TINY, clean_env

from mellama_train.backends.single import SingleDeviceBackend
from mellama_train.exit_codes import EXIT_DIVERGED, EXIT_HUNG
from mellama_train.guard import SPIKE_MIN_GOOD_STEPS, StepGuard
from mellama_train.metrics import read_metrics

FAULT_LAUNCH = str(REPO / "tests" / "fault_launch.py")


def launch_with_fault(fault: str, out: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """2 ranks (ZeRO-3 over gloo) through DeepSpeed's launcher, with MELLAMA_FAULT=fault; not checked."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29547"]
    cmd += [FAULT_LAUNCH, "--ds", "ds_configs/zero3.json", "--output-dir", str(out), *TINY, *args]
    env = {**clean_env(), "MELLAMA_FAULT": fault}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


# ---- the guard's decisions -------------------------------------------------------------------------------


def test_guard_rejects_non_finite_losses_and_only_skips_spikes_when_asked():
    guard = StepGuard(spike_factor=2.0, skip_spikes=False, max_consecutive=2)
    assert torch.isnan(guard.backward_factor(torch.tensor(math.nan)))
    assert torch.isnan(guard.backward_factor(torch.tensor(math.inf)))
    assert guard.backward_factor(torch.tensor(50.0)) == 1.0  # no running mean yet: nothing is a spike
    for step in range(1, SPIKE_MIN_GOOD_STEPS + 1):
        assert guard.after_step(step, 3.0, applied=True).applied
    assert guard.mean == pytest.approx(3.0)
    assert guard.backward_factor(torch.tensor(7.0)) == 1.0  # a spike, but skip_spikes is off
    verdict = guard.after_step(11, 7.0, applied=True)
    assert verdict.spike and verdict.applied and guard.loss_spikes == 1

    skipping = StepGuard(spike_factor=2.0, skip_spikes=True, max_consecutive=2)
    skipping.load_state_dict(guard.state_dict())
    assert torch.isnan(skipping.backward_factor(torch.tensor(20.0)))
    assert skipping.backward_factor(torch.tensor(4.0)) == 1.0
    assert skipping.after_step(12, 20.0, applied=False).reason == "spike"
    assert skipping.after_step(13, math.nan, applied=False).reason == "non-finite"
    assert not skipping.diverged  # 2 in a row is the limit, not past it
    assert skipping.after_step(14, 2.9, applied=True).applied and skipping.consecutive_skips == 0
    for step in (15, 16, 17):
        skipping.after_step(step, math.nan, applied=False)
    assert skipping.diverged and skipping.skipped_steps == 5
    assert skipping.metrics() == {"train/skipped_steps": 5, "train/loss_spikes": 2}


def test_guard_refuses_to_continue_when_the_engine_applied_a_rejected_step():
    with pytest.raises(RuntimeError, match="applied an optimizer step this run rejected"):
        StepGuard(2.0, False, 5).after_step(3, math.nan, applied=True)


def test_single_device_backend_skips_a_non_finite_step_leaving_everything_unchanged():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    groups = [{"params": list(model.parameters()), "weight_decay": 0.1}]
    eng = SingleDeviceBackend(
        model,
        groups,
        lambda step: 1.0 / (step + 1),
        optimizer="adamw",
        lr=1e-2,
        betas=[0.9, 0.95],
        eps=1e-8,
        grad_clip=1.0,
        accum_steps=2,
    )
    x = torch.randn(3, 8)

    def step(poison: float) -> None:
        for factor in (1.0, poison):  # two micro-batches; the second one carries the fault
            eng.backward(model(x).pow(2).sum() * factor)
            eng.step()

    step(1.0)
    assert eng.step_applied
    before = ({k: v.clone() for k, v in model.state_dict().items()}, eng.optimizer.state_dict(), eng.lr)
    moments = [s["exp_avg"].clone() for s in eng.optimizer.state.values()]
    step(math.nan)
    assert not eng.step_applied and not math.isfinite(eng.grad_norm)
    assert all(torch.equal(v, before[0][k]) for k, v in model.state_dict().items())  # bitwise
    assert all(torch.equal(s["exp_avg"], m) for s, m in zip(eng.optimizer.state.values(), moments))
    assert eng.optimizer.state_dict()["state"][0]["step"] == before[1]["state"][0]["step"]
    assert eng.lr == before[2]  # the schedule held
    assert all(p.grad is None for p in model.parameters())  # the bad gradients are gone
    step(1.0)
    assert eng.step_applied and not torch.equal(model.weight, before[0]["weight"])


# ---- through the real loop, 2 ranks ----------------------------------------------------------------------


def _fp32_weights(checkpoints: Path, step: int) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), tag=f"step_{step:08d}")


@pytest.mark.slow
@pytest.mark.slow
def test_faults_on_one_rank_skip_the_step_everywhere_and_repeated_ones_stop_the_run(tmp_path):
    """One 2-rank run, accumulation 2 (global batch 4 = 1 x 2 ranks x 2), faults on rank 1 only. Its forward
    pass number (s - 1) * 2 + m is step s, micro-batch m:
    - call 23 (step 12, first micro-batch): the loss x 10, a spike over the running mean of 11 good steps,
      skipped since train.skip_loss_spikes is on; its gradients are finite, so only the guard can skip it;
    - call 28 (step 14, last micro-batch): NaN;
    - calls 31, 33, 35 (steps 16, 17, 18): NaN three steps in a row, past max_consecutive_skips 2: stop."""
    out = tmp_path / "run"
    proc = launch_with_fault(
        "spike:1:23;nan:1:28,31,33,35",
        out,
        "--max-steps",
        "24",
        "--save-every",
        "1",
        "--set",
        "train.keep_last=30",
        "--set",
        "train.max_consecutive_skips=2",
        "--set",
        "train.skip_loss_spikes=true",
    )
    assert proc.returncode == EXIT_DIVERGED, proc.stderr[-4000:]
    assert "3 consecutive optimizer steps were skipped" in proc.stderr
    assert "raise train.max_consecutive_skips" in proc.stderr
    assert "loss spike" in proc.stderr and "non-finite loss" in proc.stderr
    metrics = read_metrics(out / "metrics.jsonl")
    assert max(metrics) == 18
    skipped = {12: 1, 13: 1, 14: 2, 15: 2, 16: 3, 17: 4, 18: 5}
    assert all(metrics[s]["train/skipped_steps"] == skipped.get(s, 0) for s in range(1, 12))
    assert {s: metrics[s]["train/skipped_steps"] for s in skipped} == skipped
    assert metrics[12]["train/loss_spikes"] == 1 and metrics[11]["train/loss_spikes"] == 0
    assert all("train/loss" not in metrics[s] for s in (12, 14, 16, 17, 18))  # skipped steps log no loss
    assert all(math.isfinite(metrics[s]["train/loss"]) for s in (11, 13, 15))
    assert metrics[13]["train/lr"] == metrics[12]["train/lr"]  # the schedule held while step 12 was skipped

    ckpt = out / "checkpoints"
    weights = {s: _fp32_weights(ckpt, s) for s in (11, 12, 13, 14, 15, 18)}
    same = lambda a, b: all(torch.equal(weights[a][k], weights[b][k]) for k in weights[a])  # noqa: E731
    assert same(11, 12)  # the spike changed nothing, bitwise, on the rank without the fault too
    assert not same(12, 13)  # step 13 trained again
    assert same(13, 14)  # the NaN step changed nothing
    assert same(15, 18)  # the state saved at the stop is the last good one (step 15's)
    assert (ckpt / "step_00000018" / "COMPLETE").is_file()


# ---- the hang watchdog -----------------------------------------------------------------------------------


def test_the_watchdog_dumps_every_thread_and_exits_when_nothing_progresses(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(REPO / "src")!r})
        from pathlib import Path
        from mellama_train.watchdog import Watchdog
        dog = Watchdog(0.5, Path({str(tmp_path)!r}), rank=3, poll_s=0.05).start()
        for i in range(5):
            time.sleep(0.1)
            dog.beat(f"step {{i}}")  # progress keeps it quiet
        def stuck_in_a_collective():
            time.sleep(60)
        stuck_in_a_collective()
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == EXIT_HUNG, proc.stderr
    dump = (tmp_path / "logs" / "hang-rank-3.restart-0.txt").read_text()
    assert "rank 3: no progress for" in dump and "last completed: step 4" in dump
    assert "stuck_in_a_collective" in dump and "stuck_in_a_collective" in proc.stderr


@pytest.mark.slow
@pytest.mark.slow
def test_a_sleeping_rank_is_caught_by_every_ranks_watchdog(tmp_path):
    out = tmp_path / "run"
    # rank 1 stops in its 5th forward (step 3); rank 0 then waits in the step's collective
    proc = launch_with_fault(
        "sleep:1:5", out, "--max-steps", "12", "--set", "train.watchdog_minutes=0.25", timeout=300
    )
    assert proc.returncode != 0
    dumps = {p.name: p.read_text() for p in (out / "logs").glob("hang-rank-*.txt")}
    assert set(dumps) == {"hang-rank-0.restart-0.txt", "hang-rank-1.restart-0.txt"}, proc.stderr[-3000:]
    assert all("last completed: step 2" in d for d in dumps.values())
    assert "faulty" in dumps["hang-rank-1.restart-0.txt"]  # the stuck rank's stack shows where it is
    assert "faulty" not in dumps["hang-rank-0.restart-0.txt"]
    # its peer waits for it inside a collective: DeepSpeed's all-gather or reduce-scatter, or torch.distributed
    assert re.search(r"site-packages/(deepspeed|torch/distributed)/", dumps["hang-rank-0.restart-0.txt"])
    assert max(read_metrics(out / "metrics.jsonl")) == 2


def test_a_metrics_line_cut_by_a_kill_does_not_break_the_file(tmp_path):
    from mellama_train.metrics import MetricsLogger

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/lo')
    logger = MetricsLogger(tmp_path, enabled=True)  # the relaunch appends after the fragment
    logger.log(2, {"train/loss": 1.5})
    logger.close()
    metrics = read_metrics(tmp_path / "metrics.jsonl")
    assert {s: v["train/loss"] for s, v in metrics.items()} == {1: 2.0, 2: 1.5}


# ---- hangs outside the loop: one rank, a short watchdog ----------------------------------------------------


def _hang(tmp_path: Path, fault: str | None, *args: str, minutes: str = "0.25", env: dict | None = None):
    """One process through tests/fault_launch.py with MELLAMA_FAULT=fault; (process, its output dir)."""
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        FAULT_LAUNCH if fault else LAUNCH,
        "--output-dir",
        str(out),
        *TINY,
        "--max-steps",
        "2",
    ]
    cmd += ["--set", f"train.watchdog_minutes={minutes}", *args]
    env = {**clean_env(), **({"MELLAMA_FAULT": fault} if fault else {}), **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return proc, out


def _dump(proc: subprocess.CompletedProcess, out: Path) -> str:
    assert proc.returncode == EXIT_HUNG, proc.stderr[-3000:]
    dump = (out / "logs" / "hang-rank-0.restart-0.txt").read_text()
    assert "watchdog: rank 0: no progress for" in proc.stderr  # stderr first, then the file
    return dump


@pytest.mark.slow
def test_a_rendezvous_that_never_completes_is_dumped_and_ends_76(tmp_path):
    """Rank 0 of a world of two whose rank 1 never comes: it waits in the process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    alone = {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port,
    }
    proc, out = _hang(tmp_path, None, minutes="0.1", env=alone)
    dump = _dump(proc, out)
    assert "during start-up (train.watchdog_minutes 0.1); last completed: start of the run" in dump
    assert "init_distributed" in dump and "distributed_c10d.py" in dump  # waiting inside the rendezvous


@pytest.mark.slow
def test_a_hang_while_loading_the_model_is_dumped_ends_76_and_status_says_so(tmp_path, capsys):
    proc, out = _hang(tmp_path, "hang_load:0:1")
    dump = _dump(proc, out)
    assert "during start-up" in dump and "planted_hang" in dump
    from mellama_train.cli import status_main

    assert json.loads((out / "heartbeat.json").read_text())["state"] == f"hung (exit {EXIT_HUNG})"
    status_main([str(out)])
    assert "state       not running: the watchdog ended it (exit 76)" in capsys.readouterr().out


@pytest.mark.slow
def test_a_hang_in_the_step_0_evaluation_is_dumped_and_ends_76(tmp_path):
    proc, out = _hang(tmp_path, "hang_eval:0:1")
    dump = _dump(proc, out)
    assert "during step-0 evaluation" in dump and "last completed: start-up" in dump
    assert "planted_hang" in dump
    assert not [p for p in (out / "checkpoints").glob("step_*")]  # no step ran


@pytest.mark.slow
def test_a_hang_while_writing_final_is_dumped_and_ends_76(tmp_path):
    proc, out = _hang(tmp_path, "hang_export:0:1")
    dump = _dump(proc, out)
    assert "during final export" in dump and "last completed: checkpoint step_00000002" in dump
    assert "planted_hang" in dump and "_write_outputs" in dump


@pytest.mark.slow
def test_a_merge_that_hangs_is_dumped_and_ends_76(tmp_path):
    """`mellama-train merge` on a hung filesystem: loading the base never returns (planted there)."""
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir()
    adapter.mkdir()
    (base / "config.json").write_text("{}")
    (base / "model.safetensors").write_bytes(b"")
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    cmd = [sys.executable, FAULT_LAUNCH, "merge", "--adapter", str(adapter), "--out", str(tmp_path / "out")]
    env = {**clean_env(), "MELLAMA_FAULT": "hang_merge:0:1"}
    proc = subprocess.run(
        [*cmd, "--watchdog-minutes", "0.1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == EXIT_HUNG, proc.stderr[-3000:]
    assert "during merge (--watchdog-minutes 0.1)" in proc.stderr and "planted_hang" in proc.stderr
    assert "merge_adapter" in proc.stderr
