"""`mellama-train prepare`: the shards hold exactly the documents the streaming path trains on, a killed prepare
resumes without redoing finished files and never counts a partial shard, and a prepared corpus read back
refuses another tokenizer, a damaged shard and a manifest that disagrees, in one line each."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_downloads import recipe as downloads_recipe

from mellama_train.cli import main
from mellama_train.config import resolve
from mellama_train.data.pipeline import document_encoder
from mellama_train.data.prepared import MANIFEST, open_prepared, prepare, token_dtype
from mellama_train.data.source import Exhausted, SourceStream
from mellama_train.data.tokenizer import load_tokenizer
from mellama_train.sample_data.downloads import write_all


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> tuple[Path, Path]:
    """The synthetic downloads (PubMed baseline + updates, MIMIC-IV-Note, RedPajama) and test_downloads' recipe
    over them (require_abstract on PubMed, note types DS and RR of MIMIC-IV-Note)."""
    root = tmp_path_factory.mktemp("downloads")
    write_all(root)
    return root, downloads_recipe(root, root)


@pytest.fixture(scope="module")
def prepared(downloads, tmp_path_factory) -> tuple[Path, dict]:
    _, recipe = downloads
    out = tmp_path_factory.mktemp("prepared") / "corpus"
    manifest = prepare(resolve("tiny", str(recipe)), out, workers=2)
    return out, manifest


def streamed(cfg, name: str) -> list[tuple[int, ...]]:
    """Every document one epoch of the streaming path trains on from source `name` (one rank)."""
    src = next(s for s in cfg.data.sources if s.name == name)
    tokenizer = load_tokenizer(cfg)
    stream = SourceStream(src, document_encoder(tokenizer, src.cleaners, src.min_chars), 0, 1, 0, passes=1)
    docs = []
    while True:
        try:
            docs.append(tuple(stream.next_item()))
        except Exhausted:
            return docs


def test_the_shards_hold_exactly_the_documents_a_streaming_run_trains_on(downloads, prepared):
    _, recipe = downloads
    out, manifest = prepared
    cfg = resolve("tiny", str(recipe))
    corpus = open_prepared(out, load_tokenizer(cfg))
    for name, source in corpus.items():
        shards = [
            tuple(int(t) for t in source.document(shard, d))
            for shard in range(len(source.tokens))
            for d in range(len(source.offsets[shard]) - 1)
        ]
        assert sorted(shards) == sorted(streamed(cfg, name)), name  # the stream shuffles file order
        assert manifest["sources"][name]["documents"] == len(shards) > 0
        assert manifest["sources"][name]["tokens"] == sum(map(len, shards))
    # The recipe's filters and PubMed's update rule were applied, and counted by reason.
    assert {"superseded", "deleted", "no_abstract"} <= set(manifest["sources"]["pubmed"]["skipped"])
    assert manifest["sources"]["mimic"]["skipped"].get("not_selected", 0) > 0
    assert manifest["dtype"] == token_dtype(2048).name == "uint16"


def test_a_killed_prepare_redoes_only_what_was_not_finished(downloads, prepared, tmp_path):
    _, recipe = downloads
    out, manifest = prepared
    copy = tmp_path / "corpus"
    shutil.copytree(out, copy)
    shards = sorted((copy / "pubmed").glob("*.json"))
    victim = shards[1]
    victim.unlink()  # killed after writing its arrays, before its record: not finished
    (copy / "pubmed" / f".{victim.stem}.tokens.npy.tmp").write_bytes(b"half a shard")  # a write cut short
    before = {p: p.stat().st_mtime_ns for p in copy.rglob("*.npy")}
    again = prepare(resolve("tiny", str(recipe)), copy, workers=1)
    assert again["sources"] == manifest["sources"]
    rewritten = {p for p, t in before.items() if p.stat().st_mtime_ns != t}
    assert rewritten == {
        copy / "pubmed" / f"{victim.stem}.tokens.npy",
        copy / "pubmed" / f"{victim.stem}.docs.npy",
        copy / "pubmed" / f"{victim.stem}.index.npy",
    }


def test_two_parts_prepare_every_file_once_and_the_last_writes_the_manifest(downloads, prepared, tmp_path):
    _, recipe = downloads
    _, whole = prepared
    out = tmp_path / "corpus"
    cfg = resolve("tiny", str(recipe))
    assert prepare(cfg, out, workers=1, part=(0, 2)) is None  # half the files: no manifest yet
    assert not (out / MANIFEST).exists()
    assert prepare(cfg, out, workers=1, part=(1, 2)) == whole
    assert json.loads((out / MANIFEST).read_text())["sources"] == whole["sources"]


def test_a_changed_input_file_is_prepared_again(downloads, prepared, tmp_path):
    root, recipe = downloads
    out, _ = prepared
    copy = tmp_path / "corpus"
    shutil.copytree(out, copy)
    rp = sorted((root / "redpajama").rglob("*.jsonl*"))[0]
    stat = rp.stat()
    os.utime(rp, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: size and content alike
    try:
        record = next(
            p for p in (copy / "redpajama").glob("*.json") if json.loads(p.read_text())["file"] == str(rp)
        )
        before = record.stat().st_mtime_ns
        prepare(resolve("tiny", str(recipe)), copy, workers=1)
        assert record.stat().st_mtime_ns != before
    finally:
        os.utime(rp, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def _corrupt(out: Path, tmp_path: Path, plant) -> str:
    copy = tmp_path / "corpus"
    shutil.copytree(out, copy)
    plant(copy)
    cfg = resolve("tiny")
    with pytest.raises(ValueError) as caught:
        open_prepared(copy, load_tokenizer(cfg))
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def _swap_for_file(directory: Path) -> None:
    shutil.rmtree(directory)
    directory.write_text("not a directory")


def _link_loop(path: Path) -> None:
    path.unlink()
    path.symlink_to(path.name)


def _replace(path: Path, content) -> None:
    """Plant `content` as the array file `path`: an array, an .npz archive (None), or a link out ("link")."""
    path.unlink()
    if content is None:
        with open(path, "wb") as fh:
            np.savez(fh, a=np.zeros(3))
    elif isinstance(content, str):
        outside = path.parent.parent.parent / "outside.npy"
        np.save(outside, np.zeros(3, dtype=np.uint16))
        path.symlink_to(outside)
    else:
        with open(path, "wb") as fh:
            np.save(fh, content)


def _edit_manifest(change):
    def plant(root: Path) -> None:
        manifest = json.loads((root / MANIFEST).read_text())
        change(manifest)
        (root / MANIFEST).write_text(json.dumps(manifest))

    return plant


@pytest.mark.parametrize(
    "plant, expected",
    [
        (_edit_manifest(lambda m: m["tokenizer"].update(vocab_sha256="0" * 64)), "another tokenizer"),
        (lambda root: (root / "pubmed" / "00000.tokens.npy").write_bytes(b"\x93NUMPY garbage"), "damaged"),
        (lambda root: (root / "pubmed" / "00000.docs.npy").unlink(), "missing"),
        (_edit_manifest(lambda m: m["sources"]["pubmed"].update(tokens=1)), "disagree"),
        (_edit_manifest(lambda m: m["sources"]["mimic"]["files"][0].update(tokens=3)), "disagree"),
        (_edit_manifest(lambda m: m["sources"]["mimic"]["files"][0].update(shard="../../etc/x")), "outside"),
        (_edit_manifest(lambda m: m.update(format=99)), "format"),
        (_edit_manifest(lambda m: m["sources"]["mimic"].update(documents=float("inf"))), "not a count"),
        (
            _edit_manifest(lambda m: m["sources"]["mimic"]["files"][0].update(documents=float("nan"))),
            "not a count",
        ),
        (_edit_manifest(lambda m: m["sources"]["mimic"]["files"][0].update(tokens="abc")), "not a count"),
        (_edit_manifest(lambda m: m["sources"]["mimic"]["files"][0].update(documents=-1)), "not a count"),
        (_edit_manifest(lambda m: m.update(sources=[1, 2])), "lists no sources"),
        (
            lambda root: _replace(root / "redpajama" / "00000.docs.npy", np.zeros(0, dtype=np.int64)),
            "not token",
        ),
        (lambda root: _replace(root / "redpajama" / "00000.tokens.npy", None), "holds NpzFile"),
        (
            lambda root: _replace(root / "redpajama" / "00000.index.npy", np.zeros(99, np.int64)),
            "does not index",
        ),
        (lambda root: (root / "mimic" / "00000.index.npy").unlink(), "missing"),
        (lambda root: _replace(root / "mimic" / "00000.index.npy", np.array([10**12])), "does not index"),
        (lambda root: (root / "pubmed" / "00000.tokens.npy").write_bytes(b""), "cannot be read"),
        (lambda root: _swap_for_file(root / "mimic"), "cannot be read"),
        (
            _edit_manifest(lambda m: m["sources"]["mimic"]["files"][0].update(shard="m" * 5000)),
            "cannot be read",
        ),
        (lambda root: _link_loop(root / "redpajama" / "00000.tokens.npy"), "prepare again"),
        (lambda root: _replace(root / "redpajama" / "00000.tokens.npy", "link"), "outside"),
        (lambda root: (root / MANIFEST).write_text("[" * 100_000), "not a readable manifest"),
        (lambda root: (root / MANIFEST).unlink(), "mellama-train prepare"),
    ],
)
def test_a_prepared_corpus_that_cannot_be_trusted_is_one_line_naming_the_fix(
    prepared, tmp_path, plant, expected
):
    out, _ = prepared
    assert expected in _corrupt(out, tmp_path, plant)


def test_offsets_that_do_not_rise_are_refused(prepared, tmp_path):
    out, _ = prepared

    def plant(root: Path) -> None:
        path = root / "redpajama" / "00000.docs.npy"
        docs = np.load(path)
        docs[1], docs[2] = docs[2], docs[1]
        np.save(path, docs)

    copy = tmp_path / "corpus"
    shutil.copytree(out, copy)
    plant(copy)
    # Found where the offsets are read, not by a scan of every shard at start-up.
    source = open_prepared(copy, load_tokenizer(resolve("tiny")))["redpajama"]
    with pytest.raises(ValueError, match="redpajama shard 00000: document offsets do not rise"):
        source.span(0, min(source.total_tokens, 4096))


def test_an_index_that_disagrees_with_its_offsets_is_refused_where_it_is_read(tmp_path):
    copy = tmp_path / "corpus"
    prepare(resolve("tiny"), copy, workers=1)  # the sample PubMed files hold 900 documents each
    # A shard with more than one page of offsets (over 512 documents).
    path = next(p for p in sorted(copy.rglob("*.index.npy")) if np.load(p).size >= 2)
    index = np.load(path)
    index[1] += 1
    np.save(path, index)
    name, number = path.parent.name, int(path.name.split(".")[0])
    tokenizer = load_tokenizer(resolve("tiny"))
    source = open_prepared(copy, tokenizer)[name]
    # A window whose documents are found through the damaged entry.
    start = int(source.starts[number]) + int(source.offsets[number][512]) + 1
    with pytest.raises(ValueError, match=f"{name} shard {number:05d}: its index disagrees with its offsets"):
        source.span(start, 64)

    # Offsets put out of order, with an index rewritten to match them: refused where they are read, not
    # searched into wrong document starts.
    docs_path = path.with_name(path.name.replace(".index.", ".docs."))
    docs = np.load(docs_path)
    docs[100:200] = docs[100:200][::-1].copy()
    np.save(docs_path, docs)
    np.save(path, docs[::512])
    source = open_prepared(copy, tokenizer)[name]
    start = int(source.starts[number]) + int(docs[150])
    with pytest.raises(
        ValueError, match="document offsets do not rise; the shard is damaged: delete its .json"
    ):
        source.span(start, 64)


def test_prepare_again_redoes_a_shard_whose_arrays_no_longer_match_its_record(prepared, tmp_path, downloads):
    out, manifest = prepared
    _, recipe = downloads
    copy = tmp_path / "corpus"
    shutil.copytree(out, copy)
    path = copy / "mimic" / "00000.tokens.npy"
    np.save(path, np.load(path)[:10])  # truncated: its record still says the old count
    with pytest.raises(ValueError, match="disagree with the manifest"):
        open_prepared(copy, load_tokenizer(resolve("tiny")))
    assert prepare(resolve("tiny", str(recipe)), copy, workers=1)["sources"] == manifest["sources"]
    assert open_prepared(copy, load_tokenizer(resolve("tiny")))["mimic"].total_tokens > 10


def test_the_command_prints_the_totals_and_refuses_instruction_data(downloads, tmp_path, capsys):
    _, recipe = downloads
    out = tmp_path / "corpus"
    assert main(["prepare", str(recipe), "--out", str(out), "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "pubmed: " in printed and " tokens (uint16)" in printed and str(out / MANIFEST) in printed
    assert main(["prepare", "--profile", "nonexistent", "--out", str(out)]) == 2
    assert main(["prepare", str(recipe), "--out", str(out), "--workers", "0"]) == 2
    # A corpus prepared with another tokenizer is never mixed with this one's shards.
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["tokenizer"]["vocab_size"] = 32000
    (out / MANIFEST).write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["prepare", str(recipe), "--out", str(out)]) == 2
    assert "prepared with another tokenizer" in capsys.readouterr().err


def test_a_token_id_past_the_vocabulary_is_refused_where_it_is_read(prepared, tmp_path):
    out, _ = prepared
    copy = tmp_path / "corpus"
    shutil.copytree(out, copy)
    path = copy / "redpajama" / "00000.tokens.npy"
    tokens = np.load(path)
    tokens[0] = 60000  # fits uint16, not the 2048-token vocabulary
    np.save(path, tokens)
    corpus = open_prepared(copy, load_tokenizer(resolve("tiny")))
    with pytest.raises(ValueError, match="token id 60000, past the tokenizer's 2048"):
        corpus["redpajama"].document(0, 0)
    assert corpus["redpajama"].document(0, 1).size  # the others read as they are


def test_a_changed_recipe_makes_its_shards_again_and_a_broken_manifest_is_rewritten(
    downloads, prepared, tmp_path
):
    _, recipe = downloads
    out, whole = prepared
    copy = tmp_path / "corpus"
    shutil.copytree(out, copy)
    (copy / MANIFEST).write_text("garbage")  # does not lock the directory: it is rewritten
    narrower = resolve("tiny", str(recipe), ["data.sources.mimic.where={note_type: [DS]}"])
    manifest = prepare(narrower, copy, workers=1)
    fresh = prepare(narrower, tmp_path / "fresh", workers=1)
    assert manifest["sources"]["mimic"]["documents"] == fresh["sources"]["mimic"]["documents"]
    assert manifest["sources"]["mimic"]["documents"] < whole["sources"]["mimic"]["documents"]
    assert manifest["sources"]["pubmed"] == whole["sources"]["pubmed"]  # untouched sources are kept
    assert json.loads((copy / MANIFEST).read_text())["sources"] == manifest["sources"]


def test_out_pointing_at_a_file_is_one_line(downloads, tmp_path, capsys):
    _, recipe = downloads
    (tmp_path / "afile").write_text("x")
    assert main(["prepare", str(recipe), "--out", str(tmp_path / "afile")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
