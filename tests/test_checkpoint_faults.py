"""Faults planted in real DeepSpeed checkpoints, resumed through the entry point: the damaged checkpoint is named,
the previous intact one is used, a planted payload never runs, and the resumed losses equal the uninterrupted
run's. One reference run is shared by every test (6 steps, a checkpoint every 2)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_checkpoint import SHARD, flip_a_bit, plant_payload, reseal, tmpfs
from test_train_e2e import LAUNCH, REPO, TINY, clean_env, interrupted_copy, losses, single, two_rank_command

from mellama_train import checkpoint

pytestmark = pytest.mark.slow  # each test resumes a training run in a subprocess

ARGS = ["--max-steps", "6", "--save-every", "2"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "reference"
    single(out, *ARGS)
    return out


def died_after_last_save(reference: Path, dest: Path) -> Path:
    return interrupted_copy(reference, dest, 6, ["final"])


def resumed_from(run_dir: Path) -> str:
    record = json.loads(max(run_dir.glob("run_record.*.json")).read_text())
    return Path(record["resumed_from"]).name


def test_a_truncated_shard_is_passed_over_and_the_resumed_losses_equal_the_uninterrupted_run(
    reference, tmp_path
):
    out = died_after_last_save(reference, tmp_path / "run")
    shard = out / "checkpoints" / "step_00000006" / SHARD
    size = shard.stat().st_size
    with open(shard, "r+b") as fh:
        fh.truncate(size // 2)
    proc = single(out, *ARGS)
    assert (
        f"skipping damaged checkpoint step_00000006: {shard} is {size // 2} bytes, expected {size}"
        in proc.stderr
    )
    assert resumed_from(out) == "step_00000004"
    assert losses(out) == losses(reference)  # steps 5-6 trained again, to the same losses exactly
    assert checkpoint.verify(out / "checkpoints" / "step_00000006", deep=True) is None  # written anew
    aside = list((out / "checkpoints").glob("step_00000006.replaced-*"))
    assert len(aside) == 1 and (aside[0] / SHARD).stat().st_size == size // 2  # the damaged one is kept aside
    assert (out / "final" / "model.safetensors").is_file()


def test_a_flipped_bit_in_the_master_weights_is_found_by_its_digest(reference, tmp_path):
    out = died_after_last_save(reference, tmp_path / "run")
    shard = out / "checkpoints" / "step_00000006" / SHARD
    flip_a_bit(shard, offset_from_end=shard.stat().st_size // 2)  # inside the fp32 partitions
    proc = single(out, *ARGS)
    assert f"skipping damaged checkpoint step_00000006: {shard} changed after it was written" in proc.stderr
    assert resumed_from(out) == "step_00000004" and losses(out) == losses(reference)


def test_a_payload_planted_in_a_deepspeed_shard_never_runs(reference, tmp_path):
    """The attacker rewrites the optimizer shard's pickle to run a command and recomputes the manifest: the
    payload is refused by weights-only unpickling before DeepSpeed reads the file, and the run falls back."""
    out = died_after_last_save(reference, tmp_path / "run")
    witness = tmp_path / "payload-ran"
    newest = out / "checkpoints" / "step_00000006"
    plant_payload(newest / SHARD, witness)
    reseal(newest)
    proc = single(out, *ARGS)
    assert not witness.exists()
    assert (
        f"skipping damaged checkpoint step_00000006: a file of {newest} cannot be loaded safely"
        in proc.stderr
    )
    assert resumed_from(out) == "step_00000004" and losses(out) == losses(reference)


def test_an_edited_step_with_recomputed_digests_is_caught_by_the_counters(reference, tmp_path):
    out = died_after_last_save(reference, tmp_path / "run")
    newest = out / "checkpoints" / "step_00000006"
    state = json.loads((newest / "trainer.json").read_text())
    state["step"] = 2  # would retrain steps 3-6 and rewrite good checkpoints
    (newest / "trainer.json").write_text(json.dumps(state))
    reseal(newest)
    proc = single(out, *ARGS)
    assert (
        "skipping damaged checkpoint step_00000006: step_00000006's counters disagree: trainer.json says step 2"
        in (proc.stderr)
    )
    assert resumed_from(out) == "step_00000004" and losses(out) == losses(reference)


def test_markers_removed_from_every_checkpoint_never_restart_the_run(reference, tmp_path):
    out = died_after_last_save(reference, tmp_path / "run")
    for step_dir in (out / "checkpoints").glob("step_*"):
        (step_dir / checkpoint.COMPLETE).unlink()
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    proc = subprocess.run(
        [sys.executable, LAUNCH, "--output-dir", str(out), *TINY, *ARGS],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert (
        len(errors) == 1 and "refusing to restart from step 0" in errors[0] and "Traceback" not in proc.stderr
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # nothing deleted or written
    assert losses(out) == {s: v for s, v in losses(reference).items() if s <= 6}


@pytest.mark.parametrize("size, failing, resumable", [("7m", 4, ["step_00000002"]), ("3m", 2, [])])
def test_a_disk_that_fills_during_a_save_stops_every_rank_with_one_line(tmp_path, size, failing, resumable):
    """2 ranks. 7 MiB holds one checkpoint (4.7 MB) but not two; 3 MiB not even one (then DeepSpeed's own copy
    of zero_to_fp32.py beside the checkpoints fails too, outside its checkpoint engine). The free-space checks
    would refuse these saves cleanly; tests/nospace_launch.py turns them off, as another job filling the disk
    between a check and the save would. Both ranks stop together (none left waiting in a collective), each with
    one line, and the partial save is ignored."""
    with tmpfs(tmp_path / "disk", size) as disk:
        out = disk / "run"
        proc = subprocess.run(
            two_rank_command(out, *ARGS, launch=str(REPO / "tests" / "nospace_launch.py"), port=29561),
            cwd=REPO,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode != 0, proc.stderr[-3000:]
        # One line from each rank (tqdm's progress bar may precede it on the same terminal line).
        errors = re.findall(r"error \(rank \d\): [^\n]*", proc.stderr)
        assert len(errors) == 2, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr and "inline_container" not in proc.stderr
        for line in errors:
            assert f"step_{failing:08d}" in line and "failed (No space left on device" in line
            assert "bytes free on the filesystem of" in line
        assert (out / "checkpoints" / f"step_{failing:08d}.partial").is_dir()
        found = checkpoint.resume_candidates(out, "auto", same_run=True)
        assert [c.name for c in found] == resumable
        for path in found:
            assert checkpoint.verify(path, deep=True) is None
