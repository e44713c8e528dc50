"""Held-out loss and perplexity per source (`eval/loss/<source>`, `eval/ppl/<source>`), from the sources'
`eval_paths`, and the forgetting monitor on the general-domain source.

Under ZeRO-3 every forward pass is a collective (each layer's weights are gathered from all ranks), so every
rank must run the same number of passes: a rank whose share of the held-out data is smaller runs padding
batches that carry no labels and so add nothing to the sums.
"""

from __future__ import annotations

import logging
import math

import torch

from mellama_train.backends import Backend, collectives
from mellama_train.data.packing import IGNORE_INDEX
from mellama_train.exit_codes import EXIT_FORGETTING

log = logging.getLogger(__name__)


def _empty_batch(pad_id: int) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.full((1, 2), pad_id, dtype=torch.long),
        "position_ids": torch.arange(2).unsqueeze(0),
        "labels": torch.full((1, 2), IGNORE_INDEX, dtype=torch.long),
        "source_ids": torch.zeros((1, 2), dtype=torch.long),
    }


@torch.no_grad()
def evaluate(
    backend: Backend, batches: list[dict[str, torch.Tensor]], passes: int, names: list[str], pad_id: int
) -> dict[str, float]:
    """Collective: `passes` forward passes on every rank (this rank's batches, then label-free padding)."""
    n, device = len(names), backend.env.device
    sums = torch.zeros(n, dtype=torch.float64, device=device)
    counts = torch.zeros(n, dtype=torch.float64, device=device)
    backend.eval()
    for i in range(passes):
        batch = batches[i] if i < len(batches) else _empty_batch(pad_id)
        _, s, c = backend.forward_loss(batch, n)
        sums += s
        counts += c
    backend.train()
    total = collectives.all_reduce_sum(torch.cat([sums, counts])).tolist()
    sums_, counts_ = total[:n], total[n:]
    loss = sum(sums_) / max(sum(counts_), 1.0)
    values = {"eval/loss": loss, "eval/ppl": perplexity(loss), "eval/tokens": sum(counts_)}
    for name, s, c in zip(names, sums_, counts_):
        if c:
            values[f"eval/loss/{name}"] = s / c
            values[f"eval/ppl/{name}"] = perplexity(s / c)
    return values


def perplexity(loss: float) -> float:
    """exp(mean next-token loss in nats); inf past what a float holds (a diverged model)."""
    return math.exp(loss) if loss < 700 else math.inf


class Forgetting(Exception):
    """The general-domain held-out loss rose past the margin and train.stop_on_forgetting is on."""

    exit_code = EXIT_FORGETTING

    def __init__(self, step: int, source: str, rise: float, margin: float, checkpoint: str):
        self.step = step
        super().__init__(
            f"held-out loss of {source} (the forgetting probe) rose {rise:.4f} above its step-0 value at step"
            f" {step}, past train.forgetting_margin {margin:g}; a checkpoint was saved at {checkpoint}. Lower"
            " optim.lr, give the general-domain source more weight, or raise train.forgetting_margin"
        )


class ForgettingMonitor:
    """Compares the probe source's held-out loss with its value before training (step 0).

    Continual pretraining on medical text can make the model worse at general text; the general-domain
    source's held-out loss measures that. The baseline is checkpointed (TrainerState.eval_baseline), so a
    resumed run compares with the same step-0 number."""

    def __init__(self, source: str | None, margin: float, stop: bool):
        self.source, self.margin, self.stop = source, margin, stop
        self.baseline: dict[str, float] = {}
        """Held-out loss per source at the run's first evaluation (step 0)."""
        self.rise = 0.0

    def observe(self, step: int, values: dict[str, float]) -> dict[str, float]:
        """Record an evaluation; returns the monitor's metrics (rise of each source over its baseline)."""
        losses = {k.removeprefix("eval/loss/"): v for k, v in values.items() if k.startswith("eval/loss/")}
        if not self.baseline:
            self.baseline = dict(losses)
        out = {f"eval/rise/{n}": v - self.baseline[n] for n, v in losses.items() if n in self.baseline}
        if self.source is None or f"eval/rise/{self.source}" not in out:
            return out
        self.rise = out[f"eval/rise/{self.source}"]
        out["eval/forgetting_alarm"] = float(self.alarm)
        if self.alarm:
            log.warning(
                "step %d: forgetting alarm: held-out loss of %s is %.4f above its step-0 value (margin %g)%s",
                step,
                self.source,
                self.rise,
                self.margin,
                "; stopping (train.stop_on_forgetting)" if self.stop else "",
            )
        return out

    @property
    def alarm(self) -> bool:
        return self.rise > self.margin
