"""Which checkpoint a run resumes from, what retention deletes, and how a damaged or planted checkpoint is caught.

Checkpoints here are written by the real save path (checkpoint.save, rank 0 of a world of one) with a stub engine
that writes real torch files the way DeepSpeed lays them out; the resume checks read them with the real code
(digests, weights-only unpickling, DeepSpeed's counters). tests/test_checkpoint_faults.py plants faults in real
DeepSpeed checkpoints and resumes them through the entry point."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import shutil
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mellama_train import checkpoint, integrity
from mellama_train.backends.deepspeed import files as ds_files
from mellama_train.checkpoint import (
    COMPLETE,
    CheckpointWriteError,
    TrainerState,
    find_resume_point,
    resume_candidates,
    tag_for,
)

SHARD = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
MODEL = "zero_pp_rank_0_mp_rank_00_model_states.pt"


class StubEngine:
    """What checkpoint.save/load need of a backend, writing files shaped like DeepSpeed's ZeRO-3 ones."""

    def __init__(
        self, steps: int = 0, shard_bytes: int = 4000, fail_load: bool = False, reshapes: bool = False
    ):
        self.steps, self.shard_bytes, self.fail_load = steps, shard_bytes, fail_load
        self.reshapes = reshapes
        self.loaded: list[str] = []

    def save(self, checkpoints_dir: str, tag: str) -> dict[str, integrity.FileDigest]:
        path = Path(checkpoints_dir) / tag
        model = {"global_steps": self.steps, "skipped_steps": 0, "lr_scheduler": {"last_epoch": self.steps}}
        optim = {
            "optimizer_state_dict": {"moments": torch.arange(self.shard_bytes // 4, dtype=torch.float32)}
        }
        return {
            str(path / MODEL): integrity.save_torch(model, path / MODEL),
            str(path / SHARD): integrity.save_torch(optim, path / SHARD),
        }

    def saved_counters(self, step_dir: str, rank: int) -> dict[str, int] | None:
        return ds_files.step_counters(step_dir, rank)  # the real reader of DeepSpeed's counters

    def read_file(self, path: str, mmap: bool = False):
        return ds_files.safe_load(path, mmap=mmap)  # the DeepSpeed backend's own reader

    def load(self, checkpoints_dir: str, tag: str, reshape: bool = False) -> None:
        if self.fail_load:
            raise RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central")
        self.loaded.append((tag, reshape) if reshape else tag)
        self.steps = int(tag.split("_")[1])

    @property
    def optimizer_steps(self) -> int:
        return self.steps


def saved(root: Path, step: int, keep_last: int = 5, **stub) -> Path:
    """A checkpoint of step `step` written by checkpoint.save."""
    trainer = TrainerState(step=step, tokens_by_source={"pubmed": 64 * step})
    data = {"tokens_by_source": {"pubmed": 64 * step}, "position": step}
    return checkpoint.save(StubEngine(step, **stub), root / "checkpoints", trainer, data, 0, keep_last)


def resume(root: Path, resume_arg: str = "auto") -> tuple[Path, TrainerState, dict]:
    """What a restarted run of one rank resumes from."""
    return checkpoint.load(StubEngine(), resume_candidates(root, resume_arg), rank=0, world_size=1)


def seal(path: Path, world_size: int = 1) -> None:
    """A manifest for a hand-made step directory (fake runs in other tests): every file present, rank 0."""
    files = {}
    for item in sorted(path.rglob("*")):
        if item.is_file() and item.name != COMPLETE:
            digest = integrity.file_digest(item)
            files[item.relative_to(path).as_posix()] = {
                "bytes": digest.size,
                "sha256": digest.sha256,
                "rank": 0,
            }
    step = int(path.name.split("_")[1])
    body = {"format": 2, "tag": path.name, "step": step, "world_size": world_size, "files": files}
    (path / COMPLETE).write_text(json.dumps({**body, "manifest_sha256": integrity.json_digest(body)}))


def reseal(path: Path, key: bytes | None = None) -> None:
    """Recompute every digest of a checkpoint's manifest, as an attacker who edits files and marker would (with
    `key`: an HMAC seal made with that key, the attacker's guess)."""
    marker = json.loads((path / COMPLETE).read_text())
    marker.pop("manifest_sha256", None)
    marker.pop("manifest_hmac", None)
    for name, entry in marker["files"].items():
        digest = integrity.file_digest(path / name)
        entry.update(bytes=digest.size, sha256=digest.sha256)
    seal_name = "manifest_hmac" if key else "manifest_sha256"
    marker[seal_name] = integrity.json_digest(marker, key)
    (path / COMPLETE).write_text(json.dumps(marker))


def flip_a_bit(path: Path, offset_from_end: int = 200) -> None:
    with open(path, "r+b") as fh:
        fh.seek(-offset_from_end, os.SEEK_END)
        byte = fh.read(1)[0]
        fh.seek(-offset_from_end, os.SEEK_END)
        fh.write(bytes([byte ^ 0x04]))


class Payload:
    """A pickle that runs a command when unpickled, as a planted shard would."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant_payload(file: Path, witness: Path) -> None:
    """Replace the pickle inside a torch zip file with one that would run `touch witness`."""
    with zipfile.ZipFile(file) as zf:
        entries = {info.filename: zf.read(info.filename) for info in zf.infolist()}
    name = next(n for n in entries if n.endswith("data.pkl"))
    entries[name] = pickle.dumps({"optimizer_state_dict": Payload(witness)}, protocol=2)
    with zipfile.ZipFile(file, "w") as zf:
        for entry, data in entries.items():
            zf.writestr(entry, data)


# ---- what a save writes -----------------------------------------------------------------------------------


def test_save_writes_last_a_manifest_of_every_file_with_its_size_digest_and_writer(tmp_path):
    path = saved(tmp_path, 4)
    marker = json.loads((path / COMPLETE).read_text())
    on_disk = {p.name: p for p in path.iterdir() if p.name != COMPLETE}
    assert set(on_disk) == {SHARD, MODEL, "rank_00000.pt", "trainer.json"}
    assert marker["tag"] == "step_00000004" and marker["step"] == 4 and marker["world_size"] == 1
    for name, file in on_disk.items():  # what `sha256sum FILE` prints is what the manifest holds
        entry = marker["files"][name]
        assert entry == {
            "bytes": file.stat().st_size,
            "sha256": hashlib.sha256(file.read_bytes()).hexdigest(),
            "rank": 0,
        }
    assert all(p.stat().st_mtime_ns <= (path / COMPLETE).stat().st_mtime_ns for p in path.iterdir())
    assert checkpoint.verify(path, deep=True) is None
    assert not list((tmp_path / "checkpoints").glob("*.partial"))


def test_the_rank_file_holds_coordinates_and_counters_not_tokens(tmp_path):
    path = saved(tmp_path, 4)
    state = integrity.safe_load(str(path / "rank_00000.pt"))
    assert state["step"] == 4 and state["rank"] == 0 and state["world_size"] == 1
    assert state["tokens_by_source"] == {"pubmed": 256} and state["data"]["position"] == 4


def test_a_save_killed_half_way_leaves_a_partial_directory_that_resume_passes_over(tmp_path, caplog):
    older = saved(tmp_path, 2)

    class Killed(StubEngine):
        def save(self, checkpoints_dir, tag):
            super().save(checkpoints_dir, tag)
            raise KeyboardInterrupt  # the process dies after writing its shards, before the manifest

    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(Killed(4), tmp_path / "checkpoints", TrainerState(step=4), {}, 0, 5)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_00000002", "step_00000004.partial"]  # never a step directory without a manifest
    with caplog.at_level(logging.WARNING):
        assert resume(tmp_path)[0] == older
    assert "skipping incomplete checkpoint(s) step_00000004.partial" in caplog.text
    newest = saved(tmp_path, 4)  # the next save at that step replaces the partial one
    assert checkpoint.verify(newest, deep=True) is None
    assert not (tmp_path / "checkpoints" / "step_00000004.partial").exists()


# ---- planted faults: every one is named, and the previous checkpoint is used ------------------------------


def _truncate(path: Path) -> None:
    with open(path / SHARD, "r+b") as fh:
        fh.truncate(10)


def _edit_trainer_step(path: Path) -> None:  # same length: sizes cannot see it
    text = (path / "trainer.json").read_text()
    (path / "trainer.json").write_text(text.replace('"step": 4', '"step": 9'))


def _edit_trainer_step_and_reseal(path: Path) -> None:
    _edit_trainer_step(path)
    reseal(path)


def _edit_rank_file_step_and_reseal(path: Path) -> None:
    state = integrity.safe_load(str(path / "rank_00000.pt"))
    state["step"] = 40
    torch.save(state, path / "rank_00000.pt")
    reseal(path)


def _edit_deepspeed_steps_and_reseal(path: Path) -> None:
    torch.save({"global_steps": 400, "skipped_steps": 0, "lr_scheduler": {"last_epoch": 400}}, path / MODEL)
    reseal(path)


def _edit_token_counts_and_reseal(path: Path) -> None:
    state = integrity.safe_load(str(path / "rank_00000.pt"))
    state["tokens_by_source"] = {"pubmed": 1}
    torch.save(state, path / "rank_00000.pt")
    reseal(path)


def _edit_marker(path: Path) -> None:
    text = (path / COMPLETE).read_text()
    (path / COMPLETE).write_text(text.replace('"world_size": 1', '"world_size": 2'))


def _rename_marker_tag(path: Path) -> None:  # a manifest copied from another step directory
    marker = json.loads((path / COMPLETE).read_text())
    marker.pop("manifest_sha256")
    marker.update(tag="step_00000009", step=9)
    marker["manifest_sha256"] = integrity.json_digest(marker)
    (path / COMPLETE).write_text(json.dumps(marker))


FAULTS = {
    "truncated shard": (_truncate, f"{SHARD} is 10 bytes, expected"),
    "missing rank file": (lambda p: (p / "rank_00000.pt").unlink(), "rank_00000.pt is missing"),
    "file added beside the shards": (
        lambda p: (p / "zero_pp_rank_0_mp_rank_01_model_states.pt").write_bytes(b"x"),
        "zero_pp_rank_0_mp_rank_01_model_states.pt is not in its manifest",
    ),
    "bit flipped in the optimizer moments": (
        lambda p: flip_a_bit(p / SHARD),
        f"{SHARD} changed after it was written (its SHA-256 differs)",
    ),
    "integer edited in trainer.json": (
        _edit_trainer_step,
        "trainer.json changed after it was written (its SHA-256 differs)",
    ),
    "manifest edited": (_edit_marker, "COMPLETE was modified after it was written"),
    "manifest of another step": (_rename_marker_tag, "describes step_00000009 (step 9), not its directory"),
    "manifest removed": (lambda p: (p / COMPLETE).unlink(), "COMPLETE is missing"),
    "manifest unreadable": (
        lambda p: ((p / COMPLETE).unlink(), (p / COMPLETE).mkdir()),
        "COMPLETE cannot be read",
    ),
    "trainer.json step edited, digests recomputed": (
        _edit_trainer_step_and_reseal,
        "counters disagree: trainer.json says step 9",
    ),
    "rank file step edited, digests recomputed": (
        _edit_rank_file_step_and_reseal,
        "counters disagree: rank_00000.pt says step 40 of rank 0",
    ),
    "DeepSpeed's step edited, digests recomputed": (
        _edit_deepspeed_steps_and_reseal,
        "counters disagree: DeepSpeed's global_steps is 400",
    ),
    "token counts edited, digests recomputed": (
        _edit_token_counts_and_reseal,
        "the ranks' data positions hold {'pubmed': 1} tokens per source, trainer.json {'pubmed': 256}",
    ),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_planted_fault_is_named_and_the_previous_checkpoint_is_used(tmp_path, caplog, fault):
    plant, named = FAULTS[fault]
    older, newest = saved(tmp_path, 2), saved(tmp_path, 4)
    plant(newest)
    with caplog.at_level(logging.WARNING):
        path, trainer, data = resume(tmp_path)
    assert path == older and trainer.step == 2 and data["position"] == 2
    warning = next(r.getMessage() for r in caplog.records if "skipping damaged checkpoint" in r.getMessage())
    assert warning.startswith("skipping damaged checkpoint step_00000004: ") and named in warning
    assert "\n" not in warning


def test_a_payload_planted_in_a_shard_never_runs(tmp_path, caplog):
    """The attacker replaces a shard's pickle with one that runs a command, then recomputes the manifest's
    digests: the weights-only unpickling refuses it before anything is loaded, and the older one is used."""
    witness = tmp_path / "payload-ran"
    older, newest = saved(tmp_path, 2), saved(tmp_path, 4)
    plant_payload(newest / SHARD, witness)
    reseal(newest)
    with caplog.at_level(logging.WARNING):
        assert resume(tmp_path)[0] == older
    assert not witness.exists()
    assert f"a file of {newest} cannot be loaded safely (UnpicklingError" in caplog.text
    with pytest.raises(Exception):  # noqa: B017 (sanity: the planted file is a working payload)
        ds_files.safe_load(str(newest / SHARD))
    assert not witness.exists()


def test_a_payload_in_the_only_checkpoint_is_one_line_and_never_runs(tmp_path):
    witness = tmp_path / "payload-ran"
    only = saved(tmp_path, 2)
    plant_payload(only / "rank_00000.pt", witness)
    reseal(only)
    with pytest.raises(ValueError) as err:
        resume(tmp_path)
    message = str(err.value)
    assert "\n" not in message and "refusing to restart from step 0" in message
    assert f"a file of {only} cannot be loaded safely" in message
    assert not witness.exists()


def test_with_a_signing_key_an_edit_resealed_without_the_key_is_caught(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(integrity.SIGNING_KEY_ENV, "a secret of the lab")
    older, newest = saved(tmp_path, 2), saved(tmp_path, 4)
    marker = json.loads((newest / COMPLETE).read_text())
    assert "manifest_hmac" in marker and "manifest_sha256" not in marker
    assert resume(tmp_path)[0] == newest  # sealed and checked with the same key

    _edit_trainer_step(newest)
    reseal(newest)  # a forger without the key can only write a plain digest...
    with caplog.at_level(logging.WARNING):
        assert resume(tmp_path)[0] == older
    assert "COMPLETE is not sealed with the key in MELLAMA_CHECKPOINT_KEY" in caplog.text
    reseal(newest, key=b"a guess")  # ...or a seal made with another key
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert resume(tmp_path)[0] == older
    assert "COMPLETE was modified after it was written" in caplog.text

    monkeypatch.delenv(integrity.SIGNING_KEY_ENV)  # a restart that forgot the key is told what to set
    with pytest.raises(ValueError, match="is sealed with a key: set MELLAMA_CHECKPOINT_KEY"):
        resume(tmp_path)


def test_no_intact_checkpoint_is_an_error_naming_each_file_not_a_restart(tmp_path):
    older, newest = saved(tmp_path, 2), saved(tmp_path, 4)
    (older / SHARD).write_bytes(b"")
    flip_a_bit(newest / "rank_00000.pt")
    with pytest.raises(ValueError) as err:
        resume(tmp_path)
    message = str(err.value)
    assert "\n" not in message and "refusing to restart from step 0" in message
    assert f"{older / SHARD} is 0 bytes, expected" in message
    assert f"{newest / 'rank_00000.pt'} changed after it was written" in message
    assert "restore the named file(s), or pass a new --output-dir" in message


def test_removing_every_marker_never_turns_the_run_into_a_fresh_start(tmp_path):
    for step in (2, 4, 6):
        (saved(tmp_path, step) / COMPLETE).unlink()
    for same_run in (False, True):  # not even for a requeued job of this very run
        with pytest.raises(ValueError, match="refusing to restart from step 0"):
            find_resume_point(tmp_path, "auto", same_run=same_run)


def test_an_explicit_damaged_checkpoint_is_refused_naming_the_file(tmp_path):
    path = saved(tmp_path, 2)
    (path / SHARD).write_bytes(b"o" * 999)
    with pytest.raises(
        ValueError, match=f"--resume {path}: checkpoint is damaged: {path / SHARD} is 999 bytes"
    ):
        find_resume_point(tmp_path, str(path))


def test_an_explicit_resume_of_a_final_model_says_how_to_train_on_from_it(tmp_path):
    final = tmp_path / "final"
    final.mkdir()
    (final / "config.json").write_text("{}")
    with pytest.raises(ValueError) as err:
        find_resume_point(tmp_path, str(final))
    assert "not a checkpoint directory" in str(err.value)
    assert f"--set model.init=pretrained --set model.path={final} (tuning: --base {final})" in str(err.value)


def test_a_marker_of_an_earlier_version_cannot_be_verified_and_is_not_trusted(tmp_path, caplog):
    path = tmp_path / "checkpoints" / tag_for(10)
    path.mkdir(parents=True)
    (path / COMPLETE).write_text(f"{path.name}\n")  # what versions before the manifest wrote
    with pytest.raises(ValueError, match="without content digests and cannot be verified"):
        find_resume_point(tmp_path, str(path))
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError, match="refusing to restart from step 0"):
        find_resume_point(tmp_path, "auto")


def test_a_shard_that_fails_to_load_after_every_check_is_one_line_naming_the_previous_one(tmp_path):
    older, newest = saved(tmp_path, 2), saved(tmp_path, 4)
    candidates = resume_candidates(tmp_path, "auto")
    with pytest.raises(ValueError) as err:
        checkpoint.load(StubEngine(fail_load=True), candidates, 0, 1)
    message = str(err.value)
    assert message.startswith(f"cannot load checkpoint {newest} (RuntimeError: PytorchStreamReader failed")
    assert message.endswith(f"resume from the previous checkpoint with --resume {older}")


def test_resume_on_another_world_size_moves_only_a_prepared_corpus_position(tmp_path, monkeypatch):
    saved(tmp_path, 2)
    saved(tmp_path, 4)  # written by 1 rank, streaming its sources
    stub = StubEngine()  # a backend that cannot re-partition its states
    with pytest.raises(ValueError, match="written by 1 ranks but this run has 4; relaunch on 1 ranks"):
        checkpoint.load(stub, resume_candidates(tmp_path, "auto"), rank=0, world_size=4)
    stub.reshapes = True  # one that can (DeepSpeed's universal checkpoint)
    with pytest.raises(ValueError) as err:
        checkpoint.load(stub, resume_candidates(tmp_path, "auto"), rank=0, world_size=4)
    message = str(err.value)
    assert "written by 1 data-parallel ranks but this run has 4, and its sources are streamed" in message
    assert "relaunch on 1 ranks, or train over a prepared corpus (`mellama-train prepare`" in message
    assert stub.loaded == []  # refused before anything was loaded, not passed over for an older one

    # A prepared corpus's position is the step, the same on every rank: rank 3 of 4 reads rank 0's file.
    trainer = TrainerState(step=6, tokens_by_source={"pubmed": 64 * 6})
    data = {"tokens_by_source": {"pubmed": 64 * 6}, "prepared": {"step": 6}}
    checkpoint.save(StubEngine(6), tmp_path / "checkpoints", trainer, data, 0, 5)
    # A rank file whose prepared position is not the checkpoint's step (re-sealed by whoever planted it) is
    # damaged: its sequences would repeat or be skipped.
    planted = tmp_path / "planted"
    data_wrong = {"tokens_by_source": {"pubmed": 64 * 6}, "prepared": {"step": 2}}
    checkpoint.save(StubEngine(6), planted / "checkpoints", trainer, data_wrong, 0, 5)
    with pytest.raises(ValueError, match="data position is at step 2"):
        checkpoint.load(StubEngine(6), resume_candidates(planted, "auto"), 0, 1)

    gather = checkpoint.collectives.gather_objects
    for rank in (0, 3):
        if rank:  # rank 0's verdict answers for the whole run's tokens (this process plays rank 3 alone)
            rank0 = checkpoint._Verdict(tokens=dict(trainer.tokens_by_source))

            def with_rank0(obj, rank0=rank0):
                return [rank0, obj] if isinstance(obj, checkpoint._Verdict) else gather(obj)

            monkeypatch.setattr(checkpoint.collectives, "gather_objects", with_rank0)
        stub = StubEngine(reshapes=True)
        path, state, position = checkpoint.load(stub, resume_candidates(tmp_path, "auto"), rank, 4)
        assert (path.name, state.step, position["prepared"]) == ("step_00000006", 6, {"step": 6})
        assert stub.loaded == [("step_00000006", True)]


# ---- saving never destroys a complete checkpoint ----------------------------------------------------------


def test_a_save_never_overwrites_a_complete_checkpoint_it_moves_it_aside(tmp_path, caplog):
    first = saved(tmp_path, 4)
    digest = json.loads((first / COMPLETE).read_text())["manifest_sha256"]
    with caplog.at_level(logging.WARNING):
        again = saved(tmp_path, 4)  # resumed from an older point and trained through step 4 again
    aside = [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step_00000004.replaced-")]
    assert len(aside) == 1 and json.loads((aside[0] / COMPLETE).read_text())["manifest_sha256"] == digest
    assert checkpoint.verify(again, deep=True) is None and "moved aside" in caplog.text


def test_prune_keeps_the_newest_and_the_one_just_written_and_reclaims_stale_partials(tmp_path):
    for step in (10, 20, 30):
        saved(tmp_path, step)
    stale = tmp_path / "checkpoints" / "step_00000015.partial"
    in_progress = tmp_path / "checkpoints" / "step_00000040.partial"  # newer than every complete one
    stale.mkdir()
    in_progress.mkdir()
    rewritten = saved(tmp_path, 5, keep_last=2)  # resumed from an older point (--resume PATH) and saved again
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    # The newer history is neither counted nor deleted; the stale partial (older than the newest) is reclaimed.
    assert left == [
        "step_00000005",
        "step_00000010",
        "step_00000020",
        "step_00000030",
        "step_00000040.partial",
    ]
    assert checkpoint.verify(rewritten, deep=True) is None
    saved(tmp_path, 35, keep_last=2)  # past them all again: the normal rule
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert left == ["step_00000030", "step_00000035", "step_00000040.partial"]
    checkpoint._prune(tmp_path / "checkpoints", keep_last=0)  # refused by config validation; still keeps one
    assert [p.name for p in (tmp_path / "checkpoints").glob("step_*[0-9]")] == ["step_00000035"]


def test_retention_keeps_the_checkpoint_a_run_fell_back_to_not_the_damaged_one_past_it(tmp_path):
    for step in (10, 20, 30):
        saved(tmp_path, step)
    flip_a_bit(tmp_path / "checkpoints" / "step_00000030" / SHARD)
    assert resume(tmp_path)[0].name == "step_00000020"
    saved(tmp_path, 25, keep_last=2)
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert left == ["step_00000020", "step_00000025", "step_00000030"]  # 20 intact, 30 kept for a person


def test_a_checkpoint_made_read_only_to_keep_it_does_not_stop_the_run(tmp_path, monkeypatch, caplog):
    saved(tmp_path, 10)

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(checkpoint.shutil, "rmtree", refuse)  # as for a non-owner of the directory
    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: refuse(self))
    with caplog.at_level(logging.WARNING):
        path = saved(tmp_path, 20, keep_last=1)
    assert checkpoint.verify(path, deep=True) is None
    assert "could not remove an old checkpoint" in caplog.text and "it is kept" in caplog.text


def test_a_crafted_manifest_or_rank_file_is_damaged_never_a_traceback(tmp_path, caplog):
    older = saved(tmp_path, 2)
    crafted = {
        "format": 1e999,
        "files": {"../../etc/passwd": {"bytes": 1, "sha256": "0" * 64, "rank": 0}},
    }
    for body in crafted.items():
        newest = saved(tmp_path, 4)
        marker = json.loads((newest / COMPLETE).read_text())
        marker.pop("manifest_sha256")
        marker.update([body])
        marker["manifest_sha256"] = integrity.json_digest(marker)
        (newest / COMPLETE).write_text(json.dumps(marker))
        with caplog.at_level(logging.WARNING):
            assert resume(tmp_path)[0] == older
        assert checkpoint.verify(newest) is not None
        shutil.rmtree(newest)  # (a save at step 4 would move it aside; this test starts each case clean)
    for forged in ([1, 2, 3], {"step": 4, "rank": 0, "data": {}, "tokens_by_source": {"pubmed": 256}}):
        newest = saved(tmp_path, 4)
        torch.save(forged, newest / "rank_00000.pt")
        reseal(newest)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert resume(tmp_path)[0] == older
        assert "rank_00000.pt" in caplog.text
        shutil.rmtree(newest)


def test_fresh_directory_starts_from_scratch(tmp_path):
    assert find_resume_point(tmp_path / "new", "auto") is None
    assert find_resume_point(tmp_path / "new", "never") is None


def test_only_partial_checkpoints_is_an_error_not_a_restart(tmp_path):
    (tmp_path / "checkpoints" / "step_00000050.partial").mkdir(parents=True)
    with pytest.raises(ValueError, match="refusing to restart from step 0"):
        find_resume_point(tmp_path, "auto")


def test_only_partial_checkpoints_of_this_same_run_start_over_with_a_warning(tmp_path, caplog):
    """A run killed inside its first save: nothing complete was saved, its run record matches (same_run), so a
    requeued job starts from step 0 instead of stopping; another run's partials are still refused above."""
    from mellama_train.config import resolve
    from mellama_train.outputs import same_run, write_run_record

    (tmp_path / "checkpoints" / "step_00000003.partial").mkdir(parents=True)
    cfg = resolve("tiny")
    assert not same_run(tmp_path, cfg)  # no run record: cannot tell whose partials these are
    write_run_record(tmp_path, cfg, {}, {}, None)
    assert same_run(tmp_path, cfg)
    assert not same_run(tmp_path, resolve("tiny", overrides=["optim.lr=1e-5"]))
    assert same_run(tmp_path, resolve("tiny", overrides=["train.save_every=7"]))  # may differ on a resume
    with caplog.at_level(logging.WARNING):
        assert find_resume_point(tmp_path, "auto", same_run=True) is None
    assert (
        "only incomplete checkpoints (step_00000003.partial), interrupted saves of this same run"
        in caplog.text
    )
    (tmp_path / "run_record.json").write_text('{"config": {"tr')  # a damaged record is passed over
    assert not same_run(tmp_path, cfg)


def test_never_refuses_a_directory_with_checkpoints(tmp_path):
    saved(tmp_path, 10)
    with pytest.raises(ValueError, match="choose a new --output-dir"):
        find_resume_point(tmp_path, "never")


# ---- a disk that fills during a save ----------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A small filesystem that fills up for real (needs root and mount rights: CI runs as root)."""
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def small_disk(tmp_path):
    with tmpfs(tmp_path / "disk", "2m") as mount:
        yield mount


def test_a_disk_that_fills_during_a_save_is_one_line_and_the_partial_save_is_ignored(small_disk):
    older = saved(small_disk, 2, shard_bytes=1_200_000)
    with pytest.raises(CheckpointWriteError) as err:
        saved(small_disk, 4, shard_bytes=1_200_000)  # a second copy (2.4 MB of 2) cannot fit beside the first
    message = str(err.value)
    assert "\n" not in message and message.startswith("writing step_00000004 on rank 0 failed (No space left")
    assert "bytes free on the filesystem of" in message and "the checkpoint needs about" in message
    assert "the partial save is left as step_00000004.partial and is ignored on resume" in message
    assert (small_disk / "checkpoints" / "step_00000004.partial").is_dir()
    assert resume(small_disk)[0] == older  # intact, and the partial one passed over


# ---- `mellama-train status --verify` -----------------------------------------------------------------------


def test_status_verify_hashes_every_checkpoint_and_names_a_damaged_one(tmp_path, capsys):
    from mellama_train.cli import main
    from mellama_train.config import resolve
    from mellama_train.outputs import write_run_record

    write_run_record(tmp_path, resolve("tiny"), {}, {}, None)
    older = saved(tmp_path, 2)
    saved(tmp_path, 4)
    assert main(["status", str(tmp_path), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "step_00000004 (every file matches its SHA-256 in the manifest)" in out
    assert "step_00000002 (intact)" in out

    flip_a_bit(older / SHARD)  # sizes unchanged: only the content check sees it
    assert main(["status", str(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["status", str(tmp_path), "--verify"]) == 1
    out = capsys.readouterr().out
    assert f"step_00000002 (DAMAGED: {older / SHARD} changed after it was written" in out


def test_weights_only_loading_survives_a_nested_use(tmp_path):
    """DeepSpeed's loader calls our checkpoint engine's load inside our own safe_loading: leaving the inner one
    must not disallow DeepSpeed's plain classes for the rest of the outer one."""
    from deepspeed.runtime.zero.config import ZeroStageEnum

    path = tmp_path / "optimizer_state.pt"
    torch.save({"zero_stage": ZeroStageEnum.weights}, path)
    with ds_files.safe_loading():
        ds_files.safe_load(str(path))  # nested
        assert torch.load(path, weights_only=False)["zero_stage"] == ZeroStageEnum.weights
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # and outside, refused again


def test_a_kept_universal_conversion_is_used_only_for_the_checkpoint_it_was_made_from(tmp_path, monkeypatch):
    """step_N.universal/ sits beside step_N/ for weeks: it is reused only while its seal names this very
    checkpoint (a step retrained later is another checkpoint under the same name) and its files are intact."""
    from mellama_train.backends.deepspeed import universal

    step = saved(tmp_path, 2)
    made = []

    def fake_convert(step_dir, partial, workers):  # what the child process does, without DeepSpeed
        partial.mkdir(parents=True)
        (partial / "zero").mkdir()
        (partial / "zero" / "optimizer_state.pt").write_bytes(b"states")
        made.append(step_dir.name)
        digests = integrity.digests_of(universal._files(partial))
        files = {str(p.relative_to(partial)): [d.size, d.sha256] for p, d in digests.items()}
        (partial / universal.SEAL).write_text(
            json.dumps({"source": universal._source(step_dir), "files": files})
        )

    class Child:
        def __init__(self, args, stdout=None):
            fake_convert(Path(args[3]), Path(args[4]), int(args[5]))

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(universal.subprocess, "Popen", Child)

    def convert_now() -> None:
        job = universal.Conversion(step, 1)
        assert job.poll(0.1) is None

    convert_now()
    convert_now()  # sealed and of this checkpoint: reused
    assert made == [step.name]
    (step.with_name(step.name + ".universal") / "zero" / "optimizer_state.pt").write_bytes(b"tampered")
    convert_now()  # a file that no longer matches its seal: converted again
    (step / COMPLETE).write_text((step / COMPLETE).read_text() + " ")  # the step written again since
    convert_now()
    assert made == [step.name] * 3
    assert not (step.parent / "latest_universal").exists()


def test_resume_from_an_exported_model_says_how_to_train_on_from_it(tmp_path):
    """`--resume runs/x/final` is a model, not a checkpoint: the error gives the new run that trains from it."""
    final = tmp_path / "final"
    final.mkdir()
    (final / "config.json").write_text("{}")
    with pytest.raises(ValueError) as err:
        resume_candidates(tmp_path / "new-run", str(final))
    message = str(err.value)
    assert "not a checkpoint directory" in message
    assert f"--set model.init=pretrained --set model.path={final}" in message and f"--base {final}" in message
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError) as err:
        resume_candidates(tmp_path / "new-run", str(adapter))
    assert "is a LoRA adapter: to tune it on, start a new run" in str(err.value)
    assert f"--init-adapter {adapter}" in str(err.value)
    (final / "config.json").unlink()  # a directory that is neither: no hint that would mislead
    with pytest.raises(ValueError, match=r"not a checkpoint directory \(checkpoints/step_N\)$"):
        resume_candidates(tmp_path / "new-run", str(final))


def test_atomic_writes_and_follow_umask_give_the_umask_modes(tmp_path):
    from mellama_train import integrity

    old = os.umask(0o002)
    try:
        assert integrity.umask() == 0o002
        integrity.atomic_write(tmp_path / "record.json", "{}")
        assert (tmp_path / "record.json").stat().st_mode & 0o777 == 0o664  # not mkstemp's 0600
        model = tmp_path / "model"
        model.mkdir(mode=0o700)
        (model / "model.safetensors").write_bytes(b"x")
        os.chmod(model / "model.safetensors", 0o600)  # as safetensors leaves it
        outside = tmp_path / "outside"
        outside.write_bytes(b"y")
        os.chmod(outside, 0o600)
        (model / "link").symlink_to(outside)
        integrity.follow_umask(model)
    finally:
        os.umask(old)
    assert model.stat().st_mode & 0o777 == 0o775
    assert (model / "model.safetensors").stat().st_mode & 0o777 == 0o664
    assert outside.stat().st_mode & 0o777 == 0o600  # a link is not followed out of the directory


def mode(path: Path) -> int:
    return path.stat(follow_symlinks=False).st_mode & 0o7777


@contextlib.contextmanager
def process_umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def test_follow_umask_leaves_what_it_did_not_write_and_keeps_a_shared_groups_setgid(tmp_path):
    """`merge --out` may name a directory holding the user's own files: only what this write made is touched,
    told by the inode and its change time (the file system's clock), not by mtime against this host's clock."""
    out = tmp_path / "out"
    out.mkdir(mode=0o700)
    theirs = out / "notes.txt"
    theirs.write_text("mine")
    os.chmod(theirs, 0o600)
    os.utime(theirs, None)  # an mtime of "now" (a copy tool's, or a server clock ahead): still theirs
    before = integrity.files_under(out)
    shared = out / "model"
    shared.mkdir()
    os.chmod(shared, 0o2700)  # a group directory's setgid bit
    (shared / "model.safetensors").write_bytes(b"x")
    os.chmod(shared / "model.safetensors", 0o600)
    with process_umask(0o022):
        integrity.follow_umask(out, keep=before)
    assert mode(theirs) == 0o600 and mode(out) == 0o700  # out/ got a new entry (new ctime) but was theirs
    assert mode(shared) == 0o2755
    assert mode(shared / "model.safetensors") == 0o644


def test_follow_umask_sets_a_file_whose_inode_was_reused(tmp_path):
    """A snapshotted file deleted and a new one written in its place (the kernel may hand it the same inode
    number) is ours to set: the inode-change time tells them apart."""
    old_file = tmp_path / "model.safetensors"
    old_file.write_bytes(b"old")
    os.chmod(old_file, 0o600)
    before = integrity.files_under(tmp_path)
    old_file.unlink()
    new_file = tmp_path / "model.safetensors"
    new_file.write_bytes(b"new")
    os.chmod(new_file, 0o600)  # as safetensors leaves it
    with process_umask(0o022):
        integrity.follow_umask(tmp_path, keep=before)
    assert mode(new_file) == 0o644  # whether or not the inode number was reused


def test_follow_umask_does_not_follow_a_link_out_of_the_directory(tmp_path):
    outside = tmp_path / "outside.safetensors"  # ours, private, outside the directory
    outside.write_bytes(b"y")
    os.chmod(outside, 0o600)
    private_dir = tmp_path / "private"
    private_dir.mkdir(mode=0o700)
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"x")
    os.chmod(model / "model.safetensors", 0o600)
    (model / "link").symlink_to(outside)
    (model / "dir-link").symlink_to(private_dir)
    (model / "dangling").symlink_to(tmp_path / "nothing")
    with process_umask(0o022):
        integrity.follow_umask(model)
    assert mode(outside) == 0o600 and mode(private_dir) == 0o700
    assert mode(model / "model.safetensors") == 0o644


def test_follow_umask_does_not_follow_a_file_swapped_for_a_link(tmp_path, monkeypatch):
    """The race: an entry listed as a file is swapped for a link before its mode is set. The mode is set
    through a descriptor opened without following links, so the link's target keeps its mode."""
    outside = tmp_path / "outside"
    outside.write_bytes(b"y")
    os.chmod(outside, 0o600)
    model = tmp_path / "model"
    model.mkdir()
    victim = model / "model.safetensors"
    victim.write_bytes(b"x")
    os.chmod(victim, 0o600)
    real_open = os.open

    def swapping_open(path, flags, mode=0o777, *, dir_fd=None):
        if str(path) == victim.name and dir_fd is not None and not victim.is_symlink():
            victim.unlink()
            victim.symlink_to(outside)  # swapped after the listing, before the open
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(integrity.os, "open", swapping_open)
    with process_umask(0o022):
        integrity.follow_umask(model)
    monkeypatch.undo()
    assert victim.is_symlink() and mode(outside) == 0o600


def test_follow_umask_leaves_a_fifo_alone_without_waiting_for_a_writer(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    fifo = model / "pipe"
    os.mkfifo(fifo, 0o600)
    (model / "model.safetensors").write_bytes(b"x")
    os.chmod(model / "model.safetensors", 0o600)
    with process_umask(0o022):
        integrity.follow_umask(model)  # a blocking open of the FIFO would hang here
    assert mode(fifo) == 0o600
    assert mode(model / "model.safetensors") == 0o644


def test_follow_umask_opens_a_fifo_swapped_in_for_a_file_without_hanging(tmp_path, monkeypatch):
    """An entry listed as a file that is a FIFO by the time it is opened: O_NONBLOCK, then left alone."""
    model = tmp_path / "model"
    model.mkdir()
    entry = model / "model.safetensors"
    entry.write_bytes(b"x")
    real_open = os.open

    def swapping_open(path, flags, mode=0o777, *, dir_fd=None):
        if str(path) == entry.name and dir_fd is not None and entry.is_file():
            entry.unlink()
            os.mkfifo(entry, 0o600)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(integrity.os, "open", swapping_open)
    with process_umask(0o022):
        integrity.follow_umask(model)
    monkeypatch.undo()
    assert mode(entry) == 0o600


def test_files_under_lists_links_not_their_targets_and_nothing_for_a_missing_directory(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f").write_bytes(b"y")
    root = tmp_path / "root"
    root.mkdir()
    (root / "sub").mkdir()
    (root / "sub" / "a").write_bytes(b"x")
    (root / "link").symlink_to(outside)
    found = integrity.files_under(root)
    inodes = {ino for _, ino, _ in found}
    for path in (root, root / "sub", root / "sub" / "a", root / "link"):
        assert path.lstat().st_ino in inodes, path
    assert (outside / "f").stat().st_ino not in inodes and outside.stat().st_ino not in inodes
    assert integrity.files_under(tmp_path / "missing") == set()
