"""The training objective: next-token cross-entropy over packed sequences, with per-source accounting."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mellama_train.data.packing import IGNORE_INDEX


def causal_lm_loss(
    logits_BTV: torch.Tensor, labels_BT: torch.Tensor, source_ids_BT: torch.Tensor, num_sources: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean next-token loss, plus per-source loss sums and token counts (detached) for logging.

    Shapes: B batch, T sequence, V vocabulary. Token t predicts token t+1; the target's source is its own.
    The cross-entropy runs in fp32: bf16 log-softmax over 32k classes loses the precision the loss needs.
    """
    logits = logits_BTV[:, :-1].float().flatten(0, 1)
    targets = labels_BT[:, 1:].flatten()
    per_token = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
    valid = targets != IGNORE_INDEX
    loss = per_token.sum() / valid.sum().clamp(min=1)
    sources = source_ids_BT[:, 1:].flatten()
    with torch.no_grad():
        sums = torch.zeros(num_sources, dtype=torch.float64, device=logits.device)
        counts = torch.zeros(num_sources, dtype=torch.float64, device=logits.device)
        sums.index_add_(0, sources[valid], per_token[valid].double())
        counts.index_add_(0, sources[valid], torch.ones_like(per_token[valid], dtype=torch.float64))
    return loss, sums, counts


def forward_loss(
    model: Any, batch: dict[str, torch.Tensor], num_sources: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run a model (the engine, or a plain HF model) on a packed batch and return `causal_lm_loss`."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    # No attention_mask: transformers then reads the restarting position_ids as document boundaries.
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
    return causal_lm_loss(out.logits, batch["labels"], batch["source_ids"], num_sources)
