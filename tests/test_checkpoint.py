"""Which checkpoint a run resumes from, and what retention deletes (no DeepSpeed needed)."""

from __future__ import annotations

import logging

import pytest

from mellama_train import checkpoint
from mellama_train.checkpoint import COMPLETE, find_resume_point, tag_for


def make(root, step, complete=True):
    path = root / "checkpoints" / tag_for(step)
    path.mkdir(parents=True)
    if complete:
        (path / COMPLETE).write_text("ok\n")
    return path


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
