"""Every record not trained on is counted, per source and reason, as bad data (skipped: limited) or as the
recipe's choice (filtered: where, require_abstract, min_chars, overflow drop, decontamination: never limited)."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from mellama_train.config import SourceConfig, resolve
from mellama_train.data import reasons
from mellama_train.data.pipeline import document_encoder
from mellama_train.data.source import SkipLimit, SourceStream, check_sources, data_counts, reason_counts
from mellama_train.preflight import validate
from mellama_train.sample_data import TOKENIZER_DIR

SRC = Path(__file__).resolve().parents[1] / "src" / "mellama_train"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def test_every_reason_the_code_can_give_is_registered_with_its_kind():
    given = set()
    for path in SRC.rglob("*.py"):
        given |= set(re.findall(r'Skip\(\s*"([a-z_]+)"', path.read_text()))
    assert given, "the pattern must find the readers' Skip reasons"
    assert given <= set(reasons.REASONS), given - set(reasons.REASONS)
    assert not set(reasons.SKIP_REASONS) & set(reasons.FILTER_REASONS)


def drain(stream: SourceStream) -> int:
    documents = 0
    while stream.state.epoch == 0:
        stream.next_item()
        documents += 1
    return documents - 1  # the last call started the second pass


def test_filters_are_counted_by_reason_and_never_stop_a_run(tokenizer, tmp_path):
    """90 of 100 records left out by `where` and 5 by min_chars: far past the bad-data limit, yet no stop."""
    lines = []
    for i in range(100):
        kind = "RedPajamaBook" if i % 10 == 0 else "RedPajamaC4"
        text = "short" if i in (10, 20, 30, 40, 50) else f"document number {i} with enough words in it"
        lines.append(json.dumps({"text": text, "meta": {"redpajama_set_name": kind}}))
    lines[99] = "{not json"
    path = tmp_path / "rp.jsonl.gz"
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    src = SourceConfig(
        name="rp", paths=[str(path)], where={"meta.redpajama_set_name": ["RedPajamaBook"]}, min_chars=20
    )
    stream = SourceStream(
        src, document_encoder(tokenizer, [], src.min_chars), 0, 1, 0, skip_limit=SkipLimit(0.0, 0)
    )
    with pytest.raises(
        ValueError, match=r"1 of 6 records read on rank 0 \(filtered ones aside\) were skipped \(1 bad_json\)"
    ):
        drain(stream)  # the one bad line is over a zero limit; the 94 filtered records never were
    assert stream.state.skipped == {"not_selected": 89, "too_short": 5, "bad_json": 1}
    assert stream.state.documents == 5  # books 0, 60, 70, 80, 90

    values = data_counts(["rp"], reason_counts([stream]))
    assert values["data/documents/rp"] == 5
    assert (values["data/skipped/rp"], values["data/filtered/rp"]) == (1, 94)
    assert values["data/reasons/rp/not_selected"] == 89 and values["data/reasons/rp/too_short"] == 5
    assert "data/reasons/rp/empty" not in values  # only the reasons seen


def test_counts_sum_over_ranks_and_an_unknown_reason_is_counted_as_other(tokenizer, tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(6)))
    streams = [
        SourceStream(SourceConfig(name="a", paths=[str(path)]), lambda t: [1], r, 2, 0) for r in (0, 1)
    ]
    for stream in streams:
        stream.next_item()
        stream.state.skipped = {"bad_json": 2, "made_up": 1}
    total = [a + b for a, b in zip(reason_counts(streams[:1]), reason_counts(streams[1:]))]
    values = data_counts(["a"], total)
    assert values["data/documents/a"] == 2 and values["data/skipped/a"] == 6
    assert values["data/reasons/a/other"] == 2 and values["data/filtered/a"] == 0


def test_where_fields_and_filters_are_checked_at_start_up(tmp_path):
    notes = tmp_path / "discharge.csv"
    notes.write_text("note_id,note_type,text\n1,DS,a note\n")
    rp = tmp_path / "rp.jsonl"
    rp.write_text(json.dumps({"text": "x", "meta": {"redpajama_set_name": "RedPajamaBook"}}) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"""
data:
  sources:
    - {{name: notes, paths: [{notes}], where: {{note_kind: DS}}}}
    - {{name: rp, paths: [{rp}], where: {{meta.set_name: [RedPajamaBook]}}}}
    - {{name: abstracts, paths: [{rp}], require_abstract: true}}
    - {{name: good, paths: [{notes}], where: {{note_type: DS}}, min_chars: -1}}
"""
    )
    cfg = resolve("tiny", str(recipe))
    assert cfg.data.sources[3].where == {"note_type": ["DS"]}  # one value given as a scalar
    problems, _ = validate(cfg)
    assert "data.sources[good].min_chars must be >= 0 (got -1); 0 keeps every non-empty document" in problems
    found = check_sources(cfg)
    assert any(
        "discharge.csv: no column 'note_kind' for the source's where (columns: note_id, note_type, text)" in p
        for p in found
    ), found
    assert any("rp.jsonl: none of its first 1 records has the field 'meta.set_name'" in p for p in found), (
        found
    )
    assert any(
        "[abstracts].paths: " in p and "rp.jsonl: require_abstract applies to PubMed" in p for p in found
    )
    assert not any("[good]" in p for p in found), found
