"""slurm/*.sh on a real two-node SLURM cluster on this machine: `tools/slurm_cluster.sh up --nodes 2` runs each
node's slurmd in its own network namespace (its own address and host name), which this module brings up and
removes. Ranks on both nodes rendezvous across the two network stacks; the tuning job writes its adapter; a
pretraining job over a prepared corpus is preempted (requeued on both nodes), then loses a node mid-job (its link
cut, its slurmd and rank SIGKILLed) and goes on at once on the node it still holds, where it trains exactly the
sequences the uninterrupted run would have, with the same global batch on half the ranks."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_slurm import (
    ENDED,
    REPO,
    assert_completed,
    job_info,
    rank_logs,
    resumed_records,
    sh,
    slurm_job,
    tail,
    wait_for,
    wait_until_ended,
)
from test_train_e2e import TINY

from mellama_train.checkpoint import complete_checkpoints
from mellama_train.config import resolve
from mellama_train.data.prepared import prepare
from mellama_train.metrics import read_metrics

pytestmark = pytest.mark.slow
SCRIPT = str(REPO / "tools" / "slurm_cluster.sh")
TWO_NODES = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0"]
GLOBAL_BATCH = 4  # TINY: 4 sequences a step = 1 x 2 accumulation x 2 ranks = 1 x 4 x 1 rank
STEPS = 30


@pytest.fixture(scope="module")
def two_nodes():
    """The two-node cluster, up for this module, removed after it; SLURM_CONF points the clients at it."""
    if os.geteuid() != 0:
        pytest.skip("a two-node cluster needs root: sudo bash tools/slurm_cluster.sh up --nodes 2")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("SLURM is not installed and there is no apt-get to install it")
    up = subprocess.run(["bash", SCRIPT, "up", "--nodes", "2"], capture_output=True, text=True, timeout=900)
    assert up.returncode == 0, f"tools/slurm_cluster.sh up --nodes 2 failed:\n{up.stdout}{up.stderr}"
    conf = re.search(r"export SLURM_CONF=(\S+)", up.stdout)
    assert conf, up.stdout
    before = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf[1]
    try:
        yield conf[1]
    finally:
        if before is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = before
        down = subprocess.run(
            ["bash", SCRIPT, "down", "--nodes", "2"], capture_output=True, text=True, timeout=120
        )
        assert down.returncode == 0, down.stderr
        assert not [n for n in os.listdir("/run/netns") if n.startswith("mellama-n")]


def test_the_cluster_has_two_nodes_with_their_own_addresses(two_nodes):
    assert sh("sinfo", "-h", "-o", "%D %T").stdout.split() == ["2", "idle"]
    out = sh("srun", *TWO_NODES, "--label", "sh", "-c", "hostname; hostname -I", timeout=60)
    assert out.returncode == 0, out.stderr
    lines = sorted(out.stdout.split("\n"))
    assert [x for x in lines if x] == ["0: 10.77.0.11 ", "0: mn1", "1: 10.77.0.12 ", "1: mn2"], out.stdout


def test_a_tuning_job_spans_two_nodes(two_nodes, tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.log"
    args = ["slurm/tune.sh", "--profile", "tiny", "--max-steps", "4", "--output-dir", str(out)]
    with slurm_job(args, log, resources=TWO_NODES) as job_id:
        info = wait_until_ended(job_id, 600, (log, out / "logs" / "rank-0.restart-0.log"))
    assert_completed(info, (log, out / "logs" / "rank-0.restart-0.log"))
    text = log.read_text()
    assert f"job {job_id} (restart 0) on mn[1-2]" in text
    assert "2 node(s) x 1 procs/node = world size 2" in text
    assert re.search(r"master:\s+mn1:\d+", text), text
    assert rank_logs(out) == ["rank-0.restart-0.log", "rank-1.restart-0.log"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def sequences_of(log_dir: Path, start: str) -> list[int]:
    """The global sequence ids every rank of one job step fed (tests/sequence_log_launch.py)."""
    return [
        g
        for path in sorted(log_dir.glob(f"rank_*.{start}.jsonl"))
        for line in path.read_text().splitlines()
        for g in json.loads(line)["rows"]
    ]


def bring_back_lost_nodes() -> None:
    up = subprocess.run(["bash", SCRIPT, "up", "--nodes", "2"], capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stderr


def kill_node(name: str) -> None:
    killed = subprocess.run(["bash", SCRIPT, "kill-node", name], capture_output=True, text=True, timeout=60)
    assert killed.returncode == 0, killed.stderr


def release(job_id: str, logs: tuple[Path, ...]) -> None:
    """A requeued job waits ~2 minutes (SLURM's credential lifetime) before it may start: let it start in 5 s
    (test_slurm.wait_for_requeued_run says why not at once)."""
    wait_for(lambda: job_info(job_id).get("Reason") == "BeginTime", 120, "the requeued job to pend", logs)
    assert sh("scontrol", "update", f"JobId={job_id}", "StartTime=now+5").returncode == 0


def test_a_node_lost_mid_job_goes_on_on_the_node_left_with_the_exact_next_sequences(
    two_nodes, tmp_path, monkeypatch
):
    bring_back_lost_nodes()
    corpus = tmp_path / "corpus"
    prepare(resolve("tiny"), corpus, workers=1)
    out, log, seqs = tmp_path / "run", tmp_path / "job.log", tmp_path / "sequences"
    monkeypatch.setenv("MELLAMA_SEQUENCE_LOG", str(seqs))
    monkeypatch.setenv("MELLAMA_BATCH_PAUSE", "0.2")  # slow enough to act on while it trains
    sets = [
        a for n in ("pubmed", "mimic", "redpajama") for a in ("--set", f"data.sources.{n}.prepared={corpus}")
    ]
    # slurm/launch.sh under the sequence-logging entry point, with slurm/pretrain.sh's #SBATCH lines that matter.
    args = ["--requeue", "--no-kill", "--open-mode=append", "slurm/launch.sh", "tests/sequence_log_launch.py"]
    args += ["--ds", "ds_configs/zero3.json", *TINY, *sets, "--max-steps", str(STEPS), "--save-every", "5"]
    args += ["--output-dir", str(out)]
    metrics = out / "metrics.jsonl"

    def trained(step: int) -> bool:
        return metrics.is_file() and max(read_metrics(metrics), default=0) >= step

    with slurm_job(args, log, resources=TWO_NODES) as job_id:
        logs = (log, out / "logs" / "rank-0.restart-0.log")
        # 1. Preempted on two nodes: SLURM's early warning -> a checkpoint -> requeued, again on both nodes.
        wait_for(lambda: trained(3), 400, "step 3", logs)
        assert sh("scancel", "--batch", "--signal=USR2", job_id).returncode == 0
        wait_for(lambda: f"requeued job {job_id}:" in log.read_text(), 180, "the requeue", logs)
        release(job_id, logs)
        logs = (log, out / "logs" / "rank-0.restart-1.log")
        wait_for(lambda: len(resumed_records(out)) == 1, 300, "the second start", logs)
        first_stop = int(resumed_records(out)[0]["resumed_from"].rsplit("_", 1)[1])
        assert job_info(job_id).get("NodeList") == "mn[1-2]"

        # 2. Node mn2 dies after the second start has written a checkpoint and trained past it.
        def checkpointed_since_resume() -> bool:
            assert job_info(job_id).get("JobState") not in ENDED, f"job ended early\n{tail(*logs)}"
            steps = [int(p.name.rsplit("_", 1)[1]) for p in complete_checkpoints(out / "checkpoints")]
            return any(s > first_stop and trained(s + 1) for s in steps)

        wait_for(checkpointed_since_resume, 300, "a checkpoint after the resume", logs)
        kill_node("mn2")
        assert not trained(STEPS), "the run ended before the node was killed: raise STEPS"
        # 3. The step ends; a new one starts at once on mn1, which the job still holds, and finishes the run.
        logs = (log, out / "logs" / "rank-0.restart-1.relaunch-1.log")
        info = wait_until_ended(job_id, 600, logs)
        assert_completed(info, logs)
        assert info["Restarts"] == "1" and info["NodeList"] == "mn1"

    text = log.read_text()
    assert "lost node(s) mn2: 1 of 2 node(s) left (mn1)" in text, tail(log)
    relaunched = text.split("relaunching on the 1 node(s) left: mn1, world size 1, the same global batch", 1)
    assert len(relaunched) == 2 and "layout:     1 node(s) x 1 procs/node = world size 1" in relaunched[1]
    assert rank_logs(out) == [
        "rank-0.restart-0.log",
        "rank-0.restart-1.log",
        "rank-0.restart-1.relaunch-1.log",
        "rank-1.restart-0.log",
        "rank-1.restart-1.log",
    ]
    moved = (out / "logs" / "rank-0.restart-1.relaunch-1.log").read_text()
    assert "resumed on 1 ranks a checkpoint written by 2" in moved
    starts = sorted(int(r["resumed_from"].rsplit("_", 1)[1]) for r in resumed_records(out))
    assert len(starts) == 2 and first_stop == starts[0] < starts[1] < STEPS, starts
    # Every step of the job fed the order from its checkpoint on; what the next one redid after a lost step is
    # dropped: together, each sequence of the 30 steps exactly once.
    bounds = [0, *starts, STEPS]
    fed = []
    for i, start in enumerate(("restart_0.step_0", "restart_1.step_0", "restart_1.step_1")):
        ids = sequences_of(seqs, start)
        assert ids and min(ids) == bounds[i] * GLOBAL_BATCH, (start, ids[:8])
        assert len(ids) == len(set(ids)), start
        fed += [g for g in ids if g < bounds[i + 1] * GLOBAL_BATCH]
    assert sorted(fed) == list(range(STEPS * GLOBAL_BATCH))
    assert sorted(read_metrics(out / "metrics.jsonl"))[-1] == STEPS
    assert (out / "final" / "model.safetensors").is_file()


def test_a_streamed_run_that_lost_a_node_is_requeued_for_both_nodes_and_waits_for_them(two_nodes, tmp_path):
    """A streamed corpus's position cannot move to fewer ranks: the job is requeued for two nodes, says why,
    pends while mn2 is down, and starts on both once mn2 is back."""
    bring_back_lost_nodes()
    out, log = tmp_path / "run", tmp_path / "job.log"
    args = ["slurm/pretrain.sh", "--profile", "tiny", "--max-steps", "2000", "--save-every", "2"]
    with slurm_job([*args, "--output-dir", str(out)], log, resources=TWO_NODES) as job_id:
        logs = (log, out / "logs" / "rank-0.restart-0.log")
        wait_for(lambda: complete_checkpoints(out / "checkpoints"), 400, "a checkpoint", logs)
        kill_node("mn2")
        wait_for(
            lambda: f"requeued job {job_id} for 2 node(s) again" in log.read_text(), 300, "the requeue", logs
        )
        assert (
            f"requeued job {job_id} for 2 node(s) again, not 1: its sources are streamed: a streamed run resumes"
            " on the number of ranks that wrote it"
        ) in log.read_text()
        wait_for(lambda: job_info(job_id).get("JobState") == "PENDING", 60, "the job to pend", logs)
        # It asks for both nodes again: SLURM shows the node count it held last, but two tasks at one per node.
        asked = {k: job_info(job_id).get(k) for k in ("NumNodes", "NumTasks", "Reason")}
        assert asked["NumTasks"] == "2", asked
        bring_back_lost_nodes()
        release(job_id, logs)
        running = {"Restarts": "1", "JobState": "RUNNING", "NodeList": "mn[1-2]"}
        wait_for(lambda: running.items() <= job_info(job_id).items(), 120, "the job on both nodes", logs)
        wait_for(
            lambda: "resumed from" in _text(out / "logs" / "rank-0.restart-1.log"), 300, "the resume", logs
        )
    assert "relaunching" not in log.read_text()


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""
