"""Hub ids where a model directory is expected (hub.py), resolved through a Hugging Face cache laid out as
huggingface_hub lays it out, offline: never a download."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
from test_model_card import hub_cache
from test_one_line_errors import one_line
from test_train_e2e import REPO, clean_env, run

from mellama_train.cli import main
from mellama_train.config import hub, resolve
from mellama_train.preflight import validate

MODEL = "acme-med/tiny-llama"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


def test_a_cached_hub_id_resolves_to_its_snapshot_and_back(cache):
    snapshot = hub_cache(cache, MODEL, {"config.json": "{}"})
    cfg = resolve("tiny", task="tune", overrides=["model.init=pretrained", f"model.path={MODEL}"])
    assert cfg.model.path == str(snapshot)
    assert hub.hub_id(cfg.model.path) == MODEL
    assert hub.hub_id(str(snapshot.parent.parent)) is None  # the repo folder is no snapshot
    assert hub.hub_id("/models/llama-2-7b") is None


def test_a_hub_id_missing_from_the_cache_says_which_download_to_run(cache):
    cfg = resolve(
        "tiny", task="tune", overrides=["model.init=pretrained", "model.path=meta-llama/Llama-2-7b-hf"]
    )
    assert cfg.model.path == "meta-llama/Llama-2-7b-hf"  # left as typed: nothing was fetched
    problems, _ = validate(cfg)
    line = next(p for p in problems if p.startswith("model.path:"))
    assert "not a directory here, and not a model in the Hugging Face cache" in line
    assert "`hf download meta-llama/Llama-2-7b-hf`" in line and str(cache) in line
    assert "huggingface-cli" not in line  # huggingface_hub >= 1 ships only the `hf` CLI


def test_a_local_directory_named_like_an_id_stays_a_directory(cache, tmp_path, monkeypatch):
    hub_cache(cache, "models/llama", {"config.json": "{}"})  # an id that is also a relative path here
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "llama").mkdir(parents=True)
    cfg = resolve("tiny", task="tune", overrides=["model.init=pretrained", "model.path=models/llama"])
    assert cfg.model.path == "models/llama"


@pytest.mark.slow
def test_tuning_a_hub_id_base_keeps_the_id_in_the_adapter_and_merge_finds_it(tmp_path):
    """`--base acme-med/tiny-llama` from the cache: the adapter names its base by that id (portable), and
    `mellama-train merge` without --base resolves it through the cache again."""
    from mellama_train.data.tokenizer import load_tokenizer
    from mellama_train.lora import write_random_base

    cache = tmp_path / "hub"
    snapshot = hub_cache(cache, MODEL, {})
    cfg = resolve("tiny", task="tune")
    write_random_base(cfg, load_tokenizer(cfg), snapshot)  # real files in the snapshot: a download's content
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "run"
    tune = [sys.executable, str(REPO / "launch" / "tune.py"), "--base", MODEL, "--output-dir", str(out)]
    run([*tune, "--max-steps", "2", "--set", "data.seq_len=128"], env=env)
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == MODEL
    record = json.loads((out / "run_record.json").read_text())
    assert record["config"]["model"]["path"] == str(snapshot)  # the directory actually read
    merged = tmp_path / "merged"
    run(
        [
            sys.executable,
            "-m",
            "mellama_train",
            "merge",
            "--adapter",
            str(out / "adapter"),
            "--out",
            str(merged),
        ],
        env=env,
    )
    assert (merged / "model.safetensors").is_file()
    command = [sys.executable, "-m", "mellama_train", "merge", "--adapter", str(out / "adapter")]
    missing = subprocess.run(
        [*command, "--out", str(tmp_path / "m2")],
        cwd=REPO,
        env={**clean_env(), **env, "HF_HUB_CACHE": str(tmp_path / "empty")},
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and f"`hf download {MODEL}`" in missing.stderr


@pytest.mark.parametrize(
    "field, shown",
    [
        ({"base_model_name_or_path": 5}, "is 5 (a JSON number)"),
        (
            {"base_model_name_or_path": ["acme-med/tiny-llama", "/m"]},
            'is ["acme-med/tiny-llama", "/m"] (a JSON array)',
        ),
        (
            {"base_model_name_or_path": {"path": "/models/x" * 10}},
            'is {"path": "/models/x/models/x/models/x... (a JSON object)',
        ),
        ({"base_model_name_or_path": True}, "is true (a JSON boolean)"),
        ({"base_model_name_or_path": None}, "is missing or null"),
        ({}, "is missing or null"),
        ({"base_model_name_or_path": "  "}, "is empty"),
        ({"base_model_name_or_path": "/models/a\nb"}, "holds a control character"),
        ({"base_model_name_or_path": "/models/\u202eb"}, "holds a control character"),
    ],
    ids=["number", "array", "object", "boolean", "null", "missing", "blank", "newline", "bidi"],
)
def test_merge_with_an_adapter_naming_no_usable_base_is_one_line_naming_the_file_field_and_fix(
    tmp_path, capsys, field, shown
):
    """The base comes from the adapter's adapter_config.json unless --base is given: a value there that is no
    path (a number, a list, null: an adapter written by hand or by another tool) is one line, not a
    traceback from resolving it."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, **field}))
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter), "--out", str(out)]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"{adapter / 'adapter_config.json'}: base_model_name_or_path {shown}" in line
    assert line.endswith("not a base model directory or Hub id; pass the base with --base")
    assert not out.exists()


@pytest.mark.parametrize(
    "content",
    ["[" * 100_000 + "]" * 100_000, "[1, 2]", "not json", b"\xff\xfe"],
    ids=["nested", "list", "text", "bytes"],
)
def test_merge_with_an_adapter_config_that_is_no_json_object_is_one_line(tmp_path, capsys, content):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = adapter / "adapter_config.json"
    config.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 2
    line = one_line(capsys.readouterr().err)
    assert line == f"error: {config} is not a JSON object; pass the adapter directory PEFT wrote"


def test_merge_with_an_empty_base_flag_is_one_line(tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    assert main(["merge", "--adapter", str(adapter), "--base", " ", "--out", str(tmp_path / "m")]) == 2
    assert one_line(capsys.readouterr().err) == (
        "error: --base is empty; pass the base model's directory or Hub id"
    )
