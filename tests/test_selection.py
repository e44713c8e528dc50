"""What a source reads when pointed at a directory as distributors ship it (data/selection.py): the data files,
never the readmes, licences, checksum lists, `*_detail` tables or metadata tables beside them, and `--dry-run`
lists every file left out with its reason. Also: a recipe source with its own paths inherits none of the
profile's file-bound fields, and a profile's forgetting probe on a source the recipe dropped is turned off.

The layouts are those of the real downloads (NCBI's PubMed baseline directory, PhysioNet's MIMIC-IV-Note and
MIMIC-CXR trees, a RedPajama directory), filled with synthetic content."""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
from pathlib import Path

import pytest
import yaml

from mellama_train import cli
from mellama_train.config import SourceConfig, resolve
from mellama_train.data.files import DataFileError
from mellama_train.data.readers import iter_texts
from mellama_train.data.selection import of_source, select
from mellama_train.data.source import check_sources
from mellama_train.preflight import validate

METADATA_MARK = "dicom_id_MARK"  # only in the metadata tables: must never reach a document


def gz_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *rows])
    path.write_bytes(gzip.compress(buf.getvalue().encode()))


def pubmed_download(root: Path) -> list[str]:
    """NCBI's ftp.ncbi.nlm.nih.gov/pubmed/baseline/ as mirrored: the files, a .md5 beside each, README.txt."""
    root.mkdir(parents=True)
    data = []
    for n in (1, 2):
        xml = (
            '<?xml version="1.0" encoding="utf-8"?>\n<PubmedArticleSet><PubmedArticle><MedlineCitation>'
            f"<PMID>{n}</PMID><Article><ArticleTitle>Study {n}.</ArticleTitle><Abstract><AbstractText>Result"
            f" {n}.</AbstractText></Abstract></Article></MedlineCitation></PubmedArticle></PubmedArticleSet>\n"
        )
        path = root / f"pubmed25n000{n}.xml.gz"
        path.write_bytes(gzip.compress(xml.encode()))
        (root / f"{path.name}.md5").write_text(f"MD5({path.name})= 0123456789abcdef\n")
        data.append(str(path))
    (root / "README.txt").write_text("PubMed baseline: terms and conditions of use.\n")
    return data


def mimic_note_download(root: Path) -> list[str]:
    """physionet.org/files/mimic-iv-note/2.2/: LICENSE.txt, SHA256SUMS.txt, note/{discharge,radiology}[_detail]."""
    (root / "note").mkdir(parents=True)
    (root / "LICENSE.txt").write_text("PhysioNet Credentialed Health Data License 1.5.0\n")
    (root / "SHA256SUMS.txt").write_text("abc  note/discharge.csv.gz\n")
    header = ["note_id", "subject_id", "hadm_id", "note_type", "note_seq", "charttime", "storetime", "text"]
    for kind, note_type in (("discharge", "DS"), ("radiology", "RR")):
        gz_csv(
            root / "note" / f"{kind}.csv.gz",
            header,
            [[f"1-{note_type}-1", "1", "2", note_type, "1", "", "", "A synthetic note."]],
        )
        gz_csv(
            root / "note" / f"{kind}_detail.csv.gz",
            ["note_id", "subject_id", "field_name", "field_value", "field_ordinal"],
            [[f"1-{note_type}-1", "1", "author", METADATA_MARK, "1"]],
        )
    return [str(root / "note" / "discharge.csv.gz"), str(root / "note" / "radiology.csv.gz")]


def mimic_cxr_download(root: Path) -> list[str]:
    """physionet.org/files/mimic-cxr/2.0.0/: licence, checksums, the record and study lists, files/pXX/pN/sM.txt."""
    root.mkdir(parents=True)
    (root / "LICENSE.txt").write_text("PhysioNet Credentialed Health Data License 1.5.0\n")
    (root / "SHA256SUMS.txt").write_text("abc  cxr-record-list.csv.gz\n")
    gz_csv(
        root / "cxr-record-list.csv.gz",
        ["subject_id", "study_id", "dicom_id", "path"],
        [["1", "5", METADATA_MARK, "files/p10"]],
    )
    gz_csv(root / "cxr-study-list.csv.gz", ["subject_id", "study_id", "path"], [["1", "5", METADATA_MARK]])
    reports = []
    for patient, study in (
        ("p10000032", "s50414267"),
        ("p10000032", "s53189527"),
        ("p10000764", "s57375967"),
    ):
        path = root / "files" / "p10" / patient / f"{study}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            f"FINAL REPORT\n EXAMINATION: CHEST (PA AND LAT)\n IMPRESSION: No acute process ({study}).\n"
        )
        reports.append(str(path))
    return reports


def redpajama_download(root: Path) -> list[str]:
    """A RedPajama-Data-1T sample directory: jsonl per subset, and the urls.txt it was downloaded from."""
    root.mkdir(parents=True)
    (root / "urls.txt").write_text("https://data.together.xyz/redpajama-data-1T/v1.0.0/arxiv/arxiv_0.jsonl\n")
    path = root / "arxiv_0.jsonl"
    path.write_text(json.dumps({"text": "An abstract.", "meta": {"arxiv_id": "1"}}) + "\n")
    return [str(path)]


def reasons(chosen) -> dict[str, str]:
    return {Path(path).name: why for path, why in chosen.excluded}


def test_each_download_gives_its_data_files_and_every_sidecar_is_left_out_with_its_reason(tmp_path):
    files = pubmed_download(tmp_path / "pubmed")
    pubmed = select([str(tmp_path / "pubmed")], "pubmed")
    assert pubmed.files == files
    assert reasons(pubmed) == {
        "README.txt": "not data: a readme",
        "pubmed25n0001.xml.gz.md5": "not data: a checksum or signature",
        "pubmed25n0002.xml.gz.md5": "not data: a checksum or signature",
    }

    notes = mimic_note_download(tmp_path / "mimic-iv-note" / "2.2")
    chosen = select([str(tmp_path / "mimic-iv-note")], "mimic")
    assert chosen.files == notes
    assert set(reasons(chosen)) == {
        "LICENSE.txt",
        "SHA256SUMS.txt",
        "discharge_detail.csv.gz",
        "radiology_detail.csv.gz",
    }
    assert reasons(chosen)["discharge_detail.csv.gz"].startswith("not data: a MIMIC-IV-Note *_detail table")

    reports = mimic_cxr_download(tmp_path / "mimic-cxr" / "2.0.0")
    chosen = select([str(tmp_path / "mimic-cxr")], "cxr")
    assert chosen.files == sorted(reports)
    assert reasons(chosen) == {
        "LICENSE.txt": "not data: a licence or notice",
        "SHA256SUMS.txt": "not data: a checksum list",
        "cxr-record-list.csv.gz": "a table without the 'text' column (columns: subject_id, study_id, dicom_id,"
        " path): metadata, not the data",
        "cxr-study-list.csv.gz": "a table without the 'text' column (columns: subject_id, study_id, path):"
        " metadata, not the data",
    }
    texts = [text for path in chosen.files for _, text in iter_texts(path, None)]
    assert len(texts) == 3 and not any(METADATA_MARK in text for text in texts)

    files = redpajama_download(tmp_path / "rp")
    chosen = select([str(tmp_path / "rp")], "redpajama")
    assert chosen.files == files
    assert reasons(chosen) == {"urls.txt": "not data: a download list"}


def test_the_whole_downloads_pass_start_up_and_dry_run_lists_every_file_left_out(tmp_path, capsys):
    pubmed_download(tmp_path / "pubmed")
    mimic_note_download(tmp_path / "mimic-iv-note")
    mimic_cxr_download(tmp_path / "mimic-cxr")
    redpajama_download(tmp_path / "rp")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "data": {
                    "sources": [
                        {"name": "pubmed", "paths": [str(tmp_path / "pubmed")], "weight": 15},
                        {
                            "name": "mimic",
                            "paths": [str(tmp_path / "mimic-iv-note"), str(tmp_path / "mimic-cxr")],
                            "weight": 1,
                        },
                        {"name": "redpajama", "paths": [str(tmp_path / "rp")], "weight": 4},
                    ]
                }
            }
        )
    )
    cfg = resolve("tiny", str(recipe))
    assert check_sources(cfg) == []
    assert cli.run_main("pretrain", ["--config", str(recipe), "--dry-run"]) == 0
    out = capsys.readouterr().out
    section = out[out.index("# data files") :].split("\n\n")[0].splitlines()
    assert "pubmed.paths: 2 files read, 3 left out" in section
    assert "mimic.paths: 5 files read, 8 left out" in section
    assert "redpajama.paths: 1 file read, 1 left out" in section
    left_out = [line for line in section if line.startswith("  - left out ")]
    assert len(left_out) == 3 + 8 + 1
    assert (
        f"  - left out {tmp_path / 'mimic-cxr' / 'cxr-study-list.csv.gz'}: a table without the 'text' column"
        in "\n".join(left_out)
    )
    assert METADATA_MARK not in out


def test_include_and_exclude_globs_match_relative_paths_or_names(tmp_path):
    mimic_cxr_download(tmp_path / "cxr")
    only_p10000764 = select([str(tmp_path / "cxr")], "cxr", include=["files/p10/p10000764/*"])
    assert [Path(p).name for p in only_p10000764.files] == ["s57375967.txt"]
    assert reasons(only_p10000764)["s50414267.txt"] == "matches no include ('files/p10/p10000764/*')"
    no_study = select([str(tmp_path / "cxr")], "cxr", exclude=["s5318*"])
    assert "s53189527.txt" not in [Path(p).name for p in no_study.files]
    assert reasons(no_study)["s53189527.txt"] == "matches exclude 's5318*'"
    # A glob pattern: relative paths start at the directory before its first wildcard.
    globbed = select([str(tmp_path / "cxr" / "**" / "*.txt")], "cxr", exclude=["files/p10/p10000032/*"])
    assert [Path(p).name for p in globbed.files] == ["s57375967.txt"]


def test_a_file_named_in_paths_is_read_whatever_its_name(tmp_path):
    readme = tmp_path / "README.txt"
    readme.write_text("the user asked for this one\n")
    assert select([str(readme)], "notes").files == [str(readme)]


def test_a_source_whose_files_are_all_left_out_is_refused_with_the_reasons_and_the_fix(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "README.md").write_text("x")
    (tmp_path / "d" / "page.html").write_text("x")
    with pytest.raises(DataFileError) as err:
        select([str(tmp_path / "d")], "web")
    message = str(err.value)
    assert message.startswith("data.sources[web].paths: all 2 files found were left out (")
    assert "(not a format a source reads; not data: a readme)" in message
    assert "name the files in paths, or take them with the source's include globs" in message
    assert "\n" not in message


def test_tables_without_the_column_are_an_error_when_nothing_shows_them_to_be_metadata(tmp_path):
    """A data table with the wrong text_field must be named at start-up, not silently left out."""
    gz_csv(tmp_path / "notes" / "a.csv.gz", ["note_id", "body"], [["1", "x"]])
    (tmp_path / "notes" / "b.jsonl").write_text(json.dumps({"text": "y"}) + "\n")
    assert select([str(tmp_path / "notes")], "clinic").excluded == []
    cfg = resolve("tiny")
    cfg.data.sources = [SourceConfig(name="clinic", paths=[str(tmp_path / "notes")])]
    (problem,) = check_sources(cfg)
    assert "a.csv.gz: no column 'text' (columns: note_id, body)" in problem
    assert "set the source's text_field to the column that holds the text" in problem
    assert "leave it out with the source's exclude" in problem
    # A sibling table that has the column shows the other to be metadata.
    gz_csv(tmp_path / "notes" / "c.csv.gz", ["note_id", "text"], [["1", "z"]])
    assert [Path(p).name for p, _ in select([str(tmp_path / "notes")], "clinic").excluded] == ["a.csv.gz"]


def test_eval_paths_go_through_the_same_rules_and_name_their_key(tmp_path):
    mimic_cxr_download(tmp_path / "cxr")
    src = SourceConfig(
        name="cxr",
        paths=[str(tmp_path / "cxr")],
        eval_paths=[str(tmp_path / "cxr" / "files" / "p10" / "p10000764")],
    )
    assert len(of_source(src, "eval_paths").files) == 1
    src.eval_paths = [str(tmp_path / "nowhere")]
    with pytest.raises(DataFileError, match=r"^data\.sources\[cxr\]\.eval_paths: "):
        of_source(src, "eval_paths")


def test_a_wrong_text_field_never_drops_the_data_tables_for_a_stray_text_file(tmp_path):
    """One stray .txt beside two note tables read with the wrong text_field: start-up must name the column,
    not train on the stray file; a header with the column up to case is a data table too."""
    mimic_note_download(tmp_path / "m")
    (tmp_path / "m" / "note" / "notes_v1.txt").write_text("a stray file\n")
    chosen = select([str(tmp_path / "m")], "s", text_field="TEXT")
    assert not any("metadata" in why for _, why in chosen.excluded)  # both tables stay: the error follows
    cfg = resolve("tiny")
    cfg.data.sources = [SourceConfig(name="s", paths=[str(tmp_path / "m")], text_field="TEXT")]
    problems = check_sources(cfg)
    assert len(problems) == 2 and all("no column 'TEXT'" in p for p in problems)
    gz_csv(tmp_path / "t" / "a.csv.gz", ["id", "text"], [["1", "x"]])
    gz_csv(tmp_path / "t" / "b.csv.gz", ["id", "Text"], [["1", "y"]])
    assert select([str(tmp_path / "t")], "s").excluded == []


def test_a_table_without_a_header_never_puts_its_first_row_in_a_message(tmp_path):
    gz_csv(tmp_path / "t" / "a.csv.gz", ["id", "text"], [["1", "x"]])
    row = ["10000032", "Pt is a 45 y/o M with HIV " + METADATA_MARK * 4]
    gz_csv(tmp_path / "t" / "export_no_header.csv.gz", row, [row])
    chosen = select([str(tmp_path / "t")], "s")
    assert chosen.excluded == []  # not a header: a data table read wrongly, for start-up to name
    cfg = resolve("tiny")
    cfg.data.sources = [SourceConfig(name="s", paths=[str(tmp_path / "t")])]
    (problem,) = check_sources(cfg)
    assert (
        "no column 'text' (2 columns; is its first line a header, and is it CSV?)" in problem
        and METADATA_MARK not in problem
    )
    # A short row that reads like a header is not shown either: names must look like identifiers.
    short = ["Smith John", "HIV positive", "2019-03-01"]
    gz_csv(tmp_path / "u" / "e.csv.gz", short, [short])
    cfg.data.sources = [SourceConfig(name="s", paths=[str(tmp_path / "u")])]
    (problem,) = check_sources(cfg)
    assert (
        "(3 columns; is its first line a header" in problem
        and "HIV" not in problem
        and "Smith" not in problem
    )


def test_linked_directories_are_followed_once_and_a_file_reached_twice_is_read_once(tmp_path):
    shared = tmp_path / "shared" / "pubmed"
    shared.mkdir(parents=True)
    (shared / "a.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "local.jsonl").write_text(json.dumps({"text": "y"}) + "\n")
    (corpus / "pubmed").symlink_to(shared)
    (corpus / "again").symlink_to(shared)
    (corpus / "loop").symlink_to(corpus)  # a link back up the tree
    chosen = select([str(corpus)], "s")
    assert chosen.files == sorted([str(shared / "a.jsonl"), str(corpus / "local.jsonl")])
    assert select([str(corpus), str(shared / "a.jsonl")], "s").files == chosen.files


def test_a_readme_corpus_is_taken_by_include_or_a_glob_that_spells_the_name(tmp_path):
    for repo in ("repo1", "repo2"):
        (tmp_path / repo).mkdir()
        (tmp_path / repo / "README.md").write_text("# a project\n")
    assert len(select([str(tmp_path)], "md", include=["*.md"]).files) == 2
    assert len(select([str(tmp_path / "**" / "README.md")], "md").files) == 2
    assert len(select([str(tmp_path)], "md", include=["**/*.md"]).files) == 2


@pytest.mark.parametrize(
    "name",
    [
        "README.txt.gz",
        "md5checksums.txt",
        "dataset_info.json",
        "dataset_infos.json",
        "CONTRIBUTING.md",
        "robots.txt",
        "README.zh-CN.md",
        "J_Medline.txt",
        "requirements-dev.txt",
        "LICENSE-2.0.txt",
    ],
)
def test_more_sidecars_are_left_out(tmp_path, name):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "data.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    (tmp_path / "d" / name).write_bytes(gzip.compress(b"x") if name.endswith(".gz") else b"x\n")
    assert [Path(p).name for p in select([str(tmp_path / "d")], "s").files] == ["data.jsonl"]


@pytest.mark.parametrize(
    "name",
    ["notice_of_privacy_practices.txt", "license.jsonl", "changes_in_guidelines.txt", "procedure_detail.csv"],
)
def test_data_files_with_sidecar_like_names_are_read(tmp_path, name):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / name).write_text("text\nsome text\n")
    assert [Path(p).name for p in select([str(tmp_path / "d")], "s").files] == [name]


def test_an_existing_path_with_glob_characters_is_taken_literally(tmp_path):
    (tmp_path / "[2024]").mkdir()
    (tmp_path / "[2024]" / "a.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    assert len(select([str(tmp_path / "[2024]")], "s").files) == 1
    assert len(select([str(tmp_path / "[2024]" / "a.jsonl")], "s").files) == 1


def test_pipes_are_left_out_when_found_and_refused_when_named(tmp_path):
    import os

    (tmp_path / "d").mkdir()
    gz_csv(tmp_path / "d" / "a.csv.gz", ["id", "text"], [["1", "x"]])
    os.mkfifo(tmp_path / "d" / "pipe.csv")
    assert reasons(select([str(tmp_path / "d")], "s")) == {
        "pipe.csv": "not a regular file (a pipe, a device or a broken link)"
    }
    with pytest.raises(DataFileError, match="is not a regular file"):
        select([str(tmp_path / "d" / "pipe.csv")], "s")


def test_an_empty_table_is_not_called_metadata(tmp_path):
    gz_csv(tmp_path / "d" / "a.csv.gz", ["id", "text"], [["1", "x"]])
    (tmp_path / "d" / "b.csv.gz").write_bytes(gzip.compress(b""))
    assert select([str(tmp_path / "d")], "s").excluded == []  # start-up names it: "empty CSV"


# ---- profile defaults never leak into a recipe's data (issue 15, item 7) ------------------------------------


def write_recipe(tmp_path: Path, tree: dict) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def test_a_recipe_source_with_its_own_paths_inherits_no_held_out_files_or_file_rules(tmp_path):
    redpajama_download(tmp_path / "rp")
    recipe = write_recipe(
        tmp_path, {"data": {"sources": [{"name": "redpajama", "paths": [str(tmp_path / "rp")]}]}}
    )
    cfg = resolve("tiny", recipe)
    (src,) = cfg.data.sources
    assert src.eval_paths == [] and src.license is None and src.weight == 4  # the weight is still inherited
    # Without paths of its own, a recipe source keeps the profile's files and their held-out files.
    cfg = resolve("tiny", write_recipe(tmp_path, {"data": {"sources": [{"name": "redpajama", "weight": 2}]}}))
    assert cfg.data.sources[0].eval_paths and cfg.data.sources[0].weight == 2


def test_a_profile_probe_on_a_source_the_recipe_dropped_is_turned_off_with_a_note(tmp_path, caplog):
    pubmed_download(tmp_path / "pubmed")
    recipe = write_recipe(
        tmp_path, {"data": {"sources": [{"name": "pubmed", "paths": [str(tmp_path / "pubmed")]}]}}
    )
    with caplog.at_level(logging.WARNING, logger="mellama_train.config"):
        cfg = resolve("tiny", recipe)
    assert cfg.train.forgetting_source is None
    assert "forgetting probe (train.forgetting_source: redpajama) is off" in caplog.text
    problems, _ = validate(cfg)
    assert not any("forgetting_source" in p for p in problems)
    # Set by the user, the same probe is an error that names the fix.
    cfg = resolve("tiny", recipe, ["train.forgetting_source=redpajama"])
    problems, _ = validate(cfg)
    assert any(p.startswith("train.forgetting_source 'redpajama' is not a source") for p in problems)


def test_a_profile_probe_on_a_source_given_new_files_without_held_out_ones_is_turned_off(tmp_path, caplog):
    redpajama_download(tmp_path / "rp")
    recipe = write_recipe(
        tmp_path, {"data": {"sources": [{"name": "redpajama", "paths": [str(tmp_path / "rp")]}]}}
    )
    with caplog.at_level(logging.WARNING, logger="mellama_train.config"):
        cfg = resolve("tiny", recipe)
    assert cfg.train.forgetting_source is None
    assert "is off: the recipe's redpajama has no eval_paths" in caplog.text
    assert validate(cfg) == ([], [])
    held_out = tmp_path / "held.jsonl"
    held_out.write_text('{"text": "held out"}\n')
    sources = [{"name": "redpajama", "paths": [str(tmp_path / "rp")], "eval_paths": [str(held_out)]}]
    cfg = resolve("tiny", write_recipe(tmp_path, {"data": {"sources": sources}}))
    assert cfg.train.forgetting_source == "redpajama"  # with held-out files of its own, the probe stays on


def test_an_include_or_exclude_glob_that_matches_nothing_is_named(tmp_path):
    mimic_note_download(tmp_path / "mimic")
    chosen = select(
        [str(tmp_path / "mimic")],
        "mimic",
        include=["note/*.csv.gz"],
        exclude=["*_metadata.csv.gz", "*_detail*"],
    )
    assert chosen.unmatched == ["exclude '*_metadata.csv.gz'"]  # a typo, or another layout than expected
    assert len(chosen.files) == 2
