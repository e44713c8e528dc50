"""LLaMA-Factory's `dataset_info.json`: a tuning source named by one of its entries reads that entry's file with
its column and role names, so a data directory prepared for LLaMA-Factory trains here unchanged.

    - {name: medqa, paths: [/data/llamafactory/data], dataset: medqa_alpaca}

`paths` names the directory holding dataset_info.json (or the file itself). The entry's `file_name` (a file or
a directory, relative to it) becomes the source's paths; `formatting` (alpaca, the default, or sharegpt) and
`columns` become the source's `columns` in our names (alpaca: prompt -> instruction, query -> input, response ->
output, history, system; sharegpt: messages -> conversations, system); `tags` (role_tag, content_tag, user_tag,
assistant_tag, system_tag) name the speaker and text keys and the role names of the turns. Columns the source
sets itself win. What this trainer does not train from is refused with the entry named, never half-read:
entries on a hub (`hf_hub_url`, `ms_hub_url`, `om_hub_url`, `script_url`: download the data and give
`file_name`), preference data (`ranking`, `chosen`/`rejected`, `kto_tag`), images/videos/audio, tools, and
`num_samples` (which would train a different number of examples).

The file is parsed with the json module into plain data only, and read once at resolution time.
"""

from __future__ import annotations

import json
import os
from typing import Any

INFO_FILE = "dataset_info.json"
_ALPACA = {
    "prompt": "instruction",
    "query": "input",
    "response": "output",
    "history": "history",
    "system": "system",
}
_SHAREGPT = {"messages": "conversations", "system": "system"}
TAGS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "system_tag")
"""LLaMA-Factory's tag names, also accepted as `columns` keys of any tuning source (instruct.py reads them)."""
_UNUSED_TAGS = ("observation_tag", "function_tag")  # tool turns: such turns are counted skips (bad_messages)
_HUB = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url")
_UNSUPPORTED_COLUMNS = {
    "chosen": "preference data",
    "rejected": "preference data",
    "kto_tag": "preference data",
    "images": "images",
    "videos": "videos",
    "audios": "audio",
    "tools": "tool definitions",
}
_MAX_INFO_BYTES = 16 * 2**20


def _info_file(paths: list[str]) -> str:
    if len(paths) != 1:
        raise ValueError(f"give one path: the directory holding {INFO_FILE} (or the file itself)")
    path = os.path.expanduser(paths[0])
    return path if os.path.basename(path) == INFO_FILE else os.path.join(path, INFO_FILE)


def _load(info: str) -> dict[str, Any]:
    try:
        if not os.path.isfile(info):  # a pipe or a device would hang or never end: a regular file only
            what = "not found" if not os.path.exists(info) else "not a regular file"
            raise ValueError(f"{info}: {what}; point paths at the directory holding {INFO_FILE}")
        with open(info, "rb") as fh:
            raw = fh.read(_MAX_INFO_BYTES + 1)
        if len(raw) > _MAX_INFO_BYTES:
            raise ValueError(f"{info}: larger than 16 MiB; is it LLaMA-Factory's {INFO_FILE}?")
        entries = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(
            f"{info}: cannot be read as JSON ({type(err).__name__}); fix or re-create it"
        ) from None
    if not isinstance(entries, dict):
        raise ValueError(f"{info}: not a mapping of dataset names to entries, as LLaMA-Factory writes it")
    return entries


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def resolve_entry(paths: list[str], name: str, columns: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """(the source's paths, its columns) from entry `name`; ValueError with one line naming the fix."""
    info = _info_file(paths)
    entries = _load(info)
    if name not in entries:
        known = ", ".join(sorted(_short(k).strip("'") for k in entries)[:12])
        raise ValueError(
            f"{info}: no entry {name!r} (entries: {known}); set the source's dataset to one of them"
        )
    entry = entries[name]
    where = f"{info}: entry {name!r}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is not a mapping of settings (file_name, formatting, columns, tags)")
    file_name = entry.get("file_name")
    if file_name is not None and not isinstance(file_name, str):
        raise ValueError(f"{where}: file_name must be a path (got {_short(file_name)})")
    if not file_name:
        hub = next((key for key in _HUB if entry.get(key)), None)
        fix = (
            f"it is read from a hub ({hub}): download it, and give file_name"
            if hub
            else "it has no file_name"
        )
        raise ValueError(f"{where}: {fix}")
    if entry.get("ranking"):
        raise ValueError(f"{where}: preference data (ranking: true) is not instruction tuning data")
    if entry.get("num_samples") is not None:
        raise ValueError(f"{where}: num_samples would train a different number of examples; drop it")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        raise ValueError(f"{where}: formatting {_short(formatting)} is neither alpaca nor sharegpt")
    ours = _ALPACA if formatting == "alpaca" else _SHAREGPT
    given = entry.get("columns") or {}
    tags = entry.get("tags") or {}
    if not isinstance(given, dict) or not isinstance(tags, dict):
        raise ValueError(f"{where}: columns and tags must be mappings of names")
    mapped: dict[str, str] = {}
    for theirs, field_name in given.items():
        if theirs in _UNSUPPORTED_COLUMNS:
            raise ValueError(f"{where}: {_UNSUPPORTED_COLUMNS[theirs]} ({theirs}) cannot be trained here")
        if theirs not in ours:
            raise ValueError(f"{where}: column {_short(theirs)} has no meaning for {formatting} data")
        if not isinstance(field_name, str):
            raise ValueError(f"{where}: column {theirs!r} must name a field (got {_short(field_name)})")
        mapped[ours[theirs]] = field_name
    if formatting == "sharegpt" and "conversations" not in mapped:
        mapped["conversations"] = "conversations"  # LLaMA-Factory's default messages column
    for tag, value in tags.items():
        if tag not in (*TAGS, *_UNUSED_TAGS):
            raise ValueError(
                f"{where}: unknown tag {_short(tag)} (known: {', '.join((*TAGS, *_UNUSED_TAGS))})"
            )
        if not isinstance(value, str):
            raise ValueError(f"{where}: tag {tag} must be a name (got {_short(value)})")
        if tag in TAGS:
            mapped[tag] = value
    base = os.path.realpath(os.path.dirname(os.path.abspath(info)))
    data = os.path.join(base, file_name)
    # Links resolved: a link inside the directory to a file outside it leaves the directory too.
    if os.path.isabs(file_name) or os.path.commonpath([base, os.path.realpath(data)]) != base:
        # dataset_info.json often comes with downloaded data: it must not point training at any file on disk
        raise ValueError(
            f"{where}: file_name {file_name!r} leaves the directory of {INFO_FILE}; give a path inside it"
        )
    return [data], {**mapped, **columns}
