"""The prepared path's order: what sequence g of a run holds is a pure function of (seed, g).

g counts the run's training sequences: sequence g is row g mod G of the global batch of step g // G + 1 (G =
train.global_batch_size). Rank r of W takes, at micro-step m of a step, rows m·W·b + r·b ... + b - 1 (b =
micro_batch_size): which rows a rank holds depends on the world size; what the global batch holds does not.
So a checkpoint resumed on another number of ranks trains on exactly the sequences the uninterrupted run would
have, and the position to resume at is the step count alone: nothing is scanned, whatever the step.

Three pure functions make sequence g:

1. **The source.** The weights are turned into whole counts n_i over a period of P sequences (exact for
   integer-ratio weights: 15:1:4 gives P = 20; else the shortest period up to 4096 within 1e-4 of every
   share), laid out in the period by largest deficit first (the rule Megatron's blended datasets use), and the
   period repeats. Every sequence is one source's: the shares are exact at every period's end and off by less
   than one sequence in between, on every world size.
2. **The sequence of that source.** A source's token stream (its shards back to back, in file order) is cut
   into windows of seq_len tokens; the k-th sequence the source gives is window perm_e(k mod N) of epoch
   e = k // N (N windows an epoch; the last partial window of each epoch is never trained). perm_e is a
   keyed Feistel permutation of [0, N) (4 rounds, cycle-walking): a seeded shuffle of every window in the
   corpus whose k-th value is computed in O(1) time and memory, where OLMo-core and Megatron build and
   store an index array of every sample.
3. **The row.** A window's documents keep their BOS ... EOS; position_ids restart at every document start
   and at the window's first token, whose label is -100 (the token before it is not in the row), as in the
   streaming path's packing (packing.py).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from mellama_train.data.mixture import drift
from mellama_train.data.packing import IGNORE_INDEX
from mellama_train.data.prepared import PreparedSource

MAX_PERIOD = 4096
"""The longest mixture period: weights that no shorter period meets within SHARE_ERROR are rounded at it."""
SHARE_ERROR = 1e-4
ROUNDS = 4


def apportion(weights: list[float]) -> list[int]:
    """Whole sequences per period for each weight (largest remainder), over the shortest period that gives
    every share within SHARE_ERROR of its target; exact for weights in an integer ratio."""
    total = math.fsum(weights)
    fractions = [w / total for w in weights]
    exact = [Fraction(w).limit_denominator(10**6) for w in weights]
    if all(f.denominator == 1 for f in exact):  # integer weights (15:1:4): the period is their sum
        counts = [int(f) for f in exact]
        divisor = math.gcd(*counts)
        if sum(counts) // divisor <= MAX_PERIOD:
            return [c // divisor for c in counts]
    for period in range(1, MAX_PERIOD + 1):
        counts = _largest_remainder(fractions, period)
        if max(abs(c / period - f) for c, f in zip(counts, fractions)) <= SHARE_ERROR:
            return counts
    return _largest_remainder(fractions, MAX_PERIOD)


def _largest_remainder(fractions: list[float], period: int) -> list[int]:
    quotas = [f * period for f in fractions]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda i: (counts[i] - quotas[i], i))
    for i in by_remainder[: period - sum(counts)]:
        counts[i] += 1
    return counts


def period_order(counts: list[int]) -> np.ndarray:
    """The sources of one period, largest deficit first (ties to the earlier source): after s sequences,
    source i has had the whole number nearest below or above n_i·s/P, and exactly n_i at the period's end."""
    period = sum(counts)
    given = [0] * len(counts)
    order = np.empty(period, dtype=np.int64)
    for s in range(period):  # integer deficits: n_i·(s+1) - given_i·P
        i = max(range(len(counts)), key=lambda j: (counts[j] * (s + 1) - given[j] * period, -j))
        order[s] = i
        given[i] += 1
    assert given == counts, "largest deficit first gives each source its count over the period"
    return order


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 arrays (wrapping arithmetic): the Feistel round function."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class Permutation:
    """A keyed pseudo-random permutation of [0, n), evaluated pointwise: a balanced Feistel network over the
    smallest even number of bits that holds n, cycle-walked back into [0, n) (the domain is under 4n, so a
    value takes under 4 walks on average). Hand-written: numpy and torch only shuffle whole arrays, which at
    129B tokens means an index of 31M windows per source and epoch on every rank."""

    def __init__(self, n: int, key: str):
        if n < 1:
            raise ValueError("a permutation of nothing")
        self.n = n
        self.half = max(1, math.ceil((n - 1).bit_length() / 2))
        self.mask = np.uint64((1 << self.half) - 1)
        digest = hashlib.blake2b(key.encode(), digest_size=8 * ROUNDS).digest()
        self.keys = np.frombuffer(digest, dtype="<u8").astype(np.uint64)

    def _rounds(self, x: np.ndarray) -> np.ndarray:
        half = np.uint64(self.half)
        left, right = x >> half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right ^ key) & self.mask)
        return (left << half) | right

    def __call__(self, index: np.ndarray) -> np.ndarray:
        x = self._rounds(np.asarray(index, dtype=np.uint64))
        while (outside := x >= np.uint64(self.n)).any():
            x[outside] = self._rounds(x[outside])
        return x.astype(np.int64)


@dataclass
class GlobalOrder:
    """The whole order of a run over a prepared corpus (module docstring)."""

    sources: list[PreparedSource]
    weights: list[float]
    seq_len: int
    seed: int
    counts: list[int] = field(init=False)
    """Sequences of each source per period of the mixture."""
    windows: list[int] = field(init=False)
    """Sequences of seq_len tokens each source holds: one epoch of it."""

    def __post_init__(self) -> None:
        for source, weight in zip(self.sources, self.weights):
            if not (math.isfinite(weight) and weight > 0):
                raise ValueError(f"data.sources[{source.name}].weight must be a number > 0 (got {weight})")
        self.windows = [s.total_tokens // self.seq_len for s in self.sources]
        for source, n in zip(self.sources, self.windows):
            if n == 0:
                raise ValueError(
                    f"data.sources[{source.name}]: its prepared corpus holds {source.total_tokens} tokens, under"
                    f" one sequence of data.seq_len {self.seq_len}; add files to it or lower data.seq_len"
                )
        self.counts = apportion(self.weights)
        for source, n in zip(self.sources, self.counts):
            if n == 0:
                raise ValueError(
                    f"data.sources[{source.name}]: its weight gives it no sequence in the mixture's period of at"
                    f" most {MAX_PERIOD} sequences (a share under 1/{2 * MAX_PERIOD}, or more sources than"
                    " that); raise it, or merge sources"
                )
        self.order = period_order(self.counts)
        self.period = len(self.order)
        # before[i, r]: sequences of source i among the first r of a period.
        self.before = np.zeros((len(self.counts), self.period + 1), dtype=np.int64)
        for i in range(len(self.counts)):
            self.before[i, 1:] = np.cumsum(self.order == i)
        self._perms: dict[tuple[int, int], Permutation] = {}

    def locate(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, k) of each global sequence index: sequence g is source i's k-th (0-based, all epochs)."""
        g = np.asarray(g, dtype=np.int64)
        cycles, r = np.divmod(g, self.period)
        source = self.order[r]
        return source, cycles * np.asarray(self.counts)[source] + self.before[source, r]

    def given(self, g: int) -> list[int]:
        """Sequences each source has given in the first g of the run."""
        cycles, r = divmod(g, self.period)
        return [cycles * n + int(self.before[i, r]) for i, n in enumerate(self.counts)]

    def window(self, source: int, k: int) -> tuple[int, int]:
        """(epoch, window) of source `source`'s k-th sequence."""
        epoch, j = divmod(k, self.windows[source])
        key = (source, epoch)
        if key not in self._perms:
            if len(self._perms) > 64:  # a long run crosses many epochs; only the current ones are used
                self._perms.clear()
            name = self.sources[source].name
            self._perms[key] = Permutation(self.windows[source], f"{self.seed}/{name}/{epoch}")
        return epoch, int(self._perms[key](np.array([j]))[0])

    def row(self, g: int) -> dict[str, np.ndarray]:
        """Global sequence g: input_ids, position_ids, labels, source_ids (seq_len each)."""
        (source,), (k,) = self.locate(np.array([g]))
        _, w = self.window(int(source), int(k))
        ids, starts = self.sources[source].span(w * self.seq_len, self.seq_len)
        segment = np.zeros(self.seq_len, dtype=np.int64)
        segment[starts] = 1
        positions = np.arange(self.seq_len) - starts[np.cumsum(segment) - 1]
        labels = ids.copy()
        labels[starts] = IGNORE_INDEX
        return {
            "input_ids": ids,
            "position_ids": positions,
            "labels": labels,
            "source_ids": np.full(self.seq_len, int(source), dtype=np.int64),
            "segments": np.array([starts.size]),
        }

    def wrap_step(self, source: int, global_batch: int) -> int:
        """The step (1-based) whose global batch holds the source's first sequence of its second epoch."""
        n, count = self.windows[source], self.counts[source]
        cycles, nth = divmod(n, count)  # the (n+1)-th sequence of the source: the n-th, 0-based
        position = int(np.flatnonzero(self.order == source)[nth])
        return (cycles * self.period + position) // global_batch + 1

    def corpus_digest(self) -> str:
        """A digest of every source's files (path, byte digest) and token counts, as its manifest records them."""
        body = [(s.name, s.total_tokens, s.files) for s in self.sources]
        return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def epochs(self, g: int) -> list[float]:
        """Epochs each source has made (fractional) after the first g sequences."""
        return [given / n for given, n in zip(self.given(g), self.windows)]


class _Source:
    """One source's counters, in the shape the loop's accounting reads from a streaming source."""

    def __init__(self, name: str):
        self.name = name
        self.epochs_completed = 0
        self.state = _Counts()


@dataclass
class _Counts:
    skipped: dict[str, int] = field(default_factory=dict)
    """Skips happened when the corpus was prepared: its manifest counts them, the run adds none."""
    documents: int = 0
    """Segments (documents, or the rest of one) in the sequences this rank trained on."""


class OrderedMixture:
    """The prepared path's mixture as the loop's accounting reads it: tokens per source this rank took, and the
    epochs every source has made over the whole run."""

    def __init__(self, order: GlobalOrder, tolerance: float):
        self.order = order
        self.streams = [_Source(s.name) for s in order.sources]
        self.fractions = [c / order.period for c in order.counts]
        self.unit, self.max_take = "tokens", order.seq_len
        self.taken = [0] * len(self.streams)
        self.tokens_by_source = self.taken
        self.tolerance = tolerance

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.streams]

    def drift_metrics(self, taken_global: list[float], error_bound: float) -> dict[str, float]:
        report = drift(taken_global, self.fractions, error_bound, self.tolerance)
        if report is None:
            return {}
        shares, distance, _ = report
        return {**{f"data/share/{n}": s for n, s in zip(self.names, shares)}, "data/drift": distance}


class OrderedBatches:
    """One rank's micro-batches over a prepared corpus, in the world-size-independent order (module docstring)."""

    def __init__(
        self,
        order: GlobalOrder,
        rank: int,
        world_size: int,
        micro_batch_size: int,
        accum: int,
        tolerance: float,
    ):
        self.order, self.rank, self.world_size = order, rank, world_size
        self.micro_batch_size, self.accum = micro_batch_size, accum
        self.global_batch = micro_batch_size * accum * world_size
        self.mixture = OrderedMixture(order, tolerance)
        self.step, self.micro = 0, 0
        self.last_rows: list[int] = []
        """The global sequence ids of the last micro-batch (tests check no sequence repeats or goes missing)."""

    def __iter__(self) -> OrderedBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        first = (
            self.step * self.global_batch
            + self.micro * self.world_size * self.micro_batch_size
            + self.rank * self.micro_batch_size
        )
        self.last_rows = list(range(first, first + self.micro_batch_size))
        rows = [self.order.row(g) for g in self.last_rows]
        for row in rows:
            source = int(row["source_ids"][0])
            self.mixture.taken[source] += self.order.seq_len
            self.mixture.streams[source].state.documents += int(row.pop("segments")[0])
        self.micro += 1
        if self.micro == self.accum:
            self.step, self.micro = self.step + 1, 0
            self._count_epochs()
        return {key: torch.from_numpy(np.stack([row[key] for row in rows])) for key in rows[0]}

    def _count_epochs(self) -> None:
        for stream, given, n in zip(
            self.mixture.streams, self.order.given(self.step * self.global_batch), self.order.windows
        ):
            stream.epochs_completed = given // n

    @property
    def source_names(self) -> list[str]:
        return self.mixture.names

    def state_dict(self) -> dict[str, Any]:
        """The position (steps done: the same on every rank) and what the order depends on, to check at resume."""
        return {
            "tokens_by_source": dict(zip(self.source_names, self.mixture.taken)),
            "prepared": {
                "step": self.step,
                "global_batch": self.global_batch,
                "seq_len": self.order.seq_len,
                "seed": self.order.seed,
                "counts": dict(zip(self.source_names, self.order.counts)),
                "corpus": self.order.corpus_digest(),
                "taken": dict(zip(self.source_names, self.mixture.taken)),
            },
        }

    def finished_claims(self, state: dict[str, Any]) -> dict[str, tuple[int, bytes]]:
        return {}  # nothing to share out: the corpus was checked against its manifest at start-up

    def load_state_dict(self, state: dict[str, Any], share: Any = None) -> list[dict[str, str]]:
        """Continue after the saved step: refused, naming what differs, when the saved position was made over
        another order (a streaming run, another seq_len, seed, corpus, mixture or global batch)."""
        saved = state.get("prepared") if isinstance(state, dict) else None
        if not isinstance(saved, dict):
            raise ValueError(
                "the checkpoint was written by a run that streamed its sources, not one over a prepared"
                " corpus; resume it with the same sources, or start a new run over the prepared corpus"
            )
        now = self.state_dict()["prepared"]
        for key, what in (
            ("seq_len", "data.seq_len"),
            ("seed", "data.seed"),
            ("corpus", "the prepared corpus (its files, digests and tokens)"),
            ("counts", "the mixture's weights"),
            ("global_batch", "train.global_batch_size"),
        ):
            if saved.get(key) != now[key]:
                raise ValueError(
                    f"{what} differs from the checkpoint's ({_short(saved.get(key))} then, {_short(now[key])}"
                    " now): the data order would not continue; resume with the same, or start a new run"
                )
        step = saved.get("step")
        if type(step) is not int or step < 0:
            raise ValueError("the checkpoint's data position is not a step count")
        self.step, self.micro = step, 0
        self._count_epochs()
        # The tokens taken so far, all ranks together: credited to rank 0 so sums over ranks stay right on any
        # world size (each rank's own share would depend on the world size that took them).
        taken = [0] * len(self.source_names)
        if self.rank == 0:
            given = self.order.given(step * self.global_batch)
            taken = [n * self.order.seq_len for n in given]
        self.mixture.taken[:] = taken
        return []


def _short(value: Any) -> str:
    return str(value)[:80]
