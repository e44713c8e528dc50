"""Readers and cleaners on small files built in tmp_path: every format, skips, selection, errors."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from mellama_train.data import files, pubmed_xml, readers
from mellama_train.data.cleaners import get_cleaner, mimic_deid
from mellama_train.data.files import DataFileError, ReadOptions, Skip, detect_format
from mellama_train.data.readers import count_records, iter_records, iter_texts
from mellama_train.data.selection import expand_paths

SENTINEL = "PATIENT-SECRET-4711"
DOCS = ["first doc", "second doc", "third doc", "fourth doc", "fifth doc"]


def read(path, text_field=None, **kwargs) -> list:
    return list(iter_texts(str(path), text_field, **kwargs))


def as_records(texts: list[str]) -> list:
    return list(enumerate(texts))


def write_jsonl(path, lines: list[str]) -> str:
    data = ("\n".join(lines) + "\n").encode()
    if str(path).endswith(".gz"):
        data = gzip.compress(data)
    elif str(path).endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return str(path)


# --- jsonl -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.gz", "a.jsonl.zst", "a.ndjson"])
def test_jsonl_plain_and_compressed_give_the_same_records(tmp_path, name):
    path = write_jsonl(tmp_path / name, [json.dumps({"text": doc, "id": i}) for i, doc in enumerate(DOCS)])
    assert read(path) == as_records(DOCS)
    assert count_records(path) == len(DOCS)


def test_jsonl_skips_are_counted_located_and_content_free(tmp_path):
    lines = [
        json.dumps({"text": "ok 0"}),
        "",  # blank lines are not records but still count as lines for the location
        '{"text": "' + SENTINEL + '", broken',
        json.dumps({"body": SENTINEL}),
        json.dumps({"text": 42}),
        json.dumps({"text": "  \n "}),
        json.dumps([SENTINEL]),
        json.dumps({"text": "ok 6"}),
    ]
    path = write_jsonl(tmp_path / "a.jsonl", lines)
    records = read(path)
    assert [index for index, _ in records] == list(range(7))
    assert records[0] == (0, "ok 0") and records[6] == (6, "ok 6")
    assert [rec for _, rec in records[1:6]] == [
        Skip("bad_json", f"{path}:line 3"),
        Skip("missing_field", f"{path}:line 4"),
        Skip("not_text", f"{path}:line 5"),
        Skip("empty", f"{path}:line 6"),
        Skip("bad_json", f"{path}:line 7"),
    ]
    assert all(SENTINEL not in rec.where for _, rec in records[1:6])
    assert count_records(path) == 7


def test_invalid_utf8_is_a_located_skip_in_jsonl_and_text_files(tmp_path):
    good = json.dumps({"text": "caf\u00e9 ok"}).encode()
    bad = b'{"text": "' + SENTINEL.encode() + b' \xff\xfe broken"}'
    path = tmp_path / "a.jsonl"
    path.write_bytes(good + b"\n" + bad + b"\n" + good + b"\n")
    assert read(path) == [(0, "caf\u00e9 ok"), (1, Skip("bad_utf8", f"{path}:line 2")), (2, "caf\u00e9 ok")]
    report = tmp_path / "report.txt"
    report.write_bytes(b"FINDINGS: \xc3\x28 " + SENTINEL.encode())
    assert read(report) == [(0, Skip("bad_utf8", str(report)))]
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfIMPRESSION: clear.")
    assert read(tmp_path / "bom.txt") == [(0, "IMPRESSION: clear.")]


def test_jsonl_text_field_and_want_start_select_exact_indices(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [json.dumps({"body": doc}) for doc in DOCS])
    assert read(path, "body", want=lambda i: i % 2 == 1) == [(1, DOCS[1]), (3, DOCS[3])]
    assert read(path, "body", start=3) == [(3, DOCS[3]), (4, DOCS[4])]
    assert read(path, "body", want=lambda i: i != 3, start=2) == [(2, DOCS[2]), (4, DOCS[4])]


def test_jsonl_unwanted_lines_are_not_decoded(tmp_path, monkeypatch):
    lines = [json.dumps({"text": doc}) for doc in DOCS]
    lines[1] = "not json " + SENTINEL
    path = write_jsonl(tmp_path / "a.jsonl", lines)
    decoded = []
    real_loads = json.loads
    monkeypatch.setattr(readers.json, "loads", lambda s, *a, **k: decoded.append(s) or real_loads(s, *a, **k))
    # The bad line 1 is not wanted, so it neither produces a Skip nor gets decoded.
    assert read(path, want=lambda i: i in (0, 4)) == [(0, DOCS[0]), (4, DOCS[4])]
    assert len(decoded) == 2


def test_json_array_file_is_read_item_by_item(tmp_path):
    path = tmp_path / "docs.json"
    path.write_text(json.dumps([{"text": doc} for doc in DOCS[:2]] + [7, {"text": DOCS[2]}]))
    assert read(path) == [(0, DOCS[0]), (1, DOCS[1]), (2, Skip("bad_json", f"{path}:item 3")), (3, DOCS[2])]
    assert count_records(str(path)) == 4


def test_broken_json_array_names_the_file_and_the_fix(tmp_path):
    path = tmp_path / "docs.json"
    path.write_text('[{"text": "a"}, ')
    with pytest.raises(DataFileError, match=r"docs\.json: invalid JSON array.*convert it to JSONL"):
        read(path)


@pytest.mark.parametrize("chunk", [2, 3, 7, 64])
def test_a_json_array_is_decoded_item_by_item_whatever_the_read_boundaries(tmp_path, monkeypatch, chunk):
    items = [
        {"text": 'caf\u00e9 "quoted" \\ back', "n": [1, 2.5e3, None, True]},
        12345678,  # a bare number that a read boundary cuts in two must not become two items
        {"text": "line\nbreak", "nested": {"a": [{"b": "}]"}]}},
        {"text": DOCS[0]},
    ]
    path = tmp_path / "a.json.gz"
    path.write_bytes(
        gzip.compress(
            (" [\n " + " ,\n\t".join(json.dumps(i, ensure_ascii=False) for i in items) + " ]\n").encode()
        )
    )
    monkeypatch.setattr(readers, "_CHUNK", chunk)  # every item spans several reads
    got = list(iter_records(str(path)))
    assert got == [(0, items[0]), (1, Skip("bad_json", f"{path}:item 2")), (2, items[2]), (3, items[3])]
    assert count_records(str(path)) == 4


def test_json_array_items_over_the_size_limit_are_located_skips(tmp_path):
    from mellama_train.data.files import ReadOptions

    path = tmp_path / "alpaca_data.json"
    path.write_text(
        json.dumps([{"text": "x" * 500}, {"text": DOCS[0]}, {"text": "y" * 500}, {"text": DOCS[1]}])
    )
    got = read(path, options=ReadOptions(max_record_bytes=300))  # the file: 1075 bytes, under 4 x 300
    assert got == [
        (0, Skip("too_large", f"{path}:item 1")),
        (1, DOCS[0]),
        (2, Skip("too_large", f"{path}:item 3")),
        (3, DOCS[1]),
    ]


@pytest.mark.parametrize("name", ["big.json", "big.json.gz"])
def test_a_json_array_over_its_limit_is_refused_at_start_up_with_the_command_to_convert_it(tmp_path, name):
    from mellama_train.data.readers import check_unit

    path = tmp_path / name
    data = json.dumps([{"text": f"note {i}"} for i in range(100)]).encode()  # 1890 bytes of JSON text
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    assert check_unit(str(path), None, max_record_bytes=1000) is None  # 4 x 1000 bytes: fits
    problem = check_unit(str(path), None, max_record_bytes=400)  # 1600: does not
    convert = f"zcat {path} | jq -c '.[]'" if name.endswith(".gz") else f"jq -c '.[]' {path}"
    assert problem.startswith(
        f"{path}: a JSON array of more than 1600 bytes (4 x data.max_record_bytes) is not read, as it cannot be"
        f" streamed; convert it to JSONL, which is read as a stream: {convert} > {tmp_path / 'big.jsonl'} (or"
        " python -c "
    )
    assert "\n" not in problem


def test_a_json_array_malformed_or_too_deep_past_its_first_records_is_named_at_start_up(tmp_path):
    from mellama_train.data.readers import check_unit

    good = ", ".join(json.dumps({"text": f"note {i}"}) for i in range(30))
    malformed, deep = tmp_path / "malformed.json", tmp_path / "deep.json"
    malformed.write_text(f'[{good}, {{"text": oops}}]')
    deep.write_text(f'[{good}, {{"text": ' + "[" * 100_000 + "]" * 100_000 + "}]")
    assert check_unit(str(malformed), None).startswith(
        f"{malformed}: invalid JSON array (malformed JSON at item 31); fix the file or convert it to JSONL"
    )
    assert check_unit(str(deep), None).startswith(
        f"{deep}: invalid JSON array (JSON nested too deeply at item 31); fix the file or convert it to JSONL"
    )
    # Met in a run (the file changed after start-up): the items before it, then a counted skip of the rest.
    from mellama_train.config import SourceConfig
    from mellama_train.data.source import Exhausted, SourceStream

    stream = SourceStream(SourceConfig(name="s", paths=[str(malformed)]), len, 0, 1, 0, passes=1)
    with pytest.raises(Exhausted):
        while True:
            stream.next_item()
    assert stream.state.documents == 30 and stream.state.skipped == {"unreadable_remainder": 1}
    assert stream.state.first_skip.startswith(f"{malformed}:record 31 (malformed JSON at item 31)")


def test_record_mode_yields_whole_records_for_every_tabular_format(tmp_path):
    rows = [{"instruction": "q1", "output": "a1"}, {"instruction": "q2", "output": "a2"}]
    jsonl = write_jsonl(tmp_path / "r.jsonl", [json.dumps(r) for r in rows])
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "r.parquet")
    (tmp_path / "r.csv").write_text("instruction,output\nq1,a1\nq2,a2\n")
    for path in (jsonl, tmp_path / "r.parquet", tmp_path / "r.csv"):
        assert list(iter_records(str(path), want=lambda i: i == 1)) == [(1, rows[1])], path


def test_record_mode_rejects_plain_text_units(tmp_path):
    (tmp_path / "note.txt").write_text("hello")
    with pytest.raises(DataFileError, match=r"note\.txt: a text file holds plain text.*jsonl"):
        list(iter_records(str(tmp_path / "note.txt")))


# --- csv ---------------------------------------------------------------------------------------------------


def write_csv(path, header: list[str], rows: list[list[str]]) -> str:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def test_csv_gz_with_long_multiline_field_and_row_skips(tmp_path):
    long_note = "Discharge summary.\n" + "x" * 200_000  # past csv's 131072 default field limit
    rows = [["1", long_note], ["2", ""], ["3", 'short, quoted "note"']]
    path = write_csv(tmp_path / "discharge.csv.gz", ["note_id", "text"], rows)
    assert read(path) == [(0, long_note), (1, Skip("empty", f"{path}:row 2")), (2, rows[2][1])]
    assert read(path, start=2) == [(2, rows[2][1])]
    assert count_records(path) == 3


def test_csv_missing_column_names_column_file_and_columns(tmp_path):
    path = write_csv(tmp_path / "notes.csv", ["note_id", "note"], [["1", "a"]])
    with pytest.raises(DataFileError, match=r"notes\.csv: no column 'text' \(columns: note_id, note\)"):
        read(path)
    assert read(path, "note") == [(0, "a")]


# --- parquet -----------------------------------------------------------------------------------------------


def test_parquet_across_row_groups_with_nulls_and_selection(tmp_path):
    texts = [f"doc {i}" for i in range(2500)]
    texts[1500] = None
    path = str(tmp_path / "a.parquet")
    pq.write_table(pa.table({"id": list(range(2500)), "text": texts}), path, row_group_size=1000)
    records = read(path)
    assert [i for i, _ in records] == list(range(2500))
    assert records[1500] == (1500, Skip("missing_field", f"{path}:row 1501"))
    assert records[2499] == (2499, "doc 2499")
    assert read(path, want=lambda i: i % 1000 == 7, start=1000) == [(1007, "doc 1007"), (2007, "doc 2007")]
    assert read(path, "id", start=2498) == [(2498, Skip("not_text", f"{path}:row 2499"))] + [
        (2499, Skip("not_text", f"{path}:row 2500"))
    ]
    assert count_records(path) == 2500
    with pytest.raises(DataFileError, match=r"a\.parquet: no column 'body' \(columns: id, text\)"):
        read(path, "body")


# --- text --------------------------------------------------------------------------------------------------


def test_directory_of_text_files_is_one_record_per_file_sorted(tmp_path):
    reports = tmp_path / "cxr"
    (reports / "p10").mkdir(parents=True)
    (reports / "p10" / "s2.txt").write_text("FINDINGS: clear lungs.\n")
    (reports / "p10" / "s1.txt").write_text("IMPRESSION: no acute process.\n")
    (reports / "s0.txt.gz").write_bytes(gzip.compress(b"gzipped report"))
    (reports / "empty.txt").write_text("  \n")
    (reports / ".hidden.txt").write_text("ignored")
    (reports / "notes.pdf").write_text("ignored")
    units = expand_paths([str(reports)], "cxr")
    names = [os.path.relpath(unit, reports) for unit in units]
    assert names == ["empty.txt", "p10/s1.txt", "p10/s2.txt", "s0.txt.gz"]
    assert read(units[0]) == [(0, Skip("empty", units[0]))]
    assert [read(unit) for unit in units[1:]] == [
        [(0, "IMPRESSION: no acute process.\n")],
        [(0, "FINDINGS: clear lungs.\n")],
        [(0, "gzipped report")],
    ]
    assert read(units[1], start=1) == []
    assert count_records(units[1]) == 1


# --- hf_dataset --------------------------------------------------------------------------------------------


def test_save_to_disk_dir_is_one_unit_and_is_read(tmp_path):
    datasets = pytest.importorskip("datasets")
    texts = [f"note {i}" for i in range(2100)]
    datasets.Dataset.from_dict({"text": texts, "n": list(range(2100))}).save_to_disk(
        tmp_path / "hf" / "notes"
    )
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": ["v"]})}).save_to_disk(
        tmp_path / "hf" / "dd"
    )
    write_jsonl(tmp_path / "hf" / "extra.jsonl", [json.dumps({"text": "x"})])
    units = expand_paths([str(tmp_path / "hf")], "hf")
    assert units == sorted(
        [str(tmp_path / "hf" / "dd"), str(tmp_path / "hf" / "extra.jsonl"), str(tmp_path / "hf" / "notes")]
    )
    # A recursive glob reaches the dataset's own state.json / .arrow files; they must not become units.
    assert expand_paths([str(tmp_path / "hf" / "**")], "hf") == units
    notes = str(tmp_path / "hf" / "notes")
    assert detect_format(notes) == "hf_dataset"
    assert read(notes) == as_records(texts)
    assert read(notes, want=lambda i: i % 1000 == 1, start=5) == [(1001, "note 1001"), (2001, "note 2001")]
    assert count_records(notes) == 2100
    with pytest.raises(DataFileError, match=r"notes: no column 'body' \(columns: text, n\)"):
        read(notes, "body")
    with pytest.raises(DataFileError, match=r"no 'train' split \(splits: validation\)"):
        read(tmp_path / "hf" / "dd")


@pytest.mark.parametrize(
    "name, content",
    [
        ("state.json", '{"_data_files": ' + "[" * 100_000 + "]" * 100_000 + "}"),  # past the parser's depth
        ("state.json", '{"_data_files": '),  # not JSON
        ("state.json", "[]"),  # JSON of the wrong shape
        ("dataset_info.json", '{"features": ' + "[" * 100_000 + "]" * 100_000 + "}"),
    ],
    ids=["state_too_deep", "state_not_json", "state_wrong_shape", "info_too_deep"],
)
def test_save_to_disk_metadata_that_cannot_be_read_is_one_line_at_start_up_and_a_skip_mid_run(
    tmp_path, name, content
):
    from mellama_train.config import SourceConfig
    from mellama_train.data.readers import check_unit
    from mellama_train.data.source import SourceStream

    datasets = pytest.importorskip("datasets")
    notes = tmp_path / "notes"
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(notes)
    stream = SourceStream(SourceConfig(name="s", paths=[str(notes)]), len, 0, 1, 0)
    (notes / name).write_text(content)  # damaged after start-up: the file list is already known
    problem = check_unit(str(notes), None)
    assert problem.startswith(
        f"{notes}: its save_to_disk metadata (state.json, dataset_info.json) cannot be read ("
    )
    assert problem.endswith("); save the dataset again with save_to_disk") and "\n" not in problem
    with pytest.raises(ValueError, match="found no usable document"):  # every record is unreadable: counted
        stream.next_item()
    assert stream.state.skipped == {"unreadable_remainder": 2}  # (once per epoch: two epochs tried)


# --- pubmed_xml --------------------------------------------------------------------------------------------

PUBMED_XML = """<?xml version="1.0" encoding="utf-8"?>
<!DOCTYPE PubmedArticleSet PUBLIC "-//NLM//DTD PubMedArticle, 1st January 2025//EN"
  "https://dtd.nlm.nih.gov/ncbi/pubmed/out/pubmed_250101.dtd">
<PubmedArticleSet>
<PubmedArticle><MedlineCitation><PMID>1</PMID><Article>
  <ArticleTitle>Aspirin and <i>H. pylori</i> infection.</ArticleTitle>
  <Abstract>
    <AbstractText Label="BACKGROUND" NlmCategory="BACKGROUND">Why we looked.</AbstractText>
    <AbstractText Label="RESULTS">CO<sub>2</sub> rose.</AbstractText>
  </Abstract>
</Article></MedlineCitation></PubmedArticle>
<PubmedArticle><MedlineCitation><PMID>2</PMID><Article>
  <ArticleTitle>Title only.</ArticleTitle>
</Article></MedlineCitation></PubmedArticle>
<DeleteCitation><PMID>9</PMID></DeleteCitation>
<PubmedArticle><MedlineCitation><PMID>3</PMID><Article><ArticleTitle/></Article></MedlineCitation></PubmedArticle>
<PubmedArticle><MedlineCitation><PMID>4</PMID><Article>
  <ArticleTitle>Plain abstract.</ArticleTitle><Abstract><AbstractText>One part.</AbstractText></Abstract>
</Article></MedlineCitation></PubmedArticle>
</PubmedArticleSet>
"""


def test_pubmed_xml_gz_titles_labelled_abstracts_and_empty_skip(tmp_path):
    path = tmp_path / "pubmed25n0001.xml.gz"
    path.write_bytes(gzip.compress(PUBMED_XML.encode()))
    path = str(path)
    assert detect_format(path) == "pubmed_xml"
    assert read(path, "ignored") == [
        (0, "Aspirin and H. pylori infection.\n\nBACKGROUND: Why we looked.\nRESULTS: CO_2 rose."),
        (1, "Title only."),
        (2, Skip("empty", f"{path}:article 3")),
        (3, "Plain abstract.\n\nOne part."),
    ]
    assert read(path, want=lambda i: i == 3) == [(3, "Plain abstract.\n\nOne part.")]
    assert count_records(path) == 4


PUBMED_AS_SHIPPED = """<?xml version="1.0" ?>
<!DOCTYPE PubmedArticleSet PUBLIC "-//NLM//DTD PubMedArticle, 1st January 2025//EN"
  "https://dtd.nlm.nih.gov/ncbi/pubmed/out/pubmed_250101.dtd">
<PubmedArticleSet>
<PubmedArticle><MedlineCitation Status="MEDLINE" Owner="NLM"><PMID Version="1">101</PMID><Article>
  <ArticleTitle>Counts of 10<sup>6</sup> CFU and <sup>14</sup>C in Na<sup>+</sup> at 10<sup>-3</sup> M.</ArticleTitle>
  <Abstract><AbstractText Label="METHODS">IC<sub>50</sub> of x<sup>a b</sup>.</AbstractText></Abstract>
  </Article>
  <CommentsCorrectionsList><CommentsCorrections RefType="Cites"><PMID Version="1">999</PMID>
  </CommentsCorrections></CommentsCorrectionsList>
</MedlineCitation></PubmedArticle>
<PubmedArticle><MedlineCitation><PMID Version="1">102</PMID><Article>
  <ArticleTitle>[Not Available].</ArticleTitle>
  <Abstract><AbstractText>Only an abstract.</AbstractText></Abstract>
</Article></MedlineCitation></PubmedArticle>
<PubmedArticle><MedlineCitation><PMID Version="1">103</PMID><Article>
  <ArticleTitle>[Not Available].</ArticleTitle>
</Article></MedlineCitation></PubmedArticle>
<PubmedArticle><MedlineCitation><PMID Version="2">104</PMID><Article>
  <ArticleTitle>[Effect of a drug on sleep].</ArticleTitle>
</Article></MedlineCitation></PubmedArticle>
<PubmedBookArticle><BookDocument><PMID Version="1">105</PMID>
  <Book><BookTitle book="nbk">Clinical Methods</BookTitle></Book>
  <ArticleTitle book="nbk" part="ch1">Chapter on pulse</ArticleTitle>
  <Abstract><AbstractText>A chapter abstract.</AbstractText></Abstract>
</BookDocument></PubmedBookArticle>
<PubmedBookArticle><BookDocument><PMID Version="1">106</PMID>
  <Book><BookTitle book="nbk">A whole book</BookTitle></Book>
</BookDocument></PubmedBookArticle>
<DeleteCitation><PMID Version="1">7</PMID><PMID Version="1">8</PMID></DeleteCitation>
</PubmedArticleSet>
"""


def test_pubmed_as_shipped_books_scripts_placeholders_and_require_abstract(tmp_path):
    path = tmp_path / "pubmed25n1300.xml"
    path.write_text(PUBMED_AS_SHIPPED)
    first = "Counts of 10^6 CFU and ^{14}C in Na^+ at 10^-3 M.\n\nMETHODS: IC_50 of x^{a b}."
    assert read(path) == [
        (0, first),
        (1, "Only an abstract."),  # NLM's title placeholder is never trained as text
        (2, Skip("not_available", f"{path}:article 3")),
        (3, "[Effect of a drug on sleep]."),  # a translated title keeps its brackets
        (4, "Chapter on pulse\n\nA chapter abstract."),  # PubmedBookArticle: the chapter title
        (5, "A whole book"),  # a book without a chapter: its BookTitle
    ]
    required = read(path, options=ReadOptions(require_abstract=True))
    assert [value for _, value in required] == [
        first,
        "Only an abstract.",
        Skip("no_abstract", f"{path}:article 3"),
        Skip("no_abstract", f"{path}:article 4"),
        "Chapter on pulse\n\nA chapter abstract.",
        Skip("no_abstract", f"{path}:article 6"),
    ]
    deleted: list[int] = []
    records = list(pubmed_xml.pubmed_records(str(path), files._options(None), deleted))
    assert [r.pmid for r in records] == [101, 102, 103, 104, 105, 106]  # never a cited PMID (999)
    assert [r.book for r in records] == [False] * 4 + [True] * 2
    assert deleted == [7, 8]
    assert count_records(str(path)) == 6
    jsonl = write_jsonl(tmp_path / "a.jsonl", ['{"text": "x"}'])
    with pytest.raises(DataFileError, match=r"a\.jsonl: require_abstract applies to PubMed XML only.*drop"):
        read(jsonl, options=ReadOptions(require_abstract=True))
    with pytest.raises(DataFileError, match=r"pubmed25n1300\.xml: a pubmed_xml file has no fields for the"):
        read(path, options=ReadOptions(where={"note_type": frozenset({"DS"})}))


@pytest.mark.parametrize(
    ("xml", "rendered"),
    [
        ("10<sup>6</sup>", "10^6"),
        ("10<sup>6</sup>5", "10^{6}5"),  # runs into a digit: braced
        ("CO<sub>2</sub>.", "CO_2."),
        ("m<sup>2</sup>/s", "m^2/s"),
        ("x<sup></sup>y", "xy"),  # an empty script is nothing
        ("a<sup>b<sub>c</sub></sup>", "a^{b_c}"),  # nested: innermost first
        ("H<sub><i>2</i></sub>O", "H_{2}O"),
        ("x<sup>2</sup><sup>3</sup>", "x^{2}^3"),  # adjacent scripts: braced, never x^2^3
        ("x<sup>a}b</sup>", "x^{a)b}"),  # braces inside cannot close the script early
        ("a<sup> </sup>b", "a b"),  # a blank script keeps its space
    ],
)
def test_pubmed_superscripts_and_subscripts_render_unambiguously(tmp_path, xml, rendered):
    path = tmp_path / "p.xml"
    path.write_text(
        "<PubmedArticleSet><PubmedArticle><MedlineCitation><PMID>1</PMID><Article>"
        f"<ArticleTitle>{xml}</ArticleTitle></Article></MedlineCitation></PubmedArticle></PubmedArticleSet>"
    )
    assert read(path) == [(0, rendered)]


def test_truncated_pubmed_xml_names_file_and_line(tmp_path):
    path = tmp_path / "pubmed25n0002.xml"
    path.write_text(PUBMED_XML[: PUBMED_XML.index("<PubmedArticle><MedlineCitation><PMID>2")] + "<Pubmed")
    with pytest.raises(DataFileError, match=r"pubmed25n0002\.xml: malformed XML at line \d+"):
        read(path)


# --- paths, formats and open errors ------------------------------------------------------------------------


def test_expand_paths_globs_dedupes_and_reports_empty_patterns(tmp_path):
    for name in ["b.jsonl", "a.jsonl", "sub/c.jsonl.zst", "sub/.d.jsonl", "readme.rst"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("{}\n")
    patterns = [str(tmp_path / "**" / "*.jsonl*"), str(tmp_path / "a.jsonl"), str(tmp_path / "*")]
    assert expand_paths(patterns, "rp") == [
        str(tmp_path / n) for n in ["a.jsonl", "b.jsonl", "sub/c.jsonl.zst"]
    ]
    missing = str(tmp_path / "nope" / "*.jsonl")
    expected = re.escape(f"data.sources[pubmed].paths: '{missing}' matched no files; check the path or glob")
    with pytest.raises(DataFileError, match=expected):
        expand_paths([str(tmp_path / "a.jsonl"), missing], "pubmed")


def test_detect_format_and_open_errors_name_the_file(tmp_path):
    assert [detect_format(n) for n in ["a.NDJSON.zstd", "x.csv.gz", "p.parquet", "r.md", "b.xml"]] == [
        "jsonl",
        "csv",
        "parquet",
        "text",
        "pubmed_xml",
    ]
    (tmp_path / "a.docx").write_text("x")
    with pytest.raises(DataFileError, match=r"a\.docx: unknown file type; accepted: \.jsonl"):
        detect_format(str(tmp_path / "a.docx"))
    with pytest.raises(DataFileError, match=r"gone\.jsonl: not found; check the path"):
        read(tmp_path / "gone.jsonl")
    (tmp_path / "bad.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00 then not gzip at all")
    with pytest.raises(DataFileError, match=r"bad\.jsonl\.gz: could not read .*truncated or corrupt"):
        count_records(str(tmp_path / "bad.jsonl.gz"))


def test_a_file_is_read_by_what_it_holds_when_its_name_says_otherwise_or_nothing(tmp_path):
    """Compression by the first bytes, not the suffix; a name without a known extension by its content; a
    source's `format` for what bytes cannot tell (CSV, plain text)."""
    records = b'{"text": "one"}\n{"text": "two"}\n'
    (tmp_path / "gzipped.jsonl").write_bytes(gzip.compress(records))  # saved without its .gz
    (tmp_path / "plain.jsonl.gz").write_bytes(records)  # a .gz that is not compressed
    (tmp_path / "shard-00001").write_bytes(zstandard.ZstdCompressor().compress(records))
    for name in ("gzipped.jsonl", "plain.jsonl.gz", "shard-00001"):
        assert [t for _, t in read(tmp_path / name)] == ["one", "two"], name
    assert detect_format(str(tmp_path / "shard-00001")) == "jsonl"
    (tmp_path / "articles.dat").write_text("<?xml version='1.0'?>\n<PubmedArticleSet>\n</PubmedArticleSet>\n")
    assert detect_format(str(tmp_path / "articles.dat")) == "pubmed_xml"
    pq.write_table(pa.table({"text": ["p"]}), tmp_path / "part-0")
    assert detect_format(str(tmp_path / "part-0")) == "parquet"
    (tmp_path / "notes.data").write_text("note_id,text\n1,hello\n")
    with pytest.raises(DataFileError, match=r"notes\.data: unknown file type; .*or set the source's format"):
        detect_format(str(tmp_path / "notes.data"))
    assert [t for _, t in read(tmp_path / "notes.data", options=ReadOptions(format="csv"))] == ["hello"]


# --- cleaners ----------------------------------------------------------------------------------------------


def test_mimic_deid_replaces_both_placeholder_styles():
    note = "Admitted [**2150-3-4**] to [**Hospital1 18**] by Dr. [**Last Name (NamePattern1) **].\nSeen by ___ on ____."
    assert mimic_deid(note) == "Admitted [deid] to [deid] by Dr. [deid].\nSeen by [deid] on [deid]."
    assert mimic_deid("keep a_b and __ and [* x *]") == "keep a_b and __ and [* x *]"


def test_get_cleaner_composes_in_order_and_rejects_unknown_names():
    clean = get_cleaner(["strip_control", "mimic_deid", "collapse_whitespace"])
    assert clean("  a\x00b \t [**Name**]\r\n\n\n\n c  ") == "ab [deid]\n\n c"
    assert get_cleaner([])("as is ") == "as is "
    with pytest.raises(
        ValueError, match="'nope'; known cleaners: collapse_whitespace, mimic_deid, strip_control"
    ):
        get_cleaner(["mimic_deid", "nope"])


# --- records over the size limit, multi-frame zstd ---------------------------------------------------------


def test_records_over_the_size_limit_are_located_skips_in_every_format(tmp_path):
    from mellama_train.data.files import ReadOptions

    small = ReadOptions(max_record_bytes=100)
    big = "x " * 200
    jsonl = write_jsonl(tmp_path / "a.jsonl", [json.dumps({"text": big}), json.dumps({"text": "ok"})])
    assert read(jsonl, options=small) == [(0, Skip("too_large", f"{jsonl}:line 1")), (1, "ok")]
    # A CSV record past the limit is read past up to the line where its quotes balance, and parsing goes on.
    csv_path = write_csv(tmp_path / "a.csv", ["id", "text"], [["1", 'a "quoted"\n' * 30], ["2", "next, row"]])
    assert read(csv_path, options=small) == [(0, Skip("too_large", f"{csv_path}:row 1")), (1, "next, row")]
    (tmp_path / "r.txt").write_text(big)
    assert read(tmp_path / "r.txt", options=small) == [(0, Skip("too_large", str(tmp_path / "r.txt")))]
    pq.write_table(pa.table({"text": [big, "ok"]}), tmp_path / "a.parquet")
    parquet = str(tmp_path / "a.parquet")
    assert read(parquet, options=small) == [(0, Skip("too_large", f"{parquet}:row 1")), (1, "ok")]
    xml = tmp_path / "big.xml"
    xml.write_text(PUBMED_XML.replace("Why we looked.", "Why we looked. " * 20))
    assert [r for _, r in read(xml, options=small)][:2] == [
        Skip("too_large", f"{xml}:article 1"),
        "Title only.",
    ]


def test_a_zstd_file_of_several_frames_is_read_through_all_of_them(tmp_path):
    frames = [zstandard.ZstdCompressor().compress(f'{{"text": "{doc}"}}\n'.encode()) for doc in DOCS]
    path = tmp_path / "multi.jsonl.zst"
    path.write_bytes(b"".join(frames))  # as pzstd writes, or shards concatenated with cat
    assert read(path) == as_records(DOCS)


# --- where: keep records by a field's value ------------------------------------------------------------------


def test_where_keeps_by_field_in_every_format_and_counts_the_rest(tmp_path):
    """MIMIC-IV-Note's note_type (DS discharge, AN addendum), RedPajama's meta.redpajama_set_name."""
    notes = tmp_path / "discharge.csv.gz"
    rows = [
        ["note_id", "note_type", "text"],
        ["1", "DS", "first"],
        ["2", "AN", "addendum"],
        ["3", "DS", "third"],
    ]
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    notes.write_bytes(gzip.compress(buffer.getvalue().encode()))
    ds = ReadOptions(where={"note_type": frozenset({"DS"})})
    assert read(notes, options=ds) == [
        (0, "first"),
        (1, Skip("not_selected", f"{notes}:row 2")),
        (2, "third"),
    ]
    assert [r for _, r in iter_records(str(notes), options=ds)][2] == {
        "note_id": "3",
        "note_type": "DS",
        "text": "third",
    }

    lines = [
        '{"text": "arxiv", "meta": {"redpajama_set_name": "RedPajamaArXiv"}}',
        '{"text": "book", "meta": {"redpajama_set_name": "RedPajamaBook"}}',
        '{"text": "no meta"}',
        '{"text": "flat", "meta.redpajama_set_name": "RedPajamaBook", "n": 3}',
    ]
    rp = write_jsonl(tmp_path / "rp.jsonl.zst", lines)
    books = ReadOptions(where={"meta.redpajama_set_name": frozenset({"RedPajamaBook"})})
    assert [v if isinstance(v, str) else v.reason for _, v in read(rp, options=books)] == [
        "not_selected",
        "book",
        "not_selected",  # no meta at all: not one of the kept values
        "flat",  # a key spelled with the dot is that key
    ]
    assert [v for _, v in read(rp, options=ReadOptions(where={"n": frozenset({"3"})}))][3] == "flat"
    # The Hugging Face copies of RedPajama hold meta as a JSON string: the dotted name reads into it too.
    hf = write_jsonl(
        tmp_path / "hf.jsonl",
        [json.dumps({"text": "s", "meta": json.dumps({"redpajama_set_name": "RedPajamaBook"})})],
    )
    assert [v for _, v in read(hf, options=books)] == ["s"]

    table = pa.table(
        {
            "text": ["a", "b", "c"],
            "meta": [{"redpajama_set_name": "RedPajamaBook"}, {"redpajama_set_name": "RedPajamaC4"}, None],
            "lang": ["en", "en", "de"],
        }
    )
    pq.write_table(table, tmp_path / "rp.parquet")
    both = ReadOptions(
        where={
            "meta.redpajama_set_name": frozenset({"RedPajamaBook", "RedPajamaC4"}),
            "lang": frozenset({"en"}),
        }
    )
    got = read(tmp_path / "rp.parquet", options=both)
    assert [v if isinstance(v, str) else v.reason for _, v in got] == ["a", "b", "not_selected"]
    with pytest.raises(DataFileError, match=r"rp\.parquet: no column 'note_type' for the source's where"):
        read(tmp_path / "rp.parquet", options=ds)
    with pytest.raises(
        DataFileError, match=r"discharge\.csv\.gz: no column 'meta\.x' for the source's where"
    ):
        read(notes, options=ReadOptions(where={"meta.x": frozenset({"1"})}))


def test_where_over_arrow_batches_where_no_row_is_kept_and_exceptions_cross_processes(tmp_path):
    import pickle

    table = pa.table({"text": ["a", "b", "c", "d"], "k": ["x", "x", "y", "x"]})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=2)
    keep_y = ReadOptions(where={"k": frozenset({"y"})})
    got = read(tmp_path / "t.parquet", "text", options=keep_y)
    assert [v if isinstance(v, str) else v.reason for _, v in got] == [
        "not_selected",
        "not_selected",
        "c",
        "not_selected",
    ]
    odd_rows = read(tmp_path / "t.parquet", "text", want=lambda i: i % 2 == 1, options=keep_y)  # rank 1 of 2
    assert [v.reason for _, v in odd_rows] == ["not_selected", "not_selected"]
    err = files.UnreadableFile("f.xml: malformed", "malformed XML", 3)
    back = pickle.loads(pickle.dumps(err))
    assert (str(back), back.cause, back.lost) == ("f.xml: malformed", "malformed XML", 3)
