"""The model card (README.md) written into `final/` and `adapter/`: base model, data sources with their license /
data-use notes, tokens per source and steps, so whoever receives the weights also receives their terms.

Everything comes from the run directory: the newest run record (the config the run last started with) and the
trainer.json of the newest checkpoint that verifies (the step and tokens per source at the end; the loop always
saves the last step before exporting). Paths and numbers only: no training text.

The card is written after training, on rank 0 alone: whatever it reads back (a step directory left damaged or
stale in a shared scratch directory, an edited record) must never fail the run there. A checkpoint that does
not verify is passed over and named in the card; with none, the card says that its numbers are missing.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from mellama_train.config import hub
from mellama_train.metrics import finite_number, read_metrics
from mellama_train.outputs import latest_run_record

log = logging.getLogger(__name__)

CARD = "README.md"
KINDS = {
    "model": "the full model (every weight trained from the base below)",
    "adapter": "a LoRA adapter (PEFT); load it on the base model below, or use final/ (merged)",
    "merged": "the base model with the LoRA adapter merged into its weights",
    "export": "the full model as it was at the checkpoint below, exported and verified by `mellama-train export`",
}


def _trainer_state(step_dir: Path) -> dict[str, Any] | None:
    """The fields of a checkpoint's trainer.json that the card prints, of the types written; None when it
    cannot be read."""
    from mellama_train.checkpoint import TRAINER_STATE

    try:
        raw = json.loads((step_dir / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        return None
    if not isinstance(raw, dict):
        return None
    tokens, licenses = raw.get("tokens_by_source"), raw.get("data_licenses")
    state: dict[str, Any] = {
        "tokens_by_source": {
            name: int(count)
            for name, value in (tokens.items() if isinstance(tokens, dict) else [])
            if (count := finite_number(value)) is not None and count >= 0
        },
        "data_licenses": {
            name: note
            for name, note in (licenses.items() if isinstance(licenses, dict) else [])
            if isinstance(note, str)
        },
    }
    if type(raw.get("step")) is int:
        state["step"] = raw["step"]
    return state


def _newest_trainer_state(run_dir: Path) -> tuple[dict[str, Any], str]:
    """(trainer state, a note for the card: which checkpoint it is from when newer ones were passed over, or
    why there are no numbers; "" when it is the newest's) of the newest checkpoint that verifies."""
    from mellama_train.checkpoint import complete_checkpoints, verify

    try:
        complete = complete_checkpoints(run_dir / "checkpoints")
    except ValueError as exc:  # the checkpoints directory cannot be listed
        log.warning("model card: %s", exc)
        return {}, f"Step and token counts are not given: {exc}."
    passed_over = []
    for step_dir in reversed(complete):
        problem = verify(step_dir)
        state = _trainer_state(step_dir) if problem is None else None
        if state is not None:
            if not passed_over:
                return state, ""
            log.warning("model card: counts from %s; passed over %s", step_dir.name, "; ".join(passed_over))
            return state, (
                f"Step and token counts are from checkpoint `{step_dir.name}`; newer ones did not verify:"
                f" {'; '.join(passed_over)}."
            )
        passed_over.append(problem or f"{step_dir / 'trainer.json'} cannot be read")
    if passed_over:
        log.warning(
            "model card: no checkpoint verifies (%s): written without step and token counts", passed_over[0]
        )
        return {}, (
            "Step and token counts are not given: no checkpoint of this run verifies"
            f" ({'; '.join(passed_over)})."
        )
    return {}, ""


def _base_model(config: dict[str, Any]) -> str:
    model = config["model"]
    if model.get("init") == "pretrained" and model.get("path"):
        base_id = hub.hub_id(model["path"])
        return f"`{base_id}` (Hugging Face Hub)" if base_id else f"`{model['path']}`"
    a = model.get("arch", {})
    shape = f"{a.get('num_layers')} layers, hidden {a.get('hidden_size')}, vocabulary {a.get('vocab_size')}"
    written = " (written to the run's `base/`)" if config["lora"].get("enabled") else ""
    return f"random initialisation ({shape}){written}"


# What a license note that is a Hub license identifier looks like ("apache-2.0", "llama2", "cc-by-4.0").
_LICENSE_ID = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")


def front_matter(config: dict[str, Any], kind: str, licenses: dict[str, str]) -> dict[str, Any]:
    """The card's metadata as the Hugging Face Hub reads it (huggingface_hub's ModelCardData): base_model (the
    Hub id, when the base came from the Hugging Face cache), license, datasets (sources read from cached Hub
    datasets), tags, pipeline_tag, library_name. The license is one identifier only when the base's (its card's
    `license`) and every source's note are the same identifier; otherwise `other`, and the card's body gives
    each term: weights derived from data carry the data's terms, which no single identifier can say."""
    model, sources = config["model"], config["data"]["sources"]
    base = model.get("path") if model.get("init") == "pretrained" else None
    meta: dict[str, Any] = {}
    if base_id := hub.hub_id(base):
        meta["base_model"] = base_id
    notes = {licenses.get(s["name"], s.get("license")) or None for s in sources}
    if base_license := _card_license(base):
        notes.add(base_license)
    terms = {n.strip().lower() for n in notes if n}
    only = next(iter(terms)) if len(terms) == 1 and None not in notes else None
    meta["license"] = only if only and _LICENSE_ID.match(only) else "other"
    if meta["license"] == "other":
        meta["license_name"] = "base-model-and-training-data-terms"
    datasets = sorted({d for s in sources for p in s.get("paths", []) if (d := hub.hub_id(p, "datasets"))})
    if datasets:
        meta["datasets"] = datasets
    meta["tags"] = ["mellama-train", "llama", "medical", *(["lora", "peft"] if kind == "adapter" else [])]
    meta["pipeline_tag"] = "text-generation"
    meta["library_name"] = "peft" if kind == "adapter" else "transformers"
    return meta


def _card_license(model_dir: str | None) -> str | None:
    """The `license` of a base model's own card (README.md front matter), if it has one we can read."""
    if not model_dir:
        return None
    try:
        text = (Path(model_dir) / CARD).read_text(encoding="utf-8")[:65536]
        if not text.startswith("---"):
            return None
        meta = yaml.safe_load(text.split("---", 2)[1])
    except (OSError, ValueError, IndexError, yaml.YAMLError):
        return None
    value = meta.get("license") if isinstance(meta, dict) else None
    return value if isinstance(value, str) else None


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
        k.removeprefix("eval/loss/"): loss
        for k, v in values.items()
        if k.startswith("eval/loss/") and (loss := finite_number(v)) is not None
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
        yaml.safe_dump(front_matter(config, kind, licenses), sort_keys=False, allow_unicode=True).strip(),
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
        (trainer, note), held_out = _newest_trainer_state(run_dir), _last_held_out(run_dir)
    else:  # `mellama-train export` verified this checkpoint before exporting it
        trainer, note = _trainer_state(Path(checkpoint)) or {}, ""
        held_out = _last_held_out(run_dir, trainer.get("step"))
    try:
        card = render(record, trainer, kind, held_out)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a record edited since the run began
        log.warning("model card: the run record cannot be rendered (%s): a short card is written", exc)
        card = (
            f"# {Path(run_dir).name}\n\nThis directory holds {KINDS[kind]}, trained with mellama-train. Its base"
            " model, data sources and their licenses could not be read from the run's newest run record:"
            " see the run directory's run_record*.json before using or sharing these weights.\n"
        )
    if note:
        card += note + "\n"
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
