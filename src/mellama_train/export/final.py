"""Write the trained model as a Hugging Face directory (`final/`): config, safetensors shards, tokenizer; and
what each checkpoint carries so that `mellama-train export` (export/verified.py) can turn it into one later.

`final/`: the full 16-bit weights are gathered on rank 0 (ZeRO-3 partitions them over ranks), which holds the
whole model in rank 0's host memory once. `mellama-train export` streams instead, shard by shard, from any step.

Every full-weight DeepSpeed checkpoint gets an `hf/` directory (written by rank 0 before the completion marker,
so the manifest vouches for it): the model's config.json, the tokenizer, and `probe.safetensors`, the logits of a
fixed probe sequence (seeded random token ids, not training text) computed by the training-time model at that
step. The export checks its result against
those logits, and needs neither the recipe's paths nor the tokenizer's original location.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mellama_train.backends import Backend, collectives
from mellama_train.export.model_card import write_model_card
from mellama_train.integrity import follow_umask

HF_META = "hf"
"""The directory inside a checkpoint with its config, tokenizer and probe logits."""
PROBE_FILE = "probe.safetensors"
PROBE_TOKENS = 32
"""Length of the probe sequence: enough positions to see a wrong weight, small enough to store at every save
(32 positions x the vocabulary in fp32: 4 MiB for LLaMA-2's 32k tokens)."""


def probe_input(vocab_size: int) -> torch.Tensor:
    """The probe: PROBE_TOKENS token ids drawn from a fixed seed, as one document (positions 0..n-1). Not training
    text: the checkpoint must not carry even a few tokens of a clinical note, and any input shows a wrong
    weight."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (1, PROBE_TOKENS), generator=generator)


@torch.no_grad()
def probe_logits(model: Any, input_ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Collective under ZeRO-3 (the forward gathers each layer). fp32 logits on the host, [1, n, vocab]."""
    ids = input_ids.to(device)
    positions = torch.arange(ids.shape[1], device=device).unsqueeze(0)
    model.eval()
    logits = model(input_ids=ids, position_ids=positions).logits
    model.train()
    return logits.float().cpu()


def write_checkpoint_meta(
    path: Path,
    hf_config: Any,
    tokenizer: Any,
    input_ids: torch.Tensor,
    logits: torch.Tensor,
    precision: str,
) -> None:
    """Rank 0, into a checkpoint being saved: config.json, the tokenizer and the probe's input and logits, with
    the precision they were computed in (the export's tolerance depends on it)."""
    meta = path / HF_META
    meta.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(meta)
    tokenizer.save_pretrained(meta)
    save_file(
        {"input_ids": input_ids.contiguous(), "logits": logits.contiguous()},
        str(meta / PROBE_FILE),
        metadata={"format": "pt", "precision": precision},
    )


@torch.no_grad()
def probe_loss(backend: Backend, batch: dict[str, torch.Tensor], num_sources: int) -> float:
    """Loss of a fixed batch with the training-time model: an export that loads must reproduce it."""
    backend.eval()
    total, _, counts = backend.forward_loss(batch, num_sources)
    backend.train()
    return float(total) / max(float(counts.sum()), 1.0)


def write_hf_model(
    eng: Backend, tokenizer: Any, out_dir: Path, is_main: bool, run_dir: Path | None = None
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
        follow_umask(out_dir)
    collectives.barrier()
