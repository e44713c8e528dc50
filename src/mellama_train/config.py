"""Typed run configuration: dataclasses, profile/recipe/CLI resolution and start-up validation.

Resolution order (later wins): dataclass defaults <- named profile (``profiles/<name>.yaml``) <- recipe YAML
(``--config``) <- CLI aliases (``--output-dir`` ...) <- ``--set key.sub=value`` overrides.

Nothing here imports DeepSpeed or torch: the config is plain data that every other module reads.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mellama_train.sample_data import SAMPLE_DATA_DIR

log = logging.getLogger(__name__)

PROFILES_DIR = Path(__file__).parent / "profiles"
# `${sample_data}` in a path resolves to the data shipped inside the package, so the tiny profile works from
# any working directory and from an installed wheel.
SAMPLE_DATA_VAR = "${sample_data}"


class ConfigError(ValueError):
    """Every problem found at start-up, one per line, each naming the field and the fix."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class SourceConfig:
    name: str = ""
    """Short name used in metrics (`train/loss/<name>`, `data/tokens/<name>`); letters, digits, `_`, `-`."""
    paths: list[str] = field(default_factory=list)
    """Files, directories or globs (`**` recurses). jsonl(.gz/.zst), csv(.gz), parquet, txt (one document per
    file), PubMed baseline XML(.gz) and `datasets.save_to_disk` directories are read as they are."""
    weight: float = 1.0
    """Relative share of training TOKENS (not documents): weights 15:1:4 give 75% / 5% / 20% of tokens."""
    text_field: str | None = None
    """Column / JSON key holding the text (default `text`); ignored for txt and PubMed XML."""
    format: str = "auto"
    """How its files are read: `auto` (each file by its extension, else by its first bytes: parquet, PubMed
    XML, JSON), or jsonl, csv, parquet, text, pubmed_xml or hf_dataset for every file (files without a known
    extension too; a file whose extension names another format is left out, listed by `--dry-run`)."""
    include: list[str] = field(default_factory=list)
    """Globs a file found under `paths` must match to be read (none: every data file), on its path relative to
    the directory walked, or on its name for a pattern without `/`: e.g. [files/**] for the MIMIC-CXR tree."""
    exclude: list[str] = field(default_factory=list)
    """Globs of files found under `paths` to leave out, e.g. ["*_metadata.csv.gz"]. Besides these, readmes,
    licences, checksum lists, `*_detail` tables and metadata tables without the text column are left out by
    default (docs/DATA.md, "What a source reads"); `--dry-run` lists every file left out and why. A file
    named in `paths` itself is always read."""
    where: dict[str, list[str]] = field(default_factory=dict)
    """Keep only records whose field holds one of these values (compared as text), e.g. {note_type: [DS]}
    (MIMIC-IV discharge notes without addenda) or {meta.redpajama_set_name: [RedPajamaArXiv]}: a dotted name
    reads into nested JSON or a parquet struct column. Records left out are counted (`not_selected`,
    `data/filtered/<source>`). Not for txt or PubMed XML files."""
    require_abstract: bool = False
    """(pretrain) PubMed XML: leave out citations without an abstract (title-only records), counted as
    `no_abstract`."""
    min_chars: int = 0
    """(pretrain) Leave out documents shorter than this many characters after cleaning, counted as
    `too_short`; 0: keep every non-empty document."""
    cleaners: list[str] = field(default_factory=list)
    """Text cleaners applied in order before tokenizing, e.g. [mimic_deid]; off by default."""
    eval_paths: list[str] = field(default_factory=list)
    """Held-out files of this source: their loss is logged as `eval/loss/<name>` every train.eval_every steps."""
    columns: dict[str, str] = field(default_factory=dict)
    """(tune) Field renames for instruction records: {instruction: question, input: context, output: answer};
    recognised names: instruction, input, output, system, history, messages, conversations, and the speaker
    tags role_tag, content_tag, user_tag, assistant_tag, system_tag (docs/TUNING.md)."""
    dataset: str | None = None
    """(tune) An entry of LLaMA-Factory's dataset_info.json, in the directory `paths` names: its file_name,
    formatting, columns and tags become this source's files and columns (columns set here win)."""
    license: str | None = None
    """License / data-use note of this source, e.g. "PhysioNet Credentialed Health Data License 1.5.0"; copied
    into every checkpoint's trainer.json and into the model card (README.md) of `final/` and `adapter/`."""


@dataclass
class DataConfig:
    seq_len: int = 4096
    """Tokens per packed training sequence (LLaMA-2's context is 4096)."""
    sources: list[SourceConfig] = field(default_factory=list)
    """The corpora mixed into training, each with its token weight."""
    seed: int = 1234
    """Seeds the per-epoch file order of every source; the same seed replays the same token stream."""
    chat_template: str = "auto"
    """(tune) Prompt format: `auto` (the tokenizer's chat template, else the built-in), `default` (the built-in
    `### Instruction:` / `### Response:` format, docs/TUNING.md), a .jinja file, or a template string."""
    overflow: str = "truncate"
    """(tune) Examples longer than seq_len: `truncate` (prompt side first, then the answer's end) or `drop`;
    both are counted (`data/truncated/<source>`, `data/filtered/<source>`)."""
    pack: bool = False
    """(tune) Pack several whole examples per sequence (position_ids keep them from attending to each other);
    off: one example per row, padded to the longest in the micro-batch."""
    max_skip_fraction: float = 0.001
    """Stop the run when a source's skipped records (malformed JSON, invalid UTF-8, empty text, a missing or
    non-text text_field, instructions without a response) exceed skip_allowance + this fraction of the records
    read so far. Counted per rank over that rank's share of the records; records the recipe filters out
    (where, require_abstract, min_chars, `data.overflow: drop`, decontamination) count neither way."""
    mixture_tolerance: float = 0.01
    """Drift alarm: the largest distance allowed between a source's achieved share of the weight unit (tokens;
    tune: examples) and its target, once the scheduler's bound says the mix should be that close
    (`data/drift` in the metrics); a warning, not a stop."""
    skip_allowance: int = 10
    """Skipped records per source and rank tolerated whatever the fraction, so one bad line in a small file
    does not stop a run."""
    decontamination: str | None = None
    """A benchmark n-gram index written by `mellama-train decontaminate`: training documents (tune: examples)
    sharing any n-gram with those benchmarks are dropped, counted as `data/decontaminated/<source>`. Held-out
    files are not screened."""
    max_record_bytes: int = 32 * 2**20
    """Records larger than this (bytes of a JSONL line or text file, characters of a CSV record or PubMed
    title + abstract, bytes of a parquet/dataset text value) are skipped and counted as `too_large`, without
    ever being held whole: it bounds a rank's memory whatever one record holds (tokenizing a record costs
    roughly 10-100x its size). A JSON array file (`[...]`, the alpaca_data.json layout) may hold at most 4x this
    in all: a larger one is refused at start-up with the command to convert it to JSONL."""
    accept_changes: bool = False
    """Resume over data files that changed before the saved position (`--accept-data-change`): continue from
    the same coordinates (epoch, file number, record, token offset) instead of refusing; each change is logged
    and recorded in trainer.json (`data_changes`). Documents around a change may be repeated or skipped."""


@dataclass
class ArchConfig:
    """LLaMA shape: used to build a random-init model (tiny profile) and for FLOP/memory arithmetic."""

    vocab_size: int = 32000
    """Vocabulary size; must match the tokenizer."""
    hidden_size: int = 5120
    """Model width."""
    intermediate_size: int = 13824
    """SwiGLU MLP width."""
    num_layers: int = 40
    """Decoder layers."""
    num_heads: int = 40
    """Attention heads."""
    num_kv_heads: int = 40
    """Key/value heads (grouped-query attention when < num_heads; 70B uses 8)."""
    max_position_embeddings: int = 4096
    """Longest sequence the RoPE positions are trained for."""
    rms_norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""


@dataclass
class ModelConfig:
    init: str = "pretrained"
    """`pretrained`: load weights from `path` (continual pretraining); `random`: build from `arch` (demo, tests)."""
    path: str | None = None
    """Hugging Face model directory (config.json + safetensors), e.g. a local LLaMA-2 13B checkout."""
    tokenizer: str | None = None
    """Tokenizer directory; defaults to `path`. Any tokenizer `AutoTokenizer` loads."""
    arch: ArchConfig = field(default_factory=ArchConfig)
    """Model shape for `init: random`; for `pretrained` it is read from `path`'s config.json."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass: trades ~30% compute for activation memory."""
    attn_implementation: str = "sdpa"
    """transformers attention backend: sdpa (default), flash_attention_2, eager."""
    trust_remote_code: bool = False
    """Run model code shipped inside the model directory. Off: only enable for directories you trust."""
    quantization: str = "none"
    """`nf4`: load the frozen base in 4-bit NormalFloat with double quantisation and bf16 compute (bitsandbytes;
    QLoRA: needs lora.enabled and train.backend single); `none`: the base in train.precision."""
    init_adapter: str | None = None
    """A PEFT adapter directory to continue training (`--init-adapter`; stage 1 -> stage 2 of the 8 GB recipe);
    its own r/alpha/targets are used."""


@dataclass
class LoraConfig:
    """Low-rank adapters (PEFT LoRA): the base model is frozen and only the adapters train."""

    enabled: bool = False
    """Train LoRA adapters instead of all weights (on in the tune profiles)."""
    r: int = 16
    """Adapter rank."""
    alpha: float = 32.0
    """Scaling numerator: the update is (alpha / r) * B @ A."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Module names that get adapters; the default is every linear layer of the LLaMA blocks."""
    merge: bool = True
    """At the end, merge the adapter into the base and write `final/` (rank 0 loads the base on CPU once; off
    for 70B on small-memory nodes: merge later with `mellama-train merge`)."""


@dataclass
class OptimConfig:
    lr: float = 8e-6
    """Peak learning rate (Me-LLaMA: 8e-6)."""
    min_lr_ratio: float = 0.1
    """Cosine decays to lr * min_lr_ratio (the floor), as LLaMA-2 decayed to 10% of peak."""
    warmup_ratio: float = 0.05
    """Fraction of total steps of linear warmup (Me-LLaMA: 0.05)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW (beta1, beta2); Me-LLaMA uses beta2 = 0.95."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices; norms and biases are never decayed."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    optimizer: str = "adamw"
    """`adamw`, or `paged_adamw_8bit` (bitsandbytes: 8-bit states in paged memory that spills to the host instead
    of failing on a spike; train.backend single only, DeepSpeed runs its own AdamW)."""


@dataclass
class TrainConfig:
    global_batch_size: int = 1024
    """Sequences per optimizer step over all ranks (1024 x 4096 = 4M tokens, LLaMA-2's batch)."""
    micro_batch_size: int = 1
    """Sequences per rank per forward pass; gradient accumulation = global / (micro x world size)."""
    train_tokens: int = 129_000_000_000
    """Token budget of the run (Me-LLaMA: 129B); gives the total steps unless max_steps is set."""
    max_steps: int | None = None
    """Stop after this many optimizer steps; overrides the token budget (and so shapes the schedule)."""
    precision: str = "bf16"
    """bf16 (the recipe) or fp32 (CPU demo: bf16 matmuls are slow on most CPUs)."""
    seed: int = 42
    """Seeds model init and dropout."""
    log_every: int = 10
    """Steps between metric lines (each log is a host sync)."""
    save_every: int = 500
    """Steps between checkpoints; a final checkpoint is always written."""
    keep_last: int = 3
    """Complete checkpoints kept on disk (>= 2, so a crash while saving leaves a good one)."""
    output_dir: str | None = None
    """Run directory; default: a new `runs/<profile>-<timestamp>`."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint in output_dir; never: refuse if one exists; or a path."""
    ds_config: str = "ds_configs/zero3.json"
    """DeepSpeed JSON; its "auto" values are filled from this config."""
    loss_chunk_tokens: int = 0
    """Compute the output layer and loss this many labelled tokens at a time (0: all at once), so the
    [tokens x vocab] fp32 logits never exist whole (1024 x 128k = 512 MB); train.backend single only."""
    gpu_memory_gib: float = 0.0
    """Memory of one GPU for the start-up memory check (the run is refused if the plan does not fit); 0: no
    check. The 8gb profile sets 8."""
    backend: str = "deepspeed"
    """`deepspeed` (ZeRO, any number of ranks, the ds_config applies) or `single` (one device, no DeepSpeed and
    no launcher: the 8gb profile)."""
    dist_timeout_minutes: int = 30
    """Collective timeout: a rank stuck longer than this fails the job instead of hanging it."""
    watchdog_minutes: float = 20.0
    """A rank that completes nothing for this long, anywhere in the run (start-up: rendezvous, model load,
    resume; the step-0 evaluation; a step, an evaluation or a save; the final export and merge), dumps every
    thread's Python stack to stderr and logs/hang-rank-R.*.txt and exits 76 (SLURM jobs are requeued); 0
    disables (rank 0's heartbeat.json is still written). Keep it above the longest single save or model load,
    and below dist_timeout_minutes so the dump says where each rank was."""
    max_consecutive_skips: int = 5
    """A step with a non-finite loss or gradient norm (or a skipped loss spike) is skipped on every rank, the
    weights unchanged; more consecutive skips than this saves the last good state and stops the run (exit 3)."""
    loss_spike_factor: float = 2.0
    """A step loss above this factor x the running mean of recent good steps is a spike: logged and counted
    (`train/loss_spikes`); 0 disables."""
    skip_loss_spikes: bool = False
    """Also skip the optimizer step of a loss spike (as for a non-finite loss); off: spikes are only logged."""
    world_size: int = 0
    """Data-parallel ranks; 0 = read from WORLD_SIZE (set by the launcher), else 1. Set it for a dry-run."""
    epochs: float | None = None
    """(tune) Passes over the instruction examples (all sources' records); gives max_steps at start-up."""
    eval_every: int = 0
    """Steps between held-out evaluations (sources' eval_paths); 0: only at the end."""
    eval_batches: int = 20
    """Held-out micro-batches per source and rank at most, per evaluation."""
    forgetting_source: str | None = None
    """The general-domain source whose held-out loss is the forgetting probe (the profiles: redpajama); its rise
    above the step-0 value is `eval/rise/<source>`, and past forgetting_margin the alarm fires."""
    forgetting_margin: float = 0.1
    """Nats the probe's held-out loss may rise above its step-0 value before the forgetting alarm fires."""
    stop_on_forgetting: bool = False
    """When the forgetting alarm fires, save a checkpoint and stop (exit 4); off: only log it."""


@dataclass
class Config:
    task: str = "pretrain"
    """pretrain (launch/pretrain.py) or tune (launch/tune.py); set by the entry point, picks the profile set."""
    profile: str = "tiny"
    """Named profile this config started from."""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    # ---- derived numbers -------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.train.world_size or int(os.environ.get("WORLD_SIZE", "1"))

    @property
    def grad_accum_steps(self) -> int:
        return max(1, self.train.global_batch_size // (self.train.micro_batch_size * self.world_size))

    @property
    def tokens_per_step(self) -> int:
        return self.train.global_batch_size * self.data.seq_len

    @property
    def total_steps(self) -> int:
        if self.train.max_steps:
            return self.train.max_steps
        return max(1, math.ceil(self.train.train_tokens / self.tokens_per_step))

    @property
    def warmup_steps(self) -> int:
        return round(self.optim.warmup_ratio * self.total_steps)

    def source_fractions(self) -> dict[str, float]:
        total = sum(s.weight for s in self.data.sources) or 1.0
        return {s.name: s.weight / total for s in self.data.sources}

    def derived(self) -> dict[str, Any]:
        common = {
            "world_size": self.world_size,
            "grad_accum_steps": self.grad_accum_steps,
            "global_batch_sequences": self.train.global_batch_size,
            "global_batch_tokens": self.tokens_per_step,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
        }
        # Pretraining weights count tokens; instruction weights count examples (data/mixture.py).
        unit, amount = (
            ("examples", self.total_steps * self.train.global_batch_size)
            if self.task == "tune"
            else ("tokens", self.total_steps * self.tokens_per_step)
        )
        per_source = {n: round(f * amount) for n, f in self.source_fractions().items()}
        return {**common, f"total_{unit}": amount, f"{unit}_per_source": per_source}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- building a Config from nested dicts ---------------------------------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _as_yaml_text(value: Any) -> Any:
    """A YAML scalar as the text it was written as (true, 3, 1.5); anything else unchanged (validate names it)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value) if isinstance(value, int | float) else value


def _coerce(value: Any, typ: Any, where: str, problems: list[str]) -> Any:
    """Check/convert one YAML value against a dataclass field type; record a problem instead of raising."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where, problems)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            problems.append(f"{where} must be a mapping (got {type(value).__name__}); see the profile YAMLs")
            return typ()
        return _build(typ, value, where, problems)
    if origin is dict and typing.get_args(typ)[1] == list[str]:
        # `where: {note_type: DS}` means one allowed value; numbers and booleans compare as YAML writes them
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            problems.append(f"{where} must be a mapping of field names to lists of values (got {value!r})")
            return {}
        return {
            k: [_as_yaml_text(v) for v in (vs if isinstance(vs, list) else [vs])] for k, vs in value.items()
        }
    if origin is dict:
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            problems.append(f"{where} must be a mapping of names to names (got {value!r})")
            return {}
        return dict(value)
    if origin is list:
        (item_type,) = typing.get_args(typ)
        if isinstance(value, (str, int, float)) and item_type is str:
            value = [value]  # `paths: /data/x.jsonl` means a one-element list
        if not isinstance(value, list):
            problems.append(f"{where} must be a list (got {value!r})")
            return []
        return [_coerce(v, item_type, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads `8e-6` (no dot) as a string
        except ValueError:
            pass
    if typ is int and isinstance(value, str):
        try:
            value = float(value)  # `--set train.train_tokens=129e9`: YAML reads it as a string
        except ValueError:
            pass
    if typ is int and isinstance(value, float) and value.is_integer():
        return int(value)  # `train_tokens: 129e9`
    if typ in (int, float, str, bool) and not (
        isinstance(value, typ) and not (typ is int and isinstance(value, bool))
    ):
        problems.append(f"{where} must be {typ.__name__} (got {value!r})")
        return None
    return value


def _build(cls: type, data: dict[str, Any], where: str, problems: list[str]) -> Any:
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in types_:
            hint = difflib.get_close_matches(key, types_, n=1)
            fix = f"did you mean `{hint[0]}`?" if hint else f"known fields: {', '.join(types_)}"
            problems.append(f"{where}.{key}: unknown field; {fix}".lstrip("."))
            continue
        kwargs[key] = _coerce(value, types_[key], f"{where}.{key}".lstrip("."), problems)
    return cls(**{k: v for k, v in kwargs.items() if v is not None or k in _nullable(cls)})


def _nullable(cls: type) -> set[str]:
    return {
        k for k, t in _field_types(cls).items() if typing.get_origin(t) in (typing.Union, types.UnionType)
    }


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if key == "sources" and isinstance(value, list) and isinstance(out.get(key), list):
            out[key] = _merge_sources(out[key], value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


SOURCE_FORMATS = ("auto", "jsonl", "csv", "parquet", "text", "hf_dataset", "pubmed_xml")
"""data.sources[].format values (readers.FORMATS, plus auto); tests keep the two lists equal."""
FILE_BOUND_SOURCE_FIELDS = (
    "license",
    "eval_paths",
    "include",
    "exclude",
    "text_field",
    "where",
    "format",
    "columns",
    "dataset",
)
"""Source fields a recipe source that gives its own `paths` does not inherit from the profile's source."""


def _merge_sources(base: list[Any], over: list[Any]) -> list[Any]:
    """A recipe's sources replace the profile's list, but a recipe source named like a profile source inherits
    its unset fields: a recipe may give only `{name: pubmed, paths: [...]}` and keep the profile's weight."""
    by_name = {s.get("name"): s for s in base if isinstance(s, dict)}
    merged = []
    for src in over:
        if not isinstance(src, dict):
            merged.append(src)
            continue
        inherited = dict(by_name.get(src.get("name"), {}))
        if "paths" in src:
            # These describe the profile's files: new files need their own. Inheriting the tiny profile's
            # held-out files would evaluate (and probe forgetting on) the sample data, not the user's.
            for key in FILE_BOUND_SOURCE_FIELDS:
                if key not in src:
                    inherited.pop(key, None)
        merged.append(_deep_merge(inherited, src))
    return merged


def load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found; check the --config/--profile path"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError([f"{path}:{line} is not valid YAML ({getattr(exc, 'problem', exc)})"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: top level must be a mapping of sections (model, data, optim, train)"])
    return data


TASKS = ("pretrain", "tune")
NULL = object()
"""An alias value that sets a field to null (a plain None means "flag not given")."""


def profile_names(task: str = "pretrain") -> list[str]:
    return sorted(p.stem for p in (PROFILES_DIR / task).glob("*.yaml"))


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Apply `a.b.c=value`; list items are addressed by index (`data.sources.0.weight`) or by source name
    (`data.sources.pubmed.weight`)."""
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            idx = (
                int(part)
                if part.isdigit()
                else next(
                    (j for j, s in enumerate(node) if isinstance(s, dict) and s.get("name") == part), None
                )
            )
            if idx is None or idx >= len(node):
                names = [s.get("name") for s in node if isinstance(s, dict)]
                raise ConfigError(
                    [f"--set {dotted}: no list item `{part}` (have {names}); use an index or a name"]
                )
            if last:
                node[idx] = value
            node = node[idx]
        else:
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError([f"--set {text!r}: expected key.sub=value, e.g. --set optim.lr=1e-5"])
    key, raw = text.split("=", 1)
    # YAML parsing gives numbers, booleans, null and lists (`[a, b]`) their types.
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(
            [
                f"--set {text!r}: the value is not valid YAML ({getattr(exc, 'problem', None) or 'unparsable'});"
                " complete it (a list is [a, b], a mapping {a: 1}) or quote it to pass a string"
            ]
        ) from None


def resolve(
    profile: str = "tiny",
    recipe: str | None = None,
    overrides: list[str] | None = None,
    aliases: dict[str, Any] | None = None,
    task: str = "pretrain",
) -> Config:
    """Resolve profile <- recipe <- aliases <- --set into a Config. Type problems raise ConfigError at once;
    value checks are `validate()`'s job so a dry-run can print the config beside its problems."""
    profile_path = PROFILES_DIR / task / f"{profile}.yaml"
    if not profile_path.exists():
        raise ConfigError(
            [f"--profile {profile}: unknown {task} profile; choose one of {', '.join(profile_names(task))}"]
        )
    tree = load_yaml(profile_path)
    given: set[str] = set()  # dotted keys the user set (recipe, flags, --set), as against the profile
    if recipe:
        recipe_tree = load_yaml(recipe)
        given |= _dotted_keys(recipe_tree)
        tree = _deep_merge(tree, recipe_tree)
    for key, value in (aliases or {}).items():
        if value is not None:
            given.add(key)
            _set_dotted(tree, key, None if value is NULL else value)
    for text in overrides or []:
        key, value = parse_override(text)
        given.add(key)
        _set_dotted(tree, key, value)
    _drop_orphan_probe(tree, profile, given)
    tree["profile"] = profile
    tree["task"] = task
    problems: list[str] = []
    cfg = _build(Config, tree, "", problems)
    if problems:
        raise ConfigError(problems)
    _expand_sample_paths(cfg)
    _read_dataset_info(cfg)
    cfg.train.ds_config = _find_ds_config(cfg.train.ds_config)
    return cfg


def _read_dataset_info(cfg: Config) -> None:
    """Sources named by a LLaMA-Factory dataset_info.json entry take its file and column names (resolution,
    not validation: --dry-run then shows the files and columns a run reads)."""
    from mellama_train.data.llamafactory import resolve_entry

    problems = []
    for src in cfg.data.sources:
        if src.dataset and cfg.task == "tune":
            try:
                src.paths, src.columns = resolve_entry(src.paths, src.dataset, src.columns)
            except ValueError as err:
                problems.append(f"data.sources[{src.name}].dataset: {err}")
    if problems:
        raise ConfigError(problems)


def _dotted_keys(tree: dict[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        keys.add(prefix + str(key))
        if isinstance(value, dict):
            keys |= _dotted_keys(value, f"{prefix}{key}.")
    return keys


def _drop_orphan_probe(tree: dict[str, Any], profile: str, given: set[str]) -> None:
    """A profile's forgetting probe names one of the profile's sources, with the profile's held-out files; a
    recipe with other sources, or that gives the probe's source new paths and no held-out files, must not be
    stopped by it. Turned off with a note, unless the user set the probe (then validate() names the problem)."""
    train = tree.get("train")
    probe = train.get("forgetting_source") if isinstance(train, dict) else None
    if probe is None or "train.forgetting_source" in given:
        return
    sources = (tree.get("data") or {}).get("sources") or []
    names = [src.get("name") for src in sources if isinstance(src, dict)]
    source = next((src for src in sources if isinstance(src, dict) and src.get("name") == probe), None)
    if source is not None and source.get("eval_paths"):
        return
    why = (
        f"the recipe has no source named {probe}"
        if source is None
        else f"the recipe's {probe} has no eval_paths"
    )
    train["forgetting_source"] = None
    log.warning(
        "note: the %s profile's forgetting probe (train.forgetting_source: %s) is off: %s; set"
        " train.forgetting_source to one of [%s] that has eval_paths to turn it on",
        profile,
        probe,
        why,
        ", ".join(map(str, names)),
    )


PACKAGE_DIR = Path(__file__).resolve().parent
"""This package's directory: in a checkout src/mellama_train, in a regular install site-packages/mellama_train."""


def _find_ds_config(path: str) -> str:
    """`ds_configs/zero3.json` is relative to the repo root in every documented command; accept it from any
    working directory, and from a regular (non-editable) install, by falling back to the copies this package
    carries (package data: ds_configs/ inside the package is the repo's ds_configs/)."""
    if Path(path).exists() or Path(path).is_absolute():
        return path
    parts = Path(path).parts
    if parts and parts[0] == "ds_configs" and (packaged := PACKAGE_DIR.joinpath(*parts)).exists():
        return str(packaged)
    return path


def _expand_sample_paths(cfg: Config) -> None:
    def expand(p: str | None) -> str | None:
        return p.replace(SAMPLE_DATA_VAR, str(SAMPLE_DATA_DIR)) if p else p

    cfg.model.path = expand(cfg.model.path)
    cfg.model.tokenizer = expand(cfg.model.tokenizer)
    for src in cfg.data.sources:
        src.paths = [expand(p) for p in src.paths]
        src.eval_paths = [expand(p) for p in src.eval_paths]


# ---- validation ----------------------------------------------------------------------------------------

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def validate(cfg: Config) -> tuple[list[str], list[str]]:
    """Return (problems, missing): every invalid value with its fix, and the fields a real run still needs.

    Missing inputs are listed apart so `--dry-run` of a bare profile succeeds and shows what to fill in."""
    from mellama_train.data.cleaners import CLEANERS
    from mellama_train.data.instruct import FIELDS as INSTRUCTION_FIELDS
    from mellama_train.ds_config import check_ds_config

    p: list[str] = []
    missing: list[str] = []
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train

    if cfg.task not in TASKS:
        p.append(f"task must be one of {', '.join(TASKS)} (got {cfg.task!r}); it is set by the entry point")
    if m.init not in ("pretrained", "random"):
        p.append(f"model.init must be pretrained or random (got {m.init!r})")
    if m.init == "pretrained":
        if not m.path:
            missing.append(
                "model.path (--base): the Hugging Face directory of the base model to tune, e.g. final/ of a pretraining run"
                if cfg.task == "tune"
                else "model.path: the Hugging Face directory of the model to continue (e.g. a local Llama-2-13b-hf)"
            )
        elif not (Path(m.path) / "config.json").is_file():
            p.append(f"model.path: {m.path} has no config.json; point it at a Hugging Face model directory")
        else:
            from mellama_train.integrity import pickle_only_problem  # (torch: imported only when validating)

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
        if not s.weight > 0:
            p.append(f"{label}.weight must be > 0 (got {s.weight}); drop the source or give it a weight")
        if not s.paths:
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
        if cfg.task != "tune" and s.dataset:
            p.append(f"{label}.dataset: LLaMA-Factory entries are instruction data; use launch/tune.py")
        if cfg.task == "tune" and (s.min_chars or s.require_abstract):
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
    if cfg.task == "tune":
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
        from mellama_train.data.source import check_sources

        p += check_sources(cfg)
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
            from mellama_train.integrity import pickle_only_problem

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
    if t.gpu_memory_gib < 0:
        p.append(f"train.gpu_memory_gib must be >= 0 (got {t.gpu_memory_gib}); 0 disables the memory check")
    elif t.gpu_memory_gib and not p:
        from mellama_train.plan import make_plan

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
