"""Write the trained model as a Hugging Face directory (`final/`): config, safetensors shards, tokenizer.

The full 16-bit weights are gathered on rank 0 (ZeRO-3 partitions them over ranks). This holds the whole
model in rank 0's host memory once; a streaming, verified export of any checkpoint is `mellama-train export`'s
job (own issue).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mellama_train import engine as ds_engine
from mellama_train.loss import mean_loss
from mellama_train.model_card import write_model_card


@torch.no_grad()
def probe_loss(
    eng: ds_engine.Engine,
    batch: dict[str, torch.Tensor],
    num_sources: int,
    device: torch.device,
    chunk_tokens: int = 0,
) -> float:
    """Loss of a fixed batch with the training-time model: an export that loads must reproduce it."""
    eng.eval()
    loss = mean_loss(eng, batch, num_sources, device, chunk_tokens)
    eng.train()
    return loss


def write_hf_model(
    eng: ds_engine.Engine, tokenizer: Any, out_dir: Path, is_main: bool, run_dir: Path | None = None
) -> None:
    """Collective (every rank takes part in the gather); rank 0 writes, with a model card (README.md) made from
    `run_dir` (default: out_dir's parent, the run directory `final/` lives in)."""
    state_dict = eng.full_state_dict()
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        module = eng.module
        module.config.use_cache = True  # restore the inference default turned off for training
        # safetensors only: loading it can never run code, unlike a pickled .bin.
        module.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
        module.config.use_cache = False
        tokenizer.save_pretrained(out_dir)
        write_model_card(out_dir, run_dir or out_dir.parent, "model")
    ds_engine.barrier()
