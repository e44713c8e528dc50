"""The training objective: next-token cross-entropy, averaged over every labelled token of the GLOBAL batch.

A step's loss is sum(token losses over all micro-batches and ranks) / (labelled tokens in all of them). A mean
of per-micro-batch means would weight a token by 1 / (labelled tokens in its micro-batch): in instruction
tuning, where most tokens are prompt and unlabelled, a long answer's tokens would count less than a short
answer's. Each micro-batch therefore backpropagates its loss SUM times `scale`, with
scale = accumulation steps x world size / global labelled tokens, because DeepSpeed divides every backward by
the accumulation steps and averages gradients over ranks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mellama_train.data.packing import IGNORE_INDEX


def causal_lm_loss(
    logits_BTV: torch.Tensor, labels_BT: torch.Tensor, source_ids_BT: torch.Tensor, num_sources: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum of next-token losses, plus per-source loss sums and token counts (detached) for logging.

    Shapes: B batch, T sequence, V vocabulary. Token t predicts token t+1; the target's source is its own.
    The cross-entropy runs in fp32: bf16 log-softmax over 32k classes loses the precision the loss needs.
    """
    logits = logits_BTV[:, :-1].float().flatten(0, 1)
    targets = labels_BT[:, 1:].flatten()
    per_token = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
    valid = targets != IGNORE_INDEX
    sources = source_ids_BT[:, 1:].flatten()
    with torch.no_grad():
        sums = torch.zeros(num_sources, dtype=torch.float64, device=logits.device)
        counts = torch.zeros(num_sources, dtype=torch.float64, device=logits.device)
        sums.index_add_(0, sources[valid], per_token[valid].double())
        counts.index_add_(0, sources[valid], torch.ones_like(per_token[valid], dtype=torch.float64))
    return per_token.sum(), sums, counts


def labelled_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Targets that count in the loss (labels shifted by one, as in causal_lm_loss)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def forward_loss(
    model: Any, batch: dict[str, torch.Tensor], num_sources: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run a model (the engine, or a plain HF model) on a batch and return `causal_lm_loss` (a SUM)."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    # No attention_mask: transformers then reads restarting position_ids as document boundaries, and
    # right padding needs none (it comes after every real token).
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
    return causal_lm_loss(out.logits, batch["labels"], batch["source_ids"], num_sources)


@torch.no_grad()
def mean_loss(model: Any, batch: dict[str, torch.Tensor], num_sources: int, device: torch.device) -> float:
    """Mean next-token loss of one batch (probe and test checks)."""
    total, _, counts = forward_loss(model, batch, num_sources, device)
    return float(total) / max(float(counts.sum()), 1.0)
