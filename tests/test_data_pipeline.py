"""The training data stream end to end: sources -> token mixture -> packed micro-batches.

Everything runs on CPU with the shipped sample corpora and tokenizer, or on small files written into
tmp_path. Each test checks behaviour a training run relies on: the token mix, document boundaries that the
model really respects, disjoint rank shards, exact resume, and that clinical text never reaches a log.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from mellama_train.config import Config, SourceConfig, resolve
from mellama_train.data.cleaners import get_cleaner, mimic_deid
from mellama_train.data.packing import IGNORE_INDEX, PackedBatches
from mellama_train.data.pipeline import build_train_batches, make_encoder
from mellama_train.data.readers import iter_texts
from mellama_train.data.selection import expand_paths
from mellama_train.data.source import SourceStream
from mellama_train.sample_data import TOKENIZER_DIR, sample_path

BOS, EOS = 1, 2
KEYS = ("input_ids", "position_ids", "labels", "source_ids")
SECRET = "PATIENT_SECRET_123"
WORDS = (
    "patient admitted with chest pain troponin negative echocardiogram showed preserved ejection fraction "
    "started on aspirin and atorvastatin discharged home stable follow up in clinic renal function normal "
    "blood pressure controlled cough fever resolved antibiotics completed imaging unremarkable"
).split()


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------


def make_docs(count: int, min_words: int, max_words: int, seed: int = 0, tag: str = "doc") -> list[str]:
    """Distinct synthetic documents ("<tag> 7: word word ...") of varying length."""
    rng = random.Random(seed)
    return [
        f"{tag} {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) + "."
        for i in range(count)
    ]


def write_jsonl(path: Path, texts: list[str]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return str(path)


def make_cfg(
    sources: list[SourceConfig], *, seq_len: int = 64, micro_batch_size: int = 2, seed: int = 1234
) -> Config:
    cfg = resolve("tiny")
    cfg.data.sources, cfg.data.seq_len, cfg.data.seed = sources, seq_len, seed
    cfg.train.micro_batch_size = micro_batch_size
    return cfg


def take(batches: PackedBatches, n: int) -> list[dict[str, torch.Tensor]]:
    return [next(batches) for _ in range(n)]


def json_round_trip(state: dict) -> dict:
    return json.loads(json.dumps(state))


def segments(batch: dict[str, torch.Tensor]) -> Iterator[tuple[int, list[int], int, int]]:
    """(source id, tokens, start column, end column) of every segment, in stream order."""
    for row in range(batch["input_ids"].shape[0]):
        ids = batch["input_ids"][row].tolist()
        pos = batch["position_ids"][row].tolist()
        src = batch["source_ids"][row].tolist()
        starts = [col for col, p in enumerate(pos) if p == 0] + [len(pos)]
        for start, end in zip(starts, starts[1:]):
            yield src[start], ids[start:end], start, end


def expected_stream(stream: SourceStream, encode, n_tokens: int, cleaners: list[str] = ()) -> list[int]:
    """The first n_tokens of a source's stream, built independently: epoch 0's files in order, each record
    cleaned, tokenized and wrapped in BOS ... EOS (world size 1: every record is this rank's)."""
    out: list[int] = []
    for path in stream._epoch_files(0):
        for _, text in iter_texts(path, stream.text_field):
            if isinstance(text, str):
                out += [BOS] + encode(get_cleaner(list(cleaners))(text)) + [EOS]
            if len(out) >= n_tokens:
                return out[:n_tokens]
    raise AssertionError("the source has fewer tokens than the packed stream took from it in epoch 0")


class RecordingEncoder:
    """Wraps a source's encoder and keeps every text it was given (the documents the stream read)."""

    def __init__(self, encode):
        self.encode, self.texts = encode, []

    def __call__(self, text: str) -> list[int]:
        self.texts.append(text)
        return self.encode(text)


# ---------------------------------------------------------------------------------------------------------
# 1. Mixture proportions are by tokens
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weights", "target"),
    [
        ({}, [0.75, 0.05, 0.20]),  # the tiny profile's Me-LLaMA 15:1:4
        ({"pubmed": 1, "mimic": 1, "redpajama": 1}, [1 / 3, 1 / 3, 1 / 3]),
    ],
    ids=["15-1-4", "1-1-1"],
)
def test_mixture_hits_the_token_shares_of_the_weights(tokenizer, weights, target):
    overrides = [f"data.sources.{name}.weight={w}" for name, w in weights.items()]
    cfg = resolve("tiny", overrides=overrides + ["train.micro_batch_size=8"])
    assert [s.name for s in cfg.data.sources] == ["pubmed", "mimic", "redpajama"]
    batches = build_train_batches(cfg, tokenizer, rank=0, world_size=1)

    tokens_by_source = torch.zeros(3, dtype=torch.long)
    for batch in take(batches, 100):  # 800 sequences x 256 = 204,800 tokens
        tokens_by_source += torch.bincount(batch["source_ids"].flatten(), minlength=3)

    assert tokens_by_source.sum().item() == 800 * 256
    # The batches' own source_ids and the mixture's counters are two accounts of the same tokens.
    assert tokens_by_source.tolist() == batches.mixture.tokens_by_source
    shares = (tokens_by_source / tokens_by_source.sum()).tolist()
    assert shares == pytest.approx(target, abs=0.01)

    # Proportions are of tokens, not documents: a mimic note (~900 tokens) is worth ~4.5 PubMed abstracts.
    docs = [s.state.documents for s in batches.mixture.streams]
    doc_ratio = docs[1] / docs[0]
    token_ratio = target[1] / target[0]
    assert doc_ratio < token_ratio / 3, (docs, shares)


# ---------------------------------------------------------------------------------------------------------
# 2. Packing
# ---------------------------------------------------------------------------------------------------------


def test_packed_tensors_have_consistent_positions_labels_and_sources(tokenizer):
    cfg = resolve("tiny")  # three sources, seq_len 256, micro_batch_size 4; mimic notes span sequences
    seq_len = cfg.data.seq_len
    saw_continuation = saw_mid_row_document = False
    for batch in take(build_train_batches(cfg, tokenizer, 0, 1), 20):
        assert set(batch) == set(KEYS)
        for key in KEYS:
            assert batch[key].shape == (cfg.train.micro_batch_size, seq_len)
            assert batch[key].dtype == torch.long
        ids, pos, labels, src = (batch[k] for k in KEYS)
        starts = pos == 0
        assert starts[:, 0].all()  # every sequence opens a segment
        # Inside a segment positions count up by one; anywhere else they restart at 0.
        assert torch.equal(pos[:, 1:][~starts[:, 1:]], pos[:, :-1][~starts[:, 1:]] + 1)
        # A BOS always opens a segment; a segment not opened by a BOS continues a document that an earlier
        # sequence was cut in (test_every_source_stream_reassembles_into_its_documents checks which one).
        assert torch.equal(ids == BOS, starts & (ids == BOS))
        saw_continuation |= bool((starts & (ids != BOS)).any())
        saw_mid_row_document |= bool((starts[:, 1:] & (ids[:, 1:] == BOS)).any())
        # Labels are the inputs (the model shifts them) except at segment starts, whose predecessor belongs
        # to another document or another sequence.
        assert torch.equal(labels, torch.where(starts, torch.full_like(ids, IGNORE_INDEX), ids))
        # A segment never mixes sources.
        changes = src[:, 1:] != src[:, :-1]
        assert starts[:, 1:][changes].all()
    assert saw_continuation and saw_mid_row_document  # both kinds of boundary were exercised


def test_documents_come_out_whole_in_file_order(tokenizer, tmp_path):
    # Lengths from ~15 to ~150 tokens against seq_len 64: documents are both joined and split.
    texts = make_docs(40, 3, 70, seed=1)
    path = write_jsonl(tmp_path / "notes.jsonl", texts)
    cfg = make_cfg([SourceConfig(name="notes", paths=[path])], seq_len=64, micro_batch_size=2)
    batches = build_train_batches(cfg, tokenizer, 0, 1)

    stream: list[int] = []
    for batch in take(batches, 12):
        for _, tokens, start, _ in segments(batch):
            # One source, one file: the only segments that do not open a document are continuations of the
            # document the previous sequence ended in, and those start at column 0.
            assert tokens[0] == BOS or start == 0
            stream += tokens

    encode = make_encoder(tokenizer)
    expected = [tok for text in texts for tok in [BOS] + encode(text) + [EOS]]
    assert len(stream) == 12 * 2 * 64
    assert stream == expected[: len(stream)]
    assert batches.mixture.streams[0].state.documents >= 10  # the check covered many documents


def test_a_document_ten_times_seq_len_is_split_across_consecutive_sequences_not_truncated(
    tokenizer, tmp_path
):
    seq_len = 32
    encode = make_encoder(tokenizer)
    long_doc = " ".join(make_docs(60, 20, 30, seed=11, tag="part"))  # one document of ~1,500 tokens
    short_doc = "a short note after the long one."
    doc_tokens = [BOS] + encode(long_doc) + [EOS]
    assert len(doc_tokens) > 10 * seq_len
    path = write_jsonl(tmp_path / "long.jsonl", [long_doc, short_doc])
    cfg = make_cfg([SourceConfig(name="long", paths=[path])], seq_len=seq_len, micro_batch_size=1)
    batches = build_train_batches(cfg, tokenizer, 0, 1)

    rows = [next(batches) for _ in range(len(doc_tokens) // seq_len + 1)]
    full_rows, rest = divmod(len(doc_tokens), seq_len)
    for i, batch in enumerate(rows[:full_rows]):
        # Every one of these sequences is the document alone: one segment, positions 0..seq_len-1.
        assert batch["input_ids"][0].tolist() == doc_tokens[i * seq_len : (i + 1) * seq_len], f"sequence {i}"
        assert batch["position_ids"][0].tolist() == list(range(seq_len))
        assert batch["labels"][0, 0].item() == IGNORE_INDEX  # its first token's context is in sequence i-1
        assert batch["labels"][0, 1:].tolist() == doc_tokens[i * seq_len + 1 : (i + 1) * seq_len]
    # The document's last `rest` tokens open the next sequence, and the short document follows in the same one.
    tail = rows[full_rows]["input_ids"][0].tolist()
    short_tokens = [BOS] + encode(short_doc) + [EOS]
    assert tail[:rest] == doc_tokens[full_rows * seq_len :]
    assert tail[rest : rest + len(short_tokens)] == short_tokens
    assert rows[full_rows]["position_ids"][0, rest].item() == 0
    assert batches.mixture.streams[0].state.skipped == {}


def test_every_source_stream_reassembles_into_its_documents(tokenizer):
    cfg = resolve("tiny")
    batches = build_train_batches(cfg, tokenizer, 0, 1)
    by_source: dict[int, list[int]] = {0: [], 1: [], 2: []}
    last_end: dict[int, int] = {}
    for batch in take(batches, 20):
        for source, tokens, _, end in segments(batch):
            if tokens[0] != BOS:
                # A document is cut only where a sequence is full; its rest opens a later sequence's segment.
                assert last_end[source] == cfg.data.seq_len
                assert by_source[source][-1] != EOS
            by_source[source] += tokens
            last_end[source] = end

    encode = make_encoder(tokenizer)
    for index, stream in enumerate(batches.mixture.streams):
        got = by_source[index]
        assert len(got) == batches.mixture.tokens_by_source[index]
        cleaners = cfg.data.sources[index].cleaners
        assert got == expected_stream(stream, encode, len(got), cleaners), stream.name


# ---------------------------------------------------------------------------------------------------------
# 3. The model keeps packed documents apart
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_restarting_position_ids_isolate_documents_in_the_model(tokenizer, tmp_path, attn_implementation):
    path = write_jsonl(tmp_path / "short.jsonl", make_docs(20, 3, 12, seed=2))
    cfg = make_cfg([SourceConfig(name="short", paths=[path])], seq_len=96, micro_batch_size=1)
    batch = next(build_train_batches(cfg, tokenizer, 0, 1))
    ids, pos = batch["input_ids"], batch["position_ids"]
    segs = list(segments(batch))
    assert len(segs) >= 3 and segs[1][1][0] == BOS and segs[1][1][-1] == EOS  # a whole document mid-row

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        # As model.build_model sets it: with a KV cache transformers skips the packed-sequence mask.
        use_cache=False,
    )
    model = LlamaForCausalLM._from_config(config, attn_implementation=attn_implementation).eval()
    with torch.no_grad():
        # No attention_mask: transformers reads segment boundaries from the restarting position_ids.
        packed = model(input_ids=ids, position_ids=pos).logits[0]
        unpositioned = model(input_ids=ids).logits[0]
        for _, tokens, start, end in segs:
            alone = model(input_ids=torch.tensor([tokens])).logits[0]
            torch.testing.assert_close(packed[start:end], alone, atol=1e-5, rtol=0)
        # Control: with plain 0..L-1 positions the later documents attend across the boundary.
        _, tokens, start, end = segs[1]
        alone = model(input_ids=torch.tensor([tokens])).logits[0]
        assert (unpositioned[start:end] - alone).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------------------
# 4. Rank sharding
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_shards_partition_every_epoch_and_spread_one_doc_files(tokenizer, tmp_path, world_size):
    cxr_dir = sample_path("mimic", "cxr")
    jsonl = write_jsonl(tmp_path / "extra.jsonl", make_docs(9, 5, 20, seed=3, tag="extra"))
    source = SourceConfig(name="radiology", paths=[cxr_dir, jsonl])
    cfg = make_cfg([source])

    all_texts = [
        text
        for path in expand_paths(source.paths, source.name)
        for _, text in iter_texts(path, None)
        if isinstance(text, str)
    ]
    cxr_texts = {text for path in expand_paths([cxr_dir], "cxr") for _, text in iter_texts(path, None)}
    assert len(set(all_texts)) == len(all_texts) == 49 and len(cxr_texts) == 40

    for epoch in (0, 1):  # ownership is recomputed from each epoch's file order; both must partition
        per_rank: list[Counter[str]] = []
        for rank in range(world_size):
            stream = build_train_batches(cfg, tokenizer, rank, world_size).mixture.streams[0]
            stream.encode = recorder = RecordingEncoder(stream.encode)
            read: Counter[str] = Counter()
            while stream.state.epoch <= epoch:
                stream.next_item()  # the text it read is recorder.texts[-1]
                if stream.state.epoch == epoch:  # the call that crosses into the next epoch reads from it
                    read[recorder.texts[-1]] += 1
            per_rank.append(read)

        for a in range(world_size):
            for b in range(a + 1, world_size):
                assert not per_rank[a] & per_rank[b], f"ranks {a} and {b} share documents in epoch {epoch}"
        assert sum(per_rank, Counter()) == Counter(all_texts)
        cxr_per_rank = [sum(1 for text in read if text in cxr_texts) for read in per_rank]
        assert min(cxr_per_rank) >= 40 // world_size - 1, cxr_per_rank  # not all on rank 0


# ---------------------------------------------------------------------------------------------------------
# 5-6. Resume
# ---------------------------------------------------------------------------------------------------------


def resume_cfg(tmp_path: Path) -> Config:
    # A 3-document source wraps its epochs every few batches; its ~100-170-token documents and the long
    # mimic notes are cut at sequence ends, so resume points fall inside documents.
    tiny = write_jsonl(tmp_path / "tiny.jsonl", make_docs(3, 60, 110, seed=4, tag="tiny"))
    return make_cfg(
        [
            SourceConfig(name="mimic", paths=[sample_path("mimic", "discharge.csv.gz")], weight=2),
            SourceConfig(name="tiny", paths=[tiny], weight=1),
        ],
        seq_len=128,
        micro_batch_size=2,
    )


def test_resume_continues_with_identical_batches(tokenizer, tmp_path):
    cfg = resume_cfg(tmp_path)
    reference = build_train_batches(cfg, tokenizer, 0, 1)
    batches, states = [], [None]  # states[n]: the state after n batches
    for _ in range(40):
        batches.append(next(reference))
        states.append(reference.state_dict())

    def tiny_state(n: int) -> dict:
        return states[n]["sources"]["tiny"]

    def in_progress(state: dict) -> bool:  # a document partly handed out: resume re-reads and re-encodes it
        return 0 < state["offset"] < state["doc_tokens"]

    # Resume points: plain (N=7), and where the document in progress is the LAST one of an epoch, so the next
    # document comes from the next epoch.
    plain = 7
    at_epoch_end = next(
        n
        for n in range(8, 34)
        if tiny_state(n)["epoch"] >= 1 and in_progress(tiny_state(n)) and tiny_state(n)["record"] == 3
    )
    assert in_progress(states[plain]["sources"]["mimic"]) or in_progress(tiny_state(plain))

    for n in (plain, at_epoch_end):
        state = states[n]
        # Checkpoints store this with torch.save(weights_only=True): only plain, JSON-able types.
        assert json.loads(json.dumps(state)) == state
        torch.save(state, tmp_path / "data_state.pt")
        assert torch.load(tmp_path / "data_state.pt", weights_only=True) == state

        resumed = build_train_batches(cfg, tokenizer, 0, 1)
        resumed.load_state_dict(json_round_trip(state))
        for offset, expected in enumerate(batches[n : n + 5]):
            got = next(resumed)
            for key in KEYS:
                assert torch.equal(got[key], expected[key]), f"resume at {n}: batch {offset} {key} differs"
        assert resumed.state_dict() == states[n + 5]

    # Epochs are counted: the one-file, 3-document source has read 3 documents per finished epoch.
    end = tiny_state(at_epoch_end + 5)
    assert end["epoch"] > tiny_state(at_epoch_end)["epoch"] >= 1
    assert end["documents"] == 3 * end["epoch"] + end["record"]


@pytest.mark.parametrize("change", ["extra_file", "renamed_file"])
def test_resume_refuses_a_changed_file_list(tokenizer, tmp_path, change):
    corpus = tmp_path / "corpus"
    write_jsonl(corpus / "a.jsonl", make_docs(5, 5, 30, seed=5, tag="a"))
    write_jsonl(corpus / "b.jsonl", make_docs(5, 5, 30, seed=6, tag="b"))
    cfg = make_cfg([SourceConfig(name="notes", paths=[str(corpus)])])
    original = build_train_batches(cfg, tokenizer, 0, 1)
    take(original, 3)
    state = json_round_trip(original.state_dict())
    build_train_batches(cfg, tokenizer, 0, 1).load_state_dict(state)  # unchanged files: accepted

    if change == "extra_file":
        write_jsonl(corpus / "c.jsonl", make_docs(2, 5, 30, seed=7, tag="c"))
    else:
        (corpus / "b.jsonl").rename(corpus / "b2.jsonl")
    changed = build_train_batches(cfg, tokenizer, 0, 1)
    with pytest.raises(
        ValueError, match=r"data\.sources\[notes\]: its file list changed \(\d files now, 2 at"
    ):
        changed.load_state_dict(state)


def test_a_corpus_moved_as_a_whole_resumes_exactly(tokenizer, tmp_path):
    write_jsonl(tmp_path / "old" / "a.jsonl", make_docs(5, 5, 30, seed=5, tag="a"))
    write_jsonl(tmp_path / "old" / "sub" / "b.jsonl", make_docs(5, 5, 30, seed=6, tag="b"))
    cfg = make_cfg([SourceConfig(name="notes", paths=[str(tmp_path / "old")])])
    original = build_train_batches(cfg, tokenizer, 0, 1)
    take(original, 3)
    state = json_round_trip(original.state_dict())
    expected = take(original, 3)
    (tmp_path / "old").rename(tmp_path / "new")
    cfg.data.sources[0].paths = [str(tmp_path / "new")]
    moved = build_train_batches(cfg, tokenizer, 0, 1)
    assert moved.load_state_dict(state) == []
    assert all(
        torch.equal(got["input_ids"], want["input_ids"]) for got, want in zip(take(moved, 3), expected)
    )


# ---------------------------------------------------------------------------------------------------------
# 7-9. Bad input, too few documents, cleaners
# ---------------------------------------------------------------------------------------------------------


def test_bad_records_are_skipped_counted_and_logged_without_content(tokenizer, tmp_path, caplog):
    good = make_docs(2, 40, 50, seed=8, tag="good")
    path = tmp_path / "notes.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps({"text": good[0]}),
                '{"text": "' + SECRET + " unterminated",  # line 2: malformed JSON
                json.dumps({"note": SECRET + " in the wrong field"}),  # line 3: no text field
                json.dumps({"text": good[1]}),
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    cfg = make_cfg([SourceConfig(name="notes", paths=[str(path)])], seq_len=32, micro_batch_size=1)
    batches = build_train_batches(cfg, tokenizer, 0, 1)
    stream = batches.mixture.streams[0]

    tokens: list[int] = []
    with caplog.at_level(logging.WARNING):
        while stream.state.documents < 2:  # stop as soon as the second good document has been read
            tokens += next(batches)["input_ids"].flatten().tolist()

    assert stream.state.epoch == 0
    assert stream.state.skipped == {"bad_json": 1, "missing_field": 1}
    encode = make_encoder(tokenizer)
    assert tokens == ([BOS] + encode(good[0]) + [EOS] + [BOS] + encode(good[1]))[: len(tokens)]

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"{path}:line 2" in m and "bad_json" in m for m in warnings), warnings
    assert any(f"{path}:line 3" in m and "missing_field" in m for m in warnings), warnings
    assert all(SECRET not in r.getMessage() and SECRET not in str(r.args) for r in caplog.records)
    state = batches.state_dict()
    assert state["sources"]["notes"]["skipped"] == {"bad_json": 1, "missing_field": 1}
    assert SECRET not in json.dumps(state)


def test_a_rank_without_documents_is_refused_by_name(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", ["the only document in this source."])
    cfg = make_cfg([SourceConfig(name="solo", paths=[path])], seq_len=16, micro_batch_size=1)
    first = next(build_train_batches(cfg, tokenizer, 0, 2))["input_ids"][0].tolist()
    assert first[0] == BOS  # rank 0 owns the document and keeps cycling it
    with pytest.raises(ValueError, match=r"data\.sources\[solo\].*at least one document per rank"):
        next(build_train_batches(cfg, tokenizer, 1, 2))


def test_a_source_with_a_document_per_rank_feeds_every_rank(tokenizer, tmp_path):
    corpus = tmp_path / "small"
    write_jsonl(corpus / "a.jsonl", make_docs(2, 3, 8, seed=9, tag="a"))
    write_jsonl(corpus / "b.jsonl", make_docs(2, 3, 8, seed=10, tag="b"))
    cfg = make_cfg([SourceConfig(name="small", paths=[str(corpus)])])
    for rank in range(4):
        stream = build_train_batches(cfg, tokenizer, rank, 4).mixture.streams[0]
        stream.next_item()
        assert stream.state.epoch == 0, f"rank {rank} had no document in epoch 0"


def test_a_record_emptied_by_a_cleaner_is_logged_with_its_file(tokenizer, tmp_path, caplog):
    path = write_jsonl(tmp_path / "notes.jsonl", ["\x00\x01\x0c", "a real note."])
    cfg = make_cfg([SourceConfig(name="notes", paths=[path], cleaners=["strip_control"])], seq_len=8)
    stream = build_train_batches(cfg, tokenizer, 0, 1).mixture.streams[0]
    with caplog.at_level(logging.WARNING):
        assert stream.next_item() == [BOS] + make_encoder(tokenizer)("a real note.") + [EOS]
    assert stream.state.skipped == {"empty": 1}
    assert any(f"{path}:record 1" in r.getMessage() for r in caplog.records), caplog.text


@pytest.mark.parametrize("cleaners", [["mimic_deid"], []])
def test_configured_cleaners_change_the_tokens(tokenizer, tmp_path, cleaners):
    text = "Admitted on [**2150-3-4**] to [**Hospital1 18**].\nName: ___ Unit No: ___\nDischarged home."
    path = write_jsonl(tmp_path / "note.jsonl", [text])
    cfg = make_cfg([SourceConfig(name="mimic", paths=[path], cleaners=cleaners)], seq_len=128)
    row = next(build_train_batches(cfg, tokenizer, 0, 1))["input_ids"][0].tolist()
    document = row[1 : row.index(EOS)]
    assert row[0] == BOS
    decoded = tokenizer.decode(document)
    if cleaners:
        assert decoded == mimic_deid(text) == get_cleaner(cleaners)(text)
        assert decoded.count("[deid]") == 4 and "[**" not in decoded and "___" not in decoded
    else:
        assert decoded == text


# ---------------------------------------------------------------------------------------------------------
# 10. Determinism
# ---------------------------------------------------------------------------------------------------------


def test_same_config_same_batches_and_the_seed_reorders_files(tokenizer):
    sources = [
        SourceConfig(name="pubmed", paths=[sample_path("pubmed", "train")], weight=1),
        SourceConfig(name="cxr", paths=[sample_path("mimic", "cxr")], weight=1),
    ]

    def first_batches(seed: int) -> tuple[list[dict[str, torch.Tensor]], list[str]]:
        cfg = make_cfg(sources, seq_len=128, micro_batch_size=2, seed=seed)
        batches = build_train_batches(cfg, tokenizer, 0, 1)
        return take(batches, 5), batches.mixture.streams[1]._epoch_files(0)

    one, files_one = first_batches(1234)
    two, files_two = first_batches(1234)
    other, files_other = first_batches(1235)
    assert files_one == files_two and sorted(files_one) == sorted(files_other)
    assert files_one != files_other  # same files, another order
    for a, b in zip(one, two):
        assert all(torch.equal(a[key], b[key]) for key in KEYS)
    assert any(not torch.equal(a["input_ids"], c["input_ids"]) for a, c in zip(one, other))


def test_the_fast_encoder_gives_the_wrappers_ids_on_every_sample_document(tokenizer):
    """make_encoder calls the Rust tokenizer directly (docs/PERFORMANCE.md): it must not change a single id."""
    from mellama_train.data.readers import iter_texts
    from mellama_train.data.selection import expand_paths

    cfg = resolve("tiny")
    encode = make_encoder(tokenizer)
    assert encode.__name__ == "encode_fast"  # the sample tokenizer is a fast one: the path under test
    checked = 0
    for src in cfg.data.sources:
        for path in expand_paths(src.paths, src.name):
            for _, text in iter_texts(path, src.text_field):
                if isinstance(text, str):
                    assert encode(text) == tokenizer(text, add_special_tokens=False)["input_ids"], path
                    checked += 1
    assert checked > 2000
