"""Write the trained model as a Hugging Face directory (`final/`): config, safetensors shards, tokenizer; and
what each checkpoint carries so that `mellama-train export` (export/verified.py) can turn it into one later.

`final/`: the weights are gathered on rank 0 (ZeRO-3 partitions them over ranks) and written shard by shard, so
rank 0 holds one shard (FINAL_SHARD_SIZE) at a time, never the whole model. `mellama-train export` does the
same from any step's checkpoint.

Every full-weight DeepSpeed checkpoint gets an `hf/` directory (written by rank 0 before the completion marker,
so the manifest vouches for it): the model's config.json, the tokenizer, and `probe.safetensors`, the logits of a
fixed probe sequence (seeded random token ids, not training text) computed by the training-time model at that
step. The export checks its result against
those logits, and needs neither the recipe's paths nor the tokenizer's original location.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mellama_train import watchdog
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


FINAL_SHARD_SIZE = "5GB"
"""The largest safetensors shard of final/: rank 0 holds one shard at a time, not the whole model (138 GB at 70B).
5 GB is the Hub's long-standing default, which every loader handles."""


def write_hf_model(
    eng: Backend,
    tokenizer: Any,
    out_dir: Path,
    is_main: bool,
    run_dir: Path | None = None,
    max_shard_size: str = FINAL_SHARD_SIZE,
) -> None:
    """Collective (every rank takes part in each gather); rank 0 writes, with a model card (README.md) made from
    `run_dir` (default: out_dir's parent, the run directory `final/` lives in).

    Shard by shard: the shards are planned from the weights' shapes (huggingface_hub's planner, as
    save_pretrained plans them), then each shard's weights are gathered, written and freed before the next.
    save_pretrained itself needs the whole state dict at once."""
    from huggingface_hub import split_state_dict_into_shards_factory

    planned = eng.full_tensors()
    split = split_state_dict_into_shards_factory(
        planned,
        get_storage_size=lambda t: t.numel() * t.element_size(),
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_size,
    )
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    for filename, names in split.filename_to_tensors.items():
        with eng.gathered_full(names) as shard:
            if shard is not None:
                save_file(shard, str(out_dir / filename), metadata={"format": "pt"})
        watchdog.progress(f"final/: {filename} written")  # a 70B model is many shards, each a beat
    if is_main:
        if split.is_sharded:
            total = sum(t.numel() * t.element_size() for t in planned.values())
            index = {"metadata": {"total_size": total}, "weight_map": split.tensor_to_filename}
            (out_dir / "model.safetensors.index.json").write_text(
                json.dumps(index, indent=2, sort_keys=True) + "\n"
            )
        _write_config(eng.module, planned, out_dir)
        tokenizer.save_pretrained(out_dir)
        write_model_card(out_dir, run_dir or out_dir.parent, "model")
        follow_umask(out_dir)
    collectives.barrier()


def _write_config(module: Any, planned: dict[str, torch.Tensor], out_dir: Path) -> None:
    """config.json (and generation_config.json) as save_pretrained writes them: the weights' dtype, the model
    class, and the inference default use_cache=True (turned off for training)."""
    config = module.config
    dtypes = [t.dtype for t in planned.values() if t.is_floating_point()]
    use_cache = config.use_cache
    config.use_cache = True
    if dtypes:
        config.dtype = max(set(dtypes), key=dtypes.count)
    config.architectures = [type(module).__name__]
    try:
        config.save_pretrained(out_dir)
        if module.can_generate():
            module.generation_config.save_pretrained(out_dir)
    finally:
        config.use_cache = use_cache
