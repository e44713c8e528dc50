"""The loop's save and stop policy, run in-process through the real `train()` with a fake backend: no DeepSpeed,
no process group, scripted losses. What is asserted is the loop's behaviour (which steps are saved, which are
kept, where and why a run stops, that a stopped run resumes where it stopped), which the 2-rank tests also see
but slowly and only for the cases they plant.

The fake keeps the real backends' semantics (backends/base.py): a step is counted at every accumulation end and
discarded when its backward carried a non-finite value, which is how the guard rejects a step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from mellama_train import integrity
from mellama_train import train as train_module
from mellama_train.backends import DistEnv
from mellama_train.checkpoint import complete_checkpoints
from mellama_train.config import resolve
from mellama_train.data.packing import IGNORE_INDEX
from mellama_train.evaluation import Forgetting
from mellama_train.guard import Diverged
from mellama_train.preemption import Preempted
from mellama_train.preflight import preflight

STATE = "fake_state.pt"


class FakeBackend:
    """The Backend verbs over a real tiny model whose losses are scripted: `train_loss(step)` for the training
    forwards of optimizer step `step` (1-based), `eval_loss(evaluation)` for the held-out passes of the n-th
    evaluation (0: the step-0 one)."""

    def __init__(self, model: torch.nn.Module, env: DistEnv, accum: int, script: Script):
        self.env, self._module, self.accum, self.script = env, model, accum, script
        self.micro = self.optimizer_steps = self.skipped = 0
        self.step_applied, self._poisoned = True, False
        self._evaluating = False

    @property
    def module(self) -> torch.nn.Module:
        return self._module

    def __call__(self, **inputs: torch.Tensor) -> Any:
        return self._module(**inputs)

    def forward_loss(self, batch: dict[str, torch.Tensor], num_sources: int):
        labels, sources = batch["labels"][:, 1:], batch["source_ids"][:, 1:]
        valid = labels != IGNORE_INDEX
        counts = torch.zeros(num_sources, dtype=torch.float64)
        counts.index_add_(0, sources[valid], torch.ones(int(valid.sum()), dtype=torch.float64))
        if self._module.training:
            value = self.script.train_loss(self.optimizer_steps + 1)
            self.script.on_forward(self.optimizer_steps + 1)
        else:
            value = self.script.eval_loss(self.script.evaluations)
            self._evaluating = True
        return torch.tensor(value * float(counts.sum())), counts * value, counts

    def backward(self, loss: torch.Tensor) -> None:
        self._poisoned |= not bool(torch.isfinite(loss))

    def step(self) -> None:
        self.micro += 1
        if self.micro % self.accum:
            return
        self.step_applied = not self._poisoned
        self.skipped += not self.step_applied
        self._poisoned = False
        self.optimizer_steps += 1

    def train(self) -> None:
        if self._evaluating:  # one evaluation is over
            self.script.evaluations += 1
            self._evaluating = False
        self._module.train()

    def eval(self) -> None:
        self._module.eval()

    lr = 1e-3
    grad_norm = 1.0
    exportable = False

    def save(self, checkpoints_dir: str, tag: str) -> dict[str, integrity.FileDigest]:
        path = Path(checkpoints_dir) / tag / STATE
        self.script.saves.append(int(tag.split("_")[1].split(".")[0]))
        state = {"global_steps": self.optimizer_steps, "skipped_steps": self.skipped}
        return {str(path): integrity.save_torch(state, path)}

    def saved_counters(self, step_dir: str, rank: int) -> dict[str, int] | None:
        state = integrity.safe_load(str(Path(step_dir) / STATE))
        return {**state, "scheduler_steps": -1}

    reshapes = False

    def load(self, checkpoints_dir: str, tag: str, reshape: bool = False) -> None:
        state = integrity.safe_load(str(Path(checkpoints_dir) / tag / STATE))
        self.optimizer_steps, self.skipped = state["global_steps"], state["skipped_steps"]
        self.micro = self.optimizer_steps * self.accum

    def read_file(self, path: str, mmap: bool = False) -> Any:
        return integrity.safe_load(path, mmap=mmap)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return self._module.state_dict()

    def full_tensors(self) -> dict[str, torch.Tensor]:
        return {
            n: torch.empty(w.shape, dtype=w.dtype, device="meta")
            for n, w in self._module.state_dict().items()
        }

    @contextlib.contextmanager
    def gathered_full(self, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
        weights = self._module.state_dict()
        yield {n: weights[n] for n in names}


class Script:
    """What the fake backend reports, and what it saw."""

    def __init__(
        self,
        train_loss: Callable[[int], float] = lambda step: 2.0,
        eval_loss: Callable[[int], float] = lambda n: 2.0,
        on_forward: Callable[[int], None] = lambda step: None,
    ):
        self.train_loss, self.eval_loss, self.on_forward = train_loss, eval_loss, on_forward
        self.saves: list[int] = []
        self.evaluations = 0


class FakeMaker:
    ds_config: dict[str, Any] = {}

    def __init__(self, script: Script, accum: int):
        self.script, self.accum = script, accum

    def start(self, timeout_minutes: int) -> DistEnv:
        return DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))

    @contextlib.contextmanager
    def building_model(self) -> Iterator[torch.device]:
        yield torch.device("cpu")

    def wrap(self, model, param_groups, lr_lambda, env) -> FakeBackend:
        return FakeBackend(model, env, self.accum, self.script)

    def release_model_construction(self) -> None:
        pass


def run(monkeypatch, out: Path, script: Script, *overrides: str) -> Path:
    cfg = resolve(
        "tiny",
        overrides=[
            f"train.output_dir={out}",
            "train.backend=single",
            "train.max_steps=6",
            "train.save_every=2",
            "train.keep_last=2",
            "train.eval_every=0",
            "train.eval_batches=1",
            "data.seq_len=64",
            *overrides,
        ],
    )
    checked = preflight(cfg)
    assert checked.ok, checked.problems + checked.missing
    monkeypatch.setattr(train_module, "open_backend", lambda *args: FakeMaker(script, cfg.grad_accum_steps))
    return train_module.train(checked.config)


def steps_kept(out: Path) -> list[int]:
    return [int(p.name.split("_")[1]) for p in complete_checkpoints(out / "checkpoints")]


def test_saves_at_the_interval_and_the_last_step_and_keeps_the_newest(monkeypatch, tmp_path):
    script = Script()
    run(monkeypatch, tmp_path / "run", script, "train.max_steps=5")
    assert script.saves == [2, 4, 5]  # the interval, then the last step
    assert steps_kept(tmp_path / "run") == [4, 5]  # train.keep_last=2
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_divergence_stops_after_saving_the_last_good_weights(monkeypatch, tmp_path):
    script = Script(train_loss=lambda step: math.nan if step >= 3 else 2.0)
    with pytest.raises(Diverged) as caught:
        run(monkeypatch, tmp_path / "run", script, "train.max_consecutive_skips=2")
    assert caught.value.step == 5  # steps 3, 4 and 5 skipped: more than 2 in a row end the run
    assert script.saves == [2, 4, 5]
    assert "step_00000005" in str(caught.value)
    assert not (tmp_path / "run" / "final").exists()


def test_a_stop_signal_saves_and_stops_at_the_end_of_its_step_then_the_run_resumes_there(
    monkeypatch, tmp_path
):
    def signal_in_step_2(step: int) -> None:
        if step == 2 and not fired:
            fired.append(step)
            signal.raise_signal(signal.SIGTERM)  # the StopFlag train() installed records it

    fired: list[int] = []
    script = Script(on_forward=signal_in_step_2)
    with pytest.raises(Preempted) as caught:
        run(monkeypatch, tmp_path / "run", script, "train.save_every=10")
    # The signal came during step 2's forward; the stop votes travel in the step's one collective, after its
    # last forward: every rank stops at the end of step 2.
    assert caught.value.step == 2 and caught.value.reason == "SIGTERM"
    assert script.saves == [2] and steps_kept(tmp_path / "run") == [2]

    again = Script()
    run(monkeypatch, tmp_path / "run", again, "train.save_every=10")  # resume: auto
    assert again.saves == [6]  # steps 3..6 only: the run went on from step 2
    assert steps_kept(tmp_path / "run") == [2, 6]


def test_forgetting_stops_after_saving_when_asked_and_only_logs_when_not(monkeypatch, tmp_path):
    rising = Script(eval_loss=lambda n: 2.0 if n == 0 else 3.0)  # 1 nat above step 0 from the 2nd evaluation
    knobs = ["train.eval_every=2", "train.forgetting_margin=0.5", "train.save_every=10"]
    with pytest.raises(Forgetting) as caught:
        run(monkeypatch, tmp_path / "stop", rising, *knobs, "train.stop_on_forgetting=true")
    assert caught.value.step == 2 and rising.saves == [2]

    logged = Script(eval_loss=lambda n: 2.0 if n == 0 else 3.0)
    run(monkeypatch, tmp_path / "log", logged, *knobs, "train.stop_on_forgetting=false")
    assert logged.saves == [6]  # the alarm was logged (eval/forgetting_alarm), the run went on


def test_train_takes_only_the_config_preflight_returns(tmp_path):
    """A config changed after its checks (or never checked) cannot reach the loop: a tuning run's epochs would
    otherwise never become steps."""
    cfg = resolve("tiny", overrides=[f"train.output_dir={tmp_path}", "train.backend=single"])
    with pytest.raises(TypeError, match="preflight"):
        train_module.train(cfg)
    ready = preflight(cfg).config
    with pytest.raises(dataclasses.FrozenInstanceError, match="frozen after preflight"):
        ready.train.max_steps = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        ready.data.sources[0].weight = 2.0


def test_preflight_turns_tuning_epochs_into_steps_on_a_copy():
    cfg = resolve("tiny", overrides=["train.epochs=2", "train.max_steps=null"], task="tune")
    checked = preflight(cfg)
    assert checked.ok and checked.examples
    per_step = cfg.train.global_batch_size
    assert checked.config.train.max_steps == math.ceil(2 * checked.examples / per_step)
    assert cfg.train.max_steps is None  # the config given is left as it was


def test_tracker_runs_end_finished_stopped_or_failed_even_when_the_start_fails(monkeypatch, tmp_path):
    """The trackers hear how the run ended: finished, stopped (a signal: to be resumed), or failed, also when the
    failure comes before the first step (here the step-0 evaluation) or while closing metrics.jsonl fails."""
    from mellama_train.trackers import Guarded

    ended: list[str] = []

    class Recorder:
        run_id = "r1"

        def log(self, step, scalars):
            assert all(type(v) is float for v in scalars.values())

        def close(self, outcome):
            ended.append(outcome)

    monkeypatch.setattr(train_module, "open_trackers", lambda *a: [Guarded("mlflow", Recorder())])
    run(monkeypatch, tmp_path / "fine", Script())
    assert ended == ["finished"]

    def broken_eval(n: int) -> float:
        raise RuntimeError("the held-out set is gone")

    with pytest.raises(RuntimeError, match="held-out set"):
        run(monkeypatch, tmp_path / "early", Script(eval_loss=broken_eval), "train.eval_every=2")
    assert ended == ["finished", "failed"]

    def signal_in_step_2(step: int) -> None:
        if step == 2:
            signal.raise_signal(signal.SIGTERM)

    with pytest.raises(Preempted):
        run(monkeypatch, tmp_path / "stopped", Script(on_forward=signal_in_step_2))
    assert ended == ["finished", "failed", "stopped"]
