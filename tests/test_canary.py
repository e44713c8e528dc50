"""No training text leaves the data: a canary planted in clinical notes and instructions must not appear in
anything a pretraining run, a tuning run or a failed run writes or prints (metrics, TensorBoard, run record,
logs, checkpoints, exports, stdout and stderr, tracebacks included), neither as text nor as token ids: every
integer sequence found in checkpoints (rank files read with weights-only loading, trainer.json), metrics and
logs is decoded with the run's tokenizer and searched too."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from mellama_train.config import SourceConfig, resolve
from mellama_train.data.pipeline import build_train_batches
from mellama_train.metrics import read_metrics
from mellama_train.sample_data import TOKENIZER_DIR, sample_path

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


# ---- token ids: every integer sequence, decoded ----------------------------------------------------------

_INT_RUN = re.compile(r"-?\d+(?:[\s,;\[\]()]+-?\d+)+")


def integer_sequences(value: object) -> list[list[int]]:
    """Every sequence of integers inside a loaded object: each list/tuple of ints, each integer tensor, and all
    the integers of the object in order (tokens scattered over a dict's values are found too)."""
    runs: list[list[int]] = []
    every: list[int] = []

    def walk(v: object) -> None:
        if isinstance(v, bool):
            return
        if isinstance(v, int):
            every.append(v)
        elif isinstance(v, torch.Tensor):
            if not v.is_floating_point() and not v.is_complex() and v.numel():
                runs.append([int(x) for x in v.flatten().tolist()])
        elif isinstance(v, str):
            runs.extend(integer_sequences_in_text(v))
        elif isinstance(v, dict):
            for item in v.values():
                walk(item)
        elif isinstance(v, list | tuple):
            ints = [x for x in v if isinstance(x, int) and not isinstance(x, bool)]
            if len(ints) > 1:
                runs.append(ints)
            for item in v:
                walk(item)

    walk(value)
    return runs + [every]


def integer_sequences_in_text(text: str) -> list[list[int]]:
    return [[int(x) for x in re.findall(r"-?\d+", run)] for run in _INT_RUN.findall(text)]


def file_integer_sequences(path: Path) -> list[list[int]]:
    """Integer sequences of one file the runs wrote: .pt files through weights-only loading (which must succeed
    for the rank files), JSON through json, any other text through a regex over its digits."""
    if path.suffix == ".pt":
        try:
            return integer_sequences(torch.load(path, weights_only=True, map_location="cpu"))
        except Exception:
            assert not path.name.startswith("rank_"), f"{path} is not loadable with weights_only=True"
            return []  # a DeepSpeed shard that holds more than tensors: its integers are optimizer counters
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return []
    if path.suffix == ".json":
        return integer_sequences(json.loads(text))
    if path.suffix == ".jsonl":
        return [
            run for line in text.splitlines() if line.strip() for run in integer_sequences(json.loads(line))
        ]
    return integer_sequences_in_text(text)


def decodes_to_canary(runs: list[list[int]], tokenizer) -> bool:
    """True when some run of in-vocabulary ids decodes to text holding the canary."""
    vocab = len(tokenizer)
    for run in runs:
        segment: list[int] = []
        for token in [*run, -1]:
            if 0 <= token < vocab:
                segment.append(token)
                continue
            if len(segment) > 1:
                text = tokenizer.decode(segment, skip_special_tokens=True)
                if CANARY in text or CANARY in text.replace(" ", ""):
                    return True
            segment = []
    return False


def token_hits(root: Path, tokenizer) -> list[str]:
    return [
        str(path.relative_to(root))
        for path in sorted(p for p in root.rglob("*") if p.is_file())
        if path.suffix in (".pt", ".json", ".jsonl", ".log", ".txt")
        and decodes_to_canary(file_integer_sequences(path), tokenizer)
    ]


def test_data_positions_hold_no_token_of_a_document_and_the_scan_would_find_one(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    mimic_with_canary(tmp_path / "discharge.csv.gz")
    instructions_with_canary(tmp_path / "instructions.jsonl")
    cfg = resolve("tiny", overrides=["data.seq_len=16", "train.micro_batch_size=1"])
    cfg.data.sources = [SourceConfig(name="mimic", paths=[str(tmp_path / "discharge.csv.gz")])]
    tune = resolve("tiny", task="tune", overrides=["data.seq_len=300", "data.pack=true"])
    tune.data.sources = [SourceConfig(name="notes", paths=[str(tmp_path / "instructions.jsonl")])]
    states = tmp_path / "states"
    states.mkdir()
    in_progress = carried = 0  # the cases that once stored tokens: a document split across sequences, and
    for name, config in (("pretrain", cfg), ("tune", tune)):  # an example carried to the next packed row
        batches = build_train_batches(config, tokenizer, 0, 1)
        for step in range(12):
            next(batches)
            state = batches.state_dict()
            in_progress += state["sources"].get("mimic", {}).get("offset", 0) > 0
            carried += state.get("carry") is not None
            torch.save({"data": state}, states / f"rank_{name}_{step:02d}.pt")
    assert in_progress and carried
    assert token_hits(states, tokenizer) == []
    assert scan(states) == {}
    # The scan can fail: a position that kept the unread tokens of the current document, as they once did.
    ids = tokenizer(f"seen by Dr {CANARY} for chest pain", add_special_tokens=False)["input_ids"]
    torch.save({"data": {"sources": {"mimic": {"pending": ids, "epoch": 0}}}}, states / "rank_old.pt")
    assert token_hits(states, tokenizer) == ["rank_old.pt"]
    (states / "metrics.jsonl").write_text(json.dumps({"step": 1, "ids": ids}) + "\n")
    (states / "train.log").write_text(f"tokens {' '.join(map(str, ids))} done\n")
    assert token_hits(states, tokenizer) == ["metrics.jsonl", "rank_old.pt", "train.log"]


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
    # Token ids too: every integer sequence in checkpoints, trainer.json, metrics and logs, and all printed.
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    assert any((runs / "pretrain" / "checkpoints").rglob("rank_*.pt"))
    assert token_hits(runs, tokenizer) == []
    assert not decodes_to_canary(
        [run for out in printed for run in integer_sequences_in_text(out)], tokenizer
    )
