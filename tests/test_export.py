"""`mellama-train export`: a ZeRO-3 checkpoint of any step -> a verified, sharded safetensors HF model; and what
it refuses (damaged or foreign checkpoints, unsafe pickles) or fails to verify (exit 1, nothing in OUT_DIR)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_checkpoint import reseal
from test_train_e2e import REPO, clean_env, single
from transformers import AutoModelForCausalLM, AutoTokenizer

from mellama_train.cli import main
from mellama_train.export import verified as hf_export


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """One ZeRO-3 run (one rank, fp32 like the tiny profile) with complete checkpoints at steps 3 and 6."""
    out = tmp_path_factory.mktemp("export") / "run"
    single(out, "--max-steps", "6", "--save-every", "3", "--set", "train.eval_every=3")
    return out


def export(*args: str) -> int:
    return main(["export", *map(str, args)])


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors


@pytest.mark.slow
def test_a_middle_checkpoint_exports_sharded_verified_and_loads(run_dir, tmp_path):
    out = tmp_path / "step3"
    proc = subprocess.run(  # the real command line, once
        [
            sys.executable,
            "-m",
            "mellama_train",
            "export",
            str(run_dir / "checkpoints" / "step_00000003"),
            str(out),
        ]
        + ["--max-shard-size", "300KB"],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "verified: names, shapes, count" in proc.stdout and "(step 3)" in proc.stdout
    report = json.loads((out / "export.json").read_text())
    assert report["step"] == 3 and report["problems"] == [] and report["dtype"] == "bf16"
    assert report["shards"] > 1 and (out / "model.safetensors.index.json").is_file()
    assert report["probe"]["reference_precision"] == "fp32"  # the tiny profile trains in fp32
    assert report["probe"]["mean_diff_over_std"] <= hf_export.PROBE_TOLERANCE["bf16"] + 1e-4
    assert report["peak_anon_bytes"] <= report["memory_bound_bytes"] + 64 * 2**20  # + reader metadata
    assert not (tmp_path / "step3.partial").exists()

    model = AutoModelForCausalLM.from_pretrained(out)  # every tensor found: transformers warns otherwise
    assert model.config.use_cache and model.dtype == torch.bfloat16
    assert sum(p.numel() for p in model.parameters()) == report["parameters"]
    assert len(AutoTokenizer.from_pretrained(out)) == 2048
    card = (out / "README.md").read_text()
    assert "step_00000003" in card and "- steps: 3," in card and "export.json" in card
    # It is step 3's model, not the end's: its weights differ from final/ (step 6).
    final = weights(run_dir / "final")
    assert not torch.equal(weights(out)["lm_head.weight"].float(), final["lm_head.weight"].float())


@pytest.mark.slow
def test_the_run_directory_means_its_newest_checkpoint_and_fp32_equals_final_bitwise(run_dir, tmp_path):
    out = tmp_path / "newest"
    assert export(run_dir, out, "--dtype", "fp32") == 0
    assert json.loads((out / "export.json").read_text())["step"] == 6
    exported, final = weights(out), weights(run_dir / "final")
    assert exported.keys() == final.keys()
    assert all(torch.equal(exported[k], final[k]) for k in final)  # the run trains in fp32: nothing rounds


def tampered_copy(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir / "checkpoints" / "step_00000003", dest / "checkpoints" / "step_00000003")
    return dest / "checkpoints" / "step_00000003"


@pytest.mark.slow
def test_probe_logits_that_do_not_match_exit_1_and_leave_nothing_in_out_dir(run_dir, tmp_path, capsys):
    ckpt = tampered_copy(run_dir, tmp_path / "copy")
    probe = ckpt / "hf" / "probe.safetensors"
    tensors = load_file(str(probe))
    with safe_open(str(probe), "pt") as fh:
        metadata = fh.metadata()
    tensors["logits"] = tensors["logits"] * 1.5  # what a training-time model with other weights would give
    save_file(tensors, str(probe), metadata=metadata)
    out = tmp_path / "model"
    assert export(ckpt, out) == 2  # the manifest's digest catches the edit
    assert f"{ckpt} is damaged: {probe} changed after it was written" in capsys.readouterr().err
    reseal(ckpt)  # as if the logits had been recorded so: only the probe check can tell
    assert export(ckpt, out) == 1
    err = capsys.readouterr().err
    assert "export NOT verified: probe logits differ from the training-time model's by" in err
    assert not out.exists()
    left = json.loads((tmp_path / "model.partial" / "export.json").read_text())
    assert left["problems"] and "probe logits differ" in left["problems"][0]
    # Running it again replaces its own leftover, and a second failure says the same.
    assert export(ckpt, out) == 1 and not out.exists()


@pytest.mark.slow
def test_a_config_that_does_not_match_the_tensors_exits_1_before_writing(run_dir, tmp_path, capsys):
    ckpt = tampered_copy(run_dir, tmp_path / "copy")
    config = ckpt / "hf" / "config.json"
    text = config.read_text()
    assert '"num_hidden_layers": 2' in text
    config.write_text(text.replace('"num_hidden_layers": 2', '"num_hidden_layers": 3'))
    reseal(ckpt)
    assert export(ckpt, tmp_path / "model") == 1
    err = capsys.readouterr().err
    assert "tensors of the model are not in the checkpoint, e.g. model.layers.2." in err
    assert not (tmp_path / "model").exists() and not (tmp_path / "model.partial").exists()


@pytest.mark.slow
def test_what_cannot_be_exported_gets_one_line_naming_the_fix(run_dir, tmp_path, capsys):
    assert export(tmp_path / "nothing-here", tmp_path / "a") == 2
    assert "not a checkpoint (no COMPLETE marker) nor a run directory" in capsys.readouterr().err

    ckpt = tampered_copy(run_dir, tmp_path / "copy")
    optim = next(ckpt.glob("*optim_states.pt"))
    with open(optim, "r+b") as fh:
        fh.truncate(optim.stat().st_size // 2)  # a save cut short by a full disk
    assert export(ckpt, tmp_path / "b") == 2
    err = capsys.readouterr().err
    assert f"{ckpt} is damaged: {optim} is" in err and "export an earlier checkpoint" in err

    older = tampered_copy(run_dir, tmp_path / "older")  # as a LoRA run's, or one of an earlier version
    shutil.rmtree(older / "hf")
    manifest = json.loads((older / "COMPLETE").read_text())
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("hf/")}
    (older / "COMPLETE").write_text(json.dumps(manifest))
    reseal(older)
    assert export(older, tmp_path / "c") == 2
    assert "has no hf/ (config, tokenizer and probe logits)" in capsys.readouterr().err

    assert export(run_dir, tmp_path / "d", "--max-shard-size", "lots") == 2
    assert "--max-shard-size lots: give a number with KB, MB, GB or TB" in capsys.readouterr().err

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("the user's")
    assert export(run_dir, taken) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (taken / "notes.txt").read_text() == "the user's"


@pytest.mark.slow
def test_an_unsafe_pickle_in_a_checkpoint_is_refused_without_running_it(run_dir, tmp_path, capsys):
    """A checkpoint from elsewhere is read with weights_only loads: a pickle that would run code is refused."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ckpt = tampered_copy(run_dir, tmp_path / "copy")
    states = next(ckpt.glob("*model_states.pt"))
    torch.save({"module": {}, "buffer_names": [], "payload": Payload()}, states, pickle_module=pickle)
    reseal(ckpt)  # the attacker recomputes the manifest's digests too

    assert export(ckpt, tmp_path / "model") == 2
    err = capsys.readouterr().err
    assert "DeepSpeed could not read it as a ZeRO checkpoint" in err and "GLOBAL posix.system" in err
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # restored for the rest of the process


def test_conversion_checks_catch_non_finite_and_values_the_cast_zeroes():
    problems: list[str] = []
    hf_export._materialise(torch.tensor([1.0, float("nan")]), torch.bfloat16, "a", problems)
    hf_export._materialise(torch.full((4,), 1e-44), torch.bfloat16, "b", problems)  # below bf16's smallest
    hf_export._materialise(torch.zeros(4), torch.bfloat16, "c", problems)  # zero in the checkpoint too: fine
    hf_export._materialise(torch.empty(0), torch.bfloat16, "d", problems)
    assert problems == [
        "a has non-finite values in the checkpoint",
        "b is all zero after the cast to torch.bfloat16, but not in the checkpoint",
        "d is empty",
    ]


def umask_modes() -> dict[str, set[str]]:
    """What modes() gives for a tree written under this process's umask (022 in CI: 0644 and 0755)."""
    from mellama_train.integrity import umask

    mask = umask()
    return {"files": {oct(0o666 & ~mask)}, "dirs": {oct(0o777 & ~mask)}}


def modes(root: Path) -> dict[str, set[str]]:
    """The read/write bits under `root`, files and directories apart (root itself included). A file's execute
    bits are left out: DeepSpeed copies its zero_to_fp32.py script beside the checkpoints 0744."""
    got: dict[str, set[str]] = {"files": set(), "dirs": set()}
    for path in [root, *root.rglob("*")]:
        mode = path.stat().st_mode
        got["dirs" if path.is_dir() else "files"].add(oct(mode & (0o777 if path.is_dir() else 0o666)))
    return got


@pytest.mark.slow
def test_outputs_follow_the_umask_so_colleagues_can_read_them(run_dir, tmp_path):
    """safetensors and mkstemp write 0600: on a shared cluster nobody else could load the model. Every output
    takes the umask's modes as any other tool's would: 0644/0755 under 022, 0664/0775 under 002."""
    for part in ("final", "checkpoints"):
        assert modes(run_dir / part) == umask_modes(), part  # the run was made under this process's umask
    assert oct((run_dir / "run_record.json").stat().st_mode & 0o777) == umask_modes()["files"].pop()
    out = tmp_path / "shared-export"
    command = f"umask 002; exec {sys.executable} -m mellama_train export {run_dir} {out}"
    proc = subprocess.run(["bash", "-c", command], cwd=REPO, env=clean_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert modes(out) == {"files": {"0o664"}, "dirs": {"0o775"}}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_final_is_written_shard_by_shard_and_loads_as_save_pretrained_writes_it(tmp_path, tied):
    """final/ without the whole state dict on rank 0: planned from the shapes, each shard gathered and written in
    turn. The result loads to the same weights and config as save_pretrained's, in one file or in shards."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mellama_train.backends.single import SingleDeviceBackend
    from mellama_train.export.final import write_hf_model
    from mellama_train.sample_data import TOKENIZER_DIR

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(config)
    reference = tmp_path / "reference"
    model.save_pretrained(reference)  # the inference default, use_cache=True
    model.config.use_cache = False  # as in training
    groups = [{"params": list(model.parameters()), "weight_decay": 0.0}]
    eng = SingleDeviceBackend(
        model,
        groups,
        lambda s: 1.0,
        optimizer="adamw",
        lr=1e-3,
        betas=[0.9, 0.95],
        eps=1e-8,
        grad_clip=1.0,
        accum_steps=1,
    )
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    for name, size in (("one", "5GB"), ("sharded", "200KB")):
        out = tmp_path / name
        write_hf_model(eng, tokenizer, out, True, run_dir=tmp_path, max_shard_size=size)
        shards = sorted(p.name for p in out.glob("*.safetensors"))
        assert (len(shards) > 1) == (name == "sharded"), shards
        assert (out / "model.safetensors.index.json").is_file() == (name == "sharded")
        got = AutoModelForCausalLM.from_pretrained(out)
        want = AutoModelForCausalLM.from_pretrained(reference)
        assert got.state_dict().keys() == want.state_dict().keys()
        assert all(torch.equal(got.state_dict()[k], v) for k, v in want.state_dict().items())
        mine, theirs = (json.loads((d / "config.json").read_text()) for d in (out, reference))
        assert mine == theirs
        assert (out / "generation_config.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert model.config.use_cache is False  # the training model's config is left as it was
