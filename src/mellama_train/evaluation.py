"""Held-out loss per source (`eval/loss`, `eval/loss/<source>`), from the sources' `eval_paths`.

Under ZeRO-3 every forward pass is a collective (each layer's weights are gathered from all ranks), so every
rank must run the same number of passes: a rank whose share of the held-out data is smaller runs padding
batches that carry no labels and so add nothing to the sums.
"""

from __future__ import annotations

import torch

from mellama_train import engine as ds_engine
from mellama_train.data.packing import IGNORE_INDEX
from mellama_train.loss import forward_loss


def _empty_batch(pad_id: int) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.full((1, 2), pad_id, dtype=torch.long),
        "position_ids": torch.arange(2).unsqueeze(0),
        "labels": torch.full((1, 2), IGNORE_INDEX, dtype=torch.long),
        "source_ids": torch.zeros((1, 2), dtype=torch.long),
    }


@torch.no_grad()
def evaluate(
    eng: ds_engine.Engine,
    batches: list[dict[str, torch.Tensor]],
    passes: int,
    names: list[str],
    pad_id: int,
    device: torch.device,
    chunk_tokens: int = 0,
) -> dict[str, float]:
    """Collective: `passes` forward passes on every rank (this rank's batches, then label-free padding)."""
    n = len(names)
    sums = torch.zeros(n, dtype=torch.float64, device=device)
    counts = torch.zeros(n, dtype=torch.float64, device=device)
    eng.eval()
    for i in range(passes):
        batch = batches[i] if i < len(batches) else _empty_batch(pad_id)
        _, s, c = forward_loss(eng, batch, n, device, chunk_tokens)
        sums += s
        counts += c
    eng.train()
    total = ds_engine.all_reduce_sum(torch.cat([sums, counts])).tolist()
    sums_, counts_ = total[:n], total[n:]
    values = {"eval/loss": sum(sums_) / max(sum(counts_), 1.0), "eval/tokens": sum(counts_)}
    for name, s, c in zip(names, sums_, counts_):
        if c:
            values[f"eval/loss/{name}"] = s / c
    return values
