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
import torch.utils.checkpoint

from mellama_train.data.packing import IGNORE_INDEX


def causal_lm_loss(
    logits_BTV: torch.Tensor, labels_BT: torch.Tensor, source_ids_BT: torch.Tensor, num_sources: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum of next-token losses, plus per-source loss sums and token counts (detached) for logging.

    Shapes: B batch, T sequence, V vocabulary. Token t predicts token t+1; the target's source is its own.
    The labels are shifted, not the logits: `logits[:, :-1]` is not contiguous, so flattening it copies the
    whole [B, T, V] tensor, and its backward writes another of zeros (at a 32k vocabulary and 2048 tokens, two
    256 MB copies a micro-batch); the last position gets an ignored target instead. The cross-entropy runs in
    fp32: bf16 log-softmax over 32k classes loses the precision the loss needs.
    """
    logits = logits_BTV.flatten(0, 1).float()  # a view when the logits are fp32 already
    targets = F.pad(labels_BT[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()
    per_token = F.cross_entropy(
        logits, targets, ignore_index=IGNORE_INDEX, reduction="none"
    )  # 0 where ignored
    sources = F.pad(source_ids_BT[:, 1:], (0, 1)).flatten()
    sums, counts = _per_source(per_token, sources, targets != IGNORE_INDEX, num_sources)
    return per_token.sum(), sums, counts


def labelled_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Targets that count in the loss (labels shifted by one, as in causal_lm_loss)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _per_source(
    per_token: torch.Tensor, sources: torch.Tensor, valid: torch.Tensor | None, num_sources: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss sums and labelled-token counts by source. `valid`: which positions count (None: all); an ignored
    position's loss is 0 already, so it is added without a boolean-indexed copy."""
    with torch.no_grad():
        sums = torch.zeros(num_sources, dtype=torch.float64, device=per_token.device)
        counts = torch.zeros(num_sources, dtype=torch.float64, device=per_token.device)
        sums.index_add_(0, sources, per_token.double())
        weights = valid.double() if valid is not None else torch.ones_like(per_token, dtype=torch.float64)
        counts.index_add_(0, sources, weights)
    return sums, counts


def _head_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")


def chunked_causal_lm_loss(
    hidden_BTH: torch.Tensor,
    head: torch.nn.Module,
    labels_BT: torch.Tensor,
    source_ids_BT: torch.Tensor,
    num_sources: int,
    chunk_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`causal_lm_loss` from the final hidden states, without ever holding the whole logits tensor.

    Only labelled positions go through the output layer (in tuning that skips every prompt token), `chunk_tokens`
    at a time, each chunk under activation checkpointing: its [chunk x vocab] logits are freed after the forward
    and recomputed in the backward. At a 128k vocabulary, 1024 tokens of fp32 logits are 512 MB; a 256-token
    chunk is 128 MB. (Fused linear-cross-entropy kernels would avoid even that; none is required here.)"""
    targets = labels_BT[:, 1:].flatten()
    valid = targets != IGNORE_INDEX
    hidden = hidden_BTH[:, :-1].flatten(0, 1)[valid]
    targets, sources = targets[valid], source_ids_BT[:, 1:].flatten()[valid]
    pieces = [
        torch.utils.checkpoint.checkpoint(
            _head_loss, head, hidden[i : i + chunk_tokens], targets[i : i + chunk_tokens], use_reentrant=False
        )
        for i in range(0, hidden.shape[0], chunk_tokens)
    ]
    per_token = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
    sums, counts = _per_source(per_token, sources, None, num_sources)
    return per_token.sum(), sums, counts


def decoder_and_head(model: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The decoder stack (returns final hidden states) and the output layer of an HF causal LM, through a PEFT
    wrapper or a backend."""
    module = getattr(model, "module", model)
    if hasattr(module, "get_base_model"):
        module = module.get_base_model()
    return module.get_decoder(), module.get_output_embeddings()


def forward_loss(
    model: Any,
    batch: dict[str, torch.Tensor],
    num_sources: int,
    device: torch.device,
    chunk_tokens: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run a model (a backend, or a plain HF model) on a batch and return `causal_lm_loss` (a SUM).

    chunk_tokens > 0: run the decoder and compute the output layer and loss in chunks (single-device backend;
    DeepSpeed's engine must run the whole module forward)."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    # No attention_mask: transformers then reads restarting position_ids as document boundaries, and
    # right padding needs none (it comes after every real token).
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    if chunk_tokens:
        decoder, head = decoder_and_head(model)
        hidden = decoder(**inputs).last_hidden_state
        return chunked_causal_lm_loss(
            hidden, head, batch["labels"], batch["source_ids"], num_sources, chunk_tokens
        )
    out = model(**inputs)
    return causal_lm_loss(out.logits, batch["labels"], batch["source_ids"], num_sources)


@torch.no_grad()
def mean_loss(
    model: Any, batch: dict[str, torch.Tensor], num_sources: int, device: torch.device, chunk_tokens: int = 0
) -> float:
    """Mean next-token loss of one batch (probe and test checks)."""
    total, _, counts = forward_loss(model, batch, num_sources, device, chunk_tokens)
    return float(total) / max(float(counts.sum()), 1.0)
