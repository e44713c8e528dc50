"""Instruction data: record -> chat messages -> rendered text -> token ids with labels on the responses only
-> micro-batches (one example per row, right-padded; or several whole examples packed per row).

Records are alpaca-style (`instruction`, optional `input`, `output`, optional `system`) or chat
(`messages`: a list of `{role, content}`); a source's `columns` renames fields. Rendering uses the tokenizer's
chat template, or `DEFAULT_CHAT_TEMPLATE` when it has none, so the saved tokenizer carries exactly the format
the model was tuned on and `apply_chat_template(..., add_generation_prompt=True)` reproduces it at inference.

Which tokens are trained: every assistant turn's text as the template renders it (its end-of-turn/EOS token
included, so the model learns to stop). The response spans are found by rendering the conversation prefix by
prefix (the text added by an assistant turn is a response span), then the WHOLE text is tokenized once and a
token is labelled when it starts inside a span. Tokenizing the full text (rather than prompt and response
separately) gives exactly the ids inference will see: sentencepiece would otherwise add a word-start marker
at the seam.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

# jinja2 renders every chat template (transformers' apply_chat_template; torch depends on it too): its errors
# are how a template says no.
from jinja2 import TemplateError, TemplateSyntaxError

from mellama_train.config import Config, SourceConfig
from mellama_train.data.cleaners import get_cleaner
from mellama_train.data.decontam import load_index, screened
from mellama_train.data.digests import short_digest
from mellama_train.data.files import Skip, is_valid_text
from mellama_train.data.instruction_format import ROLE_NAMES
from mellama_train.data.mixture import Mixture
from mellama_train.data.packing import IGNORE_INDEX
from mellama_train.data.source import CheckShare, Exhausted, SkipLimit, SourceStream

ROLES = ("system", "user", "assistant")

# The built-in format (for base models whose tokenizer has no chat template): alpaca-style headers, BOS once,
# EOS after every answer. Literal text sits in {{ '...' }} because transformers compiles templates with
# trim_blocks, which would eat a newline written right after a {% %} tag.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n### Response:\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% if not loop.last %}{{ '\\n\\n' }}{% endif %}"
    "{% endif %}"
    "{% endfor %}"
)


@dataclass
class Example:
    """One tokenized training example."""

    input_ids: list[int]
    labels: list[int]
    """input_ids on response tokens, IGNORE_INDEX elsewhere (prompt, template, padding)."""
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


def example_digest(example: Example) -> str:
    """Short digest of an example's ids and labels: checks a re-encoded example without storing its tokens."""
    return short_digest(
        np.asarray(example.input_ids, dtype=np.int64).tobytes(),
        np.asarray(example.labels, dtype=np.int64).tobytes(),
    )


# ---- records -> messages --------------------------------------------------------------------------------


def _turns(items: Any, name: str, columns: dict[str, str] | None = None) -> list[dict[str, str]] | Skip:
    """A messages/conversations list as {role, content} turns: OpenAI's role/content or ShareGPT's from/value
    (either key pair in either field: LLaMA-Factory accepts both). Skips never quote content: roles are named
    only when they are one of the known spellings' kind (short words), otherwise counted."""
    if not isinstance(items, list) or not items:
        return Skip("bad_messages", f"{name} is not a non-empty list")
    columns = columns or {}
    role_key, content_key = columns.get("role_tag"), columns.get("content_tag")
    names = dict(ROLE_NAMES)  # a source's own speaker names (LLaMA-Factory tags) over the published spellings
    names.update({columns[f"{r}_tag"].lower(): r for r in ROLES if f"{r}_tag" in columns})
    out = []
    for m in items:
        if not isinstance(m, dict):
            return Skip("bad_messages", f"an item of {name} is not an object")
        speaker = m.get(role_key) if role_key else m.get("role", m.get("from"))
        content = m.get(content_key) if content_key else m.get("content", m.get("value"))
        role = names.get(speaker.lower()) if isinstance(speaker, str) else None
        if role is None or not isinstance(content, str):
            known = ", ".join(sorted(ROLE_NAMES))
            return Skip(
                "bad_messages",
                f"an item of {name} lacks a known role/from ({known}) or string content/value",
            )
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        return Skip("no_response", f"no non-empty assistant turn in {name}")
    return out


def to_messages(record: dict[str, Any], columns: dict[str, str]) -> list[dict[str, str]] | Skip:
    """A record as chat messages, or the Skip that says why it cannot be one (never quoting its content).

    Formats (FORMATS): OpenAI `messages`; ShareGPT `conversations` (a top-level `system` is put first, as
    LLaMA-Factory does); alpaca instruction/input/output, whose `history` pairs become the earlier turns. Every
    assistant turn of a multi-turn example is trained on (response_spans)."""

    def get(name: str) -> Any:
        return record.get(columns.get(name, name))

    for name in ("messages", "conversations"):
        items = get(name)
        if items is None:
            continue
        out = _turns(items, name, columns)
        system = get("system")
        if (
            isinstance(out, list)
            and isinstance(system, str)
            and system.strip()
            and out[0]["role"] != "system"
        ):
            out = [{"role": "system", "content": system}, *out]
        return out
    instruction, output = get("instruction"), get("output")
    if not isinstance(instruction, str) or not isinstance(output, str):
        return Skip("missing_field", "needs string instruction and output fields, messages or conversations")
    if not instruction.strip() or not output.strip():
        return Skip("empty", "empty instruction or output")
    extra, system, history = get("input"), get("system"), get("history")
    user = f"{instruction}\n\n{extra}" if isinstance(extra, str) and extra.strip() else instruction
    out = [{"role": "system", "content": system}] if isinstance(system, str) and system.strip() else []
    if history is not None:
        pairs = history if isinstance(history, list) else None
        if pairs is None or not all(
            isinstance(p, list | tuple) and len(p) == 2 and all(isinstance(t, str) for t in p) for p in pairs
        ):
            return Skip("bad_history", "history is not a list of [instruction, response] string pairs")
        for earlier, response in pairs:
            out += [{"role": "user", "content": earlier}, {"role": "assistant", "content": response}]
    return out + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


# ---- chat template ----------------------------------------------------------------------------------------


def resolve_chat_template(tokenizer: Any, setting: str) -> str:
    """Pick the template (`auto`: the tokenizer's own, else the built-in; `default`: the built-in; or a .jinja
    path or a literal template) and install it on the tokenizer, so every tokenizer this run saves carries it."""
    if setting == "auto":
        template = tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
    elif setting == "default":
        template = DEFAULT_CHAT_TEMPLATE
    elif "{{" in setting or "{%" in setting:
        template = setting
    else:
        path = Path(setting)
        if not path.is_file():
            raise ValueError(
                f"data.chat_template: {setting} is not auto, default, a template, or an existing .jinja file"
            )
        template = path.read_text(encoding="utf-8")
    tokenizer.chat_template = template
    return template


def response_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, character spans of its assistant turns)."""

    def render(msgs: list[dict[str, str]], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    spans, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, full = render(messages[:i], True), render(messages[: i + 1], False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError(
                "data.chat_template: rendering a conversation turn by turn does not extend the earlier text "
                "(the template rewrites past turns), so response tokens cannot be located; use a template "
                "that renders turns independently, e.g. data.chat_template=default"
            )
        spans.append((len(prompt), len(full)))
        done = full
    text = render(messages, False)
    if not text.startswith(done):
        raise ValueError("data.chat_template: the full conversation does not extend its prefix; see above")
    return text, spans


# ---- messages -> example ------------------------------------------------------------------------------


def fit(example: Example, cutoff: int, bos_id: int | None) -> Example:
    """Shorten to `cutoff` tokens, prompt side first.

    The oldest context goes first: tokens are cut from the left (after a leading BOS) but the text before the
    last answer keeps at least min(its length, cutoff // 4) tokens, so the model still sees the question; any
    excess left after that is cut from the end of the answer (which then loses its EOS)."""
    ids, labels = example.input_ids, example.labels
    if len(ids) <= cutoff:
        return example
    head = 1 if bos_id is not None and ids and ids[0] == bos_id else 0
    answer = len(labels)  # start of the last labelled run (the last answer)
    while answer > 0 and labels[answer - 1] == IGNORE_INDEX:
        answer -= 1
    while answer > 0 and labels[answer - 1] != IGNORE_INDEX:
        answer -= 1
    prompt = answer - head
    cut_left = min(len(ids) - cutoff, max(0, prompt - min(prompt, cutoff // 4)))
    ids = ids[:head] + ids[head + cut_left :]
    labels = labels[:head] + labels[head + cut_left :]
    return Example(ids[:cutoff], labels[:cutoff], truncated=True)


class ExampleEncoder:
    """record -> Example | Skip, for one source. A record the chat template or the tokenizer rejects is a Skip
    ("template_rejected", "tokenizer_rejected"): the stream counts it and logs where it is. A template that
    does not compile, or that rewrites past turns, is a ValueError: no record could be encoded."""

    def __init__(self, tokenizer: Any, source: SourceConfig, cutoff: int, overflow: str):
        self.tokenizer, self.columns, self.cutoff, self.overflow = tokenizer, source.columns, cutoff, overflow
        self.clean = get_cleaner(source.cleaners)

    def __call__(self, record: dict[str, Any]) -> Example | Skip:
        messages = to_messages(record, self.columns)
        if isinstance(messages, Skip):
            return messages
        if not all(
            is_valid_text(m["content"]) for m in messages
        ):  # a lone surrogate: valid JSON, no tokenizer takes it
            return Skip("bad_text", "a message is not valid Unicode text")
        messages = [{"role": m["role"], "content": self.clean(m["content"])} for m in messages]
        try:
            text, spans = response_spans(self.tokenizer, messages)
        except TemplateSyntaxError as err:  # the template itself, not this record: every record would fail
            raise ValueError(
                f"data.chat_template does not compile (line {err.lineno}: {err.message}); fix it, or use"
                " data.chat_template=default"
            ) from None
        except (TemplateError, TypeError) as err:
            # The template's own verdict on this record, e.g. LLaMA-2-chat's raise_exception("Conversation
            # roles must alternate ..."). Only the error's type is kept: a template may quote the record.
            return Skip("template_rejected", type(err).__name__)
        try:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except (TypeError, ValueError, UnicodeError) as err:  # the tokenizer's own verdict on this record
            return Skip("tokenizer_rejected", type(err).__name__)
        ids, labels, span = enc["input_ids"], [], 0
        for token, (start, _) in zip(ids, enc["offset_mapping"]):
            while span < len(spans) and start >= spans[span][1]:
                span += 1
            inside = span < len(spans) and spans[span][0] <= start < spans[span][1]
            labels.append(token if inside else IGNORE_INDEX)
        if all(label == IGNORE_INDEX for label in labels):
            return Skip("no_response", "the response rendered to no tokens")
        example = Example(ids, labels)
        if len(example) > self.cutoff and self.overflow == "drop":
            return Skip("too_long", f"{len(example)} tokens > data.seq_len {self.cutoff}")
        return fit(example, self.cutoff, self.tokenizer.bos_token_id)


# ---- examples -> micro-batches ---------------------------------------------------------------------------


class InstructBatches:
    """Micro-batches of examples for one rank; resumable at the exact next example.

    Unpacked: one example per row, right-padded to the longest row of the micro-batch. Padding sits after every
    real token, so causal attention alone keeps it out of the real tokens' view and no attention mask is needed.
    Packed: whole examples fill rows of up to seq_len (padded to the longest row); position_ids restart at each example, which transformers
    turns into a block-diagonal mask (as in pretraining packing), so no example attends to another. An example
    that does not fit the rest of a row opens the next row (it is never split)."""

    def __init__(self, mixture: Mixture, seq_len: int, micro_batch_size: int, pack: bool, pad_id: int):
        self.mixture, self.seq_len, self.micro_batch_size = mixture, seq_len, micro_batch_size
        self.pack, self.pad_id = pack, pad_id
        self.carry: tuple[int, Example] | None = None
        """Packing: the example that did not fit the previous row (part of the resume state)."""
        self.truncated = [0] * len(mixture.streams)

    def __iter__(self) -> InstructBatches:
        return self

    def _next_example(self) -> tuple[int, Example]:
        source, example = self.mixture.next_item()
        self.truncated[source] += example.truncated
        return source, example

    def _row(self) -> list[tuple[int, Example]]:
        row: list[tuple[int, Example]] = []
        used = 0
        while True:
            item = self.carry or self._next_example()
            if row and used + len(item[1]) > self.seq_len:
                self.carry = item
                return row
            self.carry = None
            row.append(item)
            used += len(item[1])
            if not self.pack or used == self.seq_len:
                return row

    def __next__(self) -> dict[str, torch.Tensor]:
        return collate([self._row() for _ in range(self.micro_batch_size)], self.pad_id)

    @property
    def source_names(self) -> list[str]:
        return self.mixture.names

    def state_dict(self) -> dict[str, Any]:
        # The carried example is the last record its source handed out: its coordinates are that source's
        # position, so only its size and digest are kept (resume reads and encodes it again), never tokens.
        carry = None
        if self.carry is not None:
            source, ex = self.carry
            carry = {"source": source, "tokens": len(ex), "digest": example_digest(ex)}
        return {
            **self.mixture.state_dict(),
            "carry": carry,
            "truncated": dict(zip(self.mixture.names, self.truncated)),
        }

    def finished_claims(self, state: dict[str, Any]) -> dict[str, tuple[int, bytes]]:
        return self.mixture.finished_claims(state)

    def load_state_dict(self, state: dict[str, Any], share: CheckShare | None = None) -> list[dict[str, str]]:
        """Continue at the saved position; returns the data changes continued over (Mixture.load_state_dict)."""
        changes = self.mixture.load_state_dict(state, share)
        c = state["carry"]
        self.carry = None
        if c is not None:
            stream = self.mixture.streams[c["source"]]
            if "input_ids" in c:  # older checkpoints kept the example's tokens
                example = Example(c["input_ids"], c["labels"], c["truncated"])
            else:
                example = stream.restore_last(c["tokens"], c["digest"], example_digest)
                changes += [change for change in stream.changes if change not in changes]
            self.carry = None if example is None else (c["source"], example)
        self.truncated = [state["truncated"][n] for n in self.mixture.names]
        return changes


def collate(rows: list[list[tuple[int, Example]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of (source, example) -> padded tensors with the keys the loss reads (as pretraining batches)."""
    width = max(sum(len(ex) for _, ex in row) for row in rows)
    out: dict[str, list[list[int]]] = {"input_ids": [], "position_ids": [], "labels": [], "source_ids": []}
    for row in rows:
        ids, pos, labels, sources = [], [], [], []
        for source, ex in row:
            ids += ex.input_ids
            pos += range(len(ex))
            labels += ex.labels
            sources += [source] * len(ex)
        pad = width - len(ids)
        # Padding continues the last example's positions: it is after every real token (invisible to them).
        out["input_ids"].append(ids + [pad_id] * pad)
        out["position_ids"].append(pos + list(range(len(row[-1][1]), len(row[-1][1]) + pad)))
        out["labels"].append(labels + [IGNORE_INDEX] * pad)
        out["source_ids"].append(sources + [0] * pad)
    return {key: torch.tensor(value, dtype=torch.long) for key, value in out.items()}


# ---- building ---------------------------------------------------------------------------------------------


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def build_instruct_batches(cfg: Config, tokenizer: Any, rank: int, world_size: int) -> InstructBatches:
    resolve_chat_template(tokenizer, cfg.data.chat_template)
    index = load_index(cfg.data.decontamination)
    streams = [
        SourceStream(
            src,
            screened(ExampleEncoder(tokenizer, src, cfg.data.seq_len, cfg.data.overflow), index),
            rank,
            world_size,
            cfg.data.seed,
            records=True,
            skip_limit=SkipLimit.of(cfg.data),
            max_record_bytes=cfg.data.max_record_bytes,
            accept_changes=cfg.data.accept_changes,
        )
        for src in cfg.data.sources
    ]
    weights = [src.weight for src in cfg.data.sources]
    mixture = Mixture(streams, weights, unit="examples", tolerance=cfg.data.mixture_tolerance)
    return InstructBatches(
        mixture, cfg.data.seq_len, cfg.train.micro_batch_size, cfg.data.pack, _pad_id(tokenizer)
    )


def build_instruct_eval_batches(
    cfg: Config, tokenizer: Any, source_index: int, rank: int, world_size: int, max_batches: int
) -> list[dict[str, torch.Tensor]]:
    """This rank's share of one source's held-out examples (one pass), unpacked, at most max_batches."""
    resolve_chat_template(tokenizer, cfg.data.chat_template)
    src = cfg.data.sources[source_index]
    stream = SourceStream(
        src,
        ExampleEncoder(tokenizer, src, cfg.data.seq_len, "truncate"),
        rank,
        world_size,
        cfg.data.seed,
        records=True,
        paths=src.eval_paths,
        passes=1,
        skip_limit=SkipLimit.of(cfg.data),
        max_record_bytes=cfg.data.max_record_bytes,
    )
    batches, rows = [], []
    while len(batches) < max_batches:
        try:
            rows.append([(source_index, stream.next_item())])
        except Exhausted:
            break
        if len(rows) == cfg.train.micro_batch_size:
            batches.append(collate(rows, _pad_id(tokenizer)))
            rows = []
    if rows and len(batches) < max_batches:
        batches.append(collate(rows, _pad_id(tokenizer)))
    return batches
