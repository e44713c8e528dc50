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
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from mellama_train.config import hub
from mellama_train.integrity import read_capped
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

# The license identifiers the Hugging Face Hub accepts in a card's `license` (its docs, "Licenses"); any other
# terms are `license: other` with a `license_name`.
# fmt: off
HUB_LICENSES = frozenset(
    {
        "apache-2.0", "mit", "openrail", "bigscience-openrail-m", "creativeml-openrail-m",
        "bigscience-bloom-rail-1.0", "bigcode-openrail-m", "afl-3.0", "artistic-2.0", "bsl-1.0", "bsd",
        "bsd-2-clause", "bsd-3-clause", "bsd-3-clause-clear", "c-uda", "cc", "cc0-1.0", "cc-by-2.0",
        "cc-by-2.5", "cc-by-3.0", "cc-by-4.0", "cc-by-sa-3.0", "cc-by-sa-4.0", "cc-by-nc-2.0", "cc-by-nc-3.0",
        "cc-by-nc-4.0", "cc-by-nd-4.0", "cc-by-nc-nd-3.0", "cc-by-nc-nd-4.0", "cc-by-nc-sa-2.0",
        "cc-by-nc-sa-3.0", "cc-by-nc-sa-4.0", "cdla-sharing-1.0", "cdla-permissive-1.0",
        "cdla-permissive-2.0", "wtfpl", "ecl-2.0", "epl-1.0", "epl-2.0", "etalab-2.0", "eupl-1.1",
        "eupl-1.2", "agpl-3.0", "gfdl", "gpl", "gpl-2.0", "gpl-3.0", "lgpl", "lgpl-2.1", "lgpl-3.0", "isc",
        "h-research", "intel-research", "lppl-1.3c", "ms-pl", "apple-ascl", "apple-amlr", "mpl-2.0",
        "odc-by", "odbl", "openmdw-1.0", "openmdw-1.1", "openrail++", "osl-3.0", "postgresql", "ofl-1.1",
        "ncsa", "unlicense", "zlib", "pddl", "lgpl-lr", "deepfloyd-if-license",
        "fair-noncommercial-research-license", "llama2", "llama3", "llama3.1", "llama3.2", "llama3.3",
        "llama4", "grok2-community", "gemma", "unknown", "other",
    }
)
# fmt: on
LICENSE_NAME = "base-model-and-training-data-terms"  # the `license_name` of a card whose license is `other`
_CARD_BYTES = 65536  # the most of a base model's README.md read for its front matter


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


def _pretrained_base(config: dict[str, Any]) -> tuple[bool, str | None]:
    """(whether the weights start from a pretrained base, its path): a random initialisation has no base terms."""
    model = config["model"]
    pretrained = model.get("init") == "pretrained"
    return pretrained, (model.get("path") or None) if pretrained else None


def _base_model(config: dict[str, Any]) -> str:
    model = config["model"]
    if model.get("init") == "pretrained" and model.get("path"):
        base_id = hub.hub_id(model["path"])
        return f"`{base_id}` (Hugging Face Hub)" if base_id else f"`{model['path']}`"
    a = model.get("arch", {})
    shape = f"{a.get('num_layers')} layers, hidden {a.get('hidden_size')}, vocabulary {a.get('vocab_size')}"
    written = " (written to the run's `base/`)" if config["lora"].get("enabled") else ""
    return f"random initialisation ({shape}){written}"


def _base_license_line(config: dict[str, Any]) -> list[str]:
    """The card's line on a pretrained base's terms (none for a random initialisation: no base terms)."""
    pretrained, base = _pretrained_base(config)
    if not pretrained:
        return []
    if found := _card_license(base):
        shown = found.replace("`", "'")  # the base's own text, shown as code: no Markdown or links of its own
        return [f"- base model license: `{shown}` (its card's `license`); its terms apply to these weights"]
    return [
        "- base model license: not given by its card (README.md front matter); its terms, whatever they are,"
        " apply to these weights: check them before using or sharing these weights"
    ]


def front_matter(config: dict[str, Any], kind: str, licenses: dict[str, str]) -> dict[str, Any]:
    """The card's metadata as the Hugging Face Hub reads it (huggingface_hub's ModelCardData): base_model (the
    Hub id, when the base came from the Hugging Face cache), license, datasets (sources read from cached Hub
    datasets), tags, pipeline_tag, library_name. The license is one identifier only when the base's (its card's
    `license`; a pretrained base whose card gives none has unknown terms) and every source's note are the same
    identifier, and that identifier is one the Hub accepts (HUB_LICENSES); otherwise `other`, and the card's
    body gives each term: weights derived from a base and data carry their terms, which no single identifier
    can say."""
    sources = config["data"]["sources"]
    pretrained, base = _pretrained_base(config)
    meta: dict[str, Any] = {}
    if base_id := hub.hub_id(base):
        meta["base_model"] = base_id
    notes = [licenses.get(s["name"], s.get("license")) for s in sources]
    if pretrained:  # the base's terms apply too: unreadable ones are unknown ones
        notes.append(_card_license(base))
    terms = {n.strip().lower() if isinstance(n, str) and n.strip() else None for n in notes}
    only = next(iter(terms)) if len(terms) == 1 else None
    meta["license"] = only if only in HUB_LICENSES else "other"
    if meta["license"] == "other":
        meta["license_name"] = LICENSE_NAME
    datasets = sorted({d for s in sources for p in s.get("paths", []) if (d := hub.hub_id(p, "datasets"))})
    if datasets:
        meta["datasets"] = datasets
    meta["tags"] = ["mellama-train", "llama", "medical", *(["lora", "peft"] if kind == "adapter" else [])]
    meta["pipeline_tag"] = "text-generation"
    meta["library_name"] = "peft" if kind == "adapter" else "transformers"
    return meta


def _read_card(path: str) -> str | None:
    """The first _CARD_BYTES of a regular file, decoded (undecodable bytes replaced); None for anything else.
    A base directory is not ours: its README.md may be a FIFO (a plain open would wait for a writer forever),
    a device such as /dev/zero (endless), or a link to one (integrity.read_capped)."""
    data = read_capped(path, _CARD_BYTES, truncate=True)
    return data.decode("utf-8", errors="replace") if data is not None else None


def _card_license(model_dir: str | None) -> str | None:
    """The `license` of a base model's own card (README.md front matter), if it has one we can read: one line,
    at most 200 characters. Whatever the card holds (a FIFO, a device, front matter nested deeper than the
    parser goes, invalid YAML) gives None: the card is written after training and must never fail the run."""
    if not model_dir:
        return None
    try:
        text = _read_card(os.path.join(model_dir, CARD))
        if text is None or not text.startswith("---"):
            return None
        meta = yaml.safe_load(text.split("---", 2)[1])
    except (OSError, ValueError, TypeError, IndexError, RecursionError, yaml.YAMLError):
        return None
    value = meta.get("license") if isinstance(meta, dict) else None
    if not isinstance(value, str):
        return None
    return " ".join(value.split())[:200] or None


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
        *_base_license_line(config),
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
