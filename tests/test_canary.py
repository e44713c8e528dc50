"""No training text leaves the data: a canary planted in clinical notes and instructions must not appear in
anything a pretraining run, a tuning run or a failed run writes or prints (metrics, TensorBoard, run record,
logs, checkpoints, exports, stdout and stderr, tracebacks included)."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mellama_train.metrics import read_metrics
from mellama_train.sample_data import sample_path

REPO = Path(__file__).resolve().parents[1]
CANARY = "ZXQ-CANARY-7781"
TINY = ["--set", "data.seq_len=64", "--set", "train.global_batch_size=4", "--set", "train.micro_batch_size=1"]


def clean_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def launch(entry: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "launch" / f"{entry}.py"), *args]
    return subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=900)


def mimic_with_canary(path: Path, rows: int = 40) -> None:
    """The sample discharge notes, each with the canary planted mid-text (as a name would be)."""
    with gzip.open(sample_path("mimic", "discharge.csv.gz"), "rt", encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header, body = next(reader), [row for _, row in zip(range(rows), reader)]
    text = header.index("text")
    for i, row in enumerate(body):
        row[text] = row[text].replace("Chief Complaint:", f"Chief Complaint: seen by Dr {CANARY} for", 1)
        if i == 0:
            row[text] = "   "  # an empty note: skipped, and logged by location only
    out = io.StringIO()
    csv.writer(out).writerows([header, *body])
    with gzip.open(path, "wt", encoding="utf-8", newline="") as fh:
        fh.write(out.getvalue())


def instructions_with_canary(path: Path, count: int = 24) -> None:
    records = [
        {
            "instruction": f"Summarise the note of patient {CANARY}-{i}.",
            "input": f"{CANARY} was admitted with chest pain; troponin negative.",
            "output": f"Patient {CANARY} had non-cardiac chest pain and went home.",
        }
        for i in range(count)
    ]
    records[5] = {"instruction": f"Describe {CANARY}.", "output": ""}  # no response: a counted skip
    lines = [json.dumps(r) for r in records]
    lines.insert(7, '{"instruction": "' + CANARY + " unterminated")  # malformed JSON: a counted skip
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def occurrences(path: Path, needle: bytes) -> int:
    """Bytes of the file, and of every member of a zip (torch.save) or gzip container inside it."""
    data = path.read_bytes()
    found = data.count(needle)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            found += sum(zf.read(name).count(needle) for name in zf.namelist())
    if data[:2] == b"\x1f\x8b":
        found += gzip.decompress(data).count(needle)
    return found


def scan(root: Path) -> dict[str, int]:
    needles = [CANARY.encode(), CANARY.encode("utf-16-le"), CANARY.lower().encode()]
    hits = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        n = sum(occurrences(path, needle) for needle in needles)
        if n:
            hits[str(path.relative_to(root))] = n
    return hits


@pytest.mark.slow
def test_a_canary_in_clinical_data_appears_nowhere_the_runs_write_or_print(tmp_path):
    data, runs = tmp_path / "data", tmp_path / "runs"
    data.mkdir()
    mimic_with_canary(data / "discharge.csv.gz")
    instructions_with_canary(data / "instructions.jsonl")
    bad = data / "bad.jsonl"
    bad.write_text(
        "".join(json.dumps({"text": f"note {i} about a cough"}) + "\n" for i in range(3))
        + "".join('{"text": "' + f"{CANARY} note {i}\n" for i in range(20)),
        encoding="utf-8",
    )
    assert occurrences(data / "instructions.jsonl", CANARY.encode()) > 20  # the scan would see it
    assert occurrences(data / "discharge.csv.gz", CANARY.encode()) >= 39  # (inside the gzip too)

    mimic = str(data / "discharge.csv.gz")
    printed = []
    # 1. Pretraining, the canary notes making up most of the tokens and the held-out set.
    pre = launch(
        "pretrain",
        "--output-dir",
        str(runs / "pretrain"),
        *TINY,
        "--max-steps",
        "4",
        "--save-every",
        "2",
        "--set",
        f"data.sources.mimic.paths=[{mimic}]",
        "--set",
        f"data.sources.mimic.eval_paths=[{mimic}]",
        "--set",
        "data.sources.mimic.weight=30",
    )
    assert pre.returncode == 0, pre.stderr[-3000:]
    printed.append(pre.stdout + pre.stderr)
    last = read_metrics(runs / "pretrain" / "metrics.jsonl")[4]
    assert last["data/tokens/mimic"] > 0.5 * last["train/tokens"] and last["data/skipped/mimic"] == 1
    assert "eval/loss/mimic" in last

    # 2. LoRA tuning on instructions that all hold the canary (and two bad records that hold it too).
    recipe = tmp_path / "tune.yaml"
    recipe.write_text(
        "data:\n  sources:\n"
        f"    - {{name: notes, paths: ['{data / 'instructions.jsonl'}'], eval_paths: ['{data / 'instructions.jsonl'}'],"
        " weight: 1, license: 'test data'}\n"
    )
    tune = launch(
        "tune",
        "--output-dir",
        str(runs / "tune"),
        "--config",
        str(recipe),
        "--max-steps",
        "3",
        "--set",
        "data.seq_len=128",
    )
    assert tune.returncode == 0, tune.stderr[-3000:]
    printed.append(tune.stdout + tune.stderr)
    assert read_metrics(runs / "tune" / "metrics.jsonl")[3]["data/skipped/notes"] == 2

    # 3. A forced failure: a source whose malformed lines (holding the canary) pass the skip limit, --debug on
    # so the traceback is printed too.
    failed = launch(
        "pretrain",
        "--output-dir",
        str(runs / "failed"),
        *TINY,
        "--max-steps",
        "3",
        "--debug",
        "--set",
        f"data.sources.mimic.paths=[{bad}]",
        "--set",
        "data.sources.mimic.eval_paths=[]",
        "--set",
        "data.sources.mimic.weight=30",
    )
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert "Traceback" in failed.stderr and f"first at {bad}:line 4;" in failed.stderr
    printed.append(failed.stdout + failed.stderr)

    # What the runs wrote is there to be scanned: exports, model cards, checkpoints, TensorBoard.
    for path in ("pretrain/final/README.md", "tune/adapter/README.md", "tune/final/README.md"):
        assert (runs / path).is_file(), path
    assert list((runs / "pretrain" / "tensorboard").iterdir())
    trainer = json.loads((runs / "tune" / "checkpoints" / "step_00000003" / "trainer.json").read_text())
    assert trainer["data_licenses"] == {"notes": "test data"}
    assert "| notes | test data |" in (runs / "tune" / "final" / "README.md").read_text()

    assert scan(runs) == {}
    for output in printed:
        assert CANARY not in output and CANARY.lower() not in output
