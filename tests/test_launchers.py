"""Stop signals through the launchers: `mellama-train launch` (preemption.supervise) passes SIGTERM, SIGINT and
SIGUSR2 to every rank, never to the launcher, and exits with the ranks' own code; a second Ctrl-C ends every
process at once. First with a stand-in launcher and stand-in ranks (seconds), then with DeepSpeed's launcher and
torchrun on 2 real ranks (slow): the stop saves a complete checkpoint, the launcher path exits 75, and the
resumed run's losses equal the uninterrupted run's.

What the launchers do alone (DeepSpeed 0.19.8, torch 2.13; read in their source and seen on this machine): the
`deepspeed` runner has no signal handler on a single node, so SIGTERM kills it at once and the ranks train on;
DeepSpeed's per-node launcher SIGTERMs one rank at a time, SIGKILLs each after 30 s, and exits 1 after a saved
stop; torchrun SIGTERMs every rank, SIGKILLs after --shutdown-timeout (30 s), and exits 1 with a traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from mellama_train.exit_codes import EXIT_PREEMPTED
from mellama_train.preemption import SUPERVISOR_LOST, exit_code

REPO = Path(__file__).resolve().parents[1]
DEADLINE_S = 120  # a guard against a test that would otherwise wait forever, not a timing assertion


def wait_for(condition, what: str, proc: subprocess.Popen | None = None, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc is None or proc.poll() is None, f"exited {proc.returncode} while waiting for {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


# ---- the supervisor's decisions --------------------------------------------------------------------------


def test_the_ranks_own_code_wins_over_what_the_launcher_made_of_it():
    assert exit_code(1, 2, {"rank-0": 75, "rank-1": 75}) == 75  # torchrun / DeepSpeed's per-node launcher: 1
    assert exit_code(-15, 2, {"rank-0": 75}) == 75  # a collective decision: one report proves it for all
    assert exit_code(1, 2, {"rank-0": 76, "rank-1": 76}) == 76  # the watchdog
    assert exit_code(0, 2, {"rank-0": 0, "rank-1": 0}) == 0
    assert exit_code(0, 2, {"rank-1": 0}) == 1  # rank 0 never finished (e.g. died in the merge)
    assert exit_code(1, 2, {"rank-1": 0}) == 1
    assert exit_code(-9, 2, {}) == 137  # killed: 128 + the signal, as a shell reports it
    assert exit_code(1, 0, {}) == 1  # no rank registered (a launch over ssh): the launcher's code
    assert exit_code(1, 2, {"rank-0": 75, "rank-1": 3}) == 1  # no agreement: the launcher's


# ---- a stand-in launcher (loses the ranks' codes, like torchrun) and stand-in ranks ------------------------

FAKE_LAUNCHER = """
import os, subprocess, sys
ranks = [subprocess.Popen([sys.executable, sys.argv[1], sys.argv[2]], env={**os.environ, "RANK": str(r)})
         for r in range(2)]
codes = [p.wait() for p in ranks]
sys.exit(1 if any(codes) else 0)  # like torchrun: any failure becomes 1
"""

FAKE_RANK = """
import os, sys, time
from pathlib import Path
from mellama_train.exit_codes import EXIT_PREEMPTED
from mellama_train.preemption import StopFlag, report_exit
out, rank = Path(sys.argv[1]), os.environ["RANK"]
give_up = time.monotonic() + 300  # a rank left behind by a failed test must not spin forever
def wait(condition):
    while not condition():
        if time.monotonic() > give_up:
            sys.exit(99)
        time.sleep(0.02)
(out / f"pid-{rank}").write_text(str(os.getpid()))
wait(lambda: (out / f"go-{rank}").exists())  # the test decides when this rank has started
flag = StopFlag().install()  # under mellama-train launch this also registers the rank
(out / f"ready-{rank}").write_text("")
wait(lambda: flag.requested)
(out / f"stopped-{rank}").write_text(flag.reason)
wait(lambda: not (out / "keep-saving").exists())  # a save that takes long
report_exit(EXIT_PREEMPTED)
sys.exit(EXIT_PREEMPTED)
"""


def kill_tree(proc: subprocess.Popen) -> None:
    """The supervisor, its launcher and the ranks: found before the kill, since orphans lose their parent."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for member in family:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=DEADLINE_S)


def start_supervised(tmp_path: Path) -> subprocess.Popen:
    (tmp_path / "launcher.py").write_text(FAKE_LAUNCHER)
    (tmp_path / "rank.py").write_text(FAKE_RANK)
    cmd = [sys.executable, "-m", "mellama_train", "launch", sys.executable, str(tmp_path / "launcher.py")]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    return subprocess.Popen(
        [*cmd, str(tmp_path / "rank.py"), str(tmp_path)], env=env, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR2], ids=lambda s: s.name)
def test_a_stop_reaches_every_rank_even_one_still_starting_and_the_ranks_code_is_the_exit_code(tmp_path, sig):
    proc = start_supervised(tmp_path)
    try:
        (tmp_path / "go-0").write_text("")
        wait_for(lambda: (tmp_path / "ready-0").exists(), "rank 0 ready", proc)
        proc.send_signal(sig)  # rank 1 has not installed its handler yet: it is told once it has
        wait_for(lambda: (tmp_path / "stopped-0").exists(), "rank 0's stop", proc)
        assert not (tmp_path / "stopped-1").exists()
        (tmp_path / "go-1").write_text("")
        assert proc.wait(timeout=DEADLINE_S) == EXIT_PREEMPTED  # the stand-in launcher itself exits 1
    finally:
        kill_tree(proc)
    assert {(tmp_path / f"stopped-{r}").read_text() for r in (0, 1)} == {sig.name}
    stderr = proc.stderr.read()
    assert f"{sig.name}: every rank saves a checkpoint at its next step and exits 75" in stderr
    assert "the launcher exited 1: exit 75" in stderr


@pytest.mark.slow
def test_a_second_ctrl_c_ends_every_process_at_once(tmp_path):
    (tmp_path / "keep-saving").write_text("")
    proc = start_supervised(tmp_path)
    try:
        for rank in (0, 1):
            (tmp_path / f"go-{rank}").write_text("")
        wait_for(lambda: all((tmp_path / f"ready-{r}").exists() for r in (0, 1)), "both ranks ready", proc)
        pids = [int((tmp_path / f"pid-{r}").read_text()) for r in (0, 1)]
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: all((tmp_path / f"stopped-{r}").exists() for r in (0, 1)), "the stops", proc)
        proc.send_signal(signal.SIGINT)  # the ranks are still "saving": this one does not wait for them
        assert proc.wait(timeout=DEADLINE_S) == 128 + signal.SIGINT
    finally:
        kill_tree(proc)

    def gone(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
        except psutil.NoSuchProcess:
            return True

    wait_for(lambda: all(gone(p) for p in pids), "the ranks to be gone")
    assert "SIGINT again: ending every process now" in proc.stderr.read()


@pytest.mark.slow
def test_ranks_stop_and_save_when_the_supervisor_is_killed(tmp_path):
    """SIGKILL (or the OOM killer) ends the supervisor without a word; the ranks, in a session of their own, would
    train on with no one to pass them a stop. They watch its lock and stop as on a signal: saved, exit 75."""
    proc = start_supervised(tmp_path)
    family: list[psutil.Process] = []
    link = None
    try:
        for rank in (0, 1):
            (tmp_path / f"go-{rank}").write_text("")
        wait_for(lambda: all((tmp_path / f"ready-{r}").exists() for r in (0, 1)), "both ranks ready", proc)
        family = psutil.Process(proc.pid).children(recursive=True)  # the launcher and the ranks
        ranks = [psutil.Process(int((tmp_path / f"pid-{r}").read_text())) for r in (0, 1)]
        link = Path(ranks[0].environ()["MELLAMA_LAUNCH_DIR"])  # a killed supervisor cannot remove it
        proc.kill()
        assert proc.wait(timeout=DEADLINE_S) == -signal.SIGKILL
        wait_for(lambda: all((tmp_path / f"stopped-{r}").exists() for r in (0, 1)), "the ranks' stops")
        assert {(tmp_path / f"stopped-{r}").read_text() for r in (0, 1)} == {SUPERVISOR_LOST}
        assert [rank.wait(timeout=DEADLINE_S) for rank in ranks] == [None, None]  # not our children: no code
        launcher = next(p for p in family if p not in ranks)
        launcher.wait(timeout=DEADLINE_S)  # the ranks exited 75, so the stand-in launcher ends too
    finally:
        for member in family:  # after a failure: nothing left training
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()
        kill_tree(proc)
        if link is not None:
            shutil.rmtree(link, ignore_errors=True)


@pytest.mark.slow
def test_a_stop_while_the_launcher_is_being_started_is_held_and_passed_on(tmp_path):
    """The supervisor's handlers are installed before the launcher starts: a SIGTERM in between is a stop passed
    to every rank, not the default action that would kill the supervisor and leave the ranks unattended."""
    (tmp_path / "launcher.py").write_text(FAKE_LAUNCHER)
    (tmp_path / "rank.py").write_text(FAKE_RANK)
    for rank in (0, 1):
        (tmp_path / f"go-{rank}").write_text("")
    script = textwrap.dedent(
        f"""
        import os, signal, subprocess, sys
        from mellama_train import preemption

        class Popen(subprocess.Popen):
            def __init__(self, *args, **kwargs):
                os.kill(os.getpid(), signal.SIGTERM)  # the stop arrives as the launcher is being started
                super().__init__(*args, **kwargs)

        preemption.subprocess.Popen = Popen
        launcher = [sys.executable, {str(tmp_path / "launcher.py")!r}, {str(tmp_path / "rank.py")!r}]
        sys.exit(preemption.supervise([*launcher, {str(tmp_path)!r}]))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.wait(timeout=DEADLINE_S) == EXIT_PREEMPTED
    finally:
        kill_tree(proc)
    assert {(tmp_path / f"stopped-{r}").read_text() for r in (0, 1)} == {"SIGTERM"}
    assert "SIGTERM: every rank saves a checkpoint at its next step" in proc.stderr.read()


@pytest.mark.slow
def test_a_second_ctrl_c_ends_a_rank_at_once_without_the_supervisor_too(tmp_path):
    """Without a launcher (python launch/pretrain.py in a terminal): the first SIGINT only sets the flag; the
    second is the kernel's default action, which needs no Python code to run."""
    script = textwrap.dedent(
        f"""
        import os, signal, sys, time
        sys.path.insert(0, {str(REPO / "src")!r})
        from mellama_train.preemption import StopFlag
        flag = StopFlag().install()
        os.kill(os.getpid(), signal.SIGINT)
        while not flag.requested:
            time.sleep(0.01)
        print(flag.reason, flush=True)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(60)
        print("still alive", flush=True)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=DEADLINE_S)
    assert proc.returncode == -signal.SIGINT and proc.stdout == "SIGINT\n"


def test_launch_without_a_command_or_with_an_unknown_one_is_one_line(capsys):
    from mellama_train.cli import main

    assert main(["launch"]) == 2
    assert "give the launcher command" in capsys.readouterr().err
    assert main(["launch", "no-such-launcher-xyz", "--num_gpus", "2"]) == 2
    err = capsys.readouterr().err
    assert "no-such-launcher-xyz: command not found" in err and len(err.strip().splitlines()) == 1


# ---- the real launchers, 2 ranks (ZeRO-3 over gloo) ------------------------------------------------------

STEPS = ["--max-steps", "20", "--save-every", "100"]  # no periodic save: only the stops save


def _run_command(kind: str, port: int, out: Path, supervised: bool) -> list[str]:
    from test_train_e2e import LAUNCH, TINY, deepspeed_launcher

    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(port),
    ]
    launcher = deepspeed_launcher(port) if kind == "deepspeed" else torchrun
    cmd = [*launcher, LAUNCH, "--ds", "ds_configs/zero3.json", "--output-dir", str(out), *TINY, *STEPS]
    return [sys.executable, "-m", "mellama_train", "launch", *cmd] if supervised else cmd


def _stop_after(cmd: list[str], out: Path, step: int, sig: signal.Signals, log: Path) -> int:
    """Run `cmd`, send `sig` to it once `step` is logged (by progress, mid-run), return its exit code."""
    from test_train_e2e import clean_env

    from mellama_train.metrics import read_metrics

    def reached() -> bool:
        metrics = out / "metrics.jsonl"
        return metrics.is_file() and any(
            s >= step and "train/loss" in v for s, v in read_metrics(metrics).items()
        )

    env = {**clean_env(), "PYTHONPATH": str(REPO / "src")}
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            wait_for(reached, f"step {step} in {out}/metrics.jsonl (log {log})", proc, timeout=600)
            proc.send_signal(sig)
            return proc.wait(timeout=600)
        finally:
            kill_tree(proc)  # a no-op once it has exited; after a failure, no rank is left training


def _stopped_at(out: Path) -> int:
    from mellama_train import checkpoint

    complete = checkpoint.complete_checkpoints(out / "checkpoints")
    assert complete, f"no complete checkpoint in {out}"
    assert checkpoint.verify(complete[-1]) is None
    return json.loads((complete[-1] / checkpoint.TRAINER_STATE).read_text())["step"]


@pytest.mark.slow
def test_stops_through_deepspeed_and_torchrun_save_exit_75_and_the_run_resumes_exactly(tmp_path):
    """One run, stopped twice: SIGTERM through `mellama-train launch deepspeed` (the runner and DeepSpeed's
    per-node launcher), then, resumed, SIGINT through `mellama-train launch torchrun`; then resumed to the end
    with the plain launcher. Every logged loss equals an uninterrupted run's, bitwise."""
    from test_train_e2e import losses, run

    reference = tmp_path / "reference"
    run(_run_command("deepspeed", 29651, reference, supervised=False))

    out = tmp_path / "stopped"
    log = tmp_path / "deepspeed.log"
    code = _stop_after(_run_command("deepspeed", 29652, out, True), out, 3, signal.SIGTERM, log)
    text = log.read_text()
    assert code == EXIT_PREEMPTED, text[-4000:]
    first = _stopped_at(out)
    assert 3 <= first < 20
    assert "preempted (rank 0): stopped at step" in text and "preempted (rank 1): stopped at step" in text
    assert "the launcher exited 1: exit 75" not in text  # DeepSpeed's runner passed the per-node 75 on

    log = tmp_path / "torchrun.log"
    code = _stop_after(_run_command("torchrun", 29653, out, True), out, first + 1, signal.SIGINT, log)
    text = log.read_text()
    assert code == EXIT_PREEMPTED, text[-4000:]
    second = _stopped_at(out)
    assert first < second < 20
    assert "on SIGINT" in text and "the launcher exited 1: exit 75" in text  # torchrun itself said 1

    run(_run_command("deepspeed", 29654, out, supervised=False))
    assert losses(out) == losses(reference)  # exactly
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [x["step"] for x in lines if "train/loss" in x]
    assert trained == list(range(1, 21))  # none twice across the stops, none missing
