"""Which checkpoint a run resumes from, what retention deletes, and how a damaged checkpoint is caught: on fake
step directories written through checkpoint.save with a stub engine (no DeepSpeed), plus one real run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from test_train_e2e import interrupted_copy, losses, single

from mellama_train import checkpoint
from mellama_train.checkpoint import COMPLETE, TrainerState, find_resume_point, tag_for


def make(root, step, complete=True):
    """A step directory with a marker of the old plain-text kind (no manifest), or none."""
    path = root / "checkpoints" / tag_for(step)
    path.mkdir(parents=True)
    if complete:
        (path / COMPLETE).write_text("ok\n")
    return path


SHARD = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


class StubEngine:
    """What checkpoint.save/load need of the DeepSpeed engine: it writes two fake shards, or fails to load."""

    def __init__(self, load_error: Exception | None = None):
        self.load_error = load_error
        self.loaded: list[str] = []

    def save(self, checkpoints_dir: str, tag: str) -> None:
        path = Path(checkpoints_dir) / tag
        path.mkdir(parents=True, exist_ok=True)
        (path / SHARD).write_bytes(b"o" * 1000)
        (path / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"m" * 300)

    def load(self, checkpoints_dir: str, tag: str) -> None:
        self.loaded.append(tag)
        if self.load_error is not None:
            raise self.load_error


def saved(root, step, keep_last=3):
    """A checkpoint written by the real save path (rank 0 of a world of one), manifest included."""
    trainer = TrainerState(step=step, tokens_by_source={"pubmed": 64 * step})
    return checkpoint.save(StubEngine(), root / "checkpoints", trainer, {"position": step}, 0, keep_last)


def test_save_writes_last_a_manifest_of_every_file_with_its_size(tmp_path):
    path = saved(tmp_path, 4)
    marker = json.loads((path / COMPLETE).read_text())
    on_disk = {p.name: p.stat().st_size for p in path.iterdir() if p.name != COMPLETE}
    assert set(on_disk) == {
        SHARD,
        "zero_pp_rank_0_mp_rank_00_model_states.pt",
        "rank_00000.pt",
        "trainer.json",
    }
    assert marker == {"tag": "step_00000004", "files": on_disk}
    assert all(p.stat().st_mtime_ns <= (path / COMPLETE).stat().st_mtime_ns for p in path.iterdir())
    assert checkpoint.verify(path) is None


def test_a_truncated_shard_is_skipped_naming_it_and_the_previous_checkpoint_is_used(tmp_path, caplog):
    older, newest = saved(tmp_path, 2), saved(tmp_path, 4)
    with open(newest / SHARD, "r+b") as fh:
        fh.truncate(10)  # the disk filled up, or a copy was cut short
    with caplog.at_level(logging.WARNING):
        assert find_resume_point(tmp_path, "auto") == older
    assert (
        f"skipping damaged checkpoint step_00000004: {newest / SHARD} is 10 bytes, expected 1000"
        in caplog.text
    )


def test_a_missing_file_is_skipped_too(tmp_path, caplog):
    older, newest = saved(tmp_path, 2), saved(tmp_path, 4)
    (newest / "rank_00000.pt").unlink()
    with caplog.at_level(logging.WARNING):
        assert find_resume_point(tmp_path, "auto") == older
    assert f"{newest / 'rank_00000.pt'} is missing" in caplog.text


def test_no_intact_checkpoint_is_an_error_naming_the_file_not_a_restart(tmp_path):
    older, newest = saved(tmp_path, 2), saved(tmp_path, 4)
    (older / SHARD).write_bytes(b"")
    (newest / "trainer.json").unlink()
    with pytest.raises(ValueError) as err:
        find_resume_point(tmp_path, "auto")
    message = str(err.value)
    assert "\n" not in message and "refusing to restart from step 0" in message
    assert f"{older / SHARD} is 0 bytes, expected 1000" in message
    assert f"{newest / 'trainer.json'} is missing" in message
    assert "restore the named file(s), or pass a new --output-dir" in message


def test_an_explicit_damaged_checkpoint_is_refused_naming_the_file(tmp_path):
    path = saved(tmp_path, 2)
    (path / SHARD).write_bytes(b"o" * 999)
    with pytest.raises(
        ValueError, match=f"--resume {path}: checkpoint is damaged: {path / SHARD} is 999 bytes"
    ):
        find_resume_point(tmp_path, str(path))


def test_a_legacy_marker_without_manifest_is_accepted(tmp_path, caplog):
    path = make(tmp_path, 10, complete=False)
    (path / COMPLETE).write_text(f"{path.name}\n")  # what versions before the manifest wrote
    with caplog.at_level(logging.DEBUG, logger="mellama_train.checkpoint"):
        assert find_resume_point(tmp_path, "auto") == path
        assert find_resume_point(tmp_path, str(path)) == path
    assert "marker without a manifest" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_save_replaces_a_leftover_directory_of_the_same_step(tmp_path):
    stale = make(tmp_path, 4)  # e.g. skipped as damaged at resume, now trained to again
    (stale / "leftover.tmp").write_text("x")
    path = saved(tmp_path, 4)
    assert path == stale and not (path / "leftover.tmp").exists()
    assert "leftover.tmp" not in json.loads((path / COMPLETE).read_text())["files"]


def test_prune_never_deletes_the_checkpoint_just_written(tmp_path):
    for step in (10, 20, 30):
        saved(tmp_path, step)
    rewritten = saved(tmp_path, 5, keep_last=2)  # resumed from an older point (--resume PATH) and saved again
    left = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert (
        left == ["step_00000005", "step_00000020", "step_00000030"] and checkpoint.verify(rewritten) is None
    )
    checkpoint._prune(tmp_path / "checkpoints", keep_last=0)  # refused by config validation; still keeps one
    assert [p.name for p in (tmp_path / "checkpoints").glob("step_*")] == ["step_00000030"]


def test_resume_on_another_world_size_is_refused_saying_the_data_position_cannot_be_remapped(tmp_path):
    path = saved(tmp_path, 4)  # written by 1 rank
    engine = StubEngine()
    with pytest.raises(ValueError) as err:
        checkpoint.load(engine, path, rank=0, world_size=4)
    message = str(err.value)
    assert "written by 1 data-parallel ranks but this run has 4" in message
    assert "cannot be remapped exactly" in message and "relaunch on the original 1 ranks" in message
    assert engine.loaded == []  # refused before anything was loaded


def test_a_shard_deepspeed_cannot_read_is_an_error_naming_the_checkpoint_and_the_previous_one(tmp_path):
    older, newest = saved(tmp_path, 2), saved(tmp_path, 4)
    damaged = StubEngine(
        RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central")
    )
    with pytest.raises(ValueError) as err:
        checkpoint.load(damaged, newest, rank=0, world_size=1)
    message = str(err.value)
    assert message.startswith(f"cannot load checkpoint {newest} (RuntimeError: PytorchStreamReader failed")
    assert message.endswith(f"resume from the previous checkpoint with --resume {older}")
    with pytest.raises(ValueError, match="pass a new --output-dir to start over"):
        checkpoint.load(damaged, older, rank=0, world_size=1)  # nothing older to point to
    state, data = checkpoint.load(StubEngine(), newest, rank=0, world_size=1)
    assert state.step == 4 and state.tokens_by_source == {"pubmed": 256} and data == {"position": 4}


def test_fresh_directory_starts_from_scratch(tmp_path):
    assert find_resume_point(tmp_path / "new", "auto") is None
    assert find_resume_point(tmp_path / "new", "never") is None


def test_auto_takes_the_newest_complete_and_names_skipped_partials(tmp_path, caplog):
    make(tmp_path, 100)
    newest = make(tmp_path, 200)
    make(tmp_path, 300, complete=False)  # killed while saving
    with caplog.at_level(logging.WARNING):
        assert find_resume_point(tmp_path, "auto") == newest
    assert "step_00000300" in caplog.text


def test_only_partial_checkpoints_is_an_error_not_a_restart(tmp_path):
    make(tmp_path, 50, complete=False)
    with pytest.raises(ValueError, match="refusing to restart from step 0"):
        find_resume_point(tmp_path, "auto")


def test_only_partial_checkpoints_of_this_same_run_start_over_with_a_warning(tmp_path, caplog):
    """A run killed inside its first save: nothing complete was saved, its run record matches (same_run), so a
    requeued job starts from step 0 instead of stopping; another run's partials are still refused above."""
    from mellama_train.config import resolve
    from mellama_train.outputs import same_run, write_run_record

    make(tmp_path, 3, complete=False)
    cfg = resolve("tiny")
    assert not same_run(tmp_path, cfg)  # no run record: cannot tell whose partials these are
    write_run_record(tmp_path, cfg, {}, {}, None)
    assert same_run(tmp_path, cfg)
    assert not same_run(tmp_path, resolve("tiny", overrides=["optim.lr=1e-5"]))
    assert same_run(tmp_path, resolve("tiny", overrides=["train.save_every=7"]))  # may differ on a resume
    with caplog.at_level(logging.WARNING):
        assert find_resume_point(tmp_path, "auto", same_run=True) is None
    assert "only incomplete checkpoints (step_00000003), interrupted saves of this same run" in caplog.text
    (tmp_path / "run_record.json").write_text('{"config": {"tr')  # a damaged record is passed over
    assert not same_run(tmp_path, cfg)


def test_never_refuses_a_directory_with_checkpoints(tmp_path):
    make(tmp_path, 10)
    with pytest.raises(ValueError, match="choose a new --output-dir"):
        find_resume_point(tmp_path, "never")


def test_explicit_path_must_be_complete(tmp_path):
    good, bad = make(tmp_path, 10), make(tmp_path, 20, complete=False)
    assert find_resume_point(tmp_path, str(good)) == good
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        find_resume_point(tmp_path, str(bad))


def test_prune_keeps_the_newest_complete_and_removes_stale_partials(tmp_path):
    for step in (10, 20, 30):
        make(tmp_path, step)
    stale = make(tmp_path, 25, complete=False)
    in_progress = make(
        tmp_path, 40, complete=False
    )  # newer than every complete one: maybe still being written
    checkpoint._prune(tmp_path / "checkpoints", keep_last=2)
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert left == ["step_00000020", "step_00000030", "step_00000040"]
    assert not stale.exists() and in_progress.exists()


def test_a_real_run_resumes_from_the_older_checkpoint_when_the_newest_shard_is_truncated(tmp_path):
    reference = tmp_path / "reference"
    single(reference, "--max-steps", "6", "--save-every", "2")
    out = interrupted_copy(
        reference, tmp_path / "run", 6, ["final"]
    )  # as if it died right after the last save
    shard = out / "checkpoints" / "step_00000006" / SHARD
    size = shard.stat().st_size
    with open(shard, "r+b") as fh:
        fh.truncate(size // 2)

    proc = single(out, "--max-steps", "6", "--save-every", "2")
    warning = f"skipping damaged checkpoint step_00000006: {shard} is {size // 2} bytes, expected {size}"
    assert warning in proc.stderr
    record = json.loads(max(out.glob("run_record.*.json")).read_text())
    assert record["resumed_from"] == str(out / "checkpoints" / "step_00000004")
    assert losses(out) == losses(reference)  # steps 5-6 trained again, to the same losses exactly
    assert checkpoint.verify(out / "checkpoints" / "step_00000006") is None  # rewritten whole
    assert (out / "final" / "model.safetensors").is_file()
