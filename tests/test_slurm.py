"""The SLURM batch scripts (slurm/pretrain.sh, slurm/tune.sh and their shared slurm/launch.sh) on a real one-node
SLURM cluster (tools/slurm_cluster.sh, brought up by the `slurm_cluster` fixture): 2-rank CPU jobs through srun,
the default output dir, the GPU/task check, and the warning signal -> save -> requeue -> exact resume cycle."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoModelForCausalLM

from mellama_train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
ENDED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
}
# The #SBATCH defaults ask for 8 GPUs and 8 CPUs per task; the test node is a 2-core machine without GPUs.
CPU_JOB = ["--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1"]

pytestmark = pytest.mark.slow


def job_env() -> dict[str, str]:
    """This environment, with this venv's python first, and no identity from an enclosing launcher or job."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_")) or k == "SLURM_CONF"
    }
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MELLAMA_ROOT"):
        env.pop(var, None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MELLAMA_VENV"] = sys.prefix  # the job activates the venv these tests run in
    return env


def sh(*cmd: str, timeout: int = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=job_env())


def job_info(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict ({} once SLURM has forgotten the job)."""
    return dict(re.findall(r"(\w+)=(\S*)", sh("scontrol", "show", "job", "-o", job_id).stdout))


def tail(*files: Path, chars: int = 3000) -> str:
    return "\n".join(f"--- {f}\n{f.read_text(errors='replace')[-chars:]}" for f in files if f.is_file())


def wait_for(condition: Callable[[], Any], timeout: float, what: str, logs: tuple[Path, ...] = ()) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(1)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tail(*logs)}")


@contextlib.contextmanager
def slurm_job(args: list[str], log: Path, cwd: Path = REPO, resources: list[str] = CPU_JOB) -> Iterator[str]:
    """Submit `sbatch <resources> --output=<log> <args>` from `cwd`; cancel the job and wait until it has left
    the queue on the way out, whatever happened."""
    proc = subprocess.run(
        ["sbatch", "--parsable", *resources, f"--output={log}", *args],
        cwd=cwd,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
    job_id = proc.stdout.strip().split(";")[0]
    try:
        yield job_id
    finally:
        sh("scancel", job_id)  # a no-op for a job that has ended
        wait_for(lambda: not sh("squeue", "-h", "-j", job_id).stdout.strip(), 120, f"job {job_id} to leave")


def wait_until_ended(job_id: str, timeout: float, logs: tuple[Path, ...]) -> dict[str, str]:
    return wait_for(
        lambda: (info := job_info(job_id)).get("JobState") in ENDED and info, timeout, f"job {job_id}", logs
    )


def assert_completed(info: dict[str, str], logs: tuple[Path, ...]) -> None:
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), f"{info}\n{tail(*logs)}"


def rank_logs(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "logs").glob("rank-*.log"))


def test_pretrain_job_runs_two_ranks_through_srun_and_exports(slurm_cluster, tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.log"
    args = ["slurm/pretrain.sh", "--profile", "tiny", "--max-steps", "6", "--save-every", "3"]
    with slurm_job([*args, "--output-dir", str(out)], log) as job_id:
        info = wait_until_ended(job_id, 600, (log, out / "logs" / "rank-0.restart-0.log"))
    assert_completed(info, (log, out / "logs" / "rank-0.restart-0.log"))

    text = log.read_text()
    assert "1 node(s) x 2 procs/node = world size 2" in text
    assert f"master:     {job_info(job_id).get('NodeList', '')}:{10000 + int(job_id) % 20000}" in text
    assert f"output dir: {out}" in text
    assert rank_logs(out) == ["rank-0.restart-0.log", "rank-1.restart-0.log"]
    assert f"done: {out}" in (out / "logs" / "rank-0.restart-0.log").read_text()
    record = json.loads((out / "run_record.json").read_text())
    assert record["derived"]["world_size"] == 2 and record["resumed_from"] is None
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000003", "step_00000006"]
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.config.num_hidden_layers == 2


def test_tune_job_writes_adapter_and_merged_model(slurm_cluster, tmp_path):
    if not (REPO / "launch" / "tune.py").is_file():
        pytest.skip("launch/tune.py is not there yet")
    out, log = tmp_path / "run", tmp_path / "job.log"
    args = ["slurm/tune.sh", "--profile", "tiny", "--max-steps", "6", "--output-dir", str(out)]
    with slurm_job(args, log) as job_id:
        info = wait_until_ended(job_id, 600, (log, out / "logs" / "rank-0.restart-0.log"))
    assert_completed(info, (log, out / "logs" / "rank-0.restart-0.log"))

    assert "world size 2" in log.read_text()
    assert rank_logs(out) == ["rank-0.restart-0.log", "rank-1.restart-0.log"]
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "run_record.json").read_text())["derived"]["world_size"] == 2
    AutoModelForCausalLM.from_pretrained(out / "final")


def checkout_copy(tmp_path: Path) -> Path:
    """A stand-in checkout (symlinks to this one) so a job's default runs/ dir lands under tmp_path."""
    root = tmp_path / "checkout"
    root.mkdir()
    for name in ("launch", "src", "slurm", "ds_configs"):
        (root / name).symlink_to(REPO / name)
    return root


def test_default_output_dir_is_runs_slurm_job_id_under_the_checkout(slurm_cluster, tmp_path):
    root, log = checkout_copy(tmp_path), tmp_path / "job.log"
    # --dry-run: the entry point prints its resolved config (output_dir included) and exits; 1 rank is enough.
    with slurm_job(["--ntasks-per-node=1", "slurm/pretrain.sh", "--dry-run"], log, cwd=root) as job_id:
        info = wait_until_ended(job_id, 120, (log,))
    out = root / "runs" / f"slurm-{job_id}"
    assert_completed(info, (log, out / "logs" / "rank-0.restart-0.log"))
    assert f"output dir: {out}" in log.read_text()
    assert rank_logs(out) == ["rank-0.restart-0.log"]
    assert f"output_dir: runs/slurm-{job_id}\n" in (out / "logs" / "rank-0.restart-0.log").read_text()


@pytest.mark.parametrize(("gpus", "tasks", "fix"), [("2", "1", "2"), ("a100:4", "8", "4")])
def test_gpus_per_node_must_equal_tasks_per_node(tmp_path, gpus, tasks, fix):
    # A CPU-only node cannot be given GPUs (sbatch refuses the gres), so the check runs on a faked allocation.
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    root = checkout_copy(tmp_path)
    fake_job = {
        "SLURM_JOB_ID": "4242",
        "SLURM_SUBMIT_DIR": str(root),
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_GPUS_PER_NODE": gpus,
        "SLURM_NTASKS_PER_NODE": tasks,
    }
    proc = subprocess.run(
        ["bash", str(REPO / "slurm" / "pretrain.sh"), "--dry-run"],
        cwd=root,
        env={**job_env(), **fake_job},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: --gpus-per-node={fix} but {tasks} tasks per node; one process per GPU: set --ntasks-per-node={fix}"
    ]
    assert not (root / "runs").exists()  # refused before anything was created or launched


def resumed_records(out: Path) -> list[dict[str, Any]]:
    records = []
    for path in out.glob("run_record.*.json"):  # a resumed start adds a record of its own
        with contextlib.suppress(json.JSONDecodeError):  # still being written
            records.append(json.loads(path.read_text()))
    return [r for r in records if r.get("resumed_from")]


def wait_for_requeued_run(job_id: str, logs: tuple[Path, ...]) -> dict[str, str]:
    """Wait until the job's first requeue (restart 1) has ended; returns its `scontrol show job`."""

    released = False

    def finished() -> dict[str, str] | None:
        nonlocal released
        info = job_info(job_id)
        if not released and info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
            released = True  # once: each update would move the start 5 s further out
            # SLURM holds a requeued job for ~2 minutes before it may start again; a test need not wait that long,
            # but must not start it within the second of the requeue: slurmd compares credential times in whole
            # seconds, so a new allocation in the same second as the old one's revocation is refused as revoked
            # ("Killing non-startable batch job: Job credential revoked", exit 1 without a line of output).
            sh("scontrol", "update", f"JobId={job_id}", "StartTime=now+5")
        return info if info.get("Restarts") == "1" and info.get("JobState") in ENDED else None

    return wait_for(finished, 600, "the requeued job to finish", logs)


def test_warning_signal_saves_requeues_and_resumes_exactly(slurm_cluster, tmp_path):
    """SLURM's early warning (USR2 to the batch shell) -> forwarded to the ranks -> a checkpoint at the next step
    and exit 75 -> requeue under the same job id -> the run continues exactly: every step trained once, and the
    losses and tokens per source of an uninterrupted 2-rank run."""
    from test_train_e2e import losses, two_ranks

    steps = [
        "--max-steps",
        "30",
        "--save-every",
        "100",
    ]  # no periodic save before the end: only the stop saves
    reference = tmp_path / "reference"
    two_ranks(reference, *steps, shape=[])  # the tiny profile as the SLURM job runs it
    out, log = tmp_path / "run", tmp_path / "job.log"
    with slurm_job(["slurm/pretrain.sh", *steps, "--output-dir", str(out)], log) as job_id:
        logs = (log, out / "logs" / "rank-0.restart-0.log")

        def trained_three_steps() -> bool:
            assert job_info(job_id).get("JobState") not in ENDED, f"job ended early\n{tail(*logs)}"
            return (out / "metrics.jsonl").is_file() and 3 in read_metrics(out / "metrics.jsonl")

        wait_for(trained_three_steps, 400, "step 3", logs)  # by progress, not by sleeping
        # What SLURM's --signal=B:USR2@300 does before the time limit: signal the batch shell only.
        assert sh("scancel", "--batch", "--signal=USR2", job_id).returncode == 0
        wait_for(lambda: f"requeued job {job_id}" in log.read_text(), 180, "the requeue", logs)
        text = log.read_text()
        assert re.search(rf"forwarded USR2 to step {job_id}\.\d+ ", text), tail(log)
        assert "step ended with exit status 75" in text, tail(log)
        assert "preempted (rank 0): stopped at step" in (out / "logs" / "rank-0.restart-0.log").read_text()

        info = wait_for_requeued_run(job_id, (log, out / "logs" / "rank-0.restart-1.log"))
        assert_completed(info, (log,))
    (record,) = resumed_records(out)
    stopped_at = int(record["resumed_from"].rsplit("_", 1)[1])
    assert 3 <= stopped_at < 30
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r["step"] for r in logged if "train/loss" in r]
    assert trained == list(range(1, 31))  # no step twice, none missing
    assert losses(out) == losses(reference)  # exactly
    end, ref = read_metrics(out / "metrics.jsonl")[30], read_metrics(reference / "metrics.jsonl")[30]
    tokens = {k for k in ref if k.startswith("data/tokens/")}
    assert tokens and {k: end[k] for k in tokens} == {k: ref[k] for k in tokens}
    assert rank_logs(out) == [
        "rank-0.restart-0.log",
        "rank-0.restart-1.log",
        "rank-1.restart-0.log",
        "rank-1.restart-1.log",
    ]


def test_a_hung_step_is_dumped_requeued_once_and_resumed(slurm_cluster, tmp_path, monkeypatch):
    """Rank 1 stops making progress in step 5 of the first start (tests/fault_launch.py): every rank's watchdog
    dumps its stacks and exits 76, the job requeues itself, and the second start resumes from step 4 and ends."""
    monkeypatch.setenv("MELLAMA_FAULT", "sleep:1:5")  # tiny on 2 ranks: 1 micro-batch per step
    monkeypatch.setenv("MELLAMA_FAULT_RESTART", "0")
    out, log = tmp_path / "run", tmp_path / "job.log"
    # launch.sh under the fault-injecting entry point, with the #SBATCH lines of slurm/pretrain.sh that matter
    args = ["--requeue", "--open-mode=append", "slurm/launch.sh", "tests/fault_launch.py"]
    args += ["--max-steps", "8", "--save-every", "2"]
    args += ["--set", "train.watchdog_minutes=0.25", "--output-dir", str(out)]
    with slurm_job(args, log) as job_id:
        info = wait_for_requeued_run(job_id, (log, out / "logs" / "rank-0.restart-1.log"))
        assert_completed(info, (log,))
    text = log.read_text()
    assert "the step hung: stacks in" in text and f"requeued job {job_id}" in text, tail(log)
    dumps = sorted(p.name for p in (out / "logs").glob("hang-rank-*.txt"))
    assert dumps == ["hang-rank-0.restart-0.txt", "hang-rank-1.restart-0.txt"]
    (record,) = resumed_records(out)
    assert record["resumed_from"].endswith("step_00000004")
    assert max(read_metrics(out / "metrics.jsonl")) == 8 and (out / "final" / "model.safetensors").is_file()


def test_prepare_as_an_array_job_tokenizes_every_file_once_and_writes_one_manifest(slurm_cluster, tmp_path):
    """slurm/prepare.sh: two array tasks share the files (--part K/N); the one that finishes last writes the
    manifest, which covers every file of every source."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("{}\n")  # the tiny profile's sources as they are
    out = tmp_path / "corpus"
    logs = tuple(tmp_path / f"prepare-{i}.log" for i in (0, 1))
    args = ["--array=0-1", "--ntasks-per-node=1", f"--output={tmp_path}/prepare-%a.log"]
    with slurm_job([*args, "slurm/prepare.sh", str(recipe), str(out)], tmp_path / "unused.log") as job_id:
        wait_for(lambda: not sh("squeue", "-h", "-j", job_id).stdout.strip(), 600, f"array {job_id}", logs)
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["sources"]) == {"pubmed", "mimic", "redpajama"}, tail(*logs)
    shards = [f["shard"] for entry in manifest["sources"].values() for f in entry["files"]]
    assert len(shards) == len(set(shards)) == len(list(out.glob("*/*.tokens.npy")))
    texts = [log.read_text() for log in logs]
    assert all("prepare part" in text for text in texts)
    assert any("prepared: " in text for text in texts), tail(*logs)  # the last one to finish wrote it
