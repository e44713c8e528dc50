"""Every failure a user can fix is one line naming the fix (exit 2), with the traceback only under --debug:
invalid YAML in --set, a pickle-only model or adapter given to `merge` (refused, never unpickled), an output
directory that cannot be one, and bad paths given to every subcommand."""

from __future__ import annotations

import json
import pickle

import pytest

from mellama_train.cli import main


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("command", [["pretrain", "--dry-run"], ["tune", "--dry-run"], ["plan"]])
def test_invalid_yaml_in_set_names_the_override_and_the_fix(command, capsys):
    assert main([*command, "--set", "optim.lr=[1,"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # under the "invalid configuration:" header, like every config problem
    problem = err.strip().splitlines()[-1]
    assert "--set 'optim.lr=[1,': the value is not valid YAML" in problem
    assert "complete it (a list is [a, b]" in problem and "or quote it to pass a string" in problem
    if command[0] != "plan":
        assert main([*command, "--set", "optim.lr=[1,", "--debug"]) == 2
        assert "Traceback" in capsys.readouterr().err


class Payload:
    """Unpickling this runs code: it creates a file. A loader that unpickles the weights would create it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _base(path, weights: str, marker=None):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    if weights.endswith(".safetensors"):
        (path / weights).write_bytes(b"not read: the merge is refused earlier")
    else:
        (path / weights).write_bytes(pickle.dumps({"weight": Payload(marker)}))
    return path


def _adapter(path, weights: str, base, marker=None):
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    if weights.endswith(".safetensors"):
        (path / weights).write_bytes(b"not read")
    else:
        (path / weights).write_bytes(pickle.dumps({"lora_A": Payload(marker)}))
    return path


@pytest.mark.parametrize("pickled", ["base", "adapter"])
def test_merge_refuses_a_pickle_only_model_in_one_line_without_unpickling_it(tmp_path, capsys, pickled):
    marker = tmp_path / "payload-ran"
    base = _base(tmp_path / "base", "pytorch_model.bin" if pickled == "base" else "model.safetensors", marker)
    adapter = _adapter(
        tmp_path / "adapter",
        "adapter_model.bin" if pickled == "adapter" else "adapter_model.safetensors",
        base,
        marker,
    )
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter), "--out", str(out)]) == 2
    line = one_line(capsys.readouterr().err)
    name = "pytorch_model.bin" if pickled == "base" else "adapter_model.bin"
    assert f"the {'base model' if pickled == 'base' else 'adapter'} has only pickle weights ({name})" in line
    assert "unpickling can run code" in line and "save_pretrained(..., safe_serialization=True)" in line
    assert not marker.exists() and not out.exists()

    assert main(["merge", "--adapter", str(adapter), "--out", str(out), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err
    assert not marker.exists()


def test_an_output_dir_that_cannot_be_one_is_refused_before_the_run_starts(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["pretrain", "--output-dir", str(blocker / "run"), "--max-steps", "1"]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"--output-dir {blocker / 'run'}: {blocker} is a file, not a directory; pass a directory" in line


def test_bad_paths_given_to_every_subcommand_are_one_line(tmp_path, capsys):
    missing = str(tmp_path / "missing")
    (tmp_path / "record").mkdir()
    (tmp_path / "record" / "run_record.json").write_text("[]")  # JSON, but not a record
    (tmp_path / "bench.jsonl").write_text(json.dumps({"question": "a b c d e f g h i j k l m n"}) + "\n")
    (tmp_path / "taken").write_text("")
    cases = {
        "status": ["status", missing],
        "status of a damaged record": ["status", str(tmp_path / "record")],
        "report": ["report", missing],
        "export": ["export", missing, str(tmp_path / "export")],
        "eval-harness": ["eval-harness", missing],
        "decontaminate": ["decontaminate", "--benchmarks", missing, "--out", str(tmp_path / "d")],
        "decontaminate into a file": [
            "decontaminate",
            "--benchmarks",
            str(tmp_path / "bench.jsonl"),
            "--out",
            str(tmp_path / "taken"),
        ],
        "merge": ["merge", "--adapter", missing, "--out", str(tmp_path / "m")],
        "plan": ["plan", "--model", missing],
        "launch": ["launch", missing],
    }
    for what, argv in cases.items():
        assert main(argv) == 2, what
        line = one_line(capsys.readouterr().err)
        assert line.startswith(("error: ", "invalid configuration")) or "--model" in line, (what, line)


def test_a_ranks_closing_line_is_one_write_so_ranks_never_run_together(monkeypatch):
    """Ranks run unbuffered (PYTHONUNBUFFERED) and end at the same moment: print() writes the text and its
    newline separately, and two ranks' lines ran together in CI. One write per line cannot interleave."""
    from mellama_train import cli

    writes = []

    class Recorder:
        def write(self, text):
            writes.append(text)

        def flush(self):
            pass

    monkeypatch.setattr(cli.sys, "stderr", Recorder())
    cli.rank_line("error (rank 1): writing step_00000004 failed\n(second line of a message)")
    assert writes == ["error (rank 1): writing step_00000004 failed (second line of a message)\n"]
