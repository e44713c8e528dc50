"""PubMed baseline + update files read as NCBI means them (data/pubmed.py): the last version of each PMID,
deletions applied, the rest counted; the scan that finds them is checked against the reader's own parse."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest

from mellama_train.config import SourceConfig
from mellama_train.data import pubmed
from mellama_train.data.files import DataFileError
from mellama_train.data.source import Exhausted, SourceStream


def citation(pmid: int | str, title: str, book: bool = False) -> str:
    if book:
        return (
            f'<PubmedBookArticle><BookDocument><PMID Version="1">{pmid}</PMID><Book><BookTitle>{title}'
            "</BookTitle></Book></BookDocument></PubmedBookArticle>\n"
        )
    return (
        f'<PubmedArticle><MedlineCitation Status="MEDLINE"><PMID Version="1">{pmid}</PMID><Article>'
        f"<ArticleTitle>{title}</ArticleTitle></Article><CommentsCorrectionsList><CommentsCorrections>"
        '<PMID Version="1">777</PMID></CommentsCorrections></CommentsCorrectionsList></MedlineCitation>'
        "</PubmedArticle>\n"
    )


def xml_file(path: Path, body: str, deleted: list[int] = ()) -> Path:
    if deleted:
        body += (
            "<DeleteCitation>"
            + "".join(f'<PMID Version="1">{p}</PMID>' for p in deleted)
            + "</DeleteCitation>\n"
        )
    text = f'<?xml version="1.0" ?>\n<!DOCTYPE PubmedArticleSet>\n<PubmedArticleSet>\n{body}</PubmedArticleSet>\n'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(text.encode()) if path.suffix == ".gz" else text.encode())
    return path


@pytest.fixture
def download(tmp_path) -> Path:
    """A baseline of two files and two update files, as NCBI's FTP lays them out, with their sidecars."""
    root = tmp_path / "pubmed"
    xml_file(
        root / "baseline/pubmed25n0001.xml.gz", citation(1, "one") + citation(2, "two") + citation(3, "three")
    )
    xml_file(root / "baseline/pubmed25n0002.xml.gz", citation(4, "four old") + citation(5, "five old"))
    xml_file(
        root / "updatefiles/pubmed25n0010.xml.gz",
        citation(5, "five new")
        + citation(6, "six draft")
        + citation(6, "six final")
        + citation(7, "a book", True),
        deleted=[2, 99, 4],
    )
    xml_file(root / "updatefiles/pubmed25n0011.xml.gz", citation(4, "four back"))
    for name in ["baseline/README.txt", "baseline/pubmed25n0001.xml.gz.md5", "updatefiles/README.txt"]:
        (root / name).write_text("sidecar\n")
    return root


def trained(stream: SourceStream) -> list[str]:
    texts = []
    while True:
        try:
            texts.append(stream.next_item())
        except Exhausted:
            return texts


def test_later_versions_replace_earlier_ones_and_deletions_remove_them(download, tmp_path):
    src = SourceConfig(name="pubmed", paths=[str(download)])
    shards = [
        SourceStream(src, lambda text: text, rank, 2, 0, passes=1, index_dir=tmp_path / "index")
        for rank in (0, 1)
    ]
    texts = sorted(t for stream in shards for t in trained(stream))
    assert texts == sorted(["one", "three", "five new", "six final", "a book", "four back"])
    skipped = [stream.state.skipped for stream in shards]
    assert sum(s.get("superseded", 0) for s in skipped) == 3  # five old, six draft, four old
    assert sum(s.get("deleted", 0) for s in skipped) == 1  # two
    index = shards[0].pubmed
    assert [os.path.basename(f) for f in index.files] == [
        "pubmed25n0001.xml.gz",
        "pubmed25n0002.xml.gz",
        "pubmed25n0010.xml.gz",  # 10 after 2: numbers compare as numbers
        "pubmed25n0011.xml.gz",
    ]
    assert (index.citations, index.superseded, index.deleted, index.deletions_unmatched) == (10, 3, 1, 1)

    saved = pubmed.index_path(tmp_path / "index", "pubmed")
    again = pubmed.load(saved, shards[0].files)
    assert again is not None and again.by_file == index.by_file and again.describe() == index.describe()
    os.utime(index.files[0], ns=(1, 1))  # a file touched since: the saved index is not used
    assert pubmed.load(saved, shards[0].files) is None
    saved.write_bytes(b"PK\x03\x04 not an index")  # damaged on the shared disk: built again, never trusted
    assert pubmed.load(saved, shards[0].files) is None
    rebuilt = pubmed.prepare(shards[0].files, tmp_path / "index", "pubmed")
    assert rebuilt.by_file == index.by_file and pubmed.load(saved, shards[0].files) is not None


def test_the_saved_index_is_plain_arrays_loaded_without_pickle(download, tmp_path):
    files = [str(p) for p in sorted(download.rglob("*.xml.gz"))]
    pubmed.prepare(files, tmp_path, "pm")
    with np.load(pubmed.index_path(tmp_path, "pm"), allow_pickle=False) as saved:
        assert all(saved[name].dtype != object for name in saved.files)
    hostile = pubmed.index_path(tmp_path, "evil")
    np.savez(hostile, files=np.array([object()], dtype=object))
    assert pubmed.load(hostile, files) is None


@pytest.mark.parametrize(
    "trick",
    [
        citation("&#53;", "five old") + citation(8, "eight"),  # a character reference: parse reads 5
        citation(5, "five old")
        + "<?note <DeleteCitation><PMID>8</PMID></DeleteCitation> ?>"
        + citation(8, "eight"),
        citation(5, "five old") + "<!-- " + "x" * 70000 + " -->" + citation(8, "eight"),  # past any bound
        citation(5, "five old")
        + citation(8, "eight")
        + "<DeleteCitation><PMID><![CDATA[9]]></PMID></DeleteCitation>",
        '<PubmedArticle note="a>b"><MedlineCitation><PMID>5</PMID><Article><ArticleTitle>five old'
        "</ArticleTitle></Article></MedlineCitation></PubmedArticle>" + citation(8, "eight"),
    ],
)
def test_xml_the_fast_scan_could_misread_is_parsed_instead_and_trains_right(tmp_path, trick):
    citations, deleted, unsure = pubmed.scan_file(str(xml_file(tmp_path / "probe" / "p.xml", trick)))
    assert unsure
    """Anything that could make the byte scan and the XML parse disagree (comments, processing instructions,
    CDATA, character references, a `>` in an attribute) sends the file to the parser: exact, never silent."""
    xml_file(tmp_path / "pubmed25n0001.xml", trick)
    xml_file(tmp_path / "pubmed25n0002.xml", citation(5, "five new") + citation(9, "nine"))
    stream = SourceStream(
        SourceConfig(name="pm", paths=[str(tmp_path / "*.xml")]), lambda t: t, 0, 1, 0, passes=1
    )
    assert sorted(trained(stream)) == ["eight", "five new", "nine"]
    assert stream.state.skipped == {"superseded": 1}


def test_a_file_changed_after_the_index_was_built_stops_the_run_naming_it(tmp_path):
    first = xml_file(tmp_path / "pubmed25n0001.xml", citation(5, "five old") + citation(8, "eight"))
    xml_file(tmp_path / "pubmed25n0002.xml", citation(5, "five new"))
    stream = SourceStream(
        SourceConfig(name="pm", paths=[str(tmp_path / "*.xml")]), lambda t: t, 0, 1, 0, passes=1
    )
    xml_file(first, citation(5, "five old") + citation(8, "eight"), deleted=[3])  # a deletion added
    with pytest.raises(DataFileError, match=rf"{first}: its citations or deletions \(2 and 1\) differ"):
        trained(stream)


def test_a_damaged_update_file_counts_what_it_lost_as_bad_data(tmp_path):
    """Damage only the parser sees (an undefined entity): the earlier versions its later citations replace are
    not trained, and neither are they; the loss is counted as bad data (so it is limited), not as filtered."""
    xml_file(tmp_path / "pubmed25n0001.xml", citation(5, "five old") + citation(6, "six old"))
    update = xml_file(
        tmp_path / "pubmed25n0002.xml", citation(4, "four") + citation(5, "&bogus; five") + citation(6, "six")
    )
    stream = SourceStream(
        SourceConfig(name="pm", paths=[str(tmp_path / "*.xml")]), lambda t: t, 0, 1, 0, passes=1
    )
    assert sorted(trained(stream)) == ["four"]
    assert stream.state.skipped == {"superseded": 2, "unreadable_remainder": 2}
    # Damage the scan sees (bytes XML cannot hold) stops the run before it starts, naming the file.
    data = update.read_bytes()
    update.write_bytes(data.replace(b"&bogus; ", b"\x00<"))
    with pytest.raises(
        DataFileError, match=rf"{update}: malformed XML at line \d+, column \d+; .*re-download"
    ):
        SourceStream(SourceConfig(name="pm", paths=[str(tmp_path / "*.xml")]), lambda t: t, 0, 1, 0)


def test_odd_file_names_sort_and_a_tampered_index_is_rebuilt(download, tmp_path):
    assert pubmed._natural_key("a1²2.xml") < pubmed._natural_key("b.xml")
    assert sorted(["x1.xml2.xml", "x1.xml"], key=pubmed._natural_key) == ["x1.xml", "x1.xml2.xml"]
    files = [str(p) for p in download.rglob("*.xml.gz")]
    index = pubmed.prepare(files, tmp_path, "pm")
    saved = pubmed.index_path(tmp_path, "pm")
    with np.load(saved) as arrays:
        good = dict(arrays)
    tampered = [
        {"skips": good["skips"].astype(str)},
        {"citations": good["citations"].astype(float) / 2},
        {"digests": np.full_like(good["digests"], 0, dtype=float)},
        {"files": np.asarray("one name")},
        {"skips": good["skips"] * np.asarray([1, 1, 1, 10**6])},  # skip more than the file holds
        {"skips": good["skips"] * np.asarray([1, -1, 1, 1])},
    ]
    for change in tampered:
        np.savez(saved, **{**good, **change})
        assert pubmed.load(saved, files) is None, change
    assert pubmed.prepare(files, tmp_path, "pm").by_file == index.by_file  # rebuilt


def test_comments_and_cdata_never_make_records(tmp_path):
    body = (
        "<!-- <PubmedArticle><MedlineCitation><PMID>9</PMID> -->"
        + citation(1, "one <![CDATA[<PubmedArticle>]]>")
        + "<DeleteCitation/>"
        + citation(2, "two")
    )
    path = xml_file(tmp_path / "pubmed25n0001.xml", body)
    citations, deleted, unsure = pubmed.scan_file(str(path))
    assert unsure  # comments and CDATA: the file goes to the parser
    assert pubmed.file_events(str(path))[0].tolist() == [1, 2]
    stream = SourceStream(SourceConfig(name="pm", paths=[str(path)]), lambda t: t, 0, 1, 0, passes=1)
    assert trained(stream) == ["one <PubmedArticle>", "two"]


def test_the_scan_is_the_same_in_any_chunking_and_in_parallel_processes(download, monkeypatch):
    files = pubmed.ordered([str(p) for p in download.rglob("*") if p.is_file()])
    assert len(files) == 4  # the readmes and checksum files are not PubMed XML
    whole = [pubmed.scan_file(f) for f in files]
    assert not any(unsure for _, _, unsure in whole)  # NCBI's files are scanned, not parsed
    monkeypatch.setattr(pubmed, "_SCAN_CHUNK", 37)  # rounds that end inside tags and PMIDs
    monkeypatch.setattr(pubmed, "_TAIL", 60)
    small = [pubmed.scan_file(f) for f in files]
    assert all((a[0] == b[0]).all() and (a[1] == b[1]).all() and a[2] == b[2] for a, b in zip(whole, small))
    monkeypatch.undo()
    monkeypatch.setattr(pubmed, "_PARALLEL_BYTES", 0)
    assert pubmed.build_index(files, workers=2).by_file == pubmed.build_index(files, workers=1).by_file


def test_mathml_in_an_abstract_is_scanned_but_a_default_namespace_is_parsed(tmp_path):
    mathml = citation(
        5, 'x <mml:math xmlns:mml="http://www.w3.org/1998/Math/MathML"><mml:mi>y</mml:mi></mml:math>'
    )
    assert not pubmed.scan_file(str(xml_file(tmp_path / "a.xml", mathml)))[2]
    default = xml_file(tmp_path / "b.xml", citation(5, "x")).read_text()
    (tmp_path / "b.xml").write_text(default.replace("<PubmedArticleSet>", '<PubmedArticleSet xmlns="urn:x">'))
    assert pubmed.scan_file(str(tmp_path / "b.xml"))[2]
