"""kill -9 trials: one 2-rank ZeRO-3 run killed (SIGKILL to its whole process group) again and again, at moments
chosen by its progress (after a given step is logged, or while a given checkpoint is being written), and
relaunched with `--resume auto` each time. Every relaunch must resume from the newest complete checkpoint, and
every loss the run ever logs must equal the uninterrupted run's loss for that step exactly.

    .venv/bin/pytest -s tests/test_kill_trials.py     # prints "kill trials: N run, N exact (K killed during a save, ...)"
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from test_train_e2e import REPO, clean_env, losses, run, two_rank_command

from mellama_train.checkpoint import COMPLETE, complete_checkpoints, tag_for
from mellama_train.metrics import read_metrics

STEPS, SAVE_EVERY = 36, 3  # a save every 3 steps, so kills often land near one
ARGS = ["--max-steps", str(STEPS), "--save-every", str(SAVE_EVERY)]
KILLS, KILLS_DURING_SAVE = 8, 4  # 4 aim at a save; one can end before the kill lands: 2 must hit
SEED = 5
PORT = 29710  # apart from test_train_e2e's 29533; each launch takes the next one


def logged(run_dir: Path) -> list[dict]:
    """Every metrics line written so far, re-logged steps included; not a line still being written."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    *whole, _unfinished = path.read_text().split("\n")
    lines = []
    for line in whole:
        with contextlib.suppress(ValueError):  # a fragment of a line cut by an earlier kill
            lines.append(json.loads(line))
    return lines


@dataclass
class Target:
    kind: str  # "step": kill once step `step` is logged; "save": kill while step_<step> is being written
    step: int
    moment: str = ""  # for "save": the file whose appearance triggers the kill ("" = the directory itself)


def choose(rng: random.Random, kind: str, resumed_at: int) -> Target:
    """A seeded target ahead of the resume point: a step to be logged, or one of the next two saves (the very
    first save included: the relaunch then starts over, since nothing complete was saved)."""
    save_from = (resumed_at // SAVE_EVERY + 1) * SAVE_EVERY
    if kind == "save":
        step = min(save_from + SAVE_EVERY * rng.randint(0, 1), STEPS)
        return Target(
            "save", step, rng.choice(["", "zero_pp_rank_1_mp_rank_00_optim_states.pt", "rank_00001.pt"])
        )
    return Target("step", min(rng.randint(resumed_at + 1, resumed_at + 2 * SAVE_EVERY), STEPS - 1))


def saving(partial: Path, launched_ns: int, moment: str) -> bool:
    """The save is being written by this launch: its `step_N.partial` directory exists, has no marker yet, and was
    (re)created since the launch (an interrupted save's leftover directory is older)."""
    try:
        fresh = partial.stat().st_mtime_ns >= launched_ns
    except FileNotFoundError:
        return False
    return fresh and not (partial / COMPLETE).exists() and (not moment or (partial / moment).exists())


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher, its ranks and everything else in its process group; wait until none is running."""
    try:
        members = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except (
        psutil.NoSuchProcess
    ):  # the launcher already exited (a failed trial): take what is left of its group
        members = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 60
    for member in members:
        with contextlib.suppress(psutil.NoSuchProcess):
            while member.is_running() and member.status() != psutil.STATUS_ZOMBIE:
                assert time.monotonic() < deadline, f"process {member.pid} survived SIGKILL"
                time.sleep(0.01)


def launch_and_kill(out: Path, log: Path, port: int, target: Target) -> bool:
    """One launch, killed at `target`; True when the kill landed inside the save it aimed at."""
    before = len(logged(out))
    launched_ns = time.time_ns()
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            two_rank_command(out, *ARGS, port=port),
            cwd=REPO,
            env=clean_env(),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the kill takes the ranks with it, like a node loss
        )
    step_dir = out / "checkpoints" / tag_for(target.step)
    partial = step_dir.with_name(f"{step_dir.name}.partial")  # where a save writes until it is complete
    deadline = time.monotonic() + 300
    try:
        while True:
            assert proc.poll() is None, f"exit {proc.returncode} before {target}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {target} within 300 s:\n{log.read_text()[-3000:]}"
            step_logged = any(x["step"] == target.step and "train/loss" in x for x in logged(out)[before:])
            if target.kind == "step" and step_logged:
                break
            if target.kind == "save" and step_logged:
                # The save follows the step's log line within milliseconds and lasts tens: poll tightly.
                while not saving(partial, launched_ns, target.moment):
                    if step_dir.exists() or proc.poll() is not None:
                        break  # missed it: kill now, just after the save
                    time.sleep(0.001)
                break
            time.sleep(0.02)
    finally:
        kill_group(proc)
    return target.kind == "save" and partial.is_dir() and not step_dir.exists()


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    reference_dir = tmp_path / "reference"
    run(two_rank_command(reference_dir, *ARGS, port=PORT))
    reference = losses(reference_dir)
    assert sorted(reference) == list(range(1, STEPS + 1))

    out = tmp_path / "killed"
    rng = random.Random(SEED)
    kinds = ["save"] * KILLS_DURING_SAVE + ["step"] * (KILLS - KILLS_DURING_SAVE)
    rng.shuffle(kinds)
    during_save, resumes, launch_lines = 0, [], []
    for trial, kind in enumerate([*kinds, None]):
        newest = complete_checkpoints(out / "checkpoints")
        expected = str(newest[-1]) if newest else None
        resumed_at = int(newest[-1].name.split("_")[1]) if newest else 0
        records = set(out.glob("run_record*.json"))
        before = len(logged(out))
        log = tmp_path / f"launch{trial:02d}.log"
        if kind is None:  # the last launch runs to the end
            run(two_rank_command(out, *ARGS, port=PORT + 1 + trial))
        else:
            assert resumed_at < STEPS - 1, f"the run reached its end after {trial} of {KILLS} kills"
            target = choose(rng, kind, resumed_at)
            hit = launch_and_kill(out, log, PORT + 1 + trial, target)
            during_save += hit
            print(
                f"launch {trial}: from step {resumed_at}, killed at {target}{' inside the save' if hit else ''}"
            )
        (record,) = set(out.glob("run_record*.json")) - records
        resumes.append((json.loads(record.read_text())["resumed_from"], expected))
        launch_lines.append([x for x in logged(out)[before:] if "train/loss" in x])

    assert all(got == want for got, want in resumes), resumes  # always the newest complete checkpoint
    assert resumes[0] == (None, None)
    exact = sum(all(x["train/loss"] == reference[x["step"]] for x in lines) for lines in launch_lines[1:])
    compared = sum(len(lines) for lines in launch_lines)
    print(
        f"\nkill trials: {KILLS} run, {exact} exact ({during_save} killed during a save, {compared} losses compared)"
    )
    wrong = [(x["step"], x["train/loss"], reference[x["step"]]) for lines in launch_lines for x in lines]
    assert [w for w in wrong if w[1] != w[2]] == []  # every loss ever logged, re-logged ones included
    assert exact == KILLS and during_save >= 2
    assert sorted(losses(out)) == list(range(1, STEPS + 1))

    final, ref_final = (
        read_metrics(out / "metrics.jsonl")[STEPS],
        read_metrics(reference_dir / "metrics.jsonl")[STEPS],
    )
    tokens = {k: v for k, v in final.items() if k.startswith("data/tokens/")}
    assert tokens and tokens == {k: v for k, v in ref_final.items() if k.startswith("data/tokens/")}
    ours, theirs = (
        json.loads((d / "checkpoints" / tag_for(STEPS) / "trainer.json").read_text())
        for d in (out, reference_dir)
    )
    assert ours["tokens_by_source"] == theirs["tokens_by_source"]
    assert (out / "final" / "model.safetensors").is_file()
