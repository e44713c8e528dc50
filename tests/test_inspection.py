"""`mellama-train data inspect`: per source, the counts a run would find, exact from a whole read and
estimated from a stated sample, never any text."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from mellama_train.cli import main
from mellama_train.config import resolve
from mellama_train.data import inspection
from mellama_train.sample_data.downloads import write_all

SECRET = "PATIENT-SECRET-4711"


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("downloads")
    write_all(root)
    return root


def recipe(tmp_path: Path, sources: str, name: str = "r.yaml") -> str:
    path = tmp_path / name
    path.write_text(f"data:\n  sources:\n{sources}")
    return str(path)


def test_a_whole_read_counts_what_a_run_reads_from_each_download(downloads, tmp_path):
    cfg = resolve(
        "tiny",
        recipe(
            tmp_path,
            f"""    - {{name: pubmed, paths: [{downloads}/pubmed], weight: 15, require_abstract: true}}
    - {{name: mimic, paths: [{downloads}/mimic-iv-note], weight: 1, where: {{note_type: [DS, RR]}}}}
""",
        ),
        ["train.max_steps=100"],
    )
    reports = {r.name: r for r in inspection.inspect(cfg, None, workers=1)}
    pubmed, mimic = reports["pubmed"], reports["mimic"]
    assert pubmed.exact and mimic.exact
    assert (pubmed.counts.records, pubmed.counts.documents) == (64, 57)
    assert dict(pubmed.counts.reasons) == {"superseded": 3, "deleted": 2, "no_abstract": 2}
    assert "3 replaced by a later version, 2 deleted" in pubmed.update_rule
    assert len(pubmed.selection.excluded) == 5  # two readmes, three .md5 files
    assert dict(mimic.counts.reasons) == {"not_selected": 10} and mimic.counts.documents == 340
    stats = inspection.percentiles(mimic.counts)
    assert stats["p10"] <= stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"]
    planned = cfg.derived()["tokens_per_source"]
    assert pubmed.planned_tokens == planned["pubmed"]
    assert pubmed.epochs == pytest.approx(planned["pubmed"] / pubmed.counts.tokens)
    text = "\n".join(inspection.render(list(reports.values()), cfg))
    assert "2 deleted, 2 no_abstract, 3 superseded" in text and "(exact)" in text


def test_a_large_source_is_sampled_by_whole_files_and_scaled_by_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(inspection, "_PREFIX_MIN", 0)  # the fifth file's few bytes left are read too
    for n in range(20):  # near-equal files: any sample estimates the whole within a few percent
        lines = [json.dumps({"text": f"{SECRET} document {n} {i} " + "word " * 30}) for i in range(25)]
        (tmp_path / f"part-{n:04d}.jsonl").write_text("\n".join(lines) + "\n")
    cfg = resolve("tiny", recipe(tmp_path, f"    - {{name: web, paths: [{tmp_path}/*.jsonl]}}\n"))
    (whole,) = inspection.inspect(cfg, None, workers=1)
    one_file = (tmp_path / "part-0000.jsonl").stat().st_size
    (sampled,) = inspection.inspect(cfg, 5 * one_file, workers=1)
    assert whole.exact and not sampled.exact and sampled.files_read == 5
    assert whole.counts.records == 500 and sampled.total(sampled.counts.records) == pytest.approx(
        500, rel=0.02
    )
    assert sampled.total(sampled.counts.tokens) == pytest.approx(whole.counts.tokens, rel=0.02)
    text = "\n".join(inspection.render([sampled], cfg))
    assert "sampled 5 of them" in text and "(estimated)" in text
    assert SECRET not in text


def test_one_file_larger_than_the_sample_is_read_by_its_first_bytes(tmp_path, monkeypatch):
    """A corpus shipped as one huge file (MIMIC-IV's discharge.csv.gz is 1 GB) is sampled by its prefix."""
    lines = [json.dumps({"text": f"note {i} " + "finding " * (20 + i % 7)}) for i in range(4000)]
    (tmp_path / "notes.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(inspection, "_PREFIX_MIN", 0)  # (a real prefix is at least 1 MiB)
    size = (tmp_path / "notes.jsonl").stat().st_size
    for notes in (tmp_path / "notes.jsonl", tmp_path / "notes.jsonl.gz"):
        if notes.suffix == ".gz":
            notes.write_bytes(gzip.compress((tmp_path / "notes.jsonl").read_bytes()))
            (tmp_path / "notes.jsonl").unlink()
            size = notes.stat().st_size
        cfg = resolve("tiny", recipe(tmp_path, f"    - {{name: notes, paths: [{notes}]}}\n"))
        (report,) = inspection.inspect(cfg, size // 4, workers=1)
        assert not report.exact and report.files_read == 1 and report.bytes_read == size // 4
        assert report.total(report.counts.records) == pytest.approx(4000, rel=0.05), notes.name
        assert dict(report.counts.reasons) == {}  # the record cut by the prefix's end is not counted


def test_the_command_prints_warns_on_repeats_and_writes_json_without_text(downloads, tmp_path, capsys):
    path = recipe(
        tmp_path, f"    - {{name: notes, paths: [{downloads}/mimic-iv-note], where: {{note_type: [AR]}}}}\n"
    )
    out = tmp_path / "figures.json"
    argv = ["data", "inspect", "--config", path, "--workers", "2", "--json", str(out)]
    assert main([*argv, "--set", "train.train_tokens=1e9", "--set", "train.max_steps=null"]) == 0
    printed = capsys.readouterr().out
    assert "notes is repeated" in printed and "lower its weight" in printed
    (figures,) = json.loads(out.read_text())
    assert figures["documents"] == 10 and figures["filtered"] == {"not_selected": 340}
    assert "ADDENDUM" not in printed + out.read_text()  # counts and reason names only


def test_dry_run_inspect_and_refusals(downloads, tmp_path, capsys):
    from mellama_train.cli import pretrain_main

    path = recipe(tmp_path, f"    - {{name: rp, paths: [{downloads}/redpajama]}}\n")
    assert pretrain_main(["--config", path, "--dry-run", "--inspect"]) == 0
    assert "# data inspect (seq_len" in capsys.readouterr().out
    assert main(["data", "inspect", "--config", path, "--set", "data.sources.rp.format=tsv"]) == 2
    assert "data.sources[rp].format: unknown 'tsv'" in capsys.readouterr().err


def test_inspect_drops_what_decontamination_drops(tmp_path):
    from test_decontam import leaked_corpus

    from mellama_train.data import decontam

    corpus, bench = leaked_corpus(tmp_path, leaked=[3, 7, 11])
    index, info = decontam.build_index([bench])
    decontam.write_index(tmp_path / "idx", index, info)
    cfg = resolve(
        "tiny",
        recipe(tmp_path, f"    - {{name: notes, paths: [{corpus}]}}\n"),
        [f"data.decontamination={tmp_path / 'idx'}"],
    )
    (report,) = inspection.inspect(cfg, None, workers=1)
    assert dict(report.counts.reasons) == {"contaminated": 3} and report.counts.documents == 37


def test_what_stops_inspect_is_one_line(downloads, tmp_path, capsys):
    from mellama_train.cli import pretrain_main

    path = recipe(tmp_path, f"    - {{name: rp, paths: [{downloads}/redpajama]}}\n")
    assert main(["data", "inspect", "--config", path, "--set", "model.tokenizer=/no/such/tokenizer"]) == 2
    assert "model.tokenizer: /no/such/tokenizer cannot be loaded" in capsys.readouterr().err
    assert main(["data", "inspect", "--config", path, "--json", str(tmp_path / "no" / "dir" / "x.json")]) == 2
    assert "--json: " in capsys.readouterr().err
    assert main(["data", "inspect", "--config", path, "--sample-mb", "0"]) == 2
    assert "the sample must be larger than 0 bytes" in capsys.readouterr().err
    assert pretrain_main(["--config", path, "--inspect"]) == 2  # not a training run
    assert "--inspect goes with --dry-run" in capsys.readouterr().err
    assert pretrain_main(["--config", path, "--dry-run", "--inspect", "--set", "model.tokenizer=/nope"]) == 0
    assert "# data inspect unavailable: model.tokenizer: /nope cannot be loaded" in capsys.readouterr().out


def test_a_tiny_sample_still_reads_something_and_tables_and_one_document_files_are_capped_right(
    tmp_path, monkeypatch
):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "t").mkdir()
    pq.write_table(
        pa.table({"text": [f"row {i} " + "word " * 40 for i in range(2000)]}), tmp_path / "t" / "a.parquet"
    )
    cfg = resolve("tiny", recipe(tmp_path, f"    - {{name: t, paths: [{tmp_path}/t]}}\n"))
    size = (tmp_path / "t" / "a.parquet").stat().st_size
    (report,) = inspection.inspect(cfg, size // 4, workers=1)  # parquet is read by rows: its first quarter
    assert not report.exact and report.counts.records == 500
    assert report.total(report.counts.records) == pytest.approx(2000, rel=0.01)
    (report,) = inspection.inspect(cfg, 100, workers=1)  # 100 bytes: still one file's first rows, not nothing
    assert report.counts.records >= 1 and report.total(report.counts.records) > 0
    (tmp_path / "docs").mkdir()
    for i in range(4):
        (tmp_path / "docs" / f"r{i}.txt").write_text(f"report {i} " + "finding " * 400)
    cfg = resolve("tiny", recipe(tmp_path, f"    - {{name: d, paths: [{tmp_path}/docs]}}\n", "d.yaml"))
    one = (tmp_path / "docs" / "r0.txt").stat().st_size
    monkeypatch.setattr(inspection, "_PREFIX_MIN", 0)  # (real prefixes are 1 MiB or more)
    (report,) = inspection.inspect(cfg, int(2.5 * one), workers=1)  # the third file is read whole, not cut
    assert report.counts.documents == report.files_read == 3
    assert report.total(report.counts.documents) == 4
