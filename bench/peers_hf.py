"""HF Trainer's side of bench/peers.py, started by DeepSpeed's launcher like our trainer: the run_clm recipe
(TrainingArguments with `deepspeed=` the same ZeRO JSON, whose "auto" values the Trainer fills in), a LLaMA
built from the same config with random weights, SDPA, gradient checkpointing (use_reentrant=False, as the
documentation recommends), cosine schedule to the same floor, AdamW with the same betas, and fed the exact
packed sequences our pipeline made (input_ids, position_ids restarting at each document, labels with -100 at
document starts: what DataCollatorWithFlattening gives), in our order (a sequential sampler; the default
shuffles). Each rank writes the digests of the sequences it was handed, which peers.py checks against ours.

Not a user-facing tool: bench/peers.py writes its inputs (--data) and reads its outputs (--out/hf_result.json).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)


class Packed(torch.utils.data.Dataset):
    """Row i of the arrays bench/peers.py wrote, laid out so that sequential batches give each rank its own
    micro-batches in order (accelerate hands micro-batch b to rank b % world_size)."""

    def __init__(self, data: Path):
        self.columns = {k: np.load(data / f"{k}.npy") for k in ("input_ids", "position_ids", "labels")}

    def __len__(self) -> int:
        return len(self.columns["input_ids"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v[i].astype(np.int64)) for k, v in self.columns.items()}


class InOrder(Trainer):
    """HF Trainer reading the dataset in order (its default shuffles), on every transformers version: each rank
    then trains exactly the micro-batches our rank of the same number trains."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


class StepTimes(TrainerCallback):
    """Rank 0's wall clock after each optimizer step, the device drained first (as our trainer's per-step loss
    read does), and the logged losses: the same timestamps our metrics.jsonl gives."""

    def __init__(self) -> None:
        self.times: dict[int, float] = {}
        self.losses: dict[int, float] = {}

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times[state.global_step] = time.time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:
            self.losses[state.global_step] = float(logs["loss"])


def share_cpu_ranks(targs: TrainingArguments) -> None:
    """On CPU, accelerate finds no communication backend for DeepSpeed, so every rank believes it is rank 0 of
    1: DeepSpeed's batch check fails and the data would not be sharded. The process group DeepSpeed started
    knows the ranks; accelerate's shared state is told them (a GPU needs none of this)."""
    import torch.distributed as dist

    state = targs.distributed_state
    state.num_processes, state.process_index = dist.get_world_size(), dist.get_rank()
    state.local_process_index = int(os.environ["LOCAL_RANK"])
    # The ZeRO JSON's "auto" batch sizes again, now for the right world size (as TrainingArguments does).
    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    targs.hf_deepspeed_config = HfTrainerDeepSpeedConfig(targs.deepspeed)
    targs.hf_deepspeed_config.trainer_config_process(targs)
    targs.deepspeed_plugin = DeepSpeedPlugin(hf_ds_config=targs.hf_deepspeed_config)


def training_arguments(spec: dict, ds: str, out: Path) -> dict:
    """The TrainingArguments both peers (HF's run_clm recipe, LLaMA-Factory) share: the batch, optimizer,
    schedule, precision and ZeRO JSON of spec.json, no saving, no reporting, in-process data loading."""
    return dict(
        output_dir=str(out),
        per_device_train_batch_size=spec["micro_batch_size"],
        gradient_accumulation_steps=spec["grad_accum_steps"],
        max_steps=spec["steps"],
        learning_rate=spec["lr"],
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": spec["min_lr_ratio"]},
        warmup_steps=spec["warmup_steps"],
        adam_beta1=spec["betas"][0],
        adam_beta2=spec["betas"][1],
        adam_epsilon=spec["eps"],
        weight_decay=spec["weight_decay"],
        max_grad_norm=spec["grad_clip"],
        bf16=spec["precision"] == "bf16",
        deepspeed=ds,
        logging_steps=spec["log_every"],
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        seed=spec["seed"],
        disable_tqdm=True,
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--ds", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--local_rank", type=int, default=-1)  # DeepSpeed's launcher passes it
    args = p.parse_args()
    spec = json.loads((args.data / "spec.json").read_text())
    settings = training_arguments(spec, args.ds, args.out)
    settings.update(
        gradient_checkpointing=spec["gradient_checkpointing"],
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    targs = TrainingArguments(**settings)
    if not torch.cuda.is_available():
        share_cpu_ranks(targs)
    # After TrainingArguments: under ZeRO-3 the model is then built partitioned (zero.Init), as ours is.
    config = AutoConfig.from_pretrained(args.data)
    torch.manual_seed(spec["seed"])
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    times = StepTimes()
    rows: list[str] = []

    def collate(features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """default_data_collator, noting which sequences this rank was handed (peers.py checks the order)."""
        rows.extend(hashlib.sha1(f["input_ids"].numpy().tobytes()).hexdigest() for f in features)
        return default_data_collator(features)

    trainer = InOrder(
        model=model, args=targs, train_dataset=Packed(args.data), data_collator=collate, callbacks=[times]
    )
    trainer.train()
    # run_clm ends with trainer.save_model(); left out: under ZeRO-3 without 16-bit gathering it writes a full
    # checkpoint (15 GB at 1B) that nothing here reads, outside the timed steps in any case.
    rank = int(os.environ.get("RANK", "0"))
    (args.out / f"hf_rows_rank{rank}.json").write_text(json.dumps(rows))
    if trainer.is_world_process_zero():
        result = {
            "times": times.times,
            "losses": times.losses,
            "gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        }
        (args.out / "hf_result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
