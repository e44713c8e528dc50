"""Faults in the data, planted one at a time, and what the user sees (docs/FAULTS.md, issue 14 items 4-7).

- Changed files at resume: detected by content before step 1, refused in one line naming the source, the file
  and the way on (`--accept-data-change`); files unchanged up to what was read (restored, grown) resume exactly.
- A file that breaks part-way: a counted, located skip of its remainder, and the stream goes on.
- Bad files at start-up: every one listed at once, each with its fix.
- Bad records: counted, located skips on every path, in bounded memory whatever a record's size.

Everything runs on the data layer (no model), on small files written into tmp_path.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_data_pipeline import KEYS, make_cfg, make_docs, take, write_jsonl
from transformers import AutoTokenizer

from mellama_train.config import SourceConfig, resolve
from mellama_train.data import decontam
from mellama_train.data import source as source_module
from mellama_train.data.files import Skip
from mellama_train.data.pipeline import build_eval_batches, build_train_batches, document_encoder
from mellama_train.data.readers import iter_texts
from mellama_train.data.source import CheckShare, SourceStream, check_sources, finished_claim
from mellama_train.preflight import validate
from mellama_train.sample_data import TOKENIZER_DIR

SECRET = "PATIENT_SECRET_9931"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def state_of(batches) -> dict:
    """What a checkpoint keeps of the data stream (plain types, through JSON)."""
    return json.loads(json.dumps(batches.state_dict()))


def same_batches(got: list[dict], want: list[dict]) -> bool:
    return len(got) == len(want) and all(torch.equal(g[k], w[k]) for g, w in zip(got, want) for k in KEYS)


def corpus(tmp_path: Path, gz: bool = False) -> tuple[Path, list[Path]]:
    """Two files of 40 short notes each: the position after a few batches is inside the second file read."""
    root = tmp_path / "corpus"
    files = []
    for name, seed in (("a", 1), ("b", 2)):
        path = root / f"{name}.jsonl"
        write_jsonl(path, make_docs(40, 5, 20, seed=seed, tag=name))
        if gz:
            path.with_suffix(".jsonl.gz").write_bytes(gzip.compress(path.read_bytes()))
            path.unlink()
            path = path.with_suffix(".jsonl.gz")
        files.append(path)
    return root, files


def position_in_second_file(cfg, tok) -> tuple[dict, list[dict], list[Path]]:
    """(state, the next 4 batches of the uninterrupted stream, the epoch's file order) at a position inside
    the second file of the epoch, with the first one finished."""
    batches = build_train_batches(cfg, tok, 0, 1)
    stream = batches.mixture.streams[0]
    while stream.state.file_pos == 0 or stream.state.record < 10:
        next(batches)
    state = state_of(batches)
    assert state["sources"]["notes"]["finished"] and state["sources"]["notes"]["record"] >= 10
    return state, take(batches, 4), [Path(p) for p in stream._epoch_files(0)]


def swap_lines(path: Path, i: int, j: int) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    lines[i], lines[j] = lines[j], lines[i]
    path.write_bytes(b"".join(lines))


# ---------------------------------------------------------------------------------------------------------
# Resume over changed files (item 5)
# ---------------------------------------------------------------------------------------------------------


def test_a_same_size_reorder_before_the_position_is_refused_naming_source_file_and_way_on(
    tokenizer, tmp_path
):
    root, _ = corpus(tmp_path)
    cfg = make_cfg([SourceConfig(name="notes", paths=[str(root)])])
    state, _, order = position_in_second_file(cfg, tokenizer)
    current = order[1]
    size = current.stat().st_size
    swap_lines(current, 2, 3)  # two records before the position trade places: same bytes, same size
    assert current.stat().st_size == size
    with pytest.raises(ValueError) as err:
        build_train_batches(cfg, tokenizer, 0, 1).load_state_dict(state)
    message = str(err.value)
    assert message.startswith(f"data.sources[notes]: {current} changed before the saved record ")
    assert "--accept-data-change" in message and "\n" not in message
    swap_lines(current, 2, 3)  # restored: accepted again
    assert build_train_batches(cfg, tokenizer, 0, 1).load_state_dict(state) == []


@pytest.mark.parametrize("gz", [False, True])
def test_a_same_size_edit_in_a_file_finished_earlier_in_the_epoch_is_refused(tokenizer, tmp_path, gz):
    root, _ = corpus(tmp_path, gz=gz)
    cfg = make_cfg([SourceConfig(name="notes", paths=[str(root)])])
    state, _, order = position_in_second_file(cfg, tokenizer)
    finished = order[0]
    data = bytearray(finished.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit: the size is unchanged
    finished.write_bytes(bytes(data))
    with pytest.raises(
        ValueError, match=rf"data\.sources\[notes\]: {finished} changed in its first \d+ bytes"
    ):
        build_train_batches(cfg, tokenizer, 0, 1).load_state_dict(state)


def test_files_unchanged_up_to_what_was_read_resume_exactly_when_they_grew(tokenizer, tmp_path):
    root, _ = corpus(tmp_path)
    cfg = make_cfg([SourceConfig(name="notes", paths=[str(root)])])
    state, expected, order = position_in_second_file(cfg, tokenizer)
    for path in order:  # the finished file and the current one both gain records after what was read
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"text": "a note appended later"}) + "\n")
    resumed = build_train_batches(cfg, tokenizer, 0, 1)
    assert resumed.load_state_dict(state) == []
    assert same_batches(take(resumed, 4), expected)


def truncate_read_past_and_restore(tokenizer, cfg, first: Path, cut: int, caplog) -> int:
    """Cut `first` (the epoch's first file) to `cut` bytes, read past its break to a position a few batches
    into the next file, save, restore the file and resume: the resumed batches must be the uninterrupted
    ones. Returns the records read before the break."""
    intact = first.read_bytes()
    first.write_bytes(intact[:cut])  # cut mid-stream, as a copy killed half-way leaves it

    batches = build_train_batches(cfg, tokenizer, 0, 1)
    stream = batches.mixture.streams[0]
    assert Path(stream._epoch_files(0)[0]) == first
    with caplog.at_level(logging.WARNING):
        while stream.state.file_pos == 0:
            next(batches)
    read = stream.state.finished[0][2]  # records read before the break
    assert stream.state.finished[0][1] == "records" and stream.state.skipped == {"unreadable_remainder": 1}
    warning = next(r.getMessage() for r in caplog.records if "cannot be read past record" in r.getMessage())
    assert f"{first} cannot be read past record {read} (EOFError:" in warning
    assert stream.state.first_skip.startswith(f"{first}:record {read + 1} (EOFError")
    for _ in range(3):
        next(batches)
    state = state_of(batches)
    expected = take(batches, 4)

    first.write_bytes(intact)  # restored: what was read of it is unchanged, so the checkpoint is good
    resumed = build_train_batches(cfg, tokenizer, 0, 1)
    assert resumed.load_state_dict(state) == []
    assert same_batches(take(resumed, 4), expected)
    return read


def first_file(cfg, tokenizer) -> Path:
    return Path(build_train_batches(cfg, tokenizer, 0, 1).mixture.streams[0]._epoch_files(0)[0])


def test_a_truncated_file_is_a_counted_skip_and_resumes_exactly_once_restored(tokenizer, tmp_path, caplog):
    """The run that died for good in issue 14: a compressed file found truncated mid-run, later restored."""
    root, _ = corpus(tmp_path, gz=True)
    cfg = make_cfg([SourceConfig(name="notes", paths=[str(root)])], seq_len=32, micro_batch_size=1)
    cfg.data.seed = 3
    first = first_file(cfg, tokenizer)
    read = truncate_read_past_and_restore(tokenizer, cfg, first, first.stat().st_size // 2, caplog)
    assert 0 < read < 40


def multiline_notes_csv(path: Path, count: int, seed: int) -> Path:
    """The MIMIC NOTEEVENTS layout, gzip-compressed: ROW_ID,TEXT with each note a quoted field of several lines
    (one with a doubled quote), so that a cut falls inside a record that spans lines."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["ROW_ID", "TEXT"])
    for i, note in enumerate(make_docs(count, 8, 30, seed=seed, tag=path.stem)):
        words = note.split()
        lines = [" ".join(words[k : k + 6]) for k in range(0, len(words), 6)]
        writer.writerow([i, "\n".join(lines) + ('\nSigned "Dr. X"' if i % 7 == 0 else "")])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(buffer.getvalue().encode(), mtime=0))
    return path


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.75, 0.9])  # each inside a note of several lines
def test_a_multi_line_csv_truncated_mid_record_resumes_exactly_once_restored(
    tokenizer, tmp_path, caplog, fraction
):
    """A cut inside a note that spans lines: the lines of the unfinished note read before the break must not
    count in the file's fingerprint, or every later checkpoint is refused once the file is restored."""
    root = tmp_path / "notes"
    for name, seed in (("a", 1), ("b", 2)):
        multiline_notes_csv(root / f"{name}.csv.gz", 300, seed)
    source = SourceConfig(name="notes", paths=[str(root)], text_field="TEXT")
    cfg = make_cfg([source], seq_len=32, micro_batch_size=1)
    first = first_file(cfg, tokenizer)
    read = truncate_read_past_and_restore(tokenizer, cfg, first, int(first.stat().st_size * fraction), caplog)
    assert 0 < read < 300


def test_a_jsonl_file_truncated_inside_a_line_over_the_size_limit_resumes_exactly_once_restored(
    tokenizer, tmp_path, caplog
):
    """A cut inside a line that is being read through in chunks (over data.max_record_bytes): its chunks
    read before the break must not count in the file's fingerprint."""
    root = tmp_path / "notes"
    huge = random.Random(5).randbytes(300_000).hex()  # incompressible: the cut lands inside it
    write_jsonl(
        root / "a.jsonl", [*make_docs(20, 5, 20, seed=1, tag="a"), huge, *make_docs(20, 5, 20, seed=3)]
    )
    write_jsonl(root / "b.jsonl", make_docs(40, 5, 20, seed=2, tag="b"))
    for path in root.iterdir():
        path.with_suffix(".jsonl.gz").write_bytes(gzip.compress(path.read_bytes(), mtime=0))
        path.unlink()
    cfg = make_cfg([SourceConfig(name="notes", paths=[str(root)])], seq_len=32, micro_batch_size=1)
    cfg.data.max_record_bytes = 64 * 1024
    while (first := first_file(cfg, tokenizer)).name != "a.jsonl.gz":
        cfg.data.seed += 1
    read = truncate_read_past_and_restore(tokenizer, cfg, first, first.stat().st_size // 2, caplog)
    assert read == 20  # the notes before the long line; the long line never ended


def test_a_current_file_truncated_before_the_position_is_refused_then_resumes_once_restored(
    tokenizer, tmp_path
):
    root, _ = corpus(tmp_path, gz=True)
    cfg = make_cfg([SourceConfig(name="notes", paths=[str(root)])])
    state, expected, order = position_in_second_file(cfg, tokenizer)
    current = order[1]
    intact = current.read_bytes()
    current.write_bytes(intact[:40])
    with pytest.raises(ValueError, match=rf"{current} cannot be read up to the saved record \(EOFError"):
        build_train_batches(cfg, tokenizer, 0, 1).load_state_dict(state)
    current.write_bytes(intact)
    resumed = build_train_batches(cfg, tokenizer, 0, 1)
    assert resumed.load_state_dict(state) == []
    assert same_batches(take(resumed, 4), expected)


def test_accepting_a_change_continues_from_the_same_coordinates_and_reports_it(tokenizer, tmp_path, caplog):
    root, _ = corpus(tmp_path)
    cfg = make_cfg([SourceConfig(name="notes", paths=[str(root)])])
    state, _, order = position_in_second_file(cfg, tokenizer)
    saved = state["sources"]["notes"]
    swap_lines(order[1], 0, 1)
    cfg.data.accept_changes = True
    resumed = build_train_batches(cfg, tokenizer, 0, 1)
    with caplog.at_level(logging.WARNING):
        changes = resumed.load_state_dict(state)
    assert changes == [
        {
            "source": "notes",
            "file": str(order[1]),
            "what": f"changed before the saved record {saved['record']}",
        }
    ]
    assert any("continuing from the same position" in r.getMessage() for r in caplog.records)
    now = resumed.state_dict()["sources"]["notes"]
    assert (now["epoch"], now["file_pos"], now["record"]) == (
        saved["epoch"],
        saved["file_pos"],
        saved["record"],
    )
    # The next document is the record after the position, in the file as it is now.
    stream = resumed.mixture.streams[0]
    if stream._doc is not None:
        stream.take(10**6)  # the rest of the document in progress
    text = json.loads(order[1].read_text().splitlines()[saved["record"]])["text"]
    assert stream.take(10**6) == document_encoder(tokenizer, [])(text)


def test_a_different_tokenizer_is_refused_by_the_re_encoded_documents_length_and_digest(tokenizer, tmp_path):
    root, _ = corpus(tmp_path)
    cfg = make_cfg([SourceConfig(name="notes", paths=[str(root)])], seq_len=8)
    batches = build_train_batches(cfg, tokenizer, 0, 1)
    stream = batches.mixture.streams[0]
    while not (stream.state.file_pos == 1 and 0 < stream.state.offset < len(stream._doc)):
        next(batches)
    state = state_of(batches)
    other = build_train_batches(cfg, tokenizer, 0, 1)
    real = other.mixture.streams[0].encode
    other.mixture.streams[0].encode = lambda text: real(text.upper())  # another tokenizer or cleaner
    current = stream._epoch_files(0)[1]
    with pytest.raises(ValueError, match=rf"{current} record \d+ now encodes to \d+ tokens .*tokenizer"):
        other.load_state_dict(state)


# ---------------------------------------------------------------------------------------------------------
# The checks of finished files, shared out over the ranks (item 5: cheap at scale)
# ---------------------------------------------------------------------------------------------------------


def test_check_share_assigns_every_file_any_rank_finished_to_exactly_one_rank_that_finished_it():
    epoch = 3
    held = {  # rank -> (epoch, file positions its list holds)
        0: (epoch, [0, 1, 2, 3, 4, 5, 6]),  # the rank furthest ahead
        1: (epoch, [0, 1, 2, 3, 4]),
        2: (epoch, [0, 2, 4]),  # files of one document that other ranks own were never opened here
        3: (epoch - 1, [0, 1, 2, 3, 4, 5, 6, 7, 8]),  # still in the previous epoch: its files are not these
    }
    claims = [
        {"notes": finished_claim({"epoch": e, "finished": [[p, "bytes", 1, "x"] for p in ps]})}
        for e, ps in held.values()
    ]
    checked: dict[int, list[int]] = {}
    for rank, (e, positions) in held.items():
        mine = CheckShare(rank, claims).checks("notes", e, positions)
        for pos, checks in zip(positions, mine):
            if checks and e == epoch:
                checked.setdefault(pos, []).append(rank)
    # File p goes to rank p % 4 when that rank finished it, else to the next rank (cyclically) that did.
    assert checked == {0: [0], 1: [1], 2: [2], 3: [0], 4: [0], 5: [0], 6: [0]}


def ranks_apart(cfg, tokenizer, ahead: int) -> list[dict]:
    """Both ranks' saved positions (world size 2), each two records into its current file, rank 0 inside the
    epoch's 5th file and rank 1 inside its 4th: a file boundary between them, as ranks drift apart."""
    states = []
    for rank, file_pos in ((0, ahead), (1, ahead - 1)):
        batches = build_train_batches(cfg, tokenizer, rank, 2)
        stream = batches.mixture.streams[0]
        while stream.state.file_pos < file_pos or stream.state.record < 4:
            next(batches)
        assert stream.state.file_pos == file_pos and [e[0] for e in stream.state.finished] == list(
            range(file_pos)
        )
        states.append(state_of(batches))
    return states


def resume_both(cfg, tokenizer, states: list[dict]) -> list[str | None]:
    """What each rank of a 2-rank resume says about its data (train.py's _resume, in one process)."""
    fresh = [build_train_batches(cfg, tokenizer, rank, 2) for rank in (0, 1)]
    claims = [batches.finished_claims(state) for batches, state in zip(fresh, states)]  # gathered
    verdicts = []
    for rank, (batches, state) in enumerate(zip(fresh, states)):
        try:
            batches.load_state_dict(state, CheckShare(rank, claims))
            verdicts.append(None)
        except ValueError as err:
            verdicts.append(str(err))
    return verdicts


def test_a_resume_re_hashes_each_finished_file_once_over_all_ranks_with_watchdog_progress(
    tokenizer, tmp_path, monkeypatch
):
    root = tmp_path / "corpus"
    for k in range(6):
        write_jsonl(root / f"f{k}.jsonl", make_docs(12, 5, 20, seed=k, tag=f"f{k}"))
    cfg = make_cfg([SourceConfig(name="notes", paths=[str(root)])], seq_len=16, micro_batch_size=1)
    states = ranks_apart(cfg, tokenizer, ahead=4)
    order = [Path(p) for p in build_train_batches(cfg, tokenizer, 0, 1).mixture.streams[0]._epoch_files(0)]

    hashed: list[tuple[int, str]] = []
    beats: list[str] = []
    rank_now = [0]
    real = source_module.byte_digest

    def counting(path, count):
        hashed.append((rank_now[0], path))
        return real(path, count)

    monkeypatch.setattr(source_module, "byte_digest", counting)
    monkeypatch.setattr(source_module.watchdog, "progress", beats.append)
    fresh = [build_train_batches(cfg, tokenizer, rank, 2) for rank in (0, 1)]
    claims = [batches.finished_claims(state) for batches, state in zip(fresh, states)]
    for rank in (0, 1):
        rank_now[0] = rank
        assert fresh[rank].load_state_dict(states[rank], CheckShare(rank, claims)) == []
    # Files 0-2 were finished by both ranks, file 3 by rank 0 alone (rank 1 is still reading it): each one is
    # hashed once in all, half the shared ones by each rank, and file 3 by the rank that finished it.
    assert sorted(path for _, path in hashed) == sorted(str(p) for p in order[:4])
    assert {Path(path): rank for rank, path in hashed} == {order[0]: 0, order[1]: 1, order[2]: 0, order[3]: 0}
    assert beats == [
        f"resume check of source notes: {n} of {k} files" for k, n in ((3, 1), (3, 2), (3, 3), (1, 1))
    ]


def test_a_change_in_a_file_only_the_rank_ahead_finished_is_found_by_that_rank(tokenizer, tmp_path):
    root = tmp_path / "corpus"
    for k in range(6):
        write_jsonl(root / f"f{k}.jsonl", make_docs(12, 5, 20, seed=k, tag=f"f{k}"))
    cfg = make_cfg([SourceConfig(name="notes", paths=[str(root)])], seq_len=16, micro_batch_size=1)
    states = ranks_apart(cfg, tokenizer, ahead=4)
    order = [Path(p) for p in build_train_batches(cfg, tokenizer, 0, 1).mixture.streams[0]._epoch_files(0)]
    assert resume_both(cfg, tokenizer, states) == [None, None]
    boundary = order[3]  # finished by rank 0; rank 1 was 4 records into it
    data = bytearray(boundary.read_bytes())
    data[-5] ^= 0x01  # in its last record: past rank 1's position, so only rank 0 read it
    boundary.write_bytes(bytes(data))
    verdicts = resume_both(cfg, tokenizer, states)
    assert verdicts[1] is None and verdicts[0] is not None  # train.py gathers the verdicts: any one stops all
    assert verdicts[0].startswith(f"data.sources[notes]: {boundary} changed in its first ")
    boundary.write_bytes(bytes(data[:-5]) + bytes([data[-5] ^ 0x01]) + bytes(data[-4:]))  # restored
    shared = order[1]  # finished by both ranks: checked by rank 1 alone (1 % 2)
    data = bytearray(shared.read_bytes())
    data[len(data) // 2] ^= 0x01
    shared.write_bytes(bytes(data))
    verdicts = resume_both(cfg, tokenizer, states)
    assert verdicts[0] is None and verdicts[1].startswith(
        f"data.sources[notes]: {shared} changed in its first "
    )


# ---------------------------------------------------------------------------------------------------------
# Bad files before step 1 (item 6)
# ---------------------------------------------------------------------------------------------------------


def test_check_sources_lists_every_bad_file_at_once_each_with_its_fix(tmp_path):
    bad, good = tmp_path / "bad", tmp_path / "good"
    bad.mkdir()
    write_jsonl(good / "ok.jsonl", ["a fine note"])
    (bad / "truncated.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    (bad / "notes.csv").write_text("note_id,body\n1,hello\n")
    pq.write_table(pa.table({"body": ["x"]}), bad / "table.parquet")
    (bad / "wrong_field.jsonl").write_text("".join(json.dumps({"note": SECRET}) + "\n" for _ in range(3)))
    (bad / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n' * 3)
    cfg = resolve("tiny")
    cfg.data.sources = [
        SourceConfig(name="clinic", paths=[str(bad)], eval_paths=[str(tmp_path / "nowhere" / "*.jsonl")]),
        SourceConfig(name="fine", paths=[str(good)]),
    ]
    problems = check_sources(cfg)
    expected = [
        f"data.sources[clinic].eval_paths: '{tmp_path / 'nowhere' / '*.jsonl'}' matched no files",
        f"data.sources[clinic].paths: {bad / 'latin1.jsonl'}: its first 3 records were all skipped (3 bad_utf8;"
        f" first at {bad / 'latin1.jsonl'}:line 1); convert it to UTF-8",
        f"data.sources[clinic].paths: {bad / 'notes.csv'}: no column 'text' (columns: note_id, body); set the"
        " source's text_field",
        f"data.sources[clinic].paths: {bad / 'table.parquet'}: no column 'text' (columns: body)",
        f"data.sources[clinic].paths: {bad / 'truncated.jsonl.gz'}: could not read (",
        f"data.sources[clinic].paths: {bad / 'wrong_field.jsonl'}: its first 3 records were all skipped (3"
        " missing_field",
    ]
    assert len(problems) == len(expected), problems
    for want in expected:
        assert sum(p.startswith(want) for p in problems) == 1, (want, problems)
    assert all("\n" not in p and SECRET not in p for p in problems)
    # Start-up validation (and so --dry-run and every run) lists them with the config's own problems.
    cfg.optim.lr = -1.0
    listed, _ = validate(cfg)
    assert "optim.lr must be > 0 (got -1.0)" in listed and all(p in listed for p in problems)


def test_dry_run_lists_a_bad_file_before_anything_is_built(tmp_path, capsys):
    from mellama_train import cli

    broken = tmp_path / "notes.jsonl.zst"
    broken.write_bytes(b"\x28\xb5\x2f\xfd" + b"not a zstd frame")
    code = cli.run_main("pretrain", ["--dry-run", "--set", f"data.sources.mimic.paths=[{broken}]"])
    assert code == 2
    out = capsys.readouterr().out
    assert f"  - data.sources[mimic].paths: {broken}: could not read (ZstdError: " in out


def test_check_sources_for_tuning_names_the_columns_mapping(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [])
    Path(path).write_text("".join(json.dumps({"question": "q?", "answer": "a"}) + "\n" for _ in range(2)))
    cfg = resolve("tiny", task="tune")
    cfg.data.sources = [SourceConfig(name="qa", paths=[path])]
    (problem,) = check_sources(cfg)
    assert problem.startswith(
        f"data.sources[qa].paths: {path}: none of its first 2 records is an instruction record: it matches none"
        " of the instruction formats (alpaca (instruction, input, output"
    )
    assert problem.endswith(
        "its fields are answer, question; map them with data.sources[qa].columns, e.g. {instruction: question,"
        " output: answer}"
    )
    cfg.data.sources[0].columns = {"instruction": "question", "output": "answer"}
    assert check_sources(cfg) == []


def test_the_shipped_profiles_sample_data_passes_the_check():
    for task in ("pretrain", "tune"):
        assert check_sources(resolve("tiny", task=task)) == []


# ---------------------------------------------------------------------------------------------------------
# Bad records on every path (item 7)
# ---------------------------------------------------------------------------------------------------------

BAD_LINES = {
    2: '{"text": "lone \\ud800 surrogate ' + SECRET + '"}',  # valid JSON; no tokenizer takes it
    3: '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}",  # valid JSON past the parser's depth
    4: json.dumps({"text": {"nested": SECRET}}),  # not a string
}
EXPECTED_SKIPS = {2: "bad_text", 3: "too_deep", 4: "not_text"}


def bad_records_file(path: Path) -> Path:
    lines = [json.dumps({"text": "first good note about a cough"})]
    lines += [BAD_LINES[n] for n in (2, 3, 4)]
    lines.append(json.dumps({"text": "control\x07characters\x00are kept, as valid text"}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_every_bad_record_is_a_located_skip_in_the_reader(tmp_path):
    path = bad_records_file(tmp_path / "bad.jsonl")
    records = list(iter_texts(str(path), None))
    assert [r for _, r in records[1:4]] == [Skip(EXPECTED_SKIPS[n], f"{path}:line {n}") for n in (2, 3, 4)]
    assert records[4] == (4, "control\x07characters\x00are kept, as valid text")


def test_bad_records_are_counted_skips_in_pretraining_and_evaluation(tokenizer, tmp_path, caplog):
    path = bad_records_file(tmp_path / "bad.jsonl")
    cfg = make_cfg([SourceConfig(name="notes", paths=[str(path)], eval_paths=[str(path)])], seq_len=16)
    stream = build_train_batches(cfg, tokenizer, 0, 1).mixture.streams[0]
    with caplog.at_level(logging.WARNING):
        while stream.state.epoch == 0:  # (the call that crosses into epoch 1 returns its first, good, record)
            stream.next_item()
    assert stream.state.skipped == {"bad_text": 1, "too_deep": 1, "not_text": 1}
    assert stream.state.documents == 3  # the control characters are trained on
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for n, reason in EXPECTED_SKIPS.items():
        assert f"({reason}) at {path}:line {n}" in logged
    assert SECRET not in logged
    assert build_eval_batches(cfg, tokenizer, 0, 1)  # the held-out pass skips them too, without a traceback


def test_a_record_the_tokenizer_rejects_is_a_located_skip(tokenizer, tmp_path):
    class Picky:
        bos_token_id, eos_token_id, is_fast = 1, 2, False

        def __call__(self, text, add_special_tokens=False):
            if "reject" in text:
                raise TypeError("TextInputSequence must be str")
            return {"input_ids": [5, 6]}

    path = write_jsonl(tmp_path / "n.jsonl", ["fine", "please reject me", "fine again"])
    stream = SourceStream(SourceConfig(name="n", paths=[path]), document_encoder(Picky(), []), 0, 1, 0)
    assert [stream.next_item(), stream.next_item()] == [[1, 5, 6, 2], [1, 5, 6, 2]]
    assert stream.state.skipped == {"tokenizer_rejected": 1}
    assert stream.state.first_skip == f"{path}:record 2 (TypeError)"


def test_bad_records_are_counted_skips_in_tuning(tokenizer, tmp_path):
    from test_instruct import tune_cfg

    path = tmp_path / "qa.jsonl"
    good = {"instruction": "What is aspirin?", "output": "An antiplatelet drug."}
    path.write_text(
        "\n".join(
            [
                json.dumps(good),
                '{"instruction": "lone \\udc00", "output": "' + SECRET + '"}',
                '{"instruction": ' + "[" * 100_000 + "]" * 100_000 + ', "output": "x"}',
                json.dumps({"instruction": 7, "output": SECRET}),
                json.dumps(good),
            ]
        )
        + "\n"
    )
    cfg = tune_cfg([SourceConfig(name="qa", paths=[str(path)])])
    stream = build_train_batches(cfg, tokenizer, 0, 1).mixture.streams[0]
    while stream.state.epoch == 0:  # (the call that crosses into epoch 1 returns its first, good, record)
        stream.next_item()
    assert stream.state.skipped == {"bad_text": 1, "too_deep": 1, "missing_field": 1}


def test_decontamination_skips_bad_records_counted_and_located(tmp_path, caplog):
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"q": " ".join(["word"] * 14)}) + "\n")
    index_dir = decontam.write_index(tmp_path / "index", *decontam.build_index([bench], n=13))
    training = bad_records_file(tmp_path / "train.jsonl")
    with caplog.at_level(logging.WARNING):
        counts = decontam.scan(decontam.Index(index_dir), [str(training)])
    assert counts == {str(training): (2, 0)}
    message = next(r.getMessage() for r in caplog.records if "decontaminate --scan" in r.getMessage())
    assert "1 bad_text, 1 not_text, 1 too_deep" in message and f"first at {training}:line 2" in message
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"q": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(ValueError, match=rf"{deep}:1: JSON nested too deeply; fix or remove it"):
        decontam.build_index([deep])


def test_decontamination_files_read_back_are_one_line_whatever_their_json(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    benchmarks = {
        "deep.json": (deep, "not valid JSON (nested too deeply); give JSON lines or one JSON array"),
        "scalar.json": ('"one string"', "holds one JSON str; give JSON lines or one JSON array"),
        "latin1.jsonl": (None, "not UTF-8 text; convert it to UTF-8"),
    }
    for name, (content, problem) in benchmarks.items():
        path = tmp_path / name
        if content is None:
            path.write_bytes(b'{"q": "caf\xe9"}\n')
        else:
            path.write_text(content)
        with pytest.raises(ValueError) as err:
            decontam.build_index([path])
        assert str(err.value) == f"{path}: {problem}"

    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"q": " ".join(["word"] * 14)}) + "\n")
    index_dir = decontam.write_index(tmp_path / "index", *decontam.build_index([bench], n=13))
    manifest = index_dir / decontam.MANIFEST
    for damaged in ('{"n": ' + deep + "}", "[13]", '{"n": null}', '{"n": 0}'):
        manifest.write_text(damaged)
        with pytest.raises(ValueError) as err:
            decontam.load_index(str(index_dir))
        message = str(err.value)
        assert message.startswith(f"data.decontamination: {index_dir} is not an index written by")
        assert message.endswith(f"--out {index_dir}`") and "\n" not in message
    manifest.write_text(json.dumps({"n": 13}))
    np.save(index_dir / decontam.INDEX_FILE, np.zeros((2, 2)), allow_pickle=False)  # not n-gram hashes
    with pytest.raises(
        ValueError, match=r"is not an index written by .*\(n 13, float64 array of 2 dimensions\)"
    ):
        decontam.load_index(str(index_dir))


# ---------------------------------------------------------------------------------------------------------
# A record of several hundred MB, under a memory limit (item 7)
# ---------------------------------------------------------------------------------------------------------

HUGE = 300 * 2**20
# Everything imported first: from then on the reader may map at most 200 MB more than it already has, less
# than the 300 MB record or file. Holding it whole (let alone tokenizing it) would raise MemoryError.
MEMORY_LIMIT = textwrap.dedent(
    """
    import resource, sys

    def vm_bytes():
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))

    headroom = 200 * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + headroom, vm_bytes() + headroom))
    path, limit = sys.argv[1], 16 * 2**20  # the record is ~19x the limit; the headroom is 12x it
    """
)
IMPORTS = textwrap.dedent(
    """
    from mellama_train.data.files import ReadOptions
    from mellama_train.data.readers import check_unit, iter_texts
    from mellama_train.data.source import SourceStream
    from mellama_train.config import SourceConfig
    """
)
BOUNDED_READ = (
    IMPORTS
    + MEMORY_LIMIT
    + textwrap.dedent(
        """
        print(list(iter_texts(path, "text", options=ReadOptions(limit))))
        if sys.argv[2] == "stream":
            stream = SourceStream(SourceConfig(name="s", paths=[path]), len, 0, 1, 0, max_record_bytes=limit)
            print(stream.next_item(), stream.state.skipped, stream.state.first_skip)
        """
    )
)


def run_bounded(script: str, path: Path, *args: str) -> list[str]:
    """The lines `script` (IMPORTS + MEMORY_LIMIT + its body) prints about `path`; it must exit 0."""
    proc = subprocess.run(
        [sys.executable, "-c", script, str(path), *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.splitlines()


def write_huge(path: Path, head: bytes, fill: bytes, tail: bytes) -> None:
    """head + HUGE bytes of `fill` + tail, written in 1 MiB pieces (never held whole)."""
    with open(path, "wb") as fh:
        fh.write(head)
        for _ in range(HUGE // 2**20):
            fh.write(fill * (2**20 // len(fill)))
        fh.write(tail)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "txt"])
def test_a_record_of_300_mb_is_skipped_as_too_large_in_bounded_memory(tmp_path, fmt):
    path = tmp_path / f"huge.{fmt}"
    if fmt == "jsonl":
        write_huge(path, b'{"text": "', b"note ", b'"}\n{"text": "the next note"}\n')
        expected, where, nxt = (
            "[(0, Skip(reason='too_large', where='%s:line 1')), (1, 'the next note')]",
            "line 1",
            13,
        )
    elif fmt == "csv":
        write_huge(path, b'id,text\n1,"', b"note " * 200 + b'a ""quoted"" word\n', b'"\n2,the next note\n')
        expected, where, nxt = (
            "[(0, Skip(reason='too_large', where='%s:row 1')), (1, 'the next note')]",
            "row 1",
            13,
        )
    else:
        write_huge(path, b"", b"report ", b"")
        expected, where, nxt = "[(0, Skip(reason='too_large', where='%s'))]", "", None
    printed = run_bounded(BOUNDED_READ, path, "list" if nxt is None else "stream")
    assert printed[0] == expected % path
    if nxt is not None:
        assert printed[1] == f"{nxt} {{'too_large': 1}} {path}:{where}"


def test_a_json_array_of_300_mb_is_refused_at_start_up_in_bounded_memory(tmp_path):
    """The alpaca_data.json layout, grown past what can be decoded whole: start-up names it, with the command
    that converts it to JSONL, without ever holding it (it once was loaded whole, at start-up too)."""
    path = tmp_path / "huge.json.gz"
    item = json.dumps({"text": "note " * 200}).encode() + b", "
    with gzip.open(path, "wb", compresslevel=1) as fh:
        fh.write(b"[")
        for _ in range(HUGE // 2**20):
            fh.write(item * (2**20 // len(item)))
        fh.write(b'{"text": "last"}]')
    script = IMPORTS + MEMORY_LIMIT + "print(check_unit(path, 'text', max_record_bytes=limit))\n"
    (line,) = run_bounded(script, path)
    assert line.startswith(
        f"{path}: a JSON array of more than {4 * 16 * 2**20} bytes (4 x data.max_record_bytes) is not read, as"
        f" it cannot be streamed; convert it to JSONL, which is read as a stream: zcat {path} | jq -c '.[]' >"
        f" {tmp_path / 'huge.jsonl'}"
    )


def test_xml_nested_300_mb_deep_is_a_counted_located_skip_in_bounded_memory(tmp_path):
    """Nested tags past MAX_XML_DEPTH end the file's reading (its remainder is one counted skip) before the
    parser's stack can grow: the article before them is read, and the stream goes on."""
    path = tmp_path / "pubmed25n0001.xml"
    first = b"<PubmedArticle><MedlineCitation><Article><ArticleTitle>Title one.</ArticleTitle></Article>"
    first += b"</MedlineCitation></PubmedArticle>"
    write_huge(path, b"<PubmedArticleSet>" + first + b"<PubmedArticle>", b"<a>", b"")
    script = (
        IMPORTS
        + MEMORY_LIMIT
        + textwrap.dedent(
            """
            stream = SourceStream(SourceConfig(name="s", paths=[path]), len, 0, 1, 0, max_record_bytes=limit)
            print(stream.next_item(), stream.next_item())  # the second one: the file read again, next epoch
            print(stream.state.skipped, stream.state.first_skip)
            """
        )
    )
    printed = run_bounded(script, path)
    assert printed[0] == "10 10"
    assert printed[1] == (
        f"{{'unreadable_remainder': 1}} {path}:record 2 (XML nested deeper than 1000 elements, in article 2,"
        " XML bytes 0-65536)"
    )


# ---------------------------------------------------------------------------------------------------------
# Through the entry point: the refusal, and the way on recorded in trainer.json
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_changed_file_stops_the_resume_in_one_line_and_the_flag_continues_on_record(tmp_path):
    from test_train_e2e import LAUNCH, TINY, clean_env, interrupted_copy

    notes = Path(write_jsonl(tmp_path / "notes.jsonl", make_docs(300, 20, 60, seed=9, tag=SECRET)))
    args = [
        *TINY,
        "--set",
        f"data.sources.mimic.paths=[{notes}]",
        "--set",
        "data.sources.mimic.eval_paths=[]",
    ]
    args += ["--set", "data.sources.mimic.weight=30"]

    def launch(out: Path, *more: str) -> subprocess.CompletedProcess:
        cmd = [
            sys.executable,
            LAUNCH,
            "--output-dir",
            str(out),
            *args,
            "--max-steps",
            "4",
            "--save-every",
            "2",
        ]
        return subprocess.run(
            [*cmd, *more], cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600
        )

    full = tmp_path / "full"
    assert launch(full).returncode == 0
    crashed = interrupted_copy(full, tmp_path / "crashed", 2, ["checkpoints/step_00000004", "final"])
    swap_lines(notes, 0, 1)  # two notes read before step 2 trade places: same size

    refused = launch(crashed)
    assert refused.returncode == 2, refused.stderr[-3000:]
    (line,) = [x for x in refused.stderr.splitlines() if x.startswith("error")]
    assert line.startswith(f"error (rank 0): data.sources[mimic]: {notes} changed before the saved record ")
    assert "--accept-data-change" in line and "Traceback" not in refused.stderr
    assert not (crashed / "checkpoints" / "step_00000004").exists()

    accepted = launch(crashed, "--accept-data-change")
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    assert "continuing from the same position" in accepted.stderr
    trainer = json.loads((crashed / "checkpoints" / "step_00000004" / "trainer.json").read_text())
    (change,) = trainer["data_changes"]
    assert change["step"] == 2 and change["source"] == "mimic" and change["file"] == str(notes)
    assert change["what"].startswith("changed before the saved record ")
    assert SECRET not in refused.stderr + accepted.stderr + json.dumps(trainer)
