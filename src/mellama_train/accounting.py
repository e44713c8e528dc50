"""The step's accounting: what the loop counts between log lines (loss sums, tokens, time) and what it turns
into metrics, and the mixture ledger saved with each checkpoint. Numbers only: no text of any document."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from mellama_train.backends import Backend, collectives
from mellama_train.checkpoint import TrainerState
from mellama_train.data.source import data_counts, reason_counts
from mellama_train.feed import LedgerCounts


@dataclass
class Window:
    """Loss sums, token counts and time since the last log line; kept on device until logging."""

    sums: torch.Tensor
    counts: torch.Tensor
    processed: int = 0
    """Tokens this rank ran through the model (padding included): the throughput numerator."""
    steps: int = 0
    started: float = 0.0

    @classmethod
    def new(cls, num_sources: int, device: torch.device) -> Window:
        zeros = torch.zeros(num_sources, dtype=torch.float64, device=device)
        return cls(zeros, zeros.clone(), 0, 0, time.perf_counter())

    def add(self, sums: torch.Tensor, counts: torch.Tensor, processed: int, applied: bool) -> None:
        """Count one step; a skipped step's (non-finite or spiking) loss stays out of the logged loss."""
        if applied:
            self.sums += sums
            self.counts += counts
            self.steps += 1
        self.processed += processed


def window_part(window: Window, data: Any, processed: int) -> torch.Tensor:
    """This rank's log-window counters, summed over ranks by the logged step's own collective (step.py): the
    window's loss sums and counts (its earlier steps; the logged step's own come with the step), tokens and
    weight units taken by source, truncated examples, tokens run through the model (`processed`, this step's
    included) and documents by reason. Read before the next step's batches are drawn (feed.py)."""
    n = len(window.sums)
    truncated = getattr(data, "truncated", None)  # instruction data only

    def vector(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float64, device=window.sums.device)

    return torch.cat(
        [
            window.sums,
            window.counts,
            vector(data.mixture.tokens_by_source),
            vector(truncated or [0] * n),
            vector(data.mixture.taken),
            vector([processed]),
            vector(reason_counts(data.mixture.streams)),
        ]
    )


def window_metrics(
    total: list[float],
    step_totals: list[float] | None,
    window: Window,
    eng: Backend,
    data: Any,
    epochs: list[int],
    flops_tok: float,
    peak_flops: float | None,
    world_size: int,
    decontaminating: bool = False,
) -> dict[str, float]:
    """The log line's metrics from window_part summed over ranks (`total`) and, when the logged step was
    applied, its own per-source loss sums and counts over ranks (`step_totals`). No collective: the numbers
    came with the step's. `epochs`: epochs started by this (rank 0's) reader, per source."""
    names = data.source_names
    n = len(names)
    sums, counts, tokens = total[:n], total[n : 2 * n], total[2 * n : 3 * n]
    if step_totals is not None:
        sums = [a + b for a, b in zip(sums, step_totals[:n])]
        counts = [a + b for a, b in zip(counts, step_totals[n : 2 * n])]
    cut, taken, processed = total[3 * n : 4 * n], total[4 * n : 5 * n], total[5 * n]
    by_reason = data_counts(names, total[5 * n + 1 :])
    truncated = getattr(data, "truncated", None)
    elapsed = time.perf_counter() - window.started
    tokens_per_sec = processed / max(elapsed, 1e-9)
    values = {"train/tokens_per_sec": tokens_per_sec, "train/tokens": sum(tokens)}
    if sum(counts):  # none when every step of the window was skipped
        values["train/loss"] = sum(sums) / sum(counts)
    if (norm := eng.grad_norm) is not None:
        values["train/grad_norm"] = norm
    if peak_flops:
        values["train/mfu"] = flops_tok * tokens_per_sec / (peak_flops * world_size)
    if window.sums.device.type == "cuda":  # this rank's peak since the start (what the memory plan predicts)
        values["train/gpu_peak_gib"] = torch.cuda.max_memory_allocated(window.sums.device) / 2**30
    for i, name in enumerate(names):
        if counts[i]:
            values[f"train/loss/{name}"] = sums[i] / counts[i]
        values[f"data/tokens/{name}"] = tokens[i]
        if truncated is not None:
            values[f"data/truncated/{name}"] = cut[i]
        if decontaminating:
            values[f"data/decontaminated/{name}"] = by_reason.get(f"data/reasons/{name}/contaminated", 0.0)
        # Ranks hold equal shares of each source, so their epochs wrap within a few documents of each other.
        values[f"data/epochs/{name}"] = epochs[i]
    values.update(by_reason)
    values.update(data.mixture.drift_metrics(taken, world_size * data.mixture.max_take))
    return values


def record_ledger(state: TrainerState, counts: LedgerCounts, names: list[str], device: torch.device) -> None:
    """The mixture ledger saved with every checkpoint, over all ranks: tokens and weight units (tokens; tune:
    examples) taken per source, summed, and epochs completed per source, the fewest (an epoch counts once every
    rank has finished it). `counts`: this rank's, as of the step saved (feed.py)."""
    n = len(names)
    sums = torch.tensor([*counts.tokens_by_source, *counts.taken], dtype=torch.float64, device=device)
    epochs = torch.tensor(counts.epochs, dtype=torch.float64, device=device)
    sums_ = collectives.all_reduce_sum(sums).tolist()
    state.tokens_by_source = {name: int(v) for name, v in zip(names, sums_[:n])}
    state.mixture_taken = {name: int(v) for name, v in zip(names, sums_[n:])}
    state.epochs_by_source = {
        name: int(v) for name, v in zip(names, collectives.all_reduce_min(epochs).tolist())
    }
