"""Bad input that the other test files do not already cover (docs/FAULTS.md maps every case to its test): each
gets one line naming the file or field and the fix."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from mellama_train.config import ConfigError, SourceConfig, resolve
from mellama_train.data.pipeline import build_train_batches
from mellama_train.model import build_model
from mellama_train.preflight import validate
from mellama_train.sample_data import TOKENIZER_DIR


def test_two_sources_with_one_name_are_refused():
    cfg = resolve("tiny", overrides=["data.sources.1.name=pubmed"])
    problems, _ = validate(cfg)
    assert "data.sources[pubmed].name is used by 2 sources; give each source its own name" in problems


def test_a_recipe_that_is_not_yaml_names_the_file_and_line(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("data:\n  seq_len: 64\n  sources: [unclosed\n")
    with pytest.raises(ConfigError) as err:
        resolve("tiny", str(recipe))
    (problem,) = err.value.problems
    assert problem.startswith(f"{recipe}: line ") and "is not valid YAML" in problem


def test_all_weights_zero_lists_every_source():
    cfg = resolve("tiny", overrides=[f"data.sources.{n}.weight=0" for n in ("pubmed", "mimic", "redpajama")])
    problems, _ = validate(cfg)
    assert (
        sum("weight must be > 0 (got 0.0); drop the source or give it a weight" in p for p in problems) == 3
    )


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused(tmp_path):
    small = LlamaConfig(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    LlamaForCausalLM(small).save_pretrained(tmp_path / "model")
    cfg = resolve(
        "tiny",
        overrides=["model.init=pretrained", f"model.path={tmp_path / 'model'}", "data.seq_len=64"],
    )
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    with pytest.raises(
        ValueError, match="has 2048 tokens but the model's vocab_size is 512; use the tokenizer"
    ):
        build_model(cfg, tokenizer)


def test_a_source_with_no_records_is_refused_by_name(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    cfg = resolve("tiny", overrides=["data.seq_len=32"])
    (tmp_path / "empty.jsonl").write_text("")
    cfg.data.sources = [SourceConfig(name="notes", paths=[str(tmp_path / "empty.jsonl")])]
    with pytest.raises(ValueError, match=r"data.sources\[notes\]: its 1 file\(s\) are all empty"):
        build_train_batches(cfg, tokenizer, 0, 1)  # at start-up, before any model is built
    (tmp_path / "blank.jsonl").write_text("\n  \n")  # not empty, but no record in it
    cfg.data.sources = [SourceConfig(name="notes", paths=[str(tmp_path / "blank.jsonl")])]
    batches = build_train_batches(cfg, tokenizer, 0, 1)
    with pytest.raises(ValueError, match=r"data.sources\[notes\]: rank 0 of 1 found no usable document in 1"):
        next(batches)


def test_every_test_named_in_docs_faults_exists():
    """docs/FAULTS.md maps each failure mode to its test: the names must stay real."""
    import re
    from pathlib import Path

    tests = Path(__file__).parent
    doc = (tests.parent / "docs" / "FAULTS.md").read_text()
    named = re.findall(r"(test_\w+\.py)::(test_\w+)", doc)
    assert len(named) >= 20
    missing = [f"{f}::{t}" for f, t in named if f"def {t}(" not in (tests / f).read_text()]
    assert not missing


def test_a_model_or_adapter_with_only_pickle_weights_is_refused_before_anything_is_loaded(tmp_path):
    """Training reads safetensors only: a pytorch_model.bin is never unpickled (it could run code)."""
    model_dir, adapter_dir = tmp_path / "model", tmp_path / "adapter"
    for directory, config in ((model_dir, "config.json"), (adapter_dir, "adapter_config.json")):
        directory.mkdir()
        (directory / config).write_text('{"max_position_embeddings": 4096}')
    (model_dir / "pytorch_model.bin").write_bytes(b"a pickle")
    (adapter_dir / "adapter_model.bin").write_bytes(b"a pickle")
    cfg = resolve(
        "tiny",
        task="tune",
        overrides=[
            "model.init=pretrained",
            f"model.path={model_dir}",
            f"model.init_adapter={adapter_dir}",
        ],
    )
    problems, _ = validate(cfg)
    model_line = next(p for p in problems if p.startswith("model.path:"))
    adapter_line = next(p for p in problems if p.startswith("model.init_adapter:"))
    assert "only pickle weights (pytorch_model.bin), which training does not load" in model_line
    assert "only pickle weights (adapter_model.bin), which training does not load" in adapter_line
    assert "save_pretrained(..., safe_serialization=True)" in model_line


def test_a_model_config_that_is_not_a_json_object_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("[" * 100_000)  # deeper than the parser recurses
    (tmp_path / "model.safetensors").write_bytes(b"")
    problems, _ = validate(resolve("tiny", overrides=["model.init=pretrained", f"model.path={tmp_path}"]))
    assert (
        f"model.path: {tmp_path}/config.json is not a readable JSON object; restore the model's config"
        in problems
    )
