"""`mellama-train eval-harness`: lm-evaluation-harness on the tiny model with a local task file (no Hub), and
the one-line messages for a missing extra, unknown tasks and task data that cannot be reached."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mellama_train.cli import main
from mellama_train.config import resolve
from mellama_train.model import load_tokenizer, model_config

pytest.importorskip("lm_eval", reason="the eval extra (lm-eval-harness) is not installed")

# Synthetic questions with 4 options each (no real exam items): the shape of MedMCQA / MedQA records.
QUESTIONS = [
    ("Which organ produces insulin?", ["pancreas", "liver", "kidney", "spleen"], 0),
    ("What does a stethoscope mostly listen to?", ["bones", "heart sounds", "skin", "hair"], 1),
    ("Which vitamin does skin make in sunlight?", ["vitamin C", "vitamin K", "vitamin D", "vitamin B12"], 2),
    (
        "A normal adult resting heart rate, per minute?",
        ["10 to 20", "200 to 250", "60 to 100", "150 to 200"],
        2,
    ),
    ("Which cells carry oxygen in blood?", ["red blood cells", "platelets", "neurons", "adipocytes"], 0),
    ("Where is the femur?", ["arm", "thigh", "skull", "chest"], 1),
]
TASK_YAML = """task: local_mcq
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{options}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


_TASK_INDEXES: dict[object, object] = {}


@pytest.fixture(autouse=True)
def shared_task_index(monkeypatch):
    """lm-eval's TaskManager indexes the harness's thousands of task YAMLs when built (about 10 s here); the
    calls in these tests share one per include path instead of each indexing again."""
    import lm_eval.tasks

    real = lm_eval.tasks.TaskManager

    def shared(include_path=None, **kwargs):
        key = (include_path, tuple(sorted(kwargs.items())))
        if key not in _TASK_INDEXES:
            _TASK_INDEXES[key] = real(include_path=include_path, **kwargs)
        return _TASK_INDEXES[key]

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", shared)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random tiny LLaMA with the sample tokenizer, saved as a Hugging Face directory."""
    out = tmp_path_factory.mktemp("harness") / "model"
    cfg = resolve("tiny")
    tok = load_tokenizer(cfg)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(model_config(cfg, len(tok))).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture
def local_task(tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tmp_path / "mcq.jsonl"
    data.write_text(
        "".join(json.dumps({"question": q, "options": o, "answer": a}) + "\n" for q, o, a in QUESTIONS)
    )
    (tasks / "local_mcq.yaml").write_text(TASK_YAML.format(data=data))
    return tasks


@torch.no_grad()
def expected_accuracy(model_dir) -> float:
    """What the harness's multiple-choice accuracy must be, computed here: for each question, the option whose
    tokens (after a space) get the highest summed log-probability after the prompt."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    right = 0
    for question, options, answer in QUESTIONS:
        context = f"Question: {question}\nAnswer:"
        scores = []
        for option in options:
            whole = tok(context + " " + option).input_ids
            n_context = len(tok(context).input_ids)
            logits = model(torch.tensor([whole])).logits.log_softmax(-1)[0]
            scores.append(sum(float(logits[i - 1, whole[i]]) for i in range(n_context, len(whole))))
        right += int(max(range(len(options)), key=scores.__getitem__) == answer)
    return right / len(QUESTIONS)


def test_the_harness_scores_the_model_on_a_local_task(tiny_model, local_task, tmp_path, capsys):
    out = tmp_path / "scores.json"
    assert (
        main(
            ["eval-harness", str(tiny_model), "--tasks", "local_mcq", "--include-path", str(local_task)]
            + ["--out", str(out)]
        )
        == 0
    )
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["tasks"] == ["local_mcq"] and report["n-samples"]["local_mcq"]["effective"] == len(
        QUESTIONS
    )
    acc = report["results"]["local_mcq"]["acc,none"]
    assert acc == pytest.approx(expected_accuracy(tiny_model))
    assert "local_mcq" in printed and "acc" in printed
    # No question text is kept (per-sample logging is off).
    assert not any(q in out.read_text() or q in printed for q, _, _ in QUESTIONS)


def test_a_missing_extra_an_unknown_task_and_unreachable_data_are_one_line_each(
    tiny_model, local_task, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the extra were not installed
    assert main(["eval-harness", str(tiny_model), "--tasks", "medqa"]) == 2
    err = capsys.readouterr().err
    assert "lm-eval-harness is not installed" in err and "pip install 'mellama-train[eval]'" in err
    monkeypatch.delitem(sys.modules, "lm_eval")

    assert main(["eval-harness", str(tiny_model), "--tasks", "pubmedqaa"]) == 2
    assert "unknown to lm-eval-harness: pubmedqaa (did you mean pubmedqa" in capsys.readouterr().err

    # This machine, like many clusters, cannot reach the Hub. Offline mode as a user sets it (HF_HUB_OFFLINE=1
    # before starting): the libraries read it at import, which in this process is already done. Without it
    # the same line comes after ~23 s of retries.
    import datasets
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    assert main(["eval-harness", str(tiny_model), "--tasks", "pubmedqa"]) == 2
    err = capsys.readouterr().err
    assert "task pubmedqa: its data is not available" in err and "--include-path" in err

    assert main(["eval-harness", str(tiny_model.parent), "--tasks", "medqa"]) == 2
    assert "not a Hugging Face model directory" in capsys.readouterr().err
