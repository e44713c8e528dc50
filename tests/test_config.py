"""Config resolution, validation messages, ds_config "auto" filling and the dry-run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from mellama_train.cli import pretrain_main
from mellama_train.config import ConfigError, profile_names, resolve
from mellama_train.ds_config import check_ds_config, resolve_ds_config
from mellama_train.preflight import validate

REPO = Path(__file__).resolve().parents[1]
DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))


@pytest.mark.parametrize(
    "task,profile", [(task, name) for task in ("pretrain", "tune") for name in profile_names(task)]
)
def test_every_profile_resolves_and_validates(task, profile):
    cfg = resolve(profile, task=task)
    problems, missing = validate(cfg)
    assert problems == [], problems
    if profile == "tiny":
        assert missing == []  # the demo needs nothing from the user
    else:
        assert any(m.startswith("model.path") for m in missing)
    if task == "pretrain" and profile in ("13b", "70b"):
        assert {s.name for s in cfg.data.sources} == {"pubmed", "mimic", "redpajama"}


@pytest.mark.parametrize("profile", ["13b", "70b"])
def test_real_profiles_carry_the_me_llama_recipe(profile):
    cfg = resolve(profile)
    assert cfg.optim.lr == 8e-6
    assert cfg.optim.betas == [0.9, 0.95]
    assert cfg.optim.warmup_ratio == 0.05
    assert cfg.optim.weight_decay == 0.1 and cfg.optim.grad_clip == 1.0
    assert cfg.train.precision == "bf16" and cfg.data.seq_len == 4096
    assert cfg.train.train_tokens == 129_000_000_000
    assert cfg.source_fractions() == {"pubmed": 0.75, "mimic": 0.05, "redpajama": 0.20}
    shapes = {"13b": (5120, 40, 40), "70b": (8192, 80, 8)}[profile]
    assert (cfg.model.arch.hidden_size, cfg.model.arch.num_layers, cfg.model.arch.num_kv_heads) == shapes


@pytest.mark.parametrize("ds_path", DS_CONFIGS, ids=lambda p: p.name)
def test_every_ds_config_is_consistent_and_fully_resolved(ds_path):
    cfg = resolve("13b", overrides=["train.world_size=8"])
    assert check_ds_config(str(ds_path), cfg) == []
    ds = resolve_ds_config(str(ds_path), cfg)
    assert "auto" not in json.dumps(ds)
    assert ds["train_batch_size"] == 1024 and ds["gradient_accumulation_steps"] == 128
    assert ds["train_micro_batch_size_per_gpu"] == 1
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.95]
    assert ds["gradient_clipping"] == 1.0 and ds["bf16"]["enabled"] is True


def test_zero_collective_sizes_never_fall_to_one_matrix_a_bucket_at_small_widths(tmp_path):
    """HF's hidden-size rule (h^2, 0.9 h^2, 10 h) from hidden 2048 up; below it a floor on the buckets, so that
    ZeRO-3 does not make a latency-bound collective per weight matrix (1.48x tokens/s on the tiny model:
    PERFORMANCE.md). The persistence threshold stays 10 h everywhere (the tiny model's decoder weights stay
    partitioned in the 2-rank tests). A value the user wrote stays theirs."""
    from mellama_train.ds_config import MIN_BUCKET

    def sizes(profile: str, path: Path = REPO / "ds_configs/zero3.json", task: str = "pretrain") -> tuple:
        zero = resolve_ds_config(str(path), resolve(profile, task=task))["zero_optimization"]
        keys = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")
        return tuple(zero[k] for k in keys)

    for profile, task in (("13b", "pretrain"), ("70b", "pretrain"), ("13b", "tune"), ("70b", "tune")):
        h = resolve(profile, task=task).model.arch.hidden_size
        assert h * h >= MIN_BUCKET
        assert sizes(profile, task=task) == (
            h * h,
            int(0.9 * h * h),
            10 * h,
        )  # as HF's integration fills them
    assert sizes("tiny") == (MIN_BUCKET, MIN_BUCKET, 640)
    ds = json.loads((REPO / "ds_configs/zero3.json").read_text())
    ds["zero_optimization"]["reduce_bucket_size"] = 1000
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    assert sizes("tiny", tmp_path / "ds.json")[0] == 1000


def test_ds_config_contradicting_the_recipe_names_both_numbers(tmp_path):
    ds = json.loads((REPO / "ds_configs/zero3.json").read_text())
    ds["gradient_clipping"] = 0.5
    ds["optimizer"]["params"]["lr"] = 1e-4
    ds["scheduler"] = {"type": "WarmupLR"}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    problems = check_ds_config(str(path), resolve("13b"))
    assert any("gradient_clipping is 0.5 but the recipe gives 1.0" in p for p in problems)
    assert any("optimizer.params.lr is 0.0001 but the recipe gives 8e-06" in p for p in problems)
    assert any("scheduler" in p and "remove it" in p for p in problems)


def test_precedence_profile_recipe_aliases_overrides(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "optim: {lr: 1.0e-5}\n"
        "train: {save_every: 7}\n"
        "data:\n  sources:\n    - {name: pubmed, paths: [/data/pubmed/*.jsonl.gz]}\n"
    )
    cfg = resolve(
        "13b",
        str(recipe),
        overrides=["optim.lr=2e-5", "data.sources.pubmed.weight=3"],
        aliases={"train.save_every": 9, "train.max_steps": None},
    )
    assert cfg.optim.lr == 2e-5  # --set beats the recipe
    assert cfg.train.save_every == 9  # the alias beats the recipe
    assert cfg.train.max_steps is None  # an alias left unset changes nothing
    # The recipe's source list replaces the profile's, inheriting unset fields from a same-named source.
    assert [(s.name, s.paths, s.weight) for s in cfg.data.sources] == [
        ("pubmed", ["/data/pubmed/*.jsonl.gz"], 3.0)
    ]


def test_validation_lists_every_problem_with_its_fix():
    cfg = resolve(
        "tiny",
        overrides=[
            "data.sources.mimic.weight=0",
            "optim.warmup_ratio=1.5",
            "train.keep_last=1",
            "train.global_batch_size=7",
        ],
    )
    problems, _ = validate(cfg)
    text = "\n".join(problems)
    assert "data.sources[mimic].weight must be > 0 (got 0.0); drop the source or give it a weight" in text
    assert "optim.warmup_ratio must be in [0, 1) (got 1.5)" in text
    assert "train.keep_last must be >= 2 (got 1)" in text
    assert (
        "train.global_batch_size (7) must be divisible by micro_batch_size (4) x world size (1) = 4" in text
    )
    assert len(problems) == 4


def test_unknown_field_and_bad_type_are_reported_together():
    with pytest.raises(ConfigError) as err:
        resolve("tiny", overrides=["train.max_step=3", "optim.lr=fast"])
    assert sorted(err.value.problems) == [
        "optim.lr must be float (got 'fast')",
        "train.max_step: unknown field; did you mean `max_steps`?",
    ]


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(ConfigError, match="choose one of 13b, 70b, 8gb, tiny"):
        resolve("7b")


def test_derived_numbers():
    cfg = resolve("13b", overrides=["train.world_size=64"])
    d = cfg.derived()
    assert d["global_batch_tokens"] == 1024 * 4096
    assert d["grad_accum_steps"] == 16
    assert d["total_steps"] == math.ceil(129e9 / (1024 * 4096))
    assert d["warmup_steps"] == round(0.05 * d["total_steps"])
    assert sum(d["tokens_per_source"].values()) == pytest.approx(d["total_tokens"], abs=3)


def test_dry_run_of_a_bare_profile_exits_0_and_lists_what_a_run_needs(capsys):
    assert pretrain_main(["--profile", "13b", "--dry-run", "--set", "train.world_size=16"]) == 0
    out = capsys.readouterr().out
    assert "lr: 8.0e-06" in out
    assert "total steps:             30,756" in out
    assert "warmup steps:            1,538" in out
    assert "pubmed                  75.0%" in out
    assert "a real run still needs:" in out and "data.sources[mimic].paths" in out


@pytest.mark.parametrize("flag", ["--ds", "--deepspeed"])
def test_deepspeed_is_the_same_flag_as_ds(flag, tmp_path, capsys):
    """HF Trainer's, LLaMA-Factory's and axolotl's users type --deepspeed: it sets train.ds_config like --ds."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    assert pretrain_main([flag, str(ds), "--dry-run"]) == 0
    assert f"ds_config: {ds}" in capsys.readouterr().out


def test_dry_run_with_invalid_values_exits_2_and_says_why(capsys):
    assert pretrain_main(["--dry-run", "--set", "optim.lr=-1"]) == 2
    assert "optim.lr must be > 0 (got -1.0)" in capsys.readouterr().out


def test_real_run_refuses_missing_inputs_before_touching_devices(capsys):
    assert pretrain_main(["--profile", "13b"]) == 2
    err = capsys.readouterr().err
    assert "missing model.path" in err and "missing data.sources[pubmed].paths" in err


def test_sample_data_placeholder_expands_inside_the_package():
    cfg = resolve("tiny")
    assert all("${sample_data}" not in p for s in cfg.data.sources for p in s.paths)
    assert Path(cfg.model.tokenizer, "tokenizer.model").is_file()


def test_config_reference_doc_is_current():
    """docs/CONFIG.md is generated from the dataclass docstrings; a new field must regenerate it."""
    proc = subprocess.run([sys.executable, str(REPO / "tools/gen_config_docs.py"), "--check"], cwd=REPO)
    assert proc.returncode == 0, "docs/CONFIG.md is stale: run python tools/gen_config_docs.py"


def test_pretrained_model_dir_is_checked_against_seq_len(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 128}))
    cfg = resolve("tiny", overrides=["model.init=pretrained", f"model.path={tmp_path}"])
    problems, _ = validate(cfg)
    assert (
        f"data.seq_len (256) exceeds {tmp_path}'s max_position_embeddings (128); use data.seq_len <= 128"
        in problems
    )
    cfg = resolve("tiny", overrides=["model.init=pretrained", f"model.path={tmp_path / 'nope'}"])
    assert any("has no config.json" in p for p in validate(cfg)[0])
