"""The run configuration's schema: typed dataclasses with a docstring per field (docs/CONFIG.md is generated
from them), and the values some fields accept. Plain data: this module imports nothing of the package and
nothing heavy, so every other module can read a Config.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """Every problem found at start-up, one per line, each naming the field and the fix."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class Task:
    """What the entry point's task decides, named once (`Config.kind`) instead of tested as a string wherever
    it matters: how sources are read, what their weights count, and how the run's length may be given."""

    name: str
    """pretrain (launch/pretrain.py) or tune (launch/tune.py)."""
    records: bool
    """Sources hold instruction records (one example each, chat template, response-only labels) rather than
    documents packed into sequences; a directory is read for record files only."""
    unit: str
    """What the sources' weights and the mixture count: "tokens" (pretraining) or "examples" (tuning)."""
    by_epochs: bool
    """The length may be given as train.epochs over the examples (turned into steps by preflight)."""


PRETRAIN = Task("pretrain", records=False, unit="tokens", by_epochs=False)
TUNE = Task("tune", records=True, unit="examples", by_epochs=True)
KINDS = {task.name: task for task in (PRETRAIN, TUNE)}


class _Freezable:
    """Base of the config dataclasses. Once frozen (preflight hands `train()` only a frozen config), assigning a
    field raises: nothing after the checks can change what was checked. `replaced()` makes a changed copy."""

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_frozen"):
            raise dataclasses.FrozenInstanceError(
                f"{type(self).__name__}.{name}: the config is frozen after preflight; make a changed copy with"
                " config.replaced(cfg, ...)"
            )
        object.__setattr__(self, name, value)


@dataclass
class SourceConfig(_Freezable):
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
    prepared: str | None = None
    """(pretrain) A directory written by `mellama-train prepare`: this source's documents are read from its
    token shards there (the source of the same name), not read and tokenized at run time. `paths` may then be
    left empty; given, its files and this source's filters must be those the corpus was prepared from. With
    every source prepared, the data order no longer depends on the number of ranks (docs/DATA.md)."""
    license: str | None = None
    """License / data-use note of this source, e.g. "PhysioNet Credentialed Health Data License 1.5.0"; copied
    into every checkpoint's trainer.json and into the model card (README.md) of `final/` and `adapter/`."""


@dataclass
class DataConfig(_Freezable):
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
class ArchConfig(_Freezable):
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
class ModelConfig(_Freezable):
    init: str = "pretrained"
    """`pretrained`: load weights from `path` (continual pretraining); `random`: build from `arch` (demo, tests)."""
    path: str | None = None
    """Hugging Face model directory (config.json + safetensors), e.g. a local LLaMA-2 13B checkout, or a Hub id
    (meta-llama/Llama-2-13b-hf) already in the Hugging Face cache (HF_HOME): never downloaded at run time."""
    tokenizer: str | None = None
    """Tokenizer directory or cached Hub id; defaults to `path`. Any tokenizer `AutoTokenizer` loads."""
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
class LoraConfig(_Freezable):
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
class OptimConfig(_Freezable):
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
class TrainConfig(_Freezable):
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
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Where metrics go besides metrics.jsonl (always written): any of tensorboard, wandb, mlflow, or `none` alone (the extras
    `mellama-train[wandb]`, `[mlflow]`; endpoints and keys from their usual environment variables). Rank 0 only,
    the same scalars, the resolved config as parameters; a resume continues the same tracker run."""
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
class Config(_Freezable):
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
    def kind(self) -> Task:
        """The task's decisions (an unknown `task` reads as pretraining; preflight names it)."""
        return KINDS.get(self.task, PRETRAIN)

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
        unit = self.kind.unit
        per_step = self.train.global_batch_size if unit == "examples" else self.tokens_per_step
        amount = self.total_steps * per_step
        per_source = {n: round(f * amount) for n, f in self.source_fractions().items()}
        return {**common, f"total_{unit}": amount, f"{unit}_per_source": per_source}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SOURCE_FORMATS = ("auto", "jsonl", "csv", "parquet", "text", "hf_dataset", "pubmed_xml")
"""data.sources[].format values (data/files.py FORMATS, plus auto); tests keep the two lists equal."""
TASKS = tuple(KINDS)


def _walk(obj: Any) -> list[Any]:
    """Every config dataclass inside `obj` (itself included), through fields and lists."""
    found = []
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        found.append(obj)
        for f in dataclasses.fields(obj):
            found += _walk(getattr(obj, f.name))
    elif isinstance(obj, list | tuple):
        for item in obj:
            found += _walk(item)
    return found


def freeze(cfg: Config) -> Config:
    """Make `cfg` and every config inside it read-only, in place; returns it."""
    for node in _walk(cfg):
        object.__setattr__(node, "_frozen", True)
    return cfg


def is_frozen(cfg: Config) -> bool:
    return bool(cfg.__dict__.get("_frozen"))


def replaced(cfg: Config, changes: dict[str, Any]) -> Config:
    """A copy of `cfg` with dotted fields changed ({"train.output_dir": "runs/x"}), frozen like `cfg` was."""
    import copy

    out = copy.deepcopy(cfg)
    nodes = _walk(out)
    for node in nodes:
        object.__setattr__(node, "_frozen", False)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        target = out
        for part in parents:
            target = getattr(target, part)
        if not hasattr(target, leaf):
            raise AttributeError(f"replaced(): {dotted} is not a config field")
        setattr(target, leaf, value)
    return freeze(out) if is_frozen(cfg) else out
