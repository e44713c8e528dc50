"""Weighted mixture of sources by TOKEN proportion.

Weights count tokens, not documents: 15:1:4 means 75% / 5% / 20% of the training tokens, whatever the
sources' document lengths (a MIMIC discharge summary is several times longer than a PubMed abstract, so sampling
documents 15:1:4 would not give a 15:1:4 token mix).

The scheduler is deterministic "largest deficit first": the next chunk comes from the source furthest below
its target share of the tokens handed out so far (ties go to the earlier source). The error is bounded by one
chunk (at most seq_len tokens), so the achieved mix converges to the target as 1/tokens, with no random drift
to average out, and the whole choice sequence is reproduced exactly from its state (the token counters).
Randomness enters only through each source's seeded file order.

Instruction data is mixed by EXAMPLES instead (`unit="examples"`): a 2:1 weight gives twice as many examples,
which is how instruction mixtures are specified (LLaMA-Factory, axolotl); tokens are still counted for metrics.
"""

from __future__ import annotations

import logging
from typing import Any

from mellama_train.data.source import CheckShare, SourceStream, finished_claim

log = logging.getLogger(__name__)


class Mixture:
    def __init__(
        self,
        streams: list[SourceStream],
        weights: list[float],
        unit: str = "tokens",
        max_take: int = 1,
        tolerance: float = 0.01,
    ):
        """`max_take`: the most units one `take` can hand out (seq_len tokens; 1 example), which bounds how far a
        rank can be off its target; `tolerance`: the drift alarm's threshold (data.mixture_tolerance)."""
        total = sum(weights)
        self.streams = streams
        self.fractions = [w / total for w in weights]
        self.unit = unit
        self.max_take, self.tolerance = max_take, tolerance
        self._drifting = False
        self.taken = [0] * len(streams)
        """Units (tokens or examples) this rank has taken from each source, all epochs: the mixture's state."""
        self.tokens_by_source = [0] * len(streams)
        """Tokens this rank has taken from each source (all epochs)."""

    def _pick(self) -> int:
        total = sum(self.taken)
        deficits = [f * total - taken for f, taken in zip(self.fractions, self.taken)]
        return max(range(len(deficits)), key=lambda i: (deficits[i], -i))

    def take(self, max_tokens: int) -> tuple[int, list[int]]:
        """(source index, up to max_tokens tokens of one document from the source furthest below target)."""
        index = self._pick()
        chunk = self.streams[index].take(max_tokens)
        self.taken[index] += len(chunk)
        self.tokens_by_source[index] += len(chunk)
        return index, chunk

    def next_item(self) -> tuple[int, Any]:
        """(source index, the next whole example of the source furthest below its share of examples)."""
        index = self._pick()
        item = self.streams[index].next_item()
        self.taken[index] += 1
        self.tokens_by_source[index] += len(item)
        return index, item

    def drift_metrics(self, taken_global: list[float], error_bound: float) -> dict[str, float]:
        """Achieved shares over all ranks (`data/share/<source>`) and the largest distance from the target
        (`data/drift`); a drift alarm (see `drift`) is logged once when it starts."""
        report = drift(taken_global, self.fractions, error_bound, self.tolerance)
        if report is None:
            return {}
        shares, distance, alarm = report
        if alarm and not self._drifting:
            log.warning(
                "mixture drift: achieved %s shares %s are %.4f from the targets %s (data.mixture_tolerance %g)",
                self.unit,
                ", ".join(f"{n} {s:.4f}" for n, s in zip(self.names, shares)),
                distance,
                ", ".join(f"{f:.4f}" for f in self.fractions),
                self.tolerance,
            )
        self._drifting = alarm
        return {**{f"data/share/{n}": s for n, s in zip(self.names, shares)}, "data/drift": distance}

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.streams]

    def state_dict(self) -> dict[str, Any]:
        return {
            "taken": dict(zip(self.names, self.taken)),
            "tokens_by_source": dict(zip(self.names, self.tokens_by_source)),
            "sources": {s.name: s.state_dict() for s in self.streams},
        }

    def finished_claims(self, state: dict[str, Any]) -> dict[str, tuple[int, bytes]]:
        """Which files each source's saved position finished this epoch (source.finished_claim): every rank's,
        gathered by the caller, make the CheckShare that load_state_dict takes."""
        return {name: finished_claim(source) for name, source in state["sources"].items()}

    def load_state_dict(self, state: dict[str, Any], share: CheckShare | None = None) -> list[dict[str, str]]:
        """Restore every source's position (each checks its data first: `share`, this rank's share of the
        files finished earlier in the epoch; None, all of them); returns the data changes continued over
        (data.accept_changes), for the run's record."""
        if "prepared" in state:
            raise ValueError(
                "the checkpoint was written by a run over a prepared corpus; resume it with the same prepared"
                " sources (data.sources[].prepared), or start a new run"
            )
        saved = set(state["sources"])
        if saved != set(self.names):
            raise ValueError(
                f"data.sources changed since the checkpoint (saved {sorted(saved)}, now {sorted(self.names)});"
                " resume with the same sources or start a new run"
            )
        self.taken = [state["taken"][n] for n in self.names]
        self.tokens_by_source = [state["tokens_by_source"][n] for n in self.names]
        return [
            change
            for stream in self.streams
            for change in stream.load_state_dict(state["sources"][stream.name], share)
        ]


def drift(
    taken: list[float], fractions: list[float], error_bound: float, tolerance: float
) -> tuple[list[float], float, bool] | None:
    """(achieved shares, largest distance from the targets, alarm) of units taken per source over all ranks;
    None before anything was taken. The scheduler keeps each rank within one `take` (seq_len tokens, or one
    example) of its target per source, so the mix is off by at most error_bound = world size x that many
    units: only once error_bound / total is below the tolerance does a larger distance mean something is
    wrong (a source that keeps failing to deliver), and raise the alarm."""
    total = sum(taken)
    if not total:
        return None
    shares = [t / total for t in taken]
    distance = max(abs(s - f) for s, f in zip(shares, fractions))
    return shares, distance, distance > tolerance and error_bound / total < tolerance
