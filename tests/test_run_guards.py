"""Start-up and run-time guards against bad input: the skipped-record limit, an output dir of a different
run, too little free disk for the next checkpoint, and one-line errors unless --debug."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
from test_checkpoint import seal
from test_train_e2e import LAUNCH, REPO, TINY

from mellama_train import cli, disk_space, outputs
from mellama_train.config import SourceConfig, resolve
from mellama_train.data.files import Skip
from mellama_train.data.source import SkipLimit, SourceStream

SECRET = "PATIENT_SECRET_4711"


def python_run(args: list[str]) -> subprocess.CompletedProcess:
    """`python ARGS` from the repo root, output captured, exit status not checked."""
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def write_lines(path: Path, lines: list[str]) -> str:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return str(path)


def good(i: int) -> str:
    return json.dumps({"text": f"good note {i} about a patient"})


def bad_json() -> str:
    return '{"text": "' + SECRET + " unterminated"


def stream_over(path: str, limit: SkipLimit | None, encode=lambda text: [1, 2, 3]) -> SourceStream:
    return SourceStream(SourceConfig(name="notes", paths=[path]), encode, 0, 1, 0, skip_limit=limit)


def read_one_epoch(stream: SourceStream) -> None:
    while stream.state.epoch == 0:
        stream.next_item()


# ---- 1. the skipped-record limit -----------------------------------------------------------------------


def test_skips_within_the_allowance_and_fraction_are_tolerated(tmp_path):
    # 10 bad records among 20 good: exactly the allowance of 10 (+ 0.001 x 30).
    lines = [good(i) for i in range(20)] + [bad_json() for _ in range(10)]
    stream = stream_over(write_lines(tmp_path / "notes.jsonl", lines), SkipLimit(0.001, 10))
    read_one_epoch(stream)
    assert stream.state.skipped == {"bad_json": 10}
    assert stream.state.first_skip == f"{tmp_path / 'notes.jsonl'}:line 21"

    # A big file may hold its fraction: 12 bad in 6000 records with 0.001 x 6000 = 6 on top of 10.
    lines = [good(i) for i in range(5988)] + [bad_json() for _ in range(12)]
    stream = stream_over(write_lines(tmp_path / "big.jsonl", lines), SkipLimit(0.001, 10))
    read_one_epoch(stream)
    assert stream.state.skipped == {"bad_json": 12}


def test_one_skip_past_the_limit_stops_with_counts_location_and_fix_but_no_content(tmp_path):
    lines = [good(0), good(1)] + [bad_json() for _ in range(11)] + [good(2)]
    path = write_lines(tmp_path / "notes.jsonl", lines)
    stream = stream_over(path, SkipLimit(0.001, 10))
    with pytest.raises(ValueError) as info:
        read_one_epoch(stream)
    message = str(info.value)
    assert message.startswith(
        "data.sources[notes]: 11 of 13 records read on rank 0 (filtered ones aside) were skipped (11 bad_json)"
    )
    assert f"first at {path}:line 3;" in message  # the first bad line, by location
    assert "clean the file(s), or raise data.max_skip_fraction / data.skip_allowance" in message
    assert SECRET not in message and "\n" not in message
    # Without a limit (e.g. a tool reading the files) the same records are only counted.
    stream = stream_over(path, None)
    read_one_epoch(stream)
    assert stream.state.skipped == {"bad_json": 11}


def test_chosen_drops_do_not_count_against_the_limit(tmp_path):
    # data.overflow: drop skips examples on purpose (reason too_long): counted, never a reason to stop.
    path = write_lines(tmp_path / "notes.jsonl", [good(i) for i in range(40)])

    def encode(text: str) -> list[int] | Skip:
        return Skip("too_long", "99 tokens > data.seq_len 8") if int(text.split()[2]) % 2 else [1, 2]

    stream = stream_over(path, SkipLimit(0.0, 0), encode)
    read_one_epoch(stream)
    assert stream.state.skipped == {"too_long": 20} and stream.state.first_skip == ""


def test_the_limit_fields_come_from_the_config_and_are_validated():
    cfg = resolve("tiny")
    assert (cfg.data.max_skip_fraction, cfg.data.skip_allowance) == (0.001, 10)
    assert SkipLimit.of(cfg.data) == SkipLimit(0.001, 10)
    from mellama_train.preflight import validate

    bad = resolve("tiny", overrides=["data.max_skip_fraction=2", "data.skip_allowance=-1"])
    assert any("data.max_skip_fraction must be in [0, 1]" in p for p in validate(bad)[0])


@pytest.mark.slow
def test_a_source_full_of_bad_lines_stops_the_run_with_one_line_and_exit_2(tmp_path):
    data = tmp_path / "bad.jsonl"
    write_lines(data, [good(i) for i in range(5)] + [bad_json() for _ in range(30)])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "data:\n  sources:\n"
        f"    - {{name: clinic, paths: ['{data}'], weight: 1}}\n"
        f"    - {{name: pubmed, paths: ['{REPO}/src/mellama_train/sample_data/pubmed/train/*'], weight: 1}}\n"
        "train: {forgetting_source: null}\n"  # no general-domain probe among these sources
    )
    out = tmp_path / "run"
    proc = python_run(
        [
            LAUNCH,
            "--output-dir",
            str(out),
            "--config",
            str(recipe),
            *TINY,
            "--max-steps",
            "3",
        ]
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    (last,) = [line for line in proc.stderr.splitlines() if line.startswith("error")]  # one line
    assert last.startswith("error (rank 0): data.sources[clinic]: 11 of ")
    assert f"first at {data}:line 6;" in last and "data.skip_allowance" in last
    assert "Traceback" not in proc.stderr
    assert SECRET not in proc.stdout + proc.stderr
    assert not (out / "final").exists()


# ---- 3. an output dir holding another run's checkpoints -------------------------------------------------


def fake_run(run_dir: Path, overrides: list[str], steps: tuple[int, ...] = (4,)) -> list[Path]:
    """A run directory as a run with `overrides` leaves it: its record and complete checkpoints."""
    cfg = resolve("tiny", overrides=overrides + [f"train.output_dir={run_dir}"])
    run_dir.mkdir(parents=True)
    (run_dir / "run_record.json").write_text(json.dumps({"config": cfg.to_dict()}))
    paths = []
    for step in steps:
        path = run_dir / "checkpoints" / f"step_{step:08d}"
        path.mkdir(parents=True)
        (path / "weights.bin").write_bytes(b"\0" * 5000)
        seal(path)
        paths.append(path)
    return paths


def test_resuming_another_runs_checkpoints_is_refused_naming_every_key_that_differs(tmp_path):
    run_dir = tmp_path / "run"
    (ckpt,) = fake_run(run_dir, ["optim.lr=8e-6", "data.sources.mimic.weight=1"])
    changed = resolve(
        "tiny",
        overrides=[
            "optim.lr=1e-5",
            "data.sources.mimic.weight=2",
            "data.seq_len=128",
            # may differ on a resume: when to save/log, guards, notes, where the run lives
            "train.save_every=7",
            "train.log_every=3",
            "train.dist_timeout_minutes=5",
            "data.skip_allowance=100",
            "data.sources.mimic.license=another note",
            f"train.output_dir={tmp_path / 'moved'}",
        ],
    )
    with pytest.raises(ValueError) as info:
        outputs.check_same_run(run_dir, changed, ckpt)
    message = str(info.value)
    assert message.startswith(f"{run_dir} holds checkpoints of a run with a different config")
    changes = message.split("(run_record.json): ", 1)[1].split("; use a new")[0].split("; ")
    assert changes == [
        "data.seq_len: 256 -> 128",
        "data.sources.mimic.weight: 1.0 -> 2.0",
        "optim.lr: 8e-06 -> 1e-05",
    ]
    assert message.endswith(f"continue from the checkpoint with the new values on purpose: --resume {ckpt}")
    assert "\n" not in message

    # An explicit --resume PATH, a fresh start, the same config or a run dir without a record: no refusal.
    explicit = resolve("tiny", overrides=["optim.lr=1e-5", f"train.resume={ckpt}"])
    outputs.check_same_run(run_dir, explicit, ckpt)
    outputs.check_same_run(run_dir, changed, None)
    same = resolve("tiny", overrides=["optim.lr=8e-6", "train.save_every=3", f"train.output_dir={run_dir}"])
    outputs.check_same_run(run_dir, same, ckpt)
    (run_dir / "run_record.json").unlink()
    outputs.check_same_run(run_dir, changed, ckpt)


def test_the_newest_run_record_is_compared_and_source_lists_are_named(tmp_path):
    run_dir = tmp_path / "run"
    (ckpt,) = fake_run(run_dir, [])
    # A later start with --resume PATH and a new lr wrote its own record: that config is now the run's.
    later = resolve("tiny", overrides=["optim.lr=1e-5"])
    (run_dir / "run_record.20260101-000000.json").write_text(json.dumps({"config": later.to_dict()}))
    outputs.check_same_run(run_dir, later, ckpt)
    fewer = resolve("tiny", overrides=["optim.lr=1e-5"])
    fewer.data.sources = fewer.data.sources[:2]
    with pytest.raises(
        ValueError, match=r'data\.sources: \["pubmed", "mimic", "redpajama"\] -> \["pubmed", "mimic"\]'
    ):
        outputs.check_same_run(run_dir, fewer, ckpt)


@pytest.mark.slow
def test_the_refusal_reaches_the_entry_point_as_one_line_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    fake_run(run_dir, [*[o.split(" ")[0] for o in TINY[1::2]], "train.max_steps=3"])
    before = sorted(p.name for p in run_dir.iterdir())
    proc = python_run(
        [
            LAUNCH,
            "--output-dir",
            str(run_dir),
            *TINY,
            "--max-steps",
            "3",
            "--set",
            "optim.lr=1e-5",
        ]
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error")]
    assert "holds checkpoints of a run with a different config" in line and "optim.lr: 0.003 -> 1e-05" in line
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == before  # no run record, no metrics


# ---- 4. free disk for the next checkpoint ---------------------------------------------------------------

Usage = namedtuple("Usage", "total used free")


def test_too_little_disk_for_the_planned_checkpoint_is_refused_with_both_numbers(tmp_path, monkeypatch):
    cfg = resolve("tiny")
    planned = int(__import__("mellama_train.plan", fromlist=["make_plan"]).make_plan(cfg).checkpoint_bytes)
    assert planned > 0
    assert disk_space.checkpoint_bytes_needed(tmp_path / "checkpoints", cfg) == (
        planned,
        "the memory planner's estimate",
    )
    monkeypatch.setattr(disk_space.shutil, "disk_usage", lambda path: Usage(10**12, 0, planned - 1))
    with pytest.raises(ValueError) as info:
        disk_space.check_room(
            tmp_path / "run" / "checkpoints", cfg
        )  # not created yet: its parent is measured
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'run' / 'checkpoints'}: {planned - 1:,} bytes free")
    assert f"needs {planned:,} bytes" in message and "the memory planner's estimate" in message
    assert "use an --output-dir on a larger filesystem" in message
    monkeypatch.setattr(disk_space.shutil, "disk_usage", lambda path: Usage(10**12, 0, planned))
    disk_space.check_room(tmp_path / "run" / "checkpoints", cfg)


def test_once_a_checkpoint_exists_its_size_is_what_the_next_one_needs(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    fake_run(run_dir, [], steps=(2, 4))
    cfg = resolve("tiny")
    newest = disk_space.directory_bytes(run_dir / "checkpoints" / "step_00000004")  # its shard and manifest
    assert newest > 5000
    assert disk_space.checkpoint_bytes_needed(run_dir / "checkpoints", cfg) == (
        newest,
        "the size of step_00000004",
    )
    monkeypatch.setattr(disk_space.shutil, "disk_usage", lambda path: Usage(10**12, 0, newest - 1))
    # ensure_room is the before-each-save check: a collective (one process here), raising on every rank.
    with pytest.raises(ValueError, match=rf"{newest - 1:,} bytes free .* needs {newest:,} bytes"):
        disk_space.ensure_room(run_dir / "checkpoints", cfg, is_main=True)
    monkeypatch.setattr(disk_space.shutil, "disk_usage", lambda path: Usage(10**12, 0, newest))
    disk_space.ensure_room(run_dir / "checkpoints", cfg, is_main=True)


# ---- 5. --debug -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("debug", [False, True])
def test_input_errors_are_one_line_unless_debug(monkeypatch, capsys, tmp_path, debug):
    def refuse(cfg):
        raise ValueError("data.sources[x]: a refusal; the fix")

    monkeypatch.setattr("mellama_train.train.train", refuse)
    argv = ["--output-dir", str(tmp_path / "run"), "--max-steps", "1"] + (["--debug"] if debug else [])
    assert cli.pretrain_main(argv) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "error (rank 0): data.sources[x]: a refusal; the fix"
    assert ("Traceback (most recent call last)" in err) is debug
    assert ("in refuse" in err) is debug


@pytest.mark.slow
def test_a_full_disk_is_refused_at_start_through_the_entry_point(tmp_path):
    # The real entry point in a fresh process, with the filesystem reporting 1 KB free.
    script = (
        "import collections, shutil, sys\n"
        "shutil.disk_usage = lambda path: collections.namedtuple('U', 'total used free')(10**12, 0, 1000)\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from mellama_train.cli import pretrain_main\n"
        "sys.exit(pretrain_main(sys.argv[2:]))\n"
    )
    out = tmp_path / "run"
    proc = python_run(
        [
            "-c",
            script,
            str(REPO / "src"),
            "--output-dir",
            str(out),
            *TINY,
            "--max-steps",
            "2",
        ]
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error")]
    assert line.startswith(f"error (rank 0): {out / 'checkpoints'}: 1,000 bytes free")
    assert "the memory planner's estimate" in line and "Traceback" not in proc.stderr
    assert not (out / "run_record.json").exists()
