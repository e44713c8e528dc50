"""The shipped sample data: files as documented, clean splits, safe clinical text, a working tokenizer.

The files are read with gzip / zstandard / csv / pyarrow directly rather than through the project's readers, so
a bug in a reader cannot hide a bug in the data (and the other way round).
"""

from __future__ import annotations

import csv
import fnmatch
import gzip
import importlib.util
import io
import json
import re
import statistics
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
import zstandard
from transformers import AutoTokenizer

from mellama_train.sample_data import SAMPLE_DATA_DIR, TOKENIZER_DIR, sample_path

README = SAMPLE_DATA_DIR / "README.md"
GENERATOR = Path(__file__).resolve().parents[1] / "tools" / "make_sample_data.py"
MAX_TOTAL_BYTES = 3 * 1024 * 1024
VOCAB_SIZE = 2048
# Token counts in the README are exact for the pinned libraries; allow 1% so a tokenizers upgrade that
# shifts a few merges does not fail the suite. The floors come from the README table and are hard.
TOKEN_COUNT_TOLERANCE = 0.01
MIMIC_COLUMNS = [
    "note_id",
    "subject_id",
    "hadm_id",
    "note_type",
    "note_seq",
    "charttime",
    "storetime",
    "text",
]

ALPACA_FIELDS = {"instruction", "input", "output"}
QA_COLUMNS = ["question", "context", "answer"]
INSTRUCT_MAX_BYTES = 400 * 1024
# Shapes of real identifiers that must never appear in the synthetic notes.
REAL_IDENTIFIER_PATTERNS = {
    "SSN": re.compile(r"\b\d{3}-\d{2}-\d{4}\b"),
    "phone": re.compile(r"(\(\d{3}\)\s*|\b\d{3}[-.])\d{3}[-.]\d{4}\b"),
    "e-mail": re.compile(r"\b[\w.+-]+@[\w-]+\.[\w.]+\b"),
}


def read_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".gz":
        return gzip.decompress(data)
    if path.suffix == ".zst":
        return zstandard.ZstdDecompressor().decompress(data)
    return data


def read_jsonl(*parts: str) -> list[dict]:
    return [json.loads(line) for line in read_bytes(Path(sample_path(*parts))).decode("utf-8").splitlines()]


def read_notes(*parts: str) -> list[dict]:
    text = read_bytes(Path(sample_path(*parts))).decode("utf-8")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    assert reader.fieldnames == MIMIC_COLUMNS
    return list(reader)


@pytest.fixture(scope="module")
def splits() -> dict[str, dict[str, list[dict]]]:
    """Every source's train and held-out records, exactly as stored."""
    return {
        "pubmed": {
            "train": read_jsonl("pubmed/train/part-0000.jsonl")
            + read_jsonl("pubmed/train/part-0001.jsonl.gz"),
            "heldout": read_jsonl("pubmed/heldout.jsonl"),
        },
        "mimic": {
            "train": read_notes("mimic/discharge.csv.gz"),
            "heldout": read_notes("mimic/heldout.csv.gz"),
        },
        "redpajama": {
            "train": read_jsonl("redpajama/part-0000.jsonl.zst"),
            "heldout": read_jsonl("redpajama/heldout.jsonl"),
        },
    }


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def encoded(tokenizer, splits) -> dict[str, dict[str, list[list[int]]]]:
    """Bare token ids (no <s>) of every document, encoded once for the tests below."""
    return {
        source: {
            split: tokenizer([r["text"] for r in records], add_special_tokens=False).input_ids
            for split, records in parts.items()
        }
        for source, parts in splits.items()
    }


@pytest.fixture(scope="module")
def readme_counts() -> dict[str, dict[str, int]]:
    """The README's token-count table: source -> train docs, train tokens, held-out docs, floor."""
    row = re.compile(r"^\| (\w+) \| (\d+) \| (\d+) \| [^|]+ \| (\d+) \| (\d+) \|$", re.MULTILINE)
    counts = {
        name: {"docs": int(docs), "tokens": int(tokens), "heldout": int(heldout), "floor": int(floor)}
        for name, docs, tokens, heldout, floor in row.findall(README.read_text())
    }
    assert set(counts) == {"pubmed", "mimic", "redpajama"}, f"README token table rows: {sorted(counts)}"
    return counts


def documented_patterns() -> list[str]:
    """The paths (or globs) in the first column of the README's file table, relative to this directory."""
    return re.findall(r"^\| `([^`]+)` \|", README.read_text(), re.MULTILINE)


def shipped_files() -> list[str]:
    return sorted(
        path.relative_to(SAMPLE_DATA_DIR).as_posix()
        for path in SAMPLE_DATA_DIR.rglob("*")
        if path.is_file()
        and "__pycache__" not in path.parts
        and path.name not in ("__init__.py", "README.md")
    )


def test_every_documented_file_exists_and_every_shipped_file_is_documented():
    patterns = documented_patterns()
    assert len(patterns) >= 11
    files = shipped_files()
    for pattern in patterns:
        assert fnmatch.filter(files, pattern), f"README names {pattern} but no such file is shipped"
    undocumented = [f for f in files if not any(fnmatch.fnmatch(f, p) for p in patterns)]
    assert not undocumented, f"shipped but not in README.md: {undocumented}"


def test_total_size_is_small():
    total = sum((SAMPLE_DATA_DIR / f).stat().st_size for f in shipped_files())
    assert total <= MAX_TOTAL_BYTES, f"sample data is {total} bytes; the limit is {MAX_TOTAL_BYTES}"


def test_document_counts_match_readme(splits, readme_counts):
    for source, parts in splits.items():
        assert len(parts["train"]) == readme_counts[source]["docs"], source
        assert len(parts["heldout"]) == readme_counts[source]["heldout"], source


def test_record_shapes(splits):
    for record in splits["pubmed"]["train"] + splits["pubmed"]["heldout"]:
        assert set(record) == {"pmid", "text"}
        assert re.fullmatch(r"\d{8}", record["pmid"])
        title, abstract = record["text"].split("\n\n", 1)
        assert title and abstract and "\n\n" not in abstract
    for record in splits["redpajama"]["train"] + splits["redpajama"]["heldout"]:
        assert record["meta"] == {"source": "synthetic"} and record["text"].strip()
    for note in splits["mimic"]["train"] + splits["mimic"]["heldout"]:
        assert note["note_type"] == "DS"
        assert note["note_id"] == f"{note['subject_id']}-DS-{note['note_seq']}"
        assert note["charttime"] <= note["storetime"]
    cxr_reports = sorted(Path(sample_path("mimic", "cxr")).glob("*.txt"))
    assert len(cxr_reports) == 40
    for report in cxr_reports:
        assert re.fullmatch(r"s\d{8}\.txt", report.name)
        text = report.read_text(encoding="utf-8")
        assert "FINDINGS:" in text and "IMPRESSION:" in text


def test_heldout_documents_are_not_in_train(splits):
    for source, parts in splits.items():
        train_texts = {record["text"] for record in parts["train"]}
        heldout_texts = [record["text"] for record in parts["heldout"]]
        assert len(train_texts) == len(parts["train"]), f"{source} train has duplicate documents"
        leaked = [text[:60] for text in heldout_texts if text in train_texts]
        assert not leaked, f"{source}: {len(leaked)} held-out documents are also in train, e.g. {leaked[0]!r}"
    pmids = {split: {r["pmid"] for r in records} for split, records in splits["pubmed"].items()}
    assert not pmids["train"] & pmids["heldout"]
    subjects = {split: {r["subject_id"] for r in records} for split, records in splits["mimic"].items()}
    assert not subjects["train"] & subjects["heldout"]


def test_clinical_notes_are_deidentified_in_mimic_style(splits):
    notes = [note["text"] for note in splits["mimic"]["train"] + splits["mimic"]["heldout"]]
    assert all("___" in text for text in notes), "every MIMIC-IV style note removes the patient name as ___"
    assert all("\n" in text for text in notes), "notes are multi-line text inside a quoted CSV field"
    for section in ("Chief Complaint:", "History of Present Illness:", "Brief Hospital Course:"):
        assert all(section in text for text in notes), section
    # A few notes use MIMIC-III's bracketed placeholders for dates and hospitals.
    assert any(re.search(r"\[\*\*\d{4}-\d{1,2}-\d{1,2}\*\*\]", text) for text in notes)
    assert any("[**Hospital1 18**]" in text for text in notes)
    cxr_texts = [p.read_text(encoding="utf-8") for p in Path(sample_path("mimic", "cxr")).glob("*.txt")]
    for text in notes + cxr_texts:
        for kind, pattern in REAL_IDENTIFIER_PATTERNS.items():
            match = pattern.search(text)
            assert match is None, f"{kind}-like string {match.group(0)!r} in a synthetic note"


def test_tokenizer_is_llama_style(tokenizer):
    assert tokenizer.is_fast
    assert len(tokenizer) == VOCAB_SIZE
    assert (tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token) == ("<unk>", "<s>", "</s>")
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.pad_token is None
    sentence = "The patient was given 40 mg of furosemide at 08:15.\nShe baked bread at 180°C."
    ids = tokenizer(sentence, add_special_tokens=False).input_ids
    assert ids and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == sentence
    # LLaMA behaviour: <s> in front, no </s> at the end, unless asked.
    assert tokenizer(sentence).input_ids == [tokenizer.bos_token_id, *ids]
    # split_digits: every digit is its own token.
    assert tokenizer.tokenize("2024") == ["▁", "2", "0", "2", "4"]


def test_tokenizer_matches_sentencepiece_and_round_trips_every_document(tokenizer, splits, encoded):
    processor = spm.SentencePieceProcessor(model_file=str(TOKENIZER_DIR / "tokenizer.model"))
    assert processor.get_piece_size() == VOCAB_SIZE
    assert (processor.unk_id(), processor.bos_id(), processor.eos_id(), processor.pad_id()) == (0, 1, 2, -1)
    texts = [record["text"] for parts in splits.values() for records in parts.values() for record in records]
    all_ids = [ids for parts in encoded.values() for split_ids in parts.values() for ids in split_ids]
    # Lossless: byte fallback means no <unk>, and decoding gives back the exact text (whitespace included).
    assert not any(tokenizer.unk_token_id in ids for ids in all_ids)
    for text, decoded in zip(texts, tokenizer.batch_decode(all_ids), strict=True):
        assert decoded == text, f"round trip changed {text[:60]!r}"
    # tokenizer.json must agree with the sentencepiece model it was converted from.
    for text, ids in list(zip(texts, all_ids, strict=True))[::10]:
        assert ids == processor.encode(text), f"transformers and sentencepiece disagree on {text[:60]!r}"


def test_train_token_counts_match_readme_and_floors(encoded, readme_counts):
    for source, parts in encoded.items():
        tokens = sum(len(ids) for ids in parts["train"])
        documented = readme_counts[source]["tokens"]
        assert tokens >= readme_counts[source]["floor"], f"{source}: {tokens} tokens is below the floor"
        assert abs(tokens - documented) <= TOKEN_COUNT_TOLERANCE * documented, (
            f"{source}: {tokens} train tokens but README.md says {documented}; re-run "
            "tools/make_sample_data.py and update the README table"
        )
    assert sum(c["tokens"] for c in readme_counts.values()) >= 200_000


# --------------------------------------------------------------------------------------------------------
# Instruction data (instruct/)
# --------------------------------------------------------------------------------------------------------


def read_parquet(*parts: str) -> list[dict]:
    return pq.read_table(sample_path(*parts)).to_pylist()


def readme_instruct_counts() -> dict[str, int]:
    """The README's instruct file table: path -> the record count its contents column starts with."""
    rows = re.findall(r"^\| `(instruct/[^`]+)` \| [^|]+ \| (\d+) ", README.read_text(), re.MULTILINE)
    return {path: int(count) for path, count in rows}


@pytest.fixture(scope="module")
def instruct() -> dict[str, list[dict]]:
    """Every instruction file's records, keyed by its path under the sample data directory."""
    return {
        "instruct/medinstruct_alpaca.jsonl": read_jsonl("instruct/medinstruct_alpaca.jsonl"),
        "instruct/clinical_chat.jsonl": read_jsonl("instruct/clinical_chat.jsonl"),
        "instruct/qa_pairs.parquet": read_parquet("instruct/qa_pairs.parquet"),
        "instruct/heldout/medinstruct_alpaca.jsonl": read_jsonl("instruct/heldout/medinstruct_alpaca.jsonl"),
        "instruct/heldout/clinical_chat.jsonl": read_jsonl("instruct/heldout/clinical_chat.jsonl"),
    }


def alpaca_records(instruct) -> list[dict]:
    return (
        instruct["instruct/medinstruct_alpaca.jsonl"] + instruct["instruct/heldout/medinstruct_alpaca.jsonl"]
    )


def chat_records(instruct) -> list[dict]:
    return instruct["instruct/clinical_chat.jsonl"] + instruct["instruct/heldout/clinical_chat.jsonl"]


def all_instruct_texts(instruct) -> list[str]:
    texts = [record[field] for record in alpaca_records(instruct) for field in sorted(ALPACA_FIELDS)]
    texts += [message["content"] for record in chat_records(instruct) for message in record["messages"]]
    texts += [record[column] for record in instruct["instruct/qa_pairs.parquet"] for column in QA_COLUMNS]
    return texts


def test_instruct_record_counts_match_readme(instruct):
    documented = readme_instruct_counts()
    assert set(documented) == set(instruct), f"README instruct table rows: {sorted(documented)}"
    for path, records in instruct.items():
        assert len(records) == documented[path], path
    assert len(instruct["instruct/medinstruct_alpaca.jsonl"]) >= 300
    assert len(instruct["instruct/clinical_chat.jsonl"]) >= 100
    total = sum((SAMPLE_DATA_DIR / path).stat().st_size for path in instruct)
    assert total <= INSTRUCT_MAX_BYTES, f"instruct/ is {total} bytes; the limit is {INSTRUCT_MAX_BYTES}"


def test_instruct_record_shapes(instruct):
    for record in alpaca_records(instruct):
        assert set(record) == ALPACA_FIELDS
        assert all(isinstance(value, str) for value in record.values())
        assert record["instruction"].strip() and record["output"].strip()
    assert any(record["input"] == "" for record in alpaca_records(instruct)), "some alpaca inputs are empty"
    # Different column names from alpaca on purpose; plain strings, and no pandas metadata in the schema.
    schema = pq.read_schema(sample_path("instruct", "qa_pairs.parquet"))
    assert schema.names == QA_COLUMNS
    assert all(field.type == pa.string() for field in schema)
    assert b"pandas" not in (schema.metadata or {})
    for record in instruct["instruct/qa_pairs.parquet"]:
        assert record["question"].strip() and record["answer"].strip()
    assert any(record["context"] == "" for record in instruct["instruct/qa_pairs.parquet"])


def test_chat_roles_alternate_and_end_with_the_assistant(instruct):
    for record in chat_records(instruct):
        assert set(record) == {"messages"}
        roles = [message["role"] for message in record["messages"]]
        turns = roles[1:] if roles[0] == "system" else roles
        assert turns and len(turns) % 2 == 0, roles
        assert turns == ["user", "assistant"] * (len(turns) // 2), roles
        for message in record["messages"]:
            assert set(message) == {"role", "content"}
            assert isinstance(message["content"], str) and message["content"].strip()
    train = instruct["instruct/clinical_chat.jsonl"]
    with_system = sum(record["messages"][0]["role"] == "system" for record in train)
    assert 0 < with_system < len(train), "some conversations have a system message and some do not"
    multi_turn = [r for r in train if sum(m["role"] == "user" for m in r["messages"]) > 1]
    assert 0.2 <= len(multi_turn) / len(train) <= 0.45
    assert max(sum(m["role"] == "user" for m in r["messages"]) for r in multi_turn) == 3


def test_instruct_heldout_records_are_not_in_train(instruct):
    def alpaca_key(record: dict) -> tuple[str, str]:
        return record["instruction"], record["input"]

    def first_user_message(record: dict) -> str:
        return next(m["content"] for m in record["messages"] if m["role"] == "user")

    for path, key in (
        ("medinstruct_alpaca.jsonl", alpaca_key),
        ("clinical_chat.jsonl", first_user_message),
    ):
        train = [key(record) for record in instruct[f"instruct/{path}"]]
        heldout = [key(record) for record in instruct[f"instruct/heldout/{path}"]]
        assert len(set(train)) == len(train), f"{path}: duplicate prompts in train"
        assert len(set(heldout)) == len(heldout), f"{path}: duplicate prompts in held-out"
        leaked = set(train) & set(heldout)
        assert not leaked, f"{path}: held-out prompts also in train: {sorted(leaked)[:2]}"
    qa_prompts = [(r["question"], r["context"]) for r in instruct["instruct/qa_pairs.parquet"]]
    assert len(set(qa_prompts)) == len(qa_prompts)


def test_instruct_answers_are_mostly_short_with_a_few_long_ones(instruct):
    words = [len(record["output"].split()) for record in instruct["instruct/medinstruct_alpaca.jsonl"]]
    assert 5 <= statistics.median(words) <= 60
    assert sum(5 <= count <= 60 for count in words) >= 0.8 * len(words)
    assert 3 <= sum(count >= 150 for count in words) <= 0.05 * len(words), "a few long write-ups"
    assert max(words) <= 300
    replies = [
        m["content"] for r in chat_records(instruct) for m in r["messages"] if m["role"] == "assistant"
    ]
    assert max(len(reply.split()) for reply in replies) <= 300


def test_instruct_answers_follow_from_their_prompts(instruct):
    """The checkable tasks: NER lists, relation triples and multiple-choice letters come from the prompt."""
    checked = {"ner": 0, "relation": 0, "choice": 0}
    for record in alpaca_records(instruct):
        prompt, output = record["input"], record["output"]
        for line in output.splitlines():
            if line.startswith(("Drugs: ", "Diseases: ")):
                entities = line.split(": ", 1)[1].split(", ")
                assert all(entity in prompt for entity in entities), (prompt, line)
                assert entities == sorted(entities, key=prompt.index), f"not in order of mention: {line}"
                checked["ner"] += 1
        for drug, disease in re.findall(r"\(([^,()]+), treats, ([^()]+)\)", output):
            assert drug in prompt and disease in prompt and f"{drug} was stopped" not in prompt
            checked["relation"] += 1
        choice = re.match(r"([ABCD])\. (.+?)(?:,|\. )", output)
        if "\nA. " in prompt and choice:
            letter, option = choice.groups()
            assert f"\n{letter}. {option}\n" in prompt + "\n", (prompt, output)
            checked["choice"] += 1
    assert all(count >= 20 for count in checked.values()), checked


def test_instruct_text_has_no_real_identifiers_and_suits_the_tokenizer(instruct, tokenizer):
    texts = all_instruct_texts(instruct)
    for text in texts:
        for kind, pattern in REAL_IDENTIFIER_PATTERNS.items():
            match = pattern.search(text)
            assert match is None, f"{kind}-like string {match.group(0)!r} in synthetic instruction data"
    # Built from the pretraining vocabularies, so the tokenizer (never trained on this text) still covers it:
    # byte-fallback pieces are rare (newlines and "?" are most of them) and every text round-trips.
    ids = tokenizer([t for t in texts if t], add_special_tokens=False).input_ids
    byte_pieces = sum(3 <= i < 3 + 256 for seq in ids for i in seq)
    assert byte_pieces <= 0.05 * sum(len(seq) for seq in ids)
    for text, decoded in zip([t for t in texts if t][::25], tokenizer.batch_decode(ids[::25]), strict=True):
        assert decoded == text


def test_instruct_generator_reproduces_the_shipped_files(tmp_path):
    """Only the instruction builder runs (no tokenizer training): it is seeded on its own, so its output must
    equal the shipped files byte for byte. The parquet footer names the pyarrow version that wrote it, so
    with another pyarrow version the parquet file is compared by content instead."""
    spec = importlib.util.spec_from_file_location("make_sample_data", GENERATOR)
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    generator.build_instruct(tmp_path)
    shipped_dir = SAMPLE_DATA_DIR / "instruct"
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    shipped = sorted(p.relative_to(SAMPLE_DATA_DIR).as_posix() for p in shipped_dir.rglob("*") if p.is_file())
    assert written == shipped
    for path in written:
        new, old = tmp_path / path, SAMPLE_DATA_DIR / path
        if path.endswith(".parquet"):
            same_writer = pq.ParquetFile(new).metadata.created_by == pq.ParquetFile(old).metadata.created_by
            if not same_writer:
                assert pq.read_table(new).equals(pq.read_table(old)), path
                continue
        assert new.read_bytes() == old.read_bytes(), f"{path} differs; re-run tools/make_sample_data.py"
