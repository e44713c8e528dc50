"""Start-up checks, and the config a run trains with.

`validate(cfg)` lists every problem with its fix (a value out of range, a file that cannot be read, a DeepSpeed
JSON that contradicts the recipe, a model predicted not to fit) and, apart, the inputs a real run still needs, so
`--dry-run` of a bare profile shows what to fill in. `preflight(cfg)` runs it once and, when nothing is wrong,
resolves what start-up must fix before any rank starts (tuning by epochs becomes a step count) and freezes the
result: `train()` accepts only that frozen config, so a run cannot train on a config its checks never saw.

This module sits above config/, data/, ds_config and plan; none of them imports it.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from mellama_train.config import SOURCE_FORMATS, TASKS, TUNE, Config, freeze, hub
from mellama_train.data.cleaners import CLEANERS
from mellama_train.data.instruction_format import FIELDS as INSTRUCTION_FIELDS
from mellama_train.data.pipeline import open_order, plan_epochs
from mellama_train.data.prepared import check_prepared, prepared_sources
from mellama_train.data.source import check_sources
from mellama_train.data.tokenizer import load_tokenizer
from mellama_train.ds_config import check_ds_config
from mellama_train.integrity import pickle_only_problem
from mellama_train.plan import make_plan
from mellama_train.trackers import config_problems


@dataclass(frozen=True)
class Checked:
    """What preflight found: the problems (each with its fix), the inputs still missing, and the config."""

    problems: list[str]
    missing: list[str]
    config: Config
    """Frozen and fully resolved when `ok`; otherwise the config as given (for --dry-run to print)."""
    examples: int | None = None
    """Tuning by epochs: the instruction examples counted to turn epochs into train.max_steps."""

    @property
    def ok(self) -> bool:
        return not self.problems and not self.missing


def preflight(cfg: Config) -> Checked:
    """Validate `cfg`; when it passes, a frozen copy with train.max_steps fixed from train.epochs (tuning).
    A data file that cannot be counted raises ValueError naming it."""
    problems, missing = validate(cfg)
    if problems or missing:
        return Checked(problems, missing, cfg)
    ready = copy.deepcopy(cfg)
    examples = plan_epochs(ready)
    return Checked([], [], freeze(ready), examples)


_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def validate(cfg: Config) -> tuple[list[str], list[str]]:
    """Return (problems, missing): every invalid value with its fix, and the fields a real run still needs.

    Missing inputs are listed apart so `--dry-run` of a bare profile succeeds and shows what to fill in."""
    p: list[str] = []
    missing: list[str] = []
    t = cfg.train
    _check_model(cfg, p, missing)
    _check_sources(cfg, p, missing)
    _check_data(cfg, p, missing)
    _check_optimizer(cfg, p)
    _check_backend(cfg, p)
    _check_schedule(cfg, p)
    if t.gpu_memory_gib < 0:
        p.append(f"train.gpu_memory_gib must be >= 0 (got {t.gpu_memory_gib}); 0 disables the memory check")
    elif t.gpu_memory_gib and not p:
        plan = make_plan(cfg)
        if not plan.fits:
            p.append(
                f"predicted peak {plan.peak / 2**30:.2f} GiB per GPU does not fit train.gpu_memory_gib"
                f" {t.gpu_memory_gib:g} (minus 1 GiB reserve); {' '.join(plan.advice)} (details: mellama-train plan)"
            )
    if t.backend == "single":
        return p, missing  # no DeepSpeed: the ds_config is not read (--ds is ignored)
    if not Path(t.ds_config).is_file():
        p.append(
            f"train.ds_config: {t.ds_config} not found; pass --ds with a DeepSpeed JSON, e.g. ds_configs/zero3.json"
        )
    else:
        p.extend(check_ds_config(t.ds_config, cfg))
    return p, missing


def _check_model(cfg: Config, p: list[str], missing: list[str]) -> None:
    """Problems (to `p`) and missing inputs (to `missing`) of the task, the model to start from (its files are read:
    config.json, pickles refused) and its shape."""
    m, d = cfg.model, cfg.data
    if cfg.task not in TASKS:
        p.append(f"task must be one of {', '.join(TASKS)} (got {cfg.task!r}); it is set by the entry point")
    if m.init not in ("pretrained", "random"):
        p.append(f"model.init must be pretrained or random (got {m.init!r})")
    if m.init == "pretrained":
        if not m.path:
            missing.append(
                "model.path (--base): the Hugging Face directory of the base model to tune, e.g. final/ of a pretraining run"
                if cfg.kind is TUNE
                else "model.path: the Hugging Face directory of the model to continue (e.g. a local Llama-2-13b-hf)"
            )
        elif hub.looks_like_hub_id(m.path):  # an id resolve() did not find in the Hugging Face cache
            p.append(hub.missing_message("model.path", m.path))
        elif not (Path(m.path) / "config.json").is_file():
            p.append(f"model.path: {m.path} has no config.json; point it at a Hugging Face model directory")
        else:
            # (A directory with no weights yet can still be planned and dry-run; only pickles are refused here.)
            if problem := pickle_only_problem(Path(m.path), "model", "training", require_weights=False):
                p.append(f"model.path: {problem}")
            try:
                max_pos = json.loads((Path(m.path) / "config.json").read_text()).get(
                    "max_position_embeddings"
                )
            except (OSError, ValueError, AttributeError, RecursionError):
                max_pos = None
                p.append(
                    f"model.path: {m.path}/config.json is not a readable JSON object; restore the model's config"
                )
            if isinstance(max_pos, int) and d.seq_len > max_pos:
                p.append(
                    f"data.seq_len ({d.seq_len}) exceeds {m.path}'s max_position_embeddings ({max_pos});"
                    f" use data.seq_len <= {max_pos}"
                )
    if m.tokenizer and hub.looks_like_hub_id(m.tokenizer):
        p.append(hub.missing_message("model.tokenizer", m.tokenizer))
    if m.init == "random" and not (m.tokenizer or m.path):
        missing.append("model.tokenizer: a tokenizer directory (a random-init model has none of its own)")
    if m.attn_implementation not in ("sdpa", "flash_attention_2", "flash_attention_3", "eager"):
        p.append(
            f"model.attn_implementation must be sdpa, flash_attention_2 or eager (got {m.attn_implementation!r})"
        )

    a = m.arch
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
        if getattr(a, name) <= 0:
            p.append(f"model.arch.{name} must be > 0 (got {getattr(a, name)})")
    if a.num_heads > 0 and a.hidden_size % a.num_heads:
        p.append(f"model.arch.hidden_size ({a.hidden_size}) must be divisible by num_heads ({a.num_heads})")
    if a.num_kv_heads > 0 and a.num_heads % a.num_kv_heads:
        p.append(f"model.arch.num_heads ({a.num_heads}) must be divisible by num_kv_heads ({a.num_kv_heads})")


def _check_sources(cfg: Config, p: list[str], missing: list[str]) -> None:
    """Problems (to `p`) and missing inputs (to `missing`) of the sequence length and every source's own fields."""
    m, d, a = cfg.model, cfg.data, cfg.model.arch
    if d.seq_len <= 0:
        p.append(f"data.seq_len must be > 0 (got {d.seq_len})")
    elif m.init == "random" and d.seq_len > a.max_position_embeddings:
        p.append(
            f"data.seq_len ({d.seq_len}) exceeds model.arch.max_position_embeddings ({a.max_position_embeddings});"
            " lower seq_len or raise max_position_embeddings"
        )
    if not d.sources:
        p.append("data.sources is empty; add at least one {name, paths, weight} source")
    names = [s.name for s in d.sources]
    for i, s in enumerate(d.sources):
        label = f"data.sources[{s.name or i}]"
        if not _NAME_RE.match(s.name or ""):
            p.append(f"{label}.name must be letters, digits, _ or - (got {s.name!r}); it names metrics")
        if names.count(s.name) > 1 and names.index(s.name) == i:
            p.append(f"{label}.name is used by {names.count(s.name)} sources; give each source its own name")
        if not math.isfinite(s.weight):
            p.append(f"{label}.weight must be a finite number (got {s.weight}); give it a weight, e.g. 1")
        elif not s.weight > 0:
            p.append(f"{label}.weight must be > 0 (got {s.weight}); drop the source or give it a weight")
        if s.prepared is not None and not str(s.prepared).strip():
            p.append(
                f"{label}.prepared is empty (an unset variable?); give the directory `mellama-train prepare`"
                " wrote, or drop the key to stream the source's paths"
            )
        if not s.paths and not s.prepared:
            missing.append(f"{label}.paths: the files, directories or globs of this source")
        unknown = [c for c in s.cleaners if c not in CLEANERS]
        if unknown:
            p.append(f"{label}.cleaners: unknown {unknown}; known: {', '.join(CLEANERS)}")
        if s.format not in SOURCE_FORMATS:
            p.append(f"{label}.format: unknown {s.format!r}; known: {', '.join(SOURCE_FORMATS)}")
        for key, values in s.where.items():
            if not key or not values or not all(isinstance(v, str) for v in values):
                p.append(
                    f"{label}.where.{key}: give the values to keep as a list of text, e.g. {{note_type: [DS]}}"
                )
        if s.min_chars < 0:
            p.append(f"{label}.min_chars must be >= 0 (got {s.min_chars}); 0 keeps every non-empty document")
        if not cfg.kind.records and s.dataset:
            p.append(f"{label}.dataset: LLaMA-Factory entries are instruction data; use launch/tune.py")
        if cfg.kind.records and (s.min_chars or s.require_abstract):
            p.append(
                f"{label}: min_chars and require_abstract filter pretraining documents; drop them from a tuning"
                " source"
            )
        wrong = [key for key in s.columns if key not in INSTRUCTION_FIELDS]
        if wrong:
            p.append(
                f"{label}.columns: unknown field {wrong[0]!r} (keys are our names, values the file's);"
                f" known: {', '.join(INSTRUCTION_FIELDS)}"
            )


def _check_data(cfg: Config, p: list[str], missing: list[str]) -> None:
    """Problems (to `p`) and missing inputs (to `missing`) of LoRA, data handling, tuning length, the forgetting probe,
    and every data file opened."""
    d, t = cfg.data, cfg.train
    names = [s.name for s in d.sources]
    lo = cfg.lora
    if lo.enabled:
        if lo.r <= 0 or not lo.alpha > 0:
            p.append(f"lora.r and lora.alpha must be > 0 (got r={lo.r}, alpha={lo.alpha})")
        if not 0 <= lo.dropout < 1:
            p.append(f"lora.dropout must be in [0, 1) (got {lo.dropout})")
        if not lo.target_modules:
            p.append("lora.target_modules is empty; name the modules to adapt, e.g. [q_proj, v_proj]")
    if not 0 <= d.max_skip_fraction <= 1 or d.skip_allowance < 0:
        p.append(
            f"data.max_skip_fraction must be in [0, 1] and data.skip_allowance >= 0 (got {d.max_skip_fraction},"
            f" {d.skip_allowance})"
        )
    if d.overflow not in ("truncate", "drop"):
        p.append(f"data.overflow must be truncate or drop (got {d.overflow!r})")
    if not d.chat_template.strip():
        p.append("data.chat_template is empty; use auto, default, a .jinja path or a template string")
    if cfg.kind.by_epochs:
        if t.epochs is not None and not t.epochs > 0:
            p.append(f"train.epochs must be > 0 (got {t.epochs})")
        if not t.max_steps and t.epochs is None:
            p.append(
                "train.epochs or train.max_steps must be set: how long to tune (e.g. --set train.epochs=3)"
            )
        if d.pack and t.epochs is not None and not t.max_steps:
            p.append(
                "train.epochs with data.pack: packed rows hold a varying number of examples, so epochs cannot"
                " give a step count up front; set train.max_steps instead"
            )
    if t.forgetting_source is not None:
        probe = next((src for src in d.sources if src.name == t.forgetting_source), None)
        if probe is None:
            p.append(
                f"train.forgetting_source {t.forgetting_source!r} is not a source (have {names}); name the"
                " general-domain source, or set it to null"
            )
        elif not probe.eval_paths:
            missing.append(
                f"data.sources[{probe.name}].eval_paths: held-out files of the forgetting probe"
                " (train.forgetting_source), or set train.forgetting_source to null"
            )
    if d.decontamination is not None and not os.path.isfile(os.path.join(d.decontamination, "manifest.json")):
        p.append(
            f"data.decontamination: {d.decontamination} holds no index (manifest.json); build one with"
            f" `mellama-train decontaminate --benchmarks FILE... --out {d.decontamination}`"
        )
    if not 0 < d.mixture_tolerance < 1:
        p.append(
            f"data.mixture_tolerance must be in (0, 1) (got {d.mixture_tolerance}); 0.01 = one percentage point"
        )
    if d.max_record_bytes <= 0:
        p.append(
            f"data.max_record_bytes must be > 0 (got {d.max_record_bytes}); the default is 33554432 (32 MiB)"
        )
    else:  # every file of every source opened now, so a bad one is named before step 1 (data/source.py)
        p += check_sources(cfg)
    if prepared_sources(cfg):
        p += _check_prepared(cfg)
    if t.forgetting_margin < 0:
        p.append(f"train.forgetting_margin must be >= 0 (got {t.forgetting_margin})")
    if t.watchdog_minutes < 0 or t.max_consecutive_skips < 0 or t.loss_spike_factor < 0:
        p.append(
            "train.watchdog_minutes, train.max_consecutive_skips and train.loss_spike_factor must be >= 0 (got"
            f" {t.watchdog_minutes}, {t.max_consecutive_skips}, {t.loss_spike_factor}); 0 disables each"
        )
    if t.skip_loss_spikes and not t.loss_spike_factor > 1:
        p.append(
            f"train.skip_loss_spikes needs train.loss_spike_factor > 1 (got {t.loss_spike_factor}); a lower"
            " factor would skip ordinary steps"
        )
    if t.eval_every < 0 or t.eval_batches <= 0:
        p.append(
            f"train.eval_every must be >= 0 and train.eval_batches > 0 (got {t.eval_every}, {t.eval_batches})"
        )


def _check_prepared(cfg: Config) -> list[str]:
    """A recipe over prepared corpora: each corpus against its manifest, the tokenizer and the recipe, and the
    order over them (a source under one sequence, a weight too small to give one)."""
    try:
        tokenizer = load_tokenizer(cfg)
    except Exception:  # noqa: BLE001 (a missing or broken tokenizer is reported by the model checks)
        return []
    problems = check_prepared(cfg, tokenizer)
    weights_ok = all(math.isfinite(s.weight) and s.weight > 0 for s in cfg.data.sources)
    if not problems and weights_ok:  # (a bad weight is reported with the source's fields)
        try:
            open_order(cfg, tokenizer)
        except ValueError as exc:
            problems.append(str(exc))
    return problems


def _check_optimizer(cfg: Config, p: list[str]) -> None:
    """Problems (to `p`) of the AdamW settings."""
    o = cfg.optim
    if not o.lr > 0:
        p.append(f"optim.lr must be > 0 (got {o.lr})")
    if not 0 <= o.min_lr_ratio <= 1:
        p.append(f"optim.min_lr_ratio must be in [0, 1] (got {o.min_lr_ratio})")
    if not 0 <= o.warmup_ratio < 1:
        p.append(f"optim.warmup_ratio must be in [0, 1) (got {o.warmup_ratio})")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        p.append(f"optim.betas must be two numbers in [0, 1) (got {o.betas})")
    if o.weight_decay < 0:
        p.append(f"optim.weight_decay must be >= 0 (got {o.weight_decay})")
    if o.grad_clip < 0:
        p.append(f"optim.grad_clip must be >= 0 (got {o.grad_clip}); 0 disables clipping")


def _check_backend(cfg: Config, p: list[str]) -> None:
    """Problems (to `p`) of the backend and what it can run: chunked loss, 4-bit base, paged optimizer, precision,
    batch; and the trackers metrics go to."""
    m, o, t = cfg.model, cfg.optim, cfg.train
    p.extend(config_problems(t.report_to))
    if t.backend not in ("deepspeed", "single"):
        p.append(f"train.backend must be deepspeed or single (got {t.backend!r})")
    if t.backend == "single" and cfg.world_size > 1:
        p.append(
            f"train.backend single (profile {cfg.profile}) trains on one device but {cfg.world_size} ranks were"
            " started; run it without a launcher (python launch/<entry>.py ...), or use a DeepSpeed profile"
            " (13b, 70b) for several GPUs"
        )
    if t.loss_chunk_tokens < 0 or (t.loss_chunk_tokens and t.backend != "single"):
        p.append(
            f"train.loss_chunk_tokens ({t.loss_chunk_tokens}) must be >= 0 and needs train.backend single;"
            " set it to 0 for DeepSpeed runs"
        )
    if m.quantization not in ("none", "nf4"):
        p.append(f"model.quantization must be none or nf4 (got {m.quantization!r})")
    elif m.quantization == "nf4" and (t.backend != "single" or not cfg.lora.enabled):
        p.append(
            "model.quantization nf4 (QLoRA) needs lora.enabled true and train.backend single; a 4-bit base"
            " cannot be trained directly or sharded by ZeRO"
        )
    if o.optimizer not in ("adamw", "paged_adamw_8bit"):
        p.append(f"optim.optimizer must be adamw or paged_adamw_8bit (got {o.optimizer!r})")
    elif o.optimizer == "paged_adamw_8bit" and t.backend != "single":
        p.append(
            "optim.optimizer paged_adamw_8bit needs train.backend single; DeepSpeed runs its own AdamW"
            " (set the optimizer in the ds_config)"
        )
    if m.init_adapter is not None:
        if not (Path(m.init_adapter) / "adapter_config.json").is_file():
            p.append(
                f"model.init_adapter: {m.init_adapter} has no adapter_config.json; pass an adapter/ directory"
            )
        else:
            if problem := pickle_only_problem(
                Path(m.init_adapter), "adapter", "training", require_weights=False
            ):
                p.append(f"model.init_adapter: {problem}")
        if not cfg.lora.enabled:
            p.append("model.init_adapter needs lora.enabled true (the adapter is trained further)")
    if t.precision not in ("bf16", "fp32"):
        p.append(
            f"train.precision must be bf16 or fp32 (got {t.precision!r}); fp16 is not supported for LLaMA-2"
        )
    if t.micro_batch_size <= 0 or t.global_batch_size <= 0:
        p.append("train.micro_batch_size and train.global_batch_size must be > 0")
    else:
        per_step = t.micro_batch_size * cfg.world_size
        if t.global_batch_size % per_step:
            p.append(
                f"train.global_batch_size ({t.global_batch_size}) must be divisible by micro_batch_size"
                f" ({t.micro_batch_size}) x world size ({cfg.world_size}) = {per_step}; change one of them"
            )


def _check_schedule(cfg: Config, p: list[str]) -> None:
    """Problems (to `p`) of run length, save and log cadence, retention, the resume point."""
    t = cfg.train
    if t.max_steps is not None and t.max_steps <= 0:
        p.append(f"train.max_steps must be > 0 (got {t.max_steps})")
    if t.train_tokens <= 0 and not t.max_steps:
        p.append("train.train_tokens must be > 0, or set train.max_steps")
    if t.save_every <= 0:
        p.append(f"train.save_every must be > 0 (got {t.save_every})")
    if t.log_every <= 0:
        p.append(f"train.log_every must be > 0 (got {t.log_every})")
    if t.keep_last < 2:
        p.append(
            f"train.keep_last must be >= 2 (got {t.keep_last}) so a crash mid-save leaves a complete checkpoint"
        )
    if not (t.resume in ("auto", "never") or Path(t.resume).exists()):
        p.append(f"train.resume must be auto, never or an existing checkpoint path (got {t.resume!r})")
