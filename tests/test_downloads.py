"""The corpora as their distributors ship them (sample_data/downloads.py lays the shipped synthetic text out in
the real trees, with every sidecar), read with the recipe lines docs/DATA.md gives: every count exact."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from test_train_e2e import LAUNCH, TINY, run

from mellama_train.cli import main
from mellama_train.config import SourceConfig, resolve
from mellama_train.data.source import Exhausted, SourceStream
from mellama_train.metrics import read_metrics
from mellama_train.preflight import validate
from mellama_train.sample_data.downloads import write_all


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("downloads")
    return root, write_all(root)


def read_all(src: SourceConfig, world_size: int = 2) -> tuple[list[str], dict[str, int]]:
    texts, reasons = [], {}
    for rank in range(world_size):
        stream = SourceStream(src, lambda text: text, rank, world_size, 0, passes=1)
        while True:
            try:
                texts.append(stream.next_item())
            except Exhausted:
                break
        for reason, n in stream.state.skipped.items():
            reasons[reason] = reasons.get(reason, 0) + n
    return texts, reasons


def test_pubmed_baseline_and_updates(downloads):
    root, info = downloads
    texts, reasons = read_all(SourceConfig(name="pubmed", paths=[str(root / "pubmed")]))
    expected = info["pubmed"]
    assert len(texts) == expected["trained"]
    assert reasons == {"superseded": 3, "deleted": 2, "not_available": 1}
    assert sum("(revised)" in t for t in texts) == 3
    assert any(t.startswith("Colony counts above 10^6 CFU/mL of CO_2-tolerant strains\n\n") for t in texts)
    assert "Measuring the pulse\n\nA chapter on the pulse." in texts  # the PubmedBookArticle
    assert not any("[Not Available]" in t for t in texts)
    _, required = read_all(SourceConfig(name="pubmed", paths=[str(root / "pubmed")], require_abstract=True))
    assert required == {"superseded": 3, "deleted": 2, "no_abstract": expected["no_abstract"]}


def test_mimic_iv_note_by_note_type_and_the_cxr_report_tree(downloads):
    root, info = downloads
    notes = SourceConfig(name="notes", paths=[str(root / "mimic-iv-note")], where={"note_type": ["DS", "RR"]})
    texts, reasons = read_all(notes)
    assert len(texts) == info["mimic-iv-note"]["DS"] + info["mimic-iv-note"]["RR"]
    assert reasons == {"not_selected": info["mimic-iv-note"]["AR"]}  # the detail tables are never read
    assert not any(t.startswith("ADDENDUM") for t in texts)
    reports, reasons = read_all(
        SourceConfig(name="cxr", paths=[str(root / "mimic-cxr")], include=["files/**"])
    )
    assert len(reports) == info["mimic-cxr"]["reports"] and reasons == {}


def test_redpajama_subsets_by_meta(downloads):
    root, info = downloads
    keep = ["RedPajamaArXiv", "RedPajamaWikipedia"]
    src = SourceConfig(name="rp", paths=[str(root / "redpajama")], where={"meta.redpajama_set_name": keep})
    texts, reasons = read_all(src)
    by_set = info["redpajama"]["by_set"]
    assert len(texts) == sum(by_set[k] for k in keep)
    assert reasons == {"not_selected": sum(n for k, n in by_set.items() if k not in keep)}


def recipe(root: Path, tmp_path: Path) -> Path:
    path = tmp_path / "downloads.yaml"
    path.write_text(
        f"""
data:
  sources:
    - {{name: pubmed, paths: [{root}/pubmed], weight: 15, require_abstract: true}}
    - {{name: mimic, paths: [{root}/mimic-iv-note], weight: 1, where: {{note_type: [DS, RR]}}}}
    - {{name: redpajama, paths: [{root}/redpajama], weight: 4}}
"""
    )
    return path


def test_the_downloads_pass_start_up_validation(downloads, tmp_path):
    root, _ = downloads
    problems, _ = validate(resolve("tiny", str(recipe(root, tmp_path))))
    assert problems == []


@pytest.mark.slow
def test_a_run_over_the_downloads_counts_documents_and_keeps_its_update_index(downloads, tmp_path, capsys):
    root, _ = downloads
    out = tmp_path / "run"
    cmd = [sys.executable, LAUNCH, "--output-dir", str(out), "--config", str(recipe(root, tmp_path)), *TINY]
    run([*cmd, "--max-steps", "6"])
    last = read_metrics(out / "metrics.jsonl")[6]
    assert all(last[f"data/documents/{name}"] > 0 for name in ("pubmed", "mimic", "redpajama"))
    assert (out / "data_index" / "pubmed.npz").is_file()
    assert main(["status", str(out)]) == 0
    assert "documents   (step 6) pubmed " in capsys.readouterr().out
