"""End-to-end training runs through the real entry point: one process without a launcher, and 2 ranks over
gloo with DeepSpeed's launcher (ZeRO-3), including an exact resume and the HF export."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mellama_train.config import resolve
from mellama_train.data.pipeline import build_train_batches
from mellama_train.loss import mean_loss
from mellama_train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
LAUNCH = str(REPO / "launch" / "pretrain.py")
# Small enough for CI, big enough that resuming mid-run exercises warmup, cosine and accumulation.
TINY = ["--set", "data.seq_len=64", "--set", "train.global_batch_size=4", "--set", "train.micro_batch_size=1"]


def clean_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # a test must not inherit a launcher's identity
    return env


def run(cmd: list[str], timeout: int = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cmd, cwd=REPO, env={**clean_env(), **(env or {})}, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def single(out: Path, *args: str) -> subprocess.CompletedProcess:
    return run([sys.executable, LAUNCH, "--output-dir", str(out), *TINY, *args])


def two_rank_command(
    out: Path, *args: str, shape: list[str] = TINY, port: int = 29533, launch: str = LAUNCH
) -> list[str]:
    """2 ranks through DeepSpeed's launcher; `shape` (default TINY) goes before the other arguments."""
    return [
        *deepspeed_launcher(port),
        launch,
        "--ds",
        "ds_configs/zero3.json",
        "--output-dir",
        str(out),
        *shape,
        *args,
    ]


def deepspeed_launcher(port: int) -> list[str]:
    """What `deepspeed --num_gpus 2` runs: DeepSpeed's runner, which starts its per-node launcher."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port)]


def two_ranks(out: Path, *args: str, shape: list[str] = TINY, gather_log: Path | None = None) -> None:
    """gather_log: run through tests/zero3_gather_launch.py, which counts ZeRO-3's all-gathers per step there."""
    if gather_log is None:
        run(two_rank_command(out, *args, shape=shape))
        return
    launch = str(REPO / "tests" / "zero3_gather_launch.py")
    run(two_rank_command(out, *args, shape=shape, launch=launch), env={"MELLAMA_GATHER_LOG": str(gather_log)})


def interrupted_copy(run_dir: Path, dest: Path, last_step: int, written_later: list[str]) -> Path:
    """A copy of a finished run as if it had died right after its step-`last_step` checkpoint: what was written
    later (newer checkpoints, exports) is removed and metrics.jsonl is cut back to that step."""
    shutil.copytree(run_dir, dest)
    for name in written_later:
        shutil.rmtree(dest / name)
    lines = (dest / "metrics.jsonl").read_text().splitlines()
    (dest / "metrics.jsonl").write_text(
        "".join(f"{x}\n" for x in lines if json.loads(x)["step"] <= last_step)
    )
    return dest


def losses(run_dir: Path) -> dict[int, float]:
    return {
        s: v["train/loss"] for s, v in read_metrics(run_dir / "metrics.jsonl").items() if "train/loss" in v
    }


@pytest.mark.slow
def test_single_process_run_learns_and_writes_every_output(tmp_path):
    out = tmp_path / "run"
    single(out, "--max-steps", "12", "--save-every", "5")
    assert {p.name for p in out.iterdir()} >= {
        "checkpoints",
        "tensorboard",
        "metrics.jsonl",
        "final",
        "run_record.json",
    }
    # keep_last 2 of the complete checkpoints at steps 5, 10 and 12 (the end always saves)
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000010", "step_00000012"]
    assert all((p / "COMPLETE").is_file() for p in (out / "checkpoints").glob("step_*"))

    metrics = read_metrics(out / "metrics.jsonl")
    assert sorted(s for s, v in metrics.items() if "train/loss" in v) == list(
        range(1, 13)
    )  # tiny logs every step
    first, last = metrics[1], metrics[12]
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/tokens"):
        assert key in first, key
    for name in ("pubmed", "mimic", "redpajama"):
        assert f"data/tokens/{name}" in last and last[f"data/skipped/{name}"] == 0
        assert last[f"data/filtered/{name}"] == 0 and last[f"data/documents/{name}"] > 0
        assert last[f"data/epochs/{name}"] == 0  # 3k tokens: no sample source wraps yet
    assert "train/mfu" not in first  # no peak FLOPs on CPU: omitted rather than made up
    assert last["train/tokens"] == 12 * 4 * 64
    assert sum(last[f"data/tokens/{n}"] for n in ("pubmed", "mimic", "redpajama")) == last["train/tokens"]
    assert last["train/loss"] < first["train/loss"] - 0.5  # it learns

    record = json.loads((out / "run_record.json").read_text())
    assert record["config"]["data"]["seq_len"] == 64
    assert record["versions"]["deepspeed"] and record["ds_config"]["zero_optimization"]["stage"] == 3
    assert {e["path"].rsplit("/", 1)[-1] for e in record["data_manifest"]["mimic"]} == {"discharge.csv.gz"}

    # The exported HF model loads with plain transformers and reproduces the training-time probe loss.
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    assert len(tok) == 2048
    cfg = resolve(
        "tiny", overrides=["data.seq_len=64", "train.global_batch_size=4", "train.micro_batch_size=1"]
    )
    probe = next(build_train_batches(cfg, tok, rank=0, world_size=1))
    loss = mean_loss(model.eval(), probe, 3, torch.device("cpu"))
    assert loss == pytest.approx(metrics[12]["export/probe_loss"], abs=1e-5)

    # The export is a valid `model.path`: continual pretraining from it (ZeRO-3 loads it partitioned) starts
    # at the loss the first run ended with, not at a random model's ln(2048) = 7.6.
    chained = tmp_path / "chained"
    overrides = ["model.init=pretrained", f"model.path={out / 'final'}", "model.tokenizer=null"]
    single(chained, "--max-steps", "2", *[arg for o in overrides for arg in ("--set", o)])
    assert losses(chained)[1] < first["train/loss"] - 0.5
    assert json.loads((chained / "run_record.json").read_text())["config"]["model"]["path"] == str(
        out / "final"
    )


@pytest.mark.slow
def test_resume_refuses_to_start_over_partial_checkpoints(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "step_00000004.partial").mkdir(parents=True)  # a save that never completed
    proc = subprocess.run(
        [sys.executable, LAUNCH, "--output-dir", str(out), *TINY, "--max-steps", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert (
        "holds only incomplete checkpoints (step_00000004.partial); refusing to restart from step 0"
        in proc.stderr
    )
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.slow
def test_two_rank_zero3_resume_reproduces_the_uninterrupted_losses(tmp_path):
    full = tmp_path / "full"
    two_ranks(full, "--max-steps", "8", "--save-every", "4", gather_log=tmp_path / "gathers_full.json")
    reference = losses(full)
    assert sorted(reference) == list(range(1, 9))
    ckpt = full / "checkpoints"
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_00000004", "step_00000008"]
    # both ranks wrote their own data position
    assert {p.name for p in (ckpt / "step_00000004").glob("rank_*.pt")} == {"rank_00000.pt", "rank_00001.pt"}

    # Same run, interrupted after the step-4 checkpoint: drop everything written after it, then relaunch.
    resumed = interrupted_copy(full, tmp_path / "resumed", 4, ["checkpoints/step_00000008", "final"])
    two_ranks(resumed, "--max-steps", "8", "--save-every", "4", gather_log=tmp_path / "gathers_resumed.json")

    after = losses(resumed)
    assert [after[s] for s in range(5, 9)] == [
        reference[s] for s in range(5, 9)
    ]  # exactly, not approximately
    records = [json.loads(r.read_text()) for r in resumed.glob("run_record*.json")]
    starts = [r["resumed_from"] for r in records]
    assert len(starts) == 2 and None in starts  # the first start's record is kept beside the resumed one's
    assert any(s and s.endswith("step_00000004") for s in starts)
    # DeepSpeed's launcher set no thread count: each of the 2 ranks took its share of the cores (threads.py).
    if "OMP_NUM_THREADS" not in os.environ:
        share = max(1, len(os.sched_getaffinity(0)) // 2)
        assert {r["threads"]["torch_threads"] for r in records} == {share}, [r["threads"] for r in records]
    rows = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 9))  # none trained twice
    assert (resumed / "final" / "model.safetensors").is_file()

    # The fresh run evaluated before its first step; the resumed one started with a training step. Once ZeRO-3
    # has recorded its parameter trace (the first step), both gather the same number of times a step: the
    # step-0 evaluation does not leave DeepSpeed re-gathering every layer before each backward (engine.py).
    fresh = json.loads((tmp_path / "gathers_full.json").read_text())["per_step"]  # steps 1-8
    restarted = json.loads((tmp_path / "gathers_resumed.json").read_text())["per_step"]  # steps 5-8
    assert len(fresh) == 8 and len(restarted) == 4
    assert set(fresh[1:]) == set(restarted[1:]) and len(set(fresh[1:])) == 1, (fresh, restarted)
    # One collective of the loop's own a step, logged steps included (tiny logs every step): the step's
    # all-reduce carries its loss, the next step's token count, the stop votes and the log window (step.py).
    # Steps 4 and 8 also save (and 8 evaluates); the first step's loss scale was asked for before step 1.
    ours = json.loads((tmp_path / "gathers_full.json").read_text())["ours_per_step"]
    ours_resumed = json.loads((tmp_path / "gathers_resumed.json").read_text())["ours_per_step"]
    plain_steps = [ours[i] for i in (0, 1, 2, 4, 5, 6)] + [ours_resumed[i] for i in (0, 1, 2)]
    assert plain_steps == [["all_reduce_sum"]] * 9, (ours, ours_resumed)

    # A checkpoint partitioned over 2 ranks exports (DeepSpeed's reader joins the partitions) and verifies.
    from mellama_train.cli import main

    assert main(["export", str(full / "checkpoints" / "step_00000004"), str(tmp_path / "export")]) == 0
    report = json.loads((tmp_path / "export" / "export.json").read_text())
    assert report["step"] == 4 and report["problems"] == [] and report["probe"]["argmax_agreement"] > 0.5


@pytest.mark.slow
def test_a_stop_signal_saves_at_the_next_step_and_the_restart_continues_exactly(tmp_path):
    args = [*TINY, "--max-steps", "12", "--save-every", "100"]  # no periodic save: only the stop saves
    reference = tmp_path / "reference"
    single(reference, *args[len(TINY) :])
    out = tmp_path / "stopped"
    cmd = [sys.executable, LAUNCH, "--output-dir", str(out), *args]
    with open(tmp_path / "stderr.log", "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=clean_env(), stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 300
            while not (out / "metrics.jsonl").is_file() or 3 not in read_metrics(out / "metrics.jsonl"):
                assert proc.poll() is None and time.monotonic() < deadline, (
                    tmp_path / "stderr.log"
                ).read_text()
                time.sleep(0.05)  # by progress: the signal lands once step 3 is logged, mid-run
            proc.send_signal(signal.SIGUSR2)  # what slurm/launch.sh forwards before the time limit
            assert proc.wait(timeout=300) == 75, (tmp_path / "stderr.log").read_text()[-3000:]
        finally:
            proc.kill()
    stopped_at = max(losses(out))
    assert 3 <= stopped_at < 12
    assert [p.name for p in (out / "checkpoints").glob("step_*")] == [f"step_{stopped_at:08d}"]
    assert (out / "checkpoints" / f"step_{stopped_at:08d}" / "COMPLETE").is_file()
    assert "preempted (rank 0): stopped at step" in (tmp_path / "stderr.log").read_text()

    single(out, *args[len(TINY) :])  # the requeued job: --resume auto
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r["step"] for r in rows if "train/loss" in r]
    assert trained == list(range(1, 13))  # none twice, none missing
    # The stop's save and the resume's load are timed, at the step they happened at.
    assert [r["step"] for r in rows if "checkpoint/save_seconds" in r][0] == stopped_at
    assert [r["step"] for r in rows if "checkpoint/load_seconds" in r] == [stopped_at]
    assert losses(out) == losses(reference)  # exactly
    last, ref = read_metrics(out / "metrics.jsonl")[12], read_metrics(reference / "metrics.jsonl")[12]
    assert {k: v for k, v in last.items() if k.startswith("data/tokens/")} == {
        k: v for k, v in ref.items() if k.startswith("data/tokens/")
    }
