"""What an instruction record is: our names of its fields (a source's `columns` maps them to the file's), the
speaker names published sets use, the formats accepted, and why a record is none of them. Shared by the reader
(instruct.py) and the start-up check of every file (source.py), so neither imports the other."""

from __future__ import annotations

from typing import Any

from mellama_train.config.llamafactory import TAGS

FIELDS = ("instruction", "input", "output", "system", "history", "messages", "conversations", *TAGS)
"""Our names of a record's fields (a source's `columns` maps them to the file's), and the speaker tags."""
ROLE_NAMES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
}
"""Speaker names as published data sets spell them (OpenAI `role`; ShareGPT/Vicuna `from`: human, gpt, and the
names of the assistants their conversations were collected from) -> our three roles."""
FORMATS = (
    "alpaca (instruction, input, output; optional system and history: earlier [instruction, response] pairs)",
    "ShareGPT (conversations: [{from: human|gpt|system, value}])",
    "OpenAI messages (messages: [{role: system|user|assistant, content}])",
)

_PROMPT_NAMES = {"question", "prompt", "query", "instruction", "input_text", "context", "problem", "q"}
_ANSWER_NAMES = {"answer", "response", "output", "completion", "target", "output_text", "solution", "a"}
"""Field names published QA sets use for the two sides of an example: the nearest `columns` mapping names them."""


def not_an_instruction(record: dict[str, Any], columns: dict[str, str], label: str) -> str | None:
    """Why a record cannot be an instruction example (none of FORMATS), or None: the formats that
    exist, the nearest match and the `columns` mapping that would take it. Field names only: they are the
    file's schema, not its content."""

    def has(name: str) -> bool:
        return record.get(columns.get(name, name)) is not None

    if has("messages") or has("conversations") or (has("instruction") and has("output")):
        return None
    names = sorted(map(str, record))
    fields = ", ".join(names[:12])
    lists = [name for name in names if isinstance(record.get(name), list)]
    asks = [n for n in names if n.lower() in _PROMPT_NAMES]
    answers = [n for n in names if n.lower() in _ANSWER_NAMES]
    if asks and answers:  # a question/answer table: the alpaca layout under other names
        nearest = f"{{instruction: {asks[0]}, output: {answers[0]}}}"
    elif lists:  # a list of turns under another name: the ShareGPT/OpenAI layouts
        nearest = f"{{conversations: {lists[0]}}} (ShareGPT turns) or {{messages: {lists[0]}}}"
    else:
        nearest = "{instruction: question, output: answer}"
    return (
        f"it matches none of the instruction formats ({'; '.join(FORMATS)}): its fields are {fields}; map"
        f" them with {label.rsplit('.', 1)[0]}.columns, e.g. {nearest}"
    )
