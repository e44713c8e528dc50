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

from typing import Any

from mellama_train.data.source import SourceStream


class Mixture:
    def __init__(self, streams: list[SourceStream], weights: list[float], unit: str = "tokens"):
        total = sum(weights)
        self.streams = streams
        self.fractions = [w / total for w in weights]
        self.unit = unit
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

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.streams]

    def state_dict(self) -> dict[str, Any]:
        return {
            "taken": dict(zip(self.names, self.taken)),
            "tokens_by_source": dict(zip(self.names, self.tokens_by_source)),
            "sources": {s.name: s.state_dict() for s in self.streams},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = set(state["sources"])
        if saved != set(self.names):
            raise ValueError(
                f"data.sources changed since the checkpoint (saved {sorted(saved)}, now {sorted(self.names)});"
                " resume with the same sources or start a new run"
            )
        self.taken = [state["taken"][n] for n in self.names]
        self.tokens_by_source = [state["tokens_by_source"][n] for n in self.names]
        for stream in self.streams:
            stream.load_state_dict(state["sources"][stream.name])
