"""LLaMA-Factory's side of bench/peers.py, run by LLaMA-Factory's own venv (tools/llamafactory_venv.sh: it
pins transformers, datasets, accelerate and peft older than ours) under DeepSpeed's launcher, as the others.

It trains through LLaMA-Factory's own entry, `run_exp` with `stage: pt`, `finetuning_type: full` and the same
ZeRO JSON, on what the other sides train: the same model config (random weights, saved as the "pretrained"
model LLaMA-Factory loads), global batch, AdamW betas/eps/decay, clipping, cosine schedule to the same floor,
SDPA, gradient checkpointing (non-reentrant, as on the other sides; LLaMA-Factory's default is reentrant),
and our exact packed sequences through `tokenized_path`, read in order (`disable_shuffling`: a sequential
sampler, as bench/peers_hf.py's InOrder). Three things are changed from LLaMA-Factory's pt recipe, each so the
work stays ours and nothing it times is left out:

- its pt preprocessing (documents concatenated and cut into cutoff_len blocks) is not run: `tokenized_path`
  hands it our rows, which already are seq_len blocks;
- its pt collator rebuilds labels from input_ids and adds an all-ones attention_mask (`OurRows` says why that
  would change the work, and puts ours back);
- its closing `save_model()` is left out, as on the HF side: under ZeRO-3 without 16-bit gathering it writes
  a full checkpoint (15 GB at 1B) that nothing here reads, outside the timed steps in any case.

Each rank writes the digests of the sequences it was handed (peers.py checks them against ours). It never
imports mellama_train (that lives in the other venv); StepTimes and share_cpu_ranks come from peers_hf.py.

    python bench/peers_llamafactory.py --prepare --data DIR --tokenizer TOK   # once, no launcher: the inputs

Not a user-facing tool: bench/peers.py writes its inputs (--data) and reads its outputs (--out/lf_result.json,
--out/lf_rows_rankR.json).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.machinery
import json
import os
import sys
import types
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peers_hf import (  # bench/ is this script's directory, so on sys.path
    StepTimes,
    share_cpu_ranks,
    training_arguments,
)
from transformers import DataCollatorForLanguageModeling

COLUMNS = ("input_ids", "position_ids", "labels")
ROWS: list[str] = []  # digests of the sequences this rank was handed, in order


def prepare(data: Path, tokenizer: Path) -> None:
    """LLaMA-Factory's inputs, written with its venv's own libraries (its datasets <= 4.0 need not read what
    ours writes): our sequences as a saved dataset for `tokenized_path`, and a "pretrained" model (the config
    peers.py wrote, random weights drawn with the run's seed, safetensors) with the sample tokenizer beside
    it."""
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    spec = json.loads((data / "spec.json").read_text())
    columns = {k: np.load(data / f"{k}.npy").astype(np.int64).tolist() for k in COLUMNS}
    Dataset.from_dict(columns).save_to_disk(str(data / "lf_tokenized"))
    torch.manual_seed(spec["seed"])
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(data))
    if spec["precision"] == "bf16":  # what LLaMA-Factory loads it as: half the bytes to write and read
        model = model.to(torch.bfloat16)
    model.save_pretrained(data / "lf_model", safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(data / "lf_model")


class OurRows(DataCollatorForLanguageModeling):
    """LLaMA-Factory's pt collator (mlm=False), which pads (nothing to pad: every row is seq_len long),
    rebuilds labels from input_ids with -100 only at the pad token (which LLaMA-Factory sets to EOS, so EOS
    would never be a target) and adds an all-ones attention_mask. Both would change the work: ours has -100 at
    each document start, and with no attention_mask transformers reads the restarting position_ids as document
    boundaries (with one, attention crosses documents). So our labels and position_ids go back in and the mask
    comes out; the digests of the rows this rank was handed are noted (peers.py checks the order)."""

    def __call__(self, features: list[dict[str, Any]], return_tensors: str | None = None) -> dict[str, Any]:
        for f in features:
            ROWS.append(hashlib.sha1(np.asarray(f["input_ids"], np.int64).tobytes()).hexdigest())
        batch = super().__call__(features, return_tensors)
        for key in ("labels", "position_ids"):
            batch[key] = torch.tensor([f[key] for f in features], dtype=torch.long)
        batch.pop("attention_mask", None)
        return batch


def stand_in_torchaudio() -> None:
    """LLaMA-Factory imports torchaudio at the top of its multimodal plugin (it loads audio files there, which
    pt never does). Beside a CPU torch there is none that loads: PyPI's is a CUDA build and the CPU one lives
    only on PyTorch's own index (tools/llamafactory_venv.sh removes it). Then an empty module takes its place,
    one that says so if anything does reach into it."""
    try:
        import torchaudio  # noqa: F401
    except (ImportError, OSError):
        module = types.ModuleType("torchaudio")
        module.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)

        def missing(name: str):
            raise ImportError(f"torchaudio.{name}: no torchaudio that loads beside this torch (a stand-in)")

        module.__getattr__ = missing
        sys.modules["torchaudio"] = module


def patch_llamafactory() -> None:
    """Into LLaMA-Factory's pt workflow, which builds its collator and trainer inside run_pt: the collator
    above, and a trainer whose closing save_model() does nothing. On CPU, share_cpu_ranks after its argument
    parsing (the TrainingArguments are made there, before the model is built under zero.Init)."""
    from llamafactory.train import tuner
    from llamafactory.train.pt import workflow

    class Unsaved(workflow.CustomTrainer):
        def save_model(self, *args, **kwargs) -> None:
            pass

    workflow.DataCollatorForLanguageModeling = OurRows
    workflow.CustomTrainer = Unsaved
    if torch.cuda.is_available():
        return
    parse = tuner.get_train_args

    def get_train_args(args):
        parsed = parse(args)
        share_cpu_ranks(parsed[2])  # (model, data, training, finetuning, generating) arguments
        return parsed

    tuner.get_train_args = get_train_args


def settings(spec: dict[str, Any], data: Path, ds: str, out: Path) -> dict[str, Any]:
    """run_exp's arguments: what a LLaMA-Factory YAML for this run would say."""
    seq_len = np.load(data / "input_ids.npy", mmap_mode="r").shape[1]
    return dict(
        stage="pt",
        do_train=True,
        finetuning_type="full",
        model_name_or_path=str(data / "lf_model"),
        flash_attn="sdpa",
        disable_gradient_checkpointing=not spec["gradient_checkpointing"],
        use_reentrant_gc=False,
        dataset="peers",  # LLaMA-Factory requires a name; with tokenized_path present it reads none
        tokenized_path=str(data / "lf_tokenized"),
        cutoff_len=seq_len,
        disable_shuffling=True,
        overwrite_output_dir=True,
        **training_arguments(spec, ds, out),
    )


def versions() -> dict[str, str]:
    names = ("llamafactory", "transformers", "deepspeed", "torch", "accelerate", "datasets", "peft", "trl")
    return {name: version(name) for name in names}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--prepare", action="store_true", help="write lf_tokenized/ and lf_model/ under --data")
    p.add_argument("--tokenizer", type=Path, help="with --prepare: the tokenizer directory")
    p.add_argument("--ds")
    p.add_argument("--out", type=Path)
    p.add_argument("--local_rank", type=int, default=-1)  # DeepSpeed's launcher passes it
    args = p.parse_args()
    if args.prepare:
        prepare(args.data, args.tokenizer)
        return
    spec = json.loads((args.data / "spec.json").read_text())
    stand_in_torchaudio()
    patch_llamafactory()
    from llamafactory.train.tuner import run_exp

    times = StepTimes()
    run_exp(settings(spec, args.data, args.ds, args.out), callbacks=[times])
    # run_exp has closed the process group: the launcher's RANK says which rank this is.
    rank = int(os.environ.get("RANK", "0"))
    (args.out / f"lf_rows_rank{rank}.json").write_text(json.dumps(ROWS))
    if rank == 0:
        result = {
            "times": times.times,
            "losses": times.losses,
            "gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
            "versions": versions(),
        }
        (args.out / "lf_result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
