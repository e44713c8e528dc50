"""The step's one collective (step.py) and the batches drawn one step ahead (feed.py), without a launcher: the
collectives are replaced by a simulated world whose other ranks hold known numbers. The 2-rank DeepSpeed run in
test_train_e2e.py counts the same thing for real (one collective of the loop's own a step)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer

from mellama_train import step as step_module
from mellama_train.backends import collectives
from mellama_train.backends.base import DistEnv
from mellama_train.config import resolve
from mellama_train.data.pipeline import build_train_batches
from mellama_train.feed import LedgerCounts, StepFeed
from mellama_train.guard import StepGuard
from mellama_train.loss import IGNORE_INDEX, labelled_tokens
from mellama_train.sample_data import TOKENIZER_DIR


class FakeBackend:
    """Records what the step asks of an engine: each backward's loss, each step() call."""

    def __init__(self, losses: list[float]):
        self.env = DistEnv(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
        self.losses, self.backwards, self.steps = list(losses), [], 0

    def forward_loss(self, batch, num_sources):
        tokens = float(labelled_tokens(batch))
        loss_sum = torch.tensor(self.losses.pop(0) * tokens, dtype=torch.float32)
        sums = torch.tensor([loss_sum.item(), 0.0], dtype=torch.float64)
        counts = torch.tensor([tokens, 0.0], dtype=torch.float64)
        return loss_sum, sums, counts

    def backward(self, loss):
        self.backwards.append(loss.item())

    def step(self):
        self.steps += 1


def micro_batch(labelled: int, length: int = 16) -> dict[str, torch.Tensor]:
    labels = torch.full((1, length), IGNORE_INDEX)
    labels[0, 1 : 1 + labelled] = 7
    return {"input_ids": torch.zeros((1, length), dtype=torch.long), "labels": labels}


@pytest.fixture
def world(monkeypatch):
    """A world of 2: every all-reduce adds the other rank's vector (`other`), and each call is counted."""
    calls: list[int] = []
    other: dict[str, torch.Tensor] = {}

    def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
        calls.append(values.numel())
        return values + other.get("vector", torch.zeros_like(values))

    monkeypatch.setattr(collectives, "all_reduce_sum", all_reduce_sum)
    return calls, other


def test_a_step_makes_one_collective_that_carries_loss_next_tokens_votes_and_log_counters(world):
    calls, other = world
    backend = FakeBackend([2.0, 4.0])  # this rank's two micro-batches: token-mean losses 2 and 4
    batches = [micro_batch(6), micro_batch(10)]
    # The other rank: loss sums 30 over 10 tokens; it will feed 12 tokens next step, and asks to stop.
    other["vector"] = torch.tensor([30.0, 0.0, 10.0, 0.0, 12.0, 1.0, 5.0], dtype=torch.float64)
    scale = step_module.loss_scale(16.0 + 10.0, grad_accum=2, world_size=2)
    log_part = torch.tensor([3.0], dtype=torch.float64)  # a log counter of this rank's

    result = step_module.train_step(
        backend,
        batches,
        scale,
        StepGuard(10.0, False, 3),
        2,
        lambda: torch.cat([torch.tensor([9.0, 0.0], dtype=torch.float64), log_part]),
    )
    assert calls == [2 + 2 + 3]  # one all-reduce a step, of 2 sums + 2 counts + what the loop adds
    assert backend.steps == 2
    values, loss = result.read()
    # Global loss: (2*6 + 4*10 + 30) / (6 + 10 + 10) tokens.
    assert loss == pytest.approx((12 + 40 + 30) / 26)
    next_tokens, votes, counter = result.tail(values)
    assert (next_tokens, votes, counter) == (9.0 + 12.0, 1.0, 8.0)
    # Each backward is the micro-batch's loss sum times (accumulation steps x ranks) / global tokens.
    assert backend.backwards == pytest.approx([12 * 4 / 26, 40 * 4 / 26])


def test_a_rejected_step_poisons_its_last_backward_on_every_rank(world):
    calls, other = world
    other["vector"] = torch.tensor([math.nan, 0.0, 10.0, 0.0, 0.0, 0.0], dtype=torch.float64)  # NaN elsewhere
    backend = FakeBackend([2.0, 4.0])
    scale = step_module.loss_scale(26.0, 2, 2)
    result = step_module.train_step(
        backend,
        [micro_batch(6), micro_batch(10)],
        scale,
        StepGuard(10.0, False, 3),
        2,
        lambda: torch.zeros(2, dtype=torch.float64),
    )
    assert math.isnan(result.read()[1])
    assert math.isfinite(backend.backwards[0]) and math.isnan(backend.backwards[1])
    assert calls == [6]


def test_the_first_scale_is_the_only_collective_outside_a_step(world):
    calls, other = world
    other["vector"] = torch.tensor([30.0], dtype=torch.float64)
    scale = step_module.first_scale(10.0, grad_accum=4, world_size=2, device=torch.device("cpu"))
    assert calls == [1] and scale.item() == pytest.approx(4 * 2 / 40)


def test_drawing_ahead_leaves_the_saved_position_and_ledger_at_the_step_trained(tmp_path):
    """A checkpoint after step k, taken while step k+1's batches are already drawn, resumes at step k+1's
    batches exactly, and its ledger counts k steps."""
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    cfg = resolve("tiny")
    feed = StepFeed(build_train_batches(cfg, tokenizer, 0, 1), grad_accum=2)
    plain = build_train_batches(cfg, tokenizer, 0, 1)
    feed.draw()
    for _ in range(3):  # three steps, each drawing the next step's batches before it ends
        trained = feed.take()
        expected = [next(plain) for _ in range(2)]
        assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(trained, expected))
        ahead_tokens = feed.draw()
    assert feed.state_dict() == plain.state_dict()
    assert feed.counts == LedgerCounts.of(plain)
    assert feed.counts != LedgerCounts.of(feed.data)  # the data itself has moved on by one step

    resumed = build_train_batches(cfg, tokenizer, 0, 1)
    resumed.load_state_dict(feed.state_dict())
    again = [next(resumed) for _ in range(2)]
    drawn = feed.take()
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(again, drawn))
    assert ahead_tokens == sum(labelled_tokens(b) for b in drawn)
    assert feed.state_dict() == feed.data.state_dict()  # nothing drawn ahead: the live position
    with pytest.raises(RuntimeError, match="before draw"):
        feed.take()


def test_the_loss_shifts_labels_not_logits_and_matches_the_textbook_formula():
    """Shifting the labels (no copy of the logits) gives the same loss sum, per-source sums and counts, and
    gradients as cross-entropy over logits[:, :-1] against labels[:, 1:]."""
    import torch.nn.functional as F

    from mellama_train.loss import causal_lm_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 33, 50, requires_grad=True)
    labels = torch.randint(0, 50, (2, 33))
    labels[0, 4], labels[1, :6] = IGNORE_INDEX, IGNORE_INDEX  # a document start, a prompt
    sources = torch.randint(0, 3, (2, 33))
    total, sums, counts = causal_lm_loss(logits, labels, sources, 3)

    flat = F.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )
    valid = labels[:, 1:].flatten() != IGNORE_INDEX
    by_source = sources[:, 1:].flatten()[valid]
    assert total.item() == pytest.approx(flat.sum().item(), rel=1e-6)
    for s in range(3):
        assert sums[s].item() == pytest.approx(flat[valid][by_source == s].sum().item(), rel=1e-6)
        assert counts[s].item() == int((by_source == s).sum())
    (mine,) = torch.autograd.grad(total, logits)
    (textbook,) = torch.autograd.grad(flat.sum(), logits)
    assert torch.allclose(mine, textbook, atol=1e-7)


class JudgingGuard(StepGuard):
    """Records the loss each step's guard judged."""

    judged: list[float]

    def backward_factor(self, step_loss: torch.Tensor) -> torch.Tensor:
        self.judged.append(step_loss.item())
        return super().backward_factor(step_loss)


@pytest.mark.parametrize("labelled", [(5, 11), (0, 0)])
def test_the_logged_loss_is_exactly_the_one_the_guard_judged(world, labelled):
    """The loss the loop logs and guards on the host is the value the device judged before the last backward
    (read with the reduced vector in one transfer), and 0 rather than NaN for a step with no labelled token."""
    calls, other = world
    other["vector"] = torch.tensor([0.1, 0.2, 3.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    if labelled == (0, 0):
        other["vector"] = torch.zeros(6, dtype=torch.float64)
    guard = JudgingGuard(10.0, False, 3)
    guard.judged = []
    result = step_module.train_step(
        FakeBackend([1.7, 2.9]),
        [micro_batch(n) for n in labelled],
        step_module.loss_scale(19.0, 2, 2),
        guard,
        2,
        lambda: torch.zeros(2, dtype=torch.float64),
    )
    values, logged = result.read()
    assert guard.judged == [logged] and values == result.reduced.tolist()
    if labelled == (0, 0):
        assert logged == 0.0
    else:
        assert logged == pytest.approx((1.7 * 5 + 2.9 * 11 + 0.1 + 0.2) / (5 + 11 + 3))
