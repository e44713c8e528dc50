"""A data directory prepared for LLaMA-Factory (dataset_info.json + its files) trains here unchanged."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mellama_train.config import SOURCE_FORMATS, ConfigError, resolve
from mellama_train.data.files import FORMATS
from mellama_train.data.instruct import to_messages
from mellama_train.data.pipeline import count_examples
from mellama_train.data.readers import iter_records
from mellama_train.preflight import validate


@pytest.fixture
def factory_dir(tmp_path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    (data / "qa.json").write_text(
        json.dumps(
            [
                {"q": "Which drug?", "ctx": "A case.", "a": "Metformin.", "hist": [["Hello", "Hi."]]},
                {"q": "Dose?", "ctx": "", "a": "500 mg.", "hist": []},
            ]
        )
    )
    dialog = [
        {"speaker": "SYS", "text": "Be brief."},
        {"speaker": "USER", "text": "Fever?"},
        {"speaker": "BOT", "text": "Check it."},
        {"speaker": "USER", "text": "And then?"},
        {"speaker": "BOT", "text": "Call a doctor."},
    ]
    (data / "chat.jsonl").write_text(json.dumps({"dialog": dialog}) + "\n")
    info = {
        "medqa": {
            "file_name": "qa.json",
            "columns": {"prompt": "q", "query": "ctx", "response": "a", "history": "hist"},
        },
        "chat": {
            "file_name": "chat.jsonl",
            "formatting": "sharegpt",
            "columns": {"messages": "dialog"},
            "tags": {
                "role_tag": "speaker",
                "content_tag": "text",
                "user_tag": "USER",
                "assistant_tag": "BOT",
                "system_tag": "SYS",
            },
        },
        "hub": {"hf_hub_url": "someone/medical-qa"},
        "prefs": {"file_name": "qa.json", "ranking": True},
        "pics": {"file_name": "qa.json", "columns": {"prompt": "q", "images": "img"}},
        "escape": {"file_name": "../../secrets.jsonl"},
    }
    (data / "dataset_info.json").write_text(json.dumps(info))
    return data


def recipe(tmp_path: Path, sources: str) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(f"data:\n  sources:\n{sources}")
    return str(path)


def test_entries_give_the_files_columns_and_speaker_names(factory_dir, tmp_path):
    path = recipe(
        tmp_path,
        f"""    - {{name: medqa, paths: [{factory_dir}], dataset: medqa}}
    - {{name: chat, paths: [{factory_dir}/dataset_info.json], dataset: chat}}
""",
    )
    cfg = resolve("tiny", path, task="tune")
    medqa, chat = cfg.data.sources
    assert medqa.paths == [str(factory_dir / "qa.json")]
    assert medqa.columns == {"instruction": "q", "input": "ctx", "output": "a", "history": "hist"}
    assert validate(cfg)[0] == []
    records = [r for _, r in iter_records(medqa.paths[0])]
    assert to_messages(records[0], medqa.columns) == [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Which drug?\n\nA case."},
        {"role": "assistant", "content": "Metformin."},
    ]
    (record,) = [r for _, r in iter_records(chat.paths[0])]
    assert [m["role"] for m in to_messages(record, chat.columns)] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    assert count_examples(cfg) == 3


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("hub", r"entry 'hub': it is read from a hub \(hf_hub_url\): download it, and give file_name"),
        ("prefs", r"entry 'prefs': preference data \(ranking: true\) is not instruction tuning data"),
        ("pics", r"entry 'pics': images \(images\) cannot be trained here"),
        (
            "nope",
            r"no entry 'nope' \(entries: chat, escape, hub, medqa, pics, prefs\); set the source's dataset",
        ),
        (
            "escape",
            r"entry 'escape': file_name '\.\./\.\./secrets\.jsonl' leaves the directory of dataset_info",
        ),
    ],
)
def test_what_cannot_be_trained_is_refused_naming_the_entry(factory_dir, tmp_path, entry, message):
    path = recipe(tmp_path, f"    - {{name: x, paths: [{factory_dir}], dataset: {entry}}}\n")
    with pytest.raises(ConfigError) as err:
        resolve("tiny", path, task="tune")
    assert any(p.startswith("data.sources[x].dataset: ") for p in err.value.problems)
    assert re.search(message, "\n".join(err.value.problems))


def test_source_formats_match_the_readers():
    assert SOURCE_FORMATS == ("auto", *FORMATS)


def test_a_recipe_source_with_its_own_files_does_not_inherit_the_profiles_columns(factory_dir, tmp_path):
    """The tiny tune profile's `qa` source renames question/context/answer for ITS parquet file."""
    cfg = resolve(
        "tiny", recipe(tmp_path, f"    - {{name: qa, paths: [{factory_dir}], dataset: medqa}}\n"), task="tune"
    )
    assert cfg.data.sources[0].columns == {
        "instruction": "q",
        "input": "ctx",
        "output": "a",
        "history": "hist",
    }
    plain = recipe(tmp_path, f"    - {{name: qa, paths: [{factory_dir}/qa.json]}}\n")
    assert resolve("tiny", plain, task="tune").data.sources[0].columns == {}
    kept = tmp_path / "kept.yaml"
    kept.write_text(
        "data:\n  sources:\n    - {name: qa, weight: 3}\n"
    )  # no paths: the profile's files, and columns
    assert resolve("tiny", str(kept), task="tune").data.sources[0].columns["instruction"] == "question"


def test_hostile_dataset_info_files_are_refused_in_one_line(factory_dir, tmp_path):
    import os

    def problems(entry: str, paths: str) -> str:
        path = recipe(tmp_path, f"    - {{name: x, paths: [{paths}], dataset: {entry}}}\n")
        with pytest.raises(ConfigError) as err:
            resolve("tiny", path, task="tune")
        return "\n".join(err.value.problems)

    info = json.loads((factory_dir / "dataset_info.json").read_text())
    os.symlink(tmp_path, factory_dir / "up")  # a link out of the directory
    (tmp_path / "secret.jsonl").write_text('{"instruction": "x", "output": "y"}\n')
    info.update(
        linked={"file_name": "up/secret.jsonl"},
        typo={"file_name": "qa.json", "tags": {"assitant_tag": "BOT"}},
        listed=["qa.json"],
        numbered={"file_name": 5},
    )
    (factory_dir / "dataset_info.json").write_text(json.dumps(info))
    assert "entry 'linked': file_name 'up/secret.jsonl' leaves the directory" in problems(
        "linked", factory_dir
    )
    assert "entry 'typo': unknown tag 'assitant_tag' (known: role_tag" in problems("typo", factory_dir)
    assert "entry 'listed' is not a mapping of settings" in problems("listed", factory_dir)
    assert "entry 'numbered': file_name must be a path (got 5)" in problems("numbered", factory_dir)
    fifo = tmp_path / "pipe"
    fifo.mkdir()
    os.mkfifo(fifo / "dataset_info.json")  # would block a reader forever
    assert "dataset_info.json: not a regular file" in problems("medqa", fifo)


def test_a_declared_format_the_bytes_contradict_is_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mellama_train.data.files import DataFileError, detect_format

    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "t.data")
    with pytest.raises(
        DataFileError, match=r"t\.data: its bytes show a parquet file, and the source's format says csv"
    ):
        detect_format(str(tmp_path / "t.data"), "csv")
    (tmp_path / "n.data").write_text("text\nhello\n")
    with pytest.raises(DataFileError, match=r"n\.data: its bytes show a non-parquet file, .* says parquet"):
        detect_format(str(tmp_path / "n.data"), "parquet")
    with pytest.raises(DataFileError, match=r"n\.data: is a file, and the source's format hf_dataset reads"):
        detect_format(str(tmp_path / "n.data"), "hf_dataset")
    assert detect_format(str(tmp_path / "n.data"), "text") == "text"  # bytes cannot contradict text or CSV
