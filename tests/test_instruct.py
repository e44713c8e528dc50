"""Instruction data: rendering, response-only labels, truncation, packing isolation, mixing and exact resume."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from mellama_train.config import SourceConfig, resolve
from mellama_train.data.files import Skip
from mellama_train.data.instruct import (
    DEFAULT_CHAT_TEMPLATE,
    Example,
    ExampleEncoder,
    fit,
    resolve_chat_template,
    to_messages,
)
from mellama_train.data.packing import IGNORE_INDEX
from mellama_train.data.pipeline import build_eval_batches, build_train_batches, count_examples
from mellama_train.sample_data import TOKENIZER_DIR

SECRET = "PATIENT-SECRET-4711"


@pytest.fixture()
def tokenizer():
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    resolve_chat_template(tok, "auto")
    return tok


def labelled_text(tokenizer, example: Example) -> str:
    return tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX])


def prompt_text(tokenizer, example: Example) -> str:
    return tokenizer.decode([t for t, lab in zip(example.input_ids, example.labels) if lab == IGNORE_INDEX])


def encoder(tokenizer, cutoff=512, overflow="truncate", **source) -> ExampleEncoder:
    return ExampleEncoder(tokenizer, SourceConfig(name="s", **source), cutoff, overflow)


def write_jsonl(path, records) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# ---- labels are the responses, nothing else -------------------------------------------------------------


def test_alpaca_record_trains_on_its_output_and_eos_only(tokenizer):
    record = {
        "instruction": "List the drugs.",
        "input": "Aspirin then metformin.",
        "output": "aspirin, metformin",
    }
    ex = encoder(tokenizer)(record)
    assert ex.input_ids[0] == tokenizer.bos_token_id and ex.labels[0] == IGNORE_INDEX
    assert labelled_text(tokenizer, ex) == "aspirin, metformin</s>"
    assert ex.labels[-1] == tokenizer.eos_token_id  # the model learns to stop
    prompt = prompt_text(tokenizer, ex)
    assert "### Instruction:\nList the drugs.\n\nAspirin then metformin.\n\n### Response:\n" in prompt
    # Labels are the ids themselves where set: the full text was tokenized once.
    assert all(lab in (IGNORE_INDEX, tok) for tok, lab in zip(ex.input_ids, ex.labels))
    # Inference renders the same prompt: the tokens before the answer are exactly what generation starts from.
    rendered = tokenizer.apply_chat_template(
        to_messages(record, {})[:-1], tokenize=False, add_generation_prompt=True
    )
    first = ex.labels.index(next(t for t in ex.labels if t != IGNORE_INDEX))
    assert ex.input_ids[:first] == tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_multi_turn_chat_trains_on_every_assistant_turn(tokenizer):
    messages = [
        {"role": "system", "content": "You are a careful clinician."},
        {"role": "user", "content": "What treats asthma?"},
        {"role": "assistant", "content": "An inhaled steroid."},
        {"role": "user", "content": "And for sepsis?"},
        {"role": "assistant", "content": "Antibiotics and fluids."},
    ]
    ex = encoder(tokenizer)({"messages": messages})
    assert labelled_text(tokenizer, ex) == "An inhaled steroid.</s>Antibiotics and fluids.</s>"
    prompt = prompt_text(tokenizer, ex)
    for turn in ("You are a careful clinician.", "What treats asthma?", "And for sepsis?"):
        assert turn in prompt
    assert "steroid" not in prompt and "Antibiotics" not in prompt


# ---- instruction data as published: ShareGPT, alpaca with history, OpenAI messages (issue 15, item 6) -----

CHAT = [
    ("What treats asthma?", "An inhaled steroid."),
    ("And for sepsis?", "Antibiotics and fluids."),
]


def _same_example_as_openai_messages(tokenizer, record, system=None, columns=None):
    messages = [{"role": "system", "content": system}] if system else []
    for question, answer in CHAT:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    expected = encoder(tokenizer)({"messages": messages})
    got = encoder(tokenizer, columns=columns or {})(record)
    assert got.input_ids == expected.input_ids and got.labels == expected.labels
    assert labelled_text(tokenizer, got) == "An inhaled steroid.</s>Antibiotics and fluids.</s>"


def test_sharegpt_conversations_with_every_role_spelling_train_like_openai_messages(tokenizer):
    turns = []
    for (question, answer), (human, gpt) in zip(CHAT, [("human", "gpt"), ("user", "chatgpt")]):
        turns += [{"from": human, "value": question}, {"from": gpt, "value": answer}]
    _same_example_as_openai_messages(tokenizer, {"conversations": turns})
    _same_example_as_openai_messages(
        tokenizer, {"conversations": turns, "system": "Be careful."}, system="Be careful."
    )
    sys_turn = [{"from": "system", "value": "Be careful."}]
    _same_example_as_openai_messages(tokenizer, {"conversations": sys_turn + turns}, system="Be careful.")
    # LLaMA-Factory's other spelling: a `messages` field of from/value turns; and a renamed field via columns.
    _same_example_as_openai_messages(tokenizer, {"messages": turns})
    _same_example_as_openai_messages(tokenizer, {"dialog": turns}, columns={"conversations": "dialog"})


def test_alpaca_history_becomes_the_earlier_turns(tokenizer):
    (q1, a1), (q2, a2) = CHAT
    _same_example_as_openai_messages(
        tokenizer, {"instruction": q2, "input": "", "output": a2, "history": [[q1, a1]]}
    )
    assert encoder(tokenizer)({"instruction": q2, "output": a2, "history": [[q1]]}).reason == "bad_history"
    assert encoder(tokenizer)({"instruction": q2, "output": a2, "history": "no"}).reason == "bad_history"


def test_unknown_speakers_and_turnless_conversations_are_counted_skips_that_quote_nothing(tokenizer):
    skip = encoder(tokenizer)(
        {"conversations": [{"from": "doctor", "value": SECRET}, {"from": "gpt", "value": "x"}]}
    )
    assert skip.reason == "bad_messages" and "human" in skip.where and SECRET not in skip.where
    assert encoder(tokenizer)({"conversations": [{"from": "human", "value": SECRET}]}).reason == "no_response"
    assert encoder(tokenizer)({"conversations": []}).reason == "bad_messages"


def test_a_layout_matching_no_format_is_refused_with_the_formats_and_the_nearest_match(tmp_path):
    from mellama_train.config import resolve
    from mellama_train.data.source import check_sources

    path = write_jsonl(
        tmp_path / "chats.jsonl", [{"id": 1, "dialogue": [{"speaker": "a", "text": SECRET}]}] * 3
    )
    cfg = resolve("tiny", task="tune")
    cfg.data.sources = [SourceConfig(name="chats", paths=[path])]
    (problem,) = check_sources(cfg)
    assert (
        "matches none of the instruction formats (alpaca" in problem and "ShareGPT (conversations" in problem
    )
    assert "its fields are dialogue, id" in problem and "{conversations: dialogue}" in problem
    assert "data.sources[chats].columns" in problem and SECRET not in problem and "\n" not in problem
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "q", "response": "a", "id": 1}] * 2)
    cfg.data.sources = [SourceConfig(name="chats", paths=[qa])]
    (problem,) = check_sources(cfg)
    assert problem.endswith("e.g. {instruction: prompt, output: response}")
    # A mapping whose key is not one of our field names (a typo, or the two sides swapped) is named at start-up.
    from mellama_train.preflight import validate

    cfg.data.sources = [SourceConfig(name="chats", paths=[path], columns={"dialogue": "conversations"})]
    problems, _ = validate(cfg)
    assert any(p.startswith("data.sources[chats].columns: unknown field 'dialogue'") for p in problems)
    # The ShareGPT file itself passes the start-up check.
    good = write_jsonl(
        tmp_path / "sharegpt.jsonl",
        [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}],
    )
    cfg.data.sources = [SourceConfig(name="chats", paths=[good])]
    assert check_sources(cfg) == []


def test_the_tokenizers_own_chat_template_wins_over_the_default(tokenizer):
    own = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    tokenizer.chat_template = own
    assert resolve_chat_template(tokenizer, "auto") == own
    ex = encoder(tokenizer)({"instruction": "Name a beta blocker.", "output": "metoprolol"})
    assert labelled_text(tokenizer, ex) == "metoprolol</s>"
    assert "<|user|>Name a beta blocker.<|assistant|>" in prompt_text(tokenizer, ex)
    assert resolve_chat_template(tokenizer, "default") == DEFAULT_CHAT_TEMPLATE  # explicit choice wins


def test_a_template_that_rewrites_past_turns_is_refused_with_the_fix(tokenizer):
    # Renders only the last assistant turn: earlier turns disappear, so spans cannot be located.
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}{{ m['content'] }}{% endif %}"
        "{% endfor %}"
    )
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    messages += [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    with pytest.raises(ValueError, match=r"data\.chat_template: .*data\.chat_template=default"):
        encoder(tokenizer)({"messages": messages})


# LLaMA-2-chat's own rule, as in its tokenizer_config.json: a conversation that breaks it is rejected.
ALTERNATING_TEMPLATE = (
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ message['role'] + ': ' + message['content'] + '\\n' }}{% endfor %}"
)


def test_a_record_the_chat_template_rejects_is_a_counted_located_skip(tokenizer, tmp_path, caplog):
    good = {"instruction": "Name a beta blocker.", "output": "atenolol"}
    twice = [{"role": "user", "content": SECRET}, {"role": "user", "content": "again"}]
    rejected = {"messages": [*twice, {"role": "assistant", "content": "c"}]}
    path = write_jsonl(tmp_path / "qa.jsonl", [good, rejected, good])
    cfg = tune_cfg([SourceConfig(name="qa", paths=[path])])
    cfg.data.chat_template = ALTERNATING_TEMPLATE
    stream = build_train_batches(cfg, tokenizer, 0, 1).mixture.streams[0]
    with caplog.at_level("WARNING"):
        first, second = stream.next_item(), stream.next_item()  # the rank goes on past the rejected record
    assert first.input_ids == second.input_ids
    assert stream.state.skipped == {"template_rejected": 1}
    assert stream.state.first_skip == f"{path}:record 2 (TemplateError)"
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert f"(template_rejected) at {path}:record 2" in logged and SECRET not in logged


def test_a_chat_template_that_does_not_compile_is_one_fatal_line(tokenizer):
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}"  # no endfor
    with pytest.raises(ValueError) as err:
        encoder(tokenizer)({"instruction": "q", "output": "a"})
    assert str(err.value).startswith("data.chat_template does not compile (line 1: ")
    assert str(err.value).endswith("fix it, or use data.chat_template=default") and "\n" not in str(err.value)


def test_columns_rename_fields_and_bad_records_are_counted_skips(tokenizer):
    enc = encoder(tokenizer, columns={"instruction": "question", "output": "answer"})
    ex = enc({"question": "Yes or no: is aspirin an NSAID?", "answer": "yes"})
    assert labelled_text(tokenizer, ex) == "yes</s>"
    assert enc({"question": "q"}).reason == "missing_field"
    assert encoder(tokenizer)({"messages": [{"role": "doctor", "content": SECRET}]}).reason == "bad_messages"
    assert encoder(tokenizer)({"messages": [{"role": "user", "content": SECRET}]}).reason == "no_response"
    assert encoder(tokenizer)({"instruction": " ", "output": SECRET}).reason == "empty"
    for skip in (
        enc({"question": SECRET}),
        encoder(tokenizer)({"messages": [{"role": "user", "content": SECRET}]}),
    ):
        assert isinstance(skip, Skip) and SECRET not in skip.where  # no record content in a skip


# ---- too long: truncated prompt-first, or dropped ----------------------------------------------------------


def test_truncation_cuts_the_prompt_from_the_left_and_keeps_bos_and_answer(tokenizer):
    record = {"instruction": "Summarise. " + "the patient was stable overnight. " * 40, "output": "Stable."}
    full = encoder(tokenizer, cutoff=10_000)(record)
    ex = encoder(tokenizer, cutoff=64)(record)
    assert len(full) > 64 and len(ex) == 64 and ex.truncated
    assert ex.input_ids[0] == tokenizer.bos_token_id
    assert labelled_text(tokenizer, ex) == "Stable.</s>"  # the answer survives whole
    assert ex.input_ids[-len(ex.input_ids) + 1 :] == full.input_ids[-63:]  # only the oldest prompt text went


def test_an_answer_longer_than_the_cutoff_keeps_a_quarter_of_prompt_and_loses_its_end(tokenizer):
    record = {"instruction": "Write the discharge summary.", "output": "The patient improved. " * 60}
    full = encoder(tokenizer, cutoff=10_000)(record)
    ex = fit(full, 128, tokenizer.bos_token_id)
    prompt_len = full.labels.index(next(t for t in full.labels if t != IGNORE_INDEX))
    assert prompt_len <= 128 // 4  # the whole (short) prompt fits in its quarter: nothing of it is cut
    assert ex.input_ids[:prompt_len] == full.input_ids[:prompt_len]
    assert len(ex) == 128 and ex.labels[-1] != tokenizer.eos_token_id
    # A long prompt is cut down to its quarter, no further.
    record["instruction"] = "Write the discharge summary. " * 30
    long_prompt = encoder(tokenizer, cutoff=128)(record)
    answer_at = long_prompt.labels.index(next(t for t in long_prompt.labels if t != IGNORE_INDEX))
    assert answer_at == 1 + 128 // 4 and long_prompt.input_ids[0] == tokenizer.bos_token_id  # BOS + a quarter


def test_drop_mode_skips_long_examples_and_counts_them(tokenizer, tmp_path):
    short = {"instruction": "Is it benign?", "output": "yes"}
    long = {"instruction": "Explain. " * 200, "output": "no"}
    path = write_jsonl(tmp_path / "d.jsonl", [short, long, short])
    assert encoder(tokenizer, cutoff=64, overflow="drop")(long).reason == "too_long"
    cfg = tune_cfg([SourceConfig(name="d", paths=[path])], "data.overflow=drop", "data.seq_len=64")
    batches = build_train_batches(cfg, tokenizer, 0, 1)
    for _ in range(3):
        next(batches)
    assert batches.mixture.streams[0].state.skipped["too_long"] >= 1
    assert batches.truncated == [0]


# ---- batches ------------------------------------------------------------------------------------------------


def tune_cfg(sources, *overrides):
    cfg = resolve("tiny", task="tune", overrides=list(overrides))
    cfg.data.sources = sources
    return cfg


def tiny_model(attn: str):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        use_cache=False,  # as in training: with a KV cache transformers skips the packed-sequence mask
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


def sample_records(n: int) -> list[dict]:
    return [
        {
            "instruction": f"Case {i}: which drug?",
            "input": "metformin " * (i % 7),
            "output": "drug " * (1 + i % 5),
        }
        for i in range(n)
    ]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_and_padded_rows_give_each_example_its_solo_logits(tokenizer, tmp_path, attn):
    path = write_jsonl(tmp_path / "p.jsonl", sample_records(30))
    model = tiny_model(attn)
    for pack in (True, False):
        cfg = tune_cfg([SourceConfig(name="p", paths=[path])], f"data.pack={pack}", "data.seq_len=128")
        batch = next(build_train_batches(cfg, tokenizer, 0, 1))
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        examples = 0
        for row in range(batch["input_ids"].shape[0]):
            pos, labels = batch["position_ids"][row].tolist(), batch["labels"][row].tolist()
            starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
            for a, b in zip(starts, starts[1:]):
                # An example ends with its labelled EOS; what follows it in the segment is padding.
                end = max(i for i in range(a, b) if labels[i] != IGNORE_INDEX) + 1
                assert batch["input_ids"][row, end - 1] == tokenizer.eos_token_id
                with torch.no_grad():
                    solo = model(input_ids=batch["input_ids"][row, a:end].unsqueeze(0)).logits[0]
                torch.testing.assert_close(logits[row, a:end], solo, atol=1e-5, rtol=0)
                examples += 1
        if pack:
            assert 100 < batch["input_ids"].shape[1] <= 128  # rows are filled towards seq_len...
            assert examples >= 6  # ...with several whole examples each (4 rows)
        else:
            assert examples == 4


def test_unpacked_rows_are_padded_with_ignored_labels(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", sample_records(8))
    cfg = tune_cfg([SourceConfig(name="p", paths=[path])])
    batch = next(build_train_batches(cfg, tokenizer, 0, 1))
    enc = encoder(tokenizer)
    lengths = [len(enc(r)) for r in sample_records(8)[:4]]
    width = batch["input_ids"].shape[1]
    assert width == max(lengths) and len(set(lengths)) > 1
    for row, length in enumerate(lengths):  # one source, world size 1: rows are the file's first records
        assert (batch["labels"][row, length:] == IGNORE_INDEX).all()
        assert batch["position_ids"][row].tolist() == list(range(width))


def test_instruction_mixture_counts_examples_within_one_percent(tokenizer, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", sample_records(50))
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": "Short?", "output": "ok"}] * 20)
    cfg = tune_cfg([SourceConfig(name="a", paths=[a], weight=3), SourceConfig(name="b", paths=[b], weight=1)])
    batches = build_train_batches(cfg, tokenizer, 0, 1)
    seen: Counter[int] = Counter()
    for _ in range(100):
        batch = next(batches)
        for row in batch["source_ids"].tolist():
            seen[row[0]] += 1
    assert abs(seen[0] / sum(seen.values()) - 0.75) <= 0.01
    assert batches.mixture.taken == [seen[0], seen[1]]


@pytest.mark.parametrize("pack", [True, False])
def test_resume_mid_stream_gives_identical_batches(tokenizer, tmp_path, pack):
    a = write_jsonl(tmp_path / "a.jsonl", sample_records(23))
    b = write_jsonl(tmp_path / "b.jsonl", sample_records(11)[::-1])
    cfg = tune_cfg(
        [SourceConfig(name="a", paths=[a], weight=2), SourceConfig(name="b", paths=[b])],
        f"data.pack={pack}",
        "data.seq_len=96",
    )
    for rank in (0, 1):
        first = build_train_batches(cfg, tokenizer, rank, 2)
        for _ in range(7):
            next(first)
        state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores survives JSON
        if pack and rank == 0:
            assert state["carry"] is not None  # the case that needs the carried example
        expected = [next(first) for _ in range(12)]  # crosses epochs of both sources
        second = build_train_batches(cfg, tokenizer, rank, 2)
        second.load_state_dict(state)
        for want in expected:
            got = next(second)
            assert all(torch.equal(got[k], want[k]) for k in want)


def test_eval_batches_cover_each_ranks_share_of_the_heldout_records_once(tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", sample_records(5))
    held = write_jsonl(tmp_path / "h.jsonl", sample_records(11))
    sources = [SourceConfig(name="s", paths=[train], eval_paths=[held])]
    cfg = tune_cfg(sources, "train.micro_batch_size=2", "train.eval_batches=100")
    rows = 0
    for rank in (0, 1):
        batches = build_eval_batches(cfg, tokenizer, rank, 2)
        rows += sum(b["input_ids"].shape[0] for b in batches)
        assert all((b["source_ids"] == 0).all() for b in batches)
    assert rows == 11
    assert count_examples(cfg) == 5
