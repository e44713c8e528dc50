"""Benchmark decontamination: the n-gram index, the overlap rule, the command, and a run that drops (and
counts, per source) the training documents that share a 13-gram with a benchmark."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from test_train_e2e import LAUNCH, TINY, run

from mellama_train.cli import main
from mellama_train.config import resolve
from mellama_train.data import decontam
from mellama_train.data.pipeline import build_train_batches
from mellama_train.metrics import read_metrics
from mellama_train.model import load_tokenizer

QUESTION = (
    "A 45-year-old man presents with crushing substernal chest pain radiating to the left arm for two hours;"
    " which enzyme rises first after myocardial injury?"
)


def test_the_overlap_rule_ignores_case_and_punctuation_and_needs_n_words(tmp_path):
    bench = tmp_path / "medqa.jsonl"
    bench.write_text(json.dumps({"question": QUESTION, "options": {"A": "Troponin I", "B": "CK-MB"}}) + "\n")
    index, info = decontam.build_index([bench], n=13)
    decontam.write_index(tmp_path / "idx", index, info)
    loaded = decontam.Index(tmp_path / "idx")
    words = decontam.words(QUESTION)
    thirteen = " ".join(words[3:16]).upper().replace(" ", " ,  ")  # other case, spacing and punctuation
    twelve = " ".join(words[3:15])
    assert loaded.overlaps(f"Unrelated preamble. {thirteen} and more unrelated text follows here.")
    assert not loaded.overlaps(f"Unrelated preamble. {twelve} and more unrelated text follows here.")
    assert not loaded.overlaps("too short")
    # Stable across processes (blake2b, not Python's salted hash()): the index file's values are reproducible.
    assert np.array_equal(np.load(tmp_path / "idx" / "ngrams.npy"), decontam.build_index([bench], 13)[0])


def test_the_index_reads_the_three_benchmarks_layouts_and_counts_unmatchable_records(tmp_path):
    medqa = tmp_path / "medqa.jsonl"  # MedQA (4 options): question + options dict
    medqa.write_text(
        json.dumps({"question": QUESTION, "options": {"A": "Troponin", "B": "Myoglobin"}}) + "\n"
    )
    medmcqa = tmp_path / "medmcqa.jsonl"  # MedMCQA: opa..opd, and a short question
    medmcqa.write_text(json.dumps({"question": "Drug of choice?", "opa": "a", "opb": "b", "cop": 1}) + "\n")
    pubmedqa = tmp_path / "ori_pqal.json"  # PubMedQA: one JSON object of id -> record, contexts as a list
    contexts = ["Statins reduce cardiovascular events in adults with elevated LDL cholesterol levels."] * 2
    pubmedqa.write_text(json.dumps({"123": {"QUESTION": "Do statins help?", "CONTEXTS": contexts}}))
    _, info = decontam.build_index([medqa, medmcqa, pubmedqa], n=13)
    per_file = {f.path.rsplit("/", 1)[-1]: (f.records, f.too_short) for f in info.files}
    assert per_file == {"medqa.jsonl": (1, 0), "medmcqa.jsonl": (1, 1), "ori_pqal.json": (1, 0)}
    assert info.ngrams > 0

    (tmp_path / "bad.jsonl").write_text('{"question": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a JSON line"):
        decontam.build_index([tmp_path / "bad.jsonl"])


def leaked_corpus(tmp_path, leaked: list[int], total: int = 40):
    """A pretraining source of `total` synthetic documents; those at `leaked` quote a benchmark question."""
    corpus = tmp_path / "corpus.jsonl"
    docs = []
    for i in range(total):
        text = f"Document {i} discusses renal physiology, electrolytes and fluid balance in some detail. " * 6
        if i in leaked:
            text += f" As an exam once asked: {QUESTION}"
        docs.append(json.dumps({"text": text}))
    corpus.write_text("\n".join(docs) + "\n")
    bench = tmp_path / "medqa.jsonl"
    bench.write_text(json.dumps({"question": QUESTION}) + "\n")
    return corpus, bench


@pytest.mark.slow
def test_a_run_drops_overlapping_documents_and_counts_them_per_source(tmp_path, capsys):
    corpus, bench = leaked_corpus(tmp_path, leaked=[1, 4, 6])
    index = tmp_path / "decontam"
    assert (
        main(["decontaminate", "--benchmarks", str(bench), "--out", str(index), "--scan", str(corpus)]) == 0
    )
    printed = capsys.readouterr().out
    assert "3 of 40 records overlap the benchmarks" in printed
    assert f"--set data.decontamination={index}" in printed

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "data:\n"
        f"  decontamination: {index}\n"
        f"  sources:\n    - {{name: notes, weight: 1, paths: ['{corpus}']}}\n"
        "train:\n  forgetting_source: null\n  eval_every: 0\n"
    )
    # The data stream alone: one pass over the file hands out the 37 clean documents, never a leaked one.
    cfg = resolve("tiny", str(recipe))
    tokenizer = load_tokenizer(cfg)
    stream = build_train_batches(cfg, tokenizer, rank=0, world_size=1).mixture.streams[0]
    handed_out = []
    while stream.state.epoch == 0:
        handed_out.append(tokenizer.decode(stream.next_item()))
    assert not any("exam once asked" in text for text in handed_out)
    assert stream.state.skipped == {"contaminated": 3}
    assert (
        stream.state.documents == 37 + 1
    )  # the clean ones, and the second pass's first (it ended the first)

    # A real run: the metric, in metrics.jsonl, counts the three dropped documents read before step 6.
    out = tmp_path / "run"
    run(
        [sys.executable, LAUNCH, "--output-dir", str(out), "--config", str(recipe), *TINY, "--max-steps", "6"]
    )
    last = read_metrics(out / "metrics.jsonl")[6]
    assert last["data/decontaminated/notes"] == 3 and last["data/reasons/notes/contaminated"] == 3
    assert last["data/filtered/notes"] == 3 and last["data/skipped/notes"] == 0  # a choice, not bad data
    assert last["data/documents/notes"] >= 6
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    assert "decontam.   notes 3 dropped" in capsys.readouterr().out


def test_a_missing_index_is_a_start_up_error_naming_the_command(tmp_path):
    from mellama_train.preflight import validate

    cfg = resolve("tiny", overrides=[f"data.decontamination={tmp_path / 'nowhere'}"])
    problems, _ = validate(cfg)
    assert any(
        "data.decontamination" in p and "mellama-train decontaminate --benchmarks" in p for p in problems
    )


def test_tuning_drops_instruction_examples_that_quote_a_benchmark(tmp_path):
    """The same screen in front of the instruction encoder: an example whose fields quote a benchmark record is
    dropped and counted (the sample's first instruction stands in for a leaked MedQA item)."""
    from mellama_train.data.readers import iter_records

    cfg = resolve("tiny", task="tune")
    path = cfg.data.sources[0].paths[0]
    records = [r for _, r in iter_records(path)]
    bench = tmp_path / "medqa.jsonl"
    bench.write_text(json.dumps({"question": records[0]["input"]}) + "\n")
    index, info = decontam.build_index([bench])
    decontam.write_index(tmp_path / "idx", index, info)
    loaded = decontam.Index(tmp_path / "idx")
    leaked = sum(loaded.overlaps(decontam.record_text(r)) for r in records)
    assert 1 <= leaked < len(records)

    cfg = resolve("tiny", task="tune", overrides=[f"data.decontamination={tmp_path / 'idx'}"])
    stream = build_train_batches(cfg, load_tokenizer(cfg), rank=0, world_size=1).mixture.streams[0]
    while stream.state.epoch == 0:
        stream.next_item()
    # Every leaked example of the first pass, and the second pass's record 0 (the quoted one) read on the way.
    assert stream.state.skipped.get("contaminated") == leaked + 1
