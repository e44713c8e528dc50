"""The prepared path's order: the global batch of every step is the same on any number of ranks, each source's
share is exact every period and within 1% throughout, every window of an epoch is trained once, a late position
is computed without a scan, and a resume on another world size continues with exactly the next sequences. The
start-up checks refuse a recipe that no longer matches its prepared corpus, one line each."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from mellama_train.config import resolve
from mellama_train.data.ordered import GlobalOrder, OrderedBatches, Permutation, apportion, period_order
from mellama_train.data.packing import IGNORE_INDEX
from mellama_train.data.pipeline import build_train_batches
from mellama_train.data.prepared import open_prepared, prepare
from mellama_train.data.selection import of_source
from mellama_train.data.tokenizer import load_tokenizer
from mellama_train.preflight import validate

NAMES = ("pubmed", "mimic", "redpajama")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The tiny profile's sample sources (15:1:4), prepared."""
    out = tmp_path_factory.mktemp("prepared") / "corpus"
    prepare(resolve("tiny"), out, workers=1)
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve("tiny"))


def order_of(corpus: Path, tokenizer, seq_len: int = 64, weights=(15, 1, 4), seed: int = 7) -> GlobalOrder:
    sources = open_prepared(corpus, tokenizer)
    return GlobalOrder([sources[n] for n in NAMES], list(weights), seq_len, seed)


def prepared_cfg(corpus: Path, *overrides: str):
    sets = [f"data.sources.{n}.prepared={corpus}" for n in NAMES]
    return resolve("tiny", None, [*sets, "data.seq_len=64", "train.micro_batch_size=1", *overrides])


def feed(order: GlobalOrder, world_size: int, micro: int, steps: int, global_batch: int = 8, start=None):
    """{global sequence id: row bytes} of `steps` steps on `world_size` ranks (each rank's batches in turn)."""
    accum = global_batch // (micro * world_size)
    ranks = [OrderedBatches(order, r, world_size, micro, accum, 0.01) for r in range(world_size)]
    if start is not None:
        for r in ranks:
            r.load_state_dict(start)
    rows: dict[int, bytes] = {}
    for _ in range(steps):
        for _ in range(accum):
            for r in ranks:
                batch = next(r)
                for i, g in enumerate(r.last_rows):
                    assert g not in rows, f"sequence {g} fed twice"
                    rows[g] = b"".join(batch[key][i].numpy().tobytes() for key in sorted(batch))
    return rows, ranks


def test_the_global_batch_of_every_step_is_the_same_on_any_number_of_ranks(corpus, tokenizer):
    order = order_of(corpus, tokenizer)
    reference, _ = feed(order, 1, 4, 12)
    assert sorted(reference) == list(range(12 * 8))  # no sequence skipped or repeated
    for world_size, micro in ((2, 2), (2, 1), (4, 1), (8, 1), (4, 2)):
        rows, _ = feed(order, world_size, micro, 12)
        assert rows == reference, (world_size, micro)


def test_a_resume_on_another_world_size_feeds_exactly_the_next_sequences(corpus, tokenizer):
    order = order_of(corpus, tokenizer)
    whole, _ = feed(order, 2, 1, 10)
    first, ranks = feed(order, 2, 1, 4)
    state = ranks[1].state_dict()  # any rank's: the position is the step
    for world_size, micro in ((1, 1), (4, 1), (2, 2)):
        rest, resumed = feed(order, world_size, micro, 6, start=state)
        assert {**first, **rest} == whole, world_size
        taken = np.sum([r.mixture.taken for r in resumed], axis=0)  # all ranks: the whole run's tokens
        given = order.given(10 * 8)
        assert taken.tolist() == [n * 64 for n in given]


def test_each_share_is_exact_every_period_and_within_one_percent_throughout(corpus, tokenizer):
    order = order_of(corpus, tokenizer)
    assert order.counts == [15, 1, 4] and order.period == 20
    for g in range(1, 2001):
        given = order.given(g)
        for n, target in zip(given, (0.75, 0.05, 0.2)):
            assert abs(n - target * g) < 1  # under one sequence off at any point
        if g % 20 == 0:
            assert given == [15 * g // 20, g // 20, 4 * g // 20]
    shares = np.array(order.given(1000)) / 1000
    assert np.all(np.abs(shares - [0.75, 0.05, 0.2]) <= 0.01)
    # The rows say the same: every token of sequence g comes from the source the schedule names.
    source, _ = order.locate(np.arange(40))
    assert [int(order.row(g)["source_ids"][0]) for g in range(40)] == source.tolist()


@pytest.mark.parametrize(
    "weights, counts",
    [
        ([15, 1, 4], [15, 1, 4]),
        ([0.75, 0.05, 0.2], [15, 1, 4]),
        ([2, 4], [1, 2]),
        ([1.0], [1]),
        ([1, math.sqrt(2)], None),
        ([0.3333, 0.6667], None),
    ],
)
def test_weights_become_whole_counts_over_the_shortest_period(weights, counts):
    got = apportion(weights)
    if counts is not None:
        assert got == counts
    fractions = np.array(weights) / sum(weights)
    assert np.all(np.abs(np.array(got) / sum(got) - fractions) <= 1e-4)
    order = period_order(got)
    assert np.bincount(order, minlength=len(got)).tolist() == got


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_the_window_permutation_is_a_bijection_and_depends_on_its_key(n):
    values = Permutation(n, "1234/pubmed/0")(np.arange(n))
    assert sorted(values.tolist()) == list(range(n))
    if n >= 64:
        other = Permutation(n, "1234/pubmed/1")(np.arange(n))
        assert not np.array_equal(values, other) and not np.array_equal(values, np.arange(n))


def test_every_window_of_an_epoch_is_trained_once_and_the_next_epoch_reshuffles(corpus, tokenizer):
    order = order_of(corpus, tokenizer, seq_len=256)
    mimic = NAMES.index("mimic")
    n = order.windows[mimic]
    first = [order.window(mimic, k) for k in range(n)]
    second = [order.window(mimic, k) for k in range(n, 2 * n)]
    assert {e for e, _ in first} == {0} and {e for e, _ in second} == {1}
    assert sorted(w for _, w in first) == list(range(n)) == sorted(w for _, w in second)
    assert [w for _, w in first] != [w for _, w in second]
    # The step that wraps it, against a brute-force count of its sequences.
    gb = 8
    wrap = order.wrap_step(mimic, gb)
    assert order.given((wrap - 1) * gb)[mimic] <= n < order.given(wrap * gb)[mimic] + 1
    assert order.given((wrap - 1) * gb)[mimic] < n + 1 and order.given(wrap * gb)[mimic] > n


def test_a_row_holds_the_sources_tokens_with_its_documents_kept_apart(corpus, tokenizer):
    order = order_of(corpus, tokenizer, seq_len=256)
    sources = open_prepared(corpus, tokenizer)
    stream = {n: np.concatenate([np.asarray(t) for t in sources[n].tokens]) for n in NAMES}
    bos = tokenizer.bos_token_id
    for g in range(30):
        row = order.row(g)
        (source,), (k,) = order.locate(np.array([g]))
        _, w = order.window(int(source), int(k))
        ids = row["input_ids"]
        assert np.array_equal(ids, stream[NAMES[source]][w * 256 : (w + 1) * 256])
        starts = np.flatnonzero(row["position_ids"] == 0)
        assert starts[0] == 0 and np.all(ids[starts[1:]] == bos)  # a new segment is a new document
        assert np.all(row["labels"][starts] == IGNORE_INDEX)
        inside = np.setdiff1d(np.arange(256), starts)
        assert np.array_equal(row["labels"][inside], ids[inside])
        assert np.all(np.diff(row["position_ids"])[np.diff(row["position_ids"]) != 1] < 0)


def test_a_late_position_is_computed_without_a_scan(corpus, tokenizer):
    order = order_of(corpus, tokenizer)
    late = 10**12  # about a trillion sequences: no index of that size could be built
    row = order.row(late)
    assert row["input_ids"].shape == (64,)
    assert np.array_equal(order_of(corpus, tokenizer).row(late)["input_ids"], row["input_ids"])
    batches = OrderedBatches(order, 0, 1, 1, 8, 0.01)
    batches.load_state_dict({"prepared": {**batches.state_dict()["prepared"], "step": late // 8}})
    assert next(batches)["input_ids"].shape == (1, 64) and batches.last_rows == [late]


@pytest.mark.parametrize(
    "change, names",
    [
        ({"seq_len": 128}, "data.seq_len"),
        ({"seed": 8}, "data.seed"),
        ({"global_batch": 16}, "train.global_batch_size"),
        ({"counts": {"pubmed": 1, "mimic": 1, "redpajama": 1}}, "weights"),
        ({"corpus": "0" * 16}, "prepared corpus"),
    ],
)
def test_a_resume_over_another_order_is_refused_naming_what_changed(corpus, tokenizer, change, names):
    batches = OrderedBatches(order_of(corpus, tokenizer), 0, 1, 1, 8, 0.01)
    saved = batches.state_dict()["prepared"]
    with pytest.raises(ValueError, match=names):
        batches.load_state_dict({"prepared": {**saved, **change}})
    with pytest.raises(ValueError, match="streamed its sources"):
        batches.load_state_dict({"sources": {}, "taken": {}})


def test_a_recipe_over_prepared_corpora_builds_the_ordered_stream(corpus, tokenizer):
    cfg = prepared_cfg(corpus)
    assert validate(cfg)[0] == []
    data = build_train_batches(cfg, tokenizer, rank=1, world_size=2)
    assert isinstance(data, OrderedBatches) and data.accum == cfg.train.global_batch_size // 2
    batch = next(data)
    assert batch["input_ids"].shape == (1, 64) and data.last_rows == [1]


def _problems(cfg) -> list[str]:
    problems = validate(cfg)[0]
    assert all("\n" not in p for p in problems)
    return problems


def test_a_recipe_that_no_longer_matches_its_prepared_corpus_is_refused_before_step_1(corpus, tmp_path):
    # Prepared and streamed sources mixed: the order would not cover the whole mixture.
    cfg = resolve("tiny", None, [f"data.sources.pubmed.prepared={corpus}"])
    assert any("not prepared while ['pubmed'] are" in p for p in _problems(cfg))
    # A source the corpus does not hold.
    other = tmp_path / "only_pubmed"
    shutil.copytree(corpus, other)
    cfg = prepared_cfg(other, "data.sources.mimic.name=notes")
    assert any("not 'notes'" in p for p in _problems(cfg))
    # A filter the sources were not prepared with, when the recipe still lists the files.
    cfg = prepared_cfg(corpus, "data.sources.redpajama.min_chars=50")
    assert any("min_chars differ from what" in p and "redpajama" in p for p in _problems(cfg))
    # A file changed since it was prepared.
    sample = of_source(resolve("tiny").data.sources[2]).files[0]
    copy = tmp_path / Path(sample).name
    shutil.copy(sample, copy)
    cfg = prepared_cfg(corpus, f"data.sources.redpajama.paths=[{copy}]")
    assert any("not in" in p and "no longer listed" in p for p in _problems(cfg))
    # A source too small for one sequence.
    cfg = prepared_cfg(corpus, "data.seq_len=300000", "model.arch.max_position_embeddings=300000")
    assert any("under one sequence of data.seq_len 300000" in p for p in _problems(cfg))


def test_a_changed_file_and_another_decontamination_index_are_refused(corpus, tmp_path):
    moved = tmp_path / "corpus"
    shutil.copytree(corpus, moved)
    cfg = prepared_cfg(moved)
    path = of_source(cfg.data.sources[1]).files[0]
    stat = os.stat(path)
    try:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        assert any(p.startswith(os.path.abspath(path)) and "changed since" in p for p in _problems(cfg))
    finally:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    index = tmp_path / "index"
    index.mkdir()
    (index / "manifest.json").write_text("{}")
    cfg = prepared_cfg(moved, f"data.decontamination={index}")
    assert any("not the index" in p for p in _problems(cfg))


def test_bad_weights_and_an_empty_prepared_path_are_one_line_each(corpus):
    for weight, says in (
        ("-1", "weight must be > 0"),
        (".inf", "a finite number"),
        (".nan", "a finite number"),
    ):
        problems = _problems(prepared_cfg(corpus, f"data.sources.mimic.weight={weight}"))
        assert any(says in p for p in problems), (weight, problems)
    problems = _problems(prepared_cfg(corpus, "data.sources.mimic.prepared="))
    assert any("prepared is empty (an unset variable?)" in p for p in problems)


def test_a_prepared_position_given_to_a_streamed_run_says_so():
    from mellama_train.data.mixture import Mixture

    with pytest.raises(ValueError, match="written by a run over a prepared corpus"):
        Mixture([], []).load_state_dict({"prepared": {"step": 3}})
