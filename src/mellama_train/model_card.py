"""The model card (README.md) written into `final/` and `adapter/`: base model, data sources with their license /
data-use notes, tokens per source and steps, so whoever receives the weights also receives their terms.

Everything comes from the run directory: the newest run record (the config the run last started with) and the
newest complete checkpoint's trainer.json (the step and tokens per source at the end; the loop always saves the
last step before exporting). Paths and numbers only: no training text.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from mellama_train.metrics import read_metrics
from mellama_train.outputs import latest_run_record

CARD = "README.md"
KINDS = {
    "model": "the full model (every weight trained from the base below)",
    "adapter": "a LoRA adapter (PEFT); load it on the base model below, or use final/ (merged)",
    "merged": "the base model with the LoRA adapter merged into its weights",
    "export": "the full model as it was at the checkpoint below, exported and verified by `mellama-train export`",
}


def _newest_trainer_state(run_dir: Path) -> dict[str, Any]:
    from mellama_train.checkpoint import TRAINER_STATE, complete_checkpoints

    complete = complete_checkpoints(run_dir / "checkpoints")
    return json.loads((complete[-1] / TRAINER_STATE).read_text()) if complete else {}


def _base_model(config: dict[str, Any]) -> str:
    model = config["model"]
    if model.get("init") == "pretrained" and model.get("path"):
        return f"`{model['path']}`"
    a = model.get("arch", {})
    shape = f"{a.get('num_layers')} layers, hidden {a.get('hidden_size')}, vocabulary {a.get('vocab_size')}"
    written = " (written to the run's `base/`)" if config["lora"].get("enabled") else ""
    return f"random initialisation ({shape}){written}"


def _last_held_out(run_dir: Path, up_to: int | None = None) -> tuple[int | None, dict[str, float]]:
    """(step, held-out loss per source) of the run's latest evaluation (at or before step `up_to`), from
    metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    metrics = read_metrics(path) if path.is_file() else {}
    evals = [s for s, v in metrics.items() if "eval/loss" in v and (up_to is None or s <= up_to)]
    if not evals:
        return None, {}
    values = metrics[max(evals)]
    return max(evals), {
        k.removeprefix("eval/loss/"): v for k, v in values.items() if k.startswith("eval/loss/")
    }


def render(
    record: dict[str, Any],
    trainer: dict[str, Any],
    kind: str,
    held_out: tuple[int | None, dict[str, float]] = (None, {}),
) -> str:
    config = record["config"]
    data, train, optim, lora = config["data"], config["train"], config["optim"], config["lora"]
    tokens = trainer.get("tokens_by_source", {})
    licenses = trainer.get("data_licenses") or {}
    files = record.get("data_manifest", {})
    lines = [
        "---",
        f"library_name: {'peft' if kind == 'adapter' else 'transformers'}",
        "tags: [mellama-train, llama, medical]",
        "---",
        "",
        f"# {Path(train.get('output_dir') or '.').name} ({config['task']}, profile {config['profile']})",
        "",
        f"This directory holds {KINDS[kind]}, trained with mellama-train.",
        "",
        f"- base model: {_base_model(config)}",
        f"- steps: {trainer.get('step', 'unknown')}, each {train['global_batch_size']} sequences of"
        f" {data['seq_len']} tokens; peak lr {optim['lr']:g}, {train['precision']}",
    ]
    if lora.get("enabled"):
        lines.append(
            f"- LoRA: r {lora['r']}, alpha {lora['alpha']:g}, on {', '.join(lora['target_modules'])}"
        )
    lines += [
        f"- training tokens: {sum(tokens.values()):,}" if tokens else "- training tokens: unknown",
        "",
        "## Training data",
        "",
        "Each source's license / data-use note, as given in the recipe (`data.sources[].license`). The weights"
        " are derived from this data: its terms apply to them.",
        "",
        "| source | license / data-use note | weight | tokens | files | held-out loss |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    eval_step, eval_losses = held_out
    for src in data["sources"]:
        name = src["name"]
        note = licenses.get(name, src.get("license")) or "not given (set `data.sources[].license`)"
        count = f"{tokens[name]:,}" if name in tokens else "unknown"
        loss = f"{eval_losses[name]:.4f}" if name in eval_losses else "-"
        lines.append(
            f"| {name} | {note} | {src['weight']:g} | {count} | {len(files.get(name, []))} | {loss} |"
        )
    if eval_step is not None:
        lines += ["", f"Held-out losses (nats per token) are from the evaluation at step {eval_step}."]
    lines += ["", "The run's full configuration and file manifest are in its `run_record.json`.", ""]
    return "\n".join(lines)


def write_model_card(out_dir: Path, run_dir: Path, kind: str, checkpoint: Path | None = None) -> Path | None:
    """Write out_dir/README.md from run_dir's record and its newest checkpoint (or `checkpoint`, with the
    held-out losses of its step or before); None when run_dir has no record (a directory this trainer did not
    write)."""
    record = latest_run_record(run_dir)
    if record is None or "config" not in record:
        return None
    path = Path(out_dir) / CARD
    if checkpoint is None:
        trainer, held_out = _newest_trainer_state(run_dir), _last_held_out(run_dir)
    else:
        from mellama_train.checkpoint import TRAINER_STATE

        trainer = json.loads((Path(checkpoint) / TRAINER_STATE).read_text())
        held_out = _last_held_out(run_dir, trainer.get("step"))
    card = render(record, trainer, kind, held_out)
    if checkpoint is not None:
        card += f"Exported from checkpoint `{Path(checkpoint).name}`; its verification is in `export.json`.\n"
    path.write_text(card, encoding="utf-8")
    return path


def carry_model_card(adapter_dir: Path, out_dir: Path) -> Path | None:
    """The merged model's card: rendered from the adapter's run when it came from one, else the adapter's own
    README.md copied (a merge of an adapter from elsewhere)."""
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if written := write_model_card(out_dir, adapter_dir.parent, "merged"):
        return written
    if (adapter_dir / CARD).is_file():
        return Path(shutil.copyfile(adapter_dir / CARD, out_dir / CARD))
    return None
