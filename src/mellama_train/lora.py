"""LoRA through PEFT: wrap the model, save the adapter (gathering only adapter weights), merge it into its base.

    <output-dir>/adapter/   adapter_config.json + adapter_model.safetensors (PEFT format) + the tokenizer
    <output-dir>/final/     the base with the adapter merged: a plain Hugging Face model (lora.merge)
    <output-dir>/base/      only for `model.init: random` (the demo): the random base, so the adapter has one

`mellama-train merge --base B --adapter A --out O` runs the same merge on its own (e.g. on a large-memory node).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from mellama_train import integrity, watchdog
from mellama_train.backends import Backend, collectives
from mellama_train.config import Config, hub
from mellama_train.export.model_card import carry_model_card, write_model_card

log = logging.getLogger(__name__)


def apply_lora(model: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    """Freeze the model and add trainable adapters to `lora.target_modules` (PEFT), or continue training the
    adapter in `model.init_adapter` (with its own r, alpha and targets)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if cfg.model.init_adapter:
        log.info("continuing adapter %s (its own r/alpha/targets apply)", cfg.model.init_adapter)
        return PeftModel.from_pretrained(model, cfg.model.init_adapter, is_trainable=True)
    lo = cfg.lora
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    unknown = sorted(set(lo.target_modules) - names)
    if unknown:
        raise ValueError(
            f"lora.target_modules: {unknown} name no module of this model; LLaMA's linear layers are "
            "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
        )
    peft_config = LoraConfig(
        r=lo.r,
        lora_alpha=lo.alpha,
        lora_dropout=lo.dropout,
        target_modules=list(lo.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    # Adapter A matrices start random: every rank must draw the same ones (ZeRO-3 partitions each rank's own
    # copy, it does not broadcast them), and a restart must draw them again identically.
    torch.manual_seed(cfg.train.seed)
    return get_peft_model(model, peft_config)


def trainable_count(model: torch.nn.Module) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)


def save_adapter(eng: Backend, out_dir: Path, base_path: str, tokenizer: Any, is_main: bool) -> None:
    """Collective: gather the adapter weights (only those) on rank 0, which writes the PEFT directory."""
    state = eng.trainable_state_dict()
    if is_main:
        peft_model = eng.module
        # The adapter names the base it belongs to, so PeftModel.from_pretrained / merge can find it: by its Hub
        # id when it came from the Hugging Face cache (portable, as the Hub expects), else by its directory.
        peft_model.peft_config["default"].base_model_name_or_path = hub.hub_id(base_path) or base_path
        # save_embedding_layers=False: embeddings are never adapted here, and "auto" may look the base up online.
        peft_model.save_pretrained(
            out_dir, state_dict=state, safe_serialization=True, save_embedding_layers=False
        )
        tokenizer.save_pretrained(out_dir)  # with the chat template the adapter was tuned on
        # Our card (base, data licenses, tokens, steps) replaces the generic one PEFT writes.
        write_model_card(out_dir, out_dir.parent, "adapter")
        integrity.follow_umask(out_dir)
    collectives.barrier()


def merge_adapter(
    base: str | Path, adapter: str | Path, out_dir: str | Path, dtype: torch.dtype, trust_remote_code: bool
) -> Path:
    """Load the base on CPU, apply the adapter, fold it into the weights and write a plain HF model.

    Memory: the whole base in `dtype` on one host (26 GB for 13B, 140 GB for 70B in bf16).
    Weights are read from safetensors only: a pickled .bin can run code when loaded, so a base or adapter that
    has only that is refused (ValueError naming the file and the fix) before anything is loaded."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for path, what in ((base, "base model"), (adapter, "adapter")):
        marker = "config.json" if what == "base model" else "adapter_config.json"
        if not (Path(path) / marker).is_file():
            raise ValueError(f"{path}: no {marker}; pass the {what} directory")
        _require_safetensors(Path(path), what)
    model = AutoModelForCausalLM.from_pretrained(
        base, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
    )
    watchdog.progress("merge: base loaded")
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    watchdog.progress("merge: adapter folded in")
    merged.config.use_cache = True
    out_dir = Path(out_dir)
    # `merge --out` may name a directory already holding the user's files: only what this writes gets its mode set.
    before = integrity.files_under(out_dir)
    merged.save_pretrained(out_dir, safe_serialization=True)
    watchdog.progress("merge: weights written")
    # The adapter directory's tokenizer carries the chat template used in tuning; the base's may have none.
    tokenizer_dir = adapter if (Path(adapter) / "tokenizer_config.json").is_file() else base
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    carry_model_card(Path(adapter), out_dir)
    integrity.follow_umask(out_dir, keep=before)
    log.info("merged %s into %s -> %s", adapter, base, out_dir)
    return out_dir


def _require_safetensors(path: Path, what: str) -> None:
    """Refuse a model or adapter directory without safetensors weights, naming its pickle file and the fix."""
    if problem := integrity.pickle_only_problem(path, what, "merge"):
        raise ValueError(problem)


def write_random_base(cfg: Config, tokenizer: Any, out_dir: Path) -> None:
    """The demo's random-init base, written once (same seed, same weights) so the adapter has a base on disk."""
    from mellama_train.model import build_model

    if (out_dir / "config.json").is_file():
        return  # resumed run: the base it started from is already there
    model = build_model(cfg, tokenizer, for_training=False)
    model.config.use_cache = True
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    integrity.follow_umask(out_dir)
