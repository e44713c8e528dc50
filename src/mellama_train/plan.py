"""Memory and disk plan of a run, before it starts: `mellama-train plan`, `--dry-run`, and start-up validation.

Predictions are arithmetic on the model's shape, not measurements: every row says what it counts. They aim at
the peak that `torch.cuda.max_memory_allocated` reports; the CUDA context and allocator slack (~0.5-1 GiB) are
outside it, which is why a card's budget is its memory minus `RESERVE_GIB`.

- one device (train.backend single, e.g. the 8gb QLoRA profile): 4-bit or 16-bit block weights, bf16 embeddings
  and head, adapters with their gradients and optimizer states, checkpointed activations, the output layer;
- DeepSpeed: per-GPU model states from DeepSpeed's own ZeRO-3 estimator (full training) or the frozen-base
  arithmetic (LoRA), gathered-parameter buffers, activations, logits; host RAM while loading and saving; disk
  per checkpoint times train.keep_last.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from mellama_train.config import ArchConfig, Config

GIB = 2**30
RESERVE_GIB = 1.0
"""Kept free on every GPU for the CUDA context, cuBLAS workspaces and allocator fragmentation."""
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)
"""4-bit codes, an 8-bit absmax per 64-weight block, and (double quantisation) an fp32 constant per 256 absmax."""
SHARD_BYTES = 10e9
"""Size of one safetensors shard of a Hub LLaMA checkpoint (~10 GB), when the model directory is not at hand."""

PRESETS = {
    "llama2-7b": ArchConfig(32000, 4096, 11008, 32, 32, 32, 4096),
    "llama2-13b": ArchConfig(32000, 5120, 13824, 40, 40, 40, 4096),
    "llama2-70b": ArchConfig(32000, 8192, 28672, 80, 64, 8, 4096),
    "llama3-8b": ArchConfig(128256, 4096, 14336, 32, 32, 8, 8192, rope_theta=500000.0),
    "llama3-70b": ArchConfig(128256, 8192, 28672, 80, 64, 8, 8192, rope_theta=500000.0),
}


@dataclass
class Counts:
    """Parameter counts of a LLaMA shape (untied embedding and head, as in LLaMA-2 and -3)."""

    embed: int
    head: int
    block_linear: int
    """All linear weights of all decoder blocks (what NF4 quantises)."""
    norms: int
    largest_module: int
    """Parameters of the largest single module (DeepSpeed's "largest layer")."""
    layer: int
    """Parameters of one decoder block."""
    lora: int
    """Adapter parameters for the configured rank and targets (0 without LoRA)."""

    @property
    def total(self) -> int:
        return self.embed + self.head + self.block_linear + self.norms


def module_shapes(a: ArchConfig) -> dict[str, tuple[int, int]]:
    kv = a.num_kv_heads * (a.hidden_size // a.num_heads)
    h, i = a.hidden_size, a.intermediate_size
    return {
        "q_proj": (h, h),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (h, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def count(a: ArchConfig, lora_r: int = 0, targets: list[str] | None = None) -> Counts:
    shapes = module_shapes(a)
    linear = sum(n_in * n_out for n_in, n_out in shapes.values())
    lora = a.num_layers * sum(lora_r * sum(shapes[t]) for t in (targets or []) if t in shapes)
    embed = a.vocab_size * a.hidden_size
    return Counts(
        embed=embed,
        head=embed,
        block_linear=a.num_layers * linear,
        norms=(2 * a.num_layers + 1) * a.hidden_size,
        largest_module=max(embed, max(n_in * n_out for n_in, n_out in shapes.values())),
        layer=linear + 2 * a.hidden_size,
        lora=lora,
    )


def shape_for(cfg: Config, model: str | None = None) -> tuple[ArchConfig, str]:
    """(shape, where it came from): --model (a preset name or an HF directory), else model.path's config.json,
    else the profile's model.arch."""
    source = model or (cfg.model.path if cfg.model.init == "pretrained" else None)
    if source in PRESETS:
        return PRESETS[source], f"preset {source}"
    if source and (Path(source) / "config.json").is_file():
        c = json.loads((Path(source) / "config.json").read_text())
        arch = ArchConfig(
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=c["num_attention_heads"],
            num_kv_heads=c.get("num_key_value_heads", c["num_attention_heads"]),
            max_position_embeddings=c.get("max_position_embeddings", 4096),
        )
        return arch, f"{source}/config.json"
    if model:
        raise ValueError(
            f"--model {model}: neither a preset ({', '.join(PRESETS)}) nor a directory with config.json"
        )
    return cfg.model.arch, f"profile {cfg.profile} (model.arch)"


@dataclass
class Plan:
    title: str
    rows: list[tuple[str, float, str]] = field(default_factory=list)
    """(what, bytes per GPU, how it is counted)."""
    budget: float = 0.0
    """Bytes per GPU the peak must stay under (0: no budget given)."""
    host: list[tuple[str, float]] = field(default_factory=list)
    disk: list[tuple[str, float]] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)
    checkpoint_bytes: float = 0.0
    """Disk of one checkpoint (the free-disk check before a run's first save, disk_space.py)."""

    @property
    def peak(self) -> float:
        return sum(b for _, b, _ in self.rows)

    @property
    def fits(self) -> bool:
        return not self.budget or self.peak <= self.budget

    def add(self, what: str, nbytes: float, how: str) -> None:
        self.rows.append((what, float(nbytes), how))


def _activation_rows(plan: Plan, cfg: Config, a: ArchConfig, lora: bool) -> None:
    """Checkpointed activations: one saved input per block, plus one block's working set while it is recomputed."""
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    h, i = a.hidden_size, a.intermediate_size
    kv = a.num_kv_heads * (h // a.num_heads)
    if cfg.model.gradient_checkpointing:
        plan.add("activations: block inputs", a.num_layers * tokens * h * 2, "layers x tokens x hidden x 2 B")
        work = tokens * 2 * (6 * h + 2 * kv + 4 * i)
        plan.add(
            "activations: one block recomputed", work, "tokens x (6h + 2kv + 4i) x 2 B (SDPA, no T^2 term)"
        )
    else:
        plan.add(
            "activations: every block",
            a.num_layers * tokens * 2 * (7 * h + 2 * kv + 4 * i),
            "no checkpointing",
        )
    if lora:
        plan.add(
            "activations: adapter inputs",
            tokens * 2 * (6 * h + i),
            "dropout outputs feeding lora_A, one block",
        )


def _logit_rows(plan: Plan, cfg: Config, a: ArchConfig) -> None:
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    chunk = cfg.train.loss_chunk_tokens
    if chunk:
        plan.add(
            "output layer + loss",
            min(chunk, tokens) * a.vocab_size * 8,
            f"{chunk}-token chunks: fp32 logits + grad",
        )
    else:
        plan.add("output layer + loss", tokens * a.vocab_size * 10, "bf16 logits + fp32 copy + fp32 grad")


def plan_single(cfg: Config, a: ArchConfig, gpu_gib: float) -> Plan:
    lo = cfg.lora
    c = count(a, lo.r if lo.enabled else 0, lo.target_modules)
    dtype_bytes = 2 if cfg.train.precision == "bf16" else 4
    plan = Plan(
        "one GPU (train.backend single)", budget=max(0.0, gpu_gib - RESERVE_GIB) * GIB if gpu_gib else 0.0
    )
    if cfg.model.quantization == "nf4":
        plan.add(
            "block weights (NF4)",
            c.block_linear * NF4_BITS / 8,
            f"{c.block_linear / 1e9:.2f}B x {NF4_BITS:.3f} bits",
        )
        plan.add(
            "dequantised weight (transient)",
            max(s[0] * s[1] for s in module_shapes(a).values()) * 2,
            "largest linear, bf16",
        )
    else:
        plan.add(
            "block weights", c.block_linear * dtype_bytes, f"{c.block_linear / 1e9:.2f}B x {dtype_bytes} B"
        )
    plan.add(
        "embeddings + head + norms",
        (c.embed + c.head + c.norms) * dtype_bytes,
        f"kept in {cfg.train.precision}",
    )
    opt_bytes = 2 if cfg.optim.optimizer == "paged_adamw_8bit" else 8
    if lo.enabled:
        plan.add(
            "adapters: weights + grads + optimizer",
            c.lora * (4 + 4 + opt_bytes),
            f"{c.lora / 1e6:.1f}M x (4 + 4 + {opt_bytes}) B",
        )
    else:
        plan.add("gradients + optimizer", c.total * (dtype_bytes + opt_bytes), "full training on one device")
    _activation_rows(plan, cfg, a, lo.enabled)
    _logit_rows(plan, cfg, a)
    plan.host.append(("host RAM while loading (one shard at a time)", SHARD_BYTES))
    plan.checkpoint_bytes = c.lora * (4 + 4 + opt_bytes) if lo.enabled else c.total * 14
    plan.disk.append(("per checkpoint (adapter + optimizer)", plan.checkpoint_bytes))
    if not plan.fits:
        plan.advice.append(_single_advice(cfg, c))
    return plan


def _single_advice(cfg: Config, c: Counts) -> str:
    fixes = []
    if c.block_linear > 8e9:
        fixes.append(f"a 7B/8B model (this one has {c.total / 1e9:.1f}B parameters)")
    if cfg.model.quantization != "nf4":
        fixes.append("model.quantization=nf4")
    if not cfg.train.loss_chunk_tokens:
        fixes.append("train.loss_chunk_tokens=256")
    if cfg.data.seq_len > 512:
        fixes.append(f"data.seq_len below {cfg.data.seq_len}")
    if cfg.lora.enabled and cfg.lora.r > 8:
        fixes.append(f"lora.r below {cfg.lora.r}")
    return "to fit: " + ", or ".join(fixes or ["a GPU with more memory"])


def _ds_config_flags(cfg: Config) -> tuple[int, bool, bool]:
    from mellama_train.ds_config import load_ds_config, zero_stage

    try:
        ds = load_ds_config(cfg.train.ds_config)
    except (OSError, ValueError):
        return 3, False, False
    z = ds.get("zero_optimization", {})
    offload_opt = (z.get("offload_optimizer") or {}).get("device") == "cpu"
    offload_param = (z.get("offload_param") or {}).get("device") == "cpu"
    return zero_stage(ds), offload_opt, offload_param


def plan_deepspeed(cfg: Config, a: ArchConfig, gpus: int, gpus_per_node: int, gpu_gib: float) -> Plan:
    from mellama_train.backends.deepspeed.offline import estimate_zero3_model_states

    lo = cfg.lora
    c = count(a, lo.r if lo.enabled else 0, lo.target_modules)
    stage, offload_opt, offload_param = _ds_config_flags(cfg)
    nodes = max(1, math.ceil(gpus / gpus_per_node))
    title = f"DeepSpeed ZeRO-{stage}, {gpus} GPUs ({nodes} node(s) x {min(gpus, gpus_per_node)})"
    plan = Plan(title, budget=max(0.0, gpu_gib - RESERVE_GIB) * GIB if gpu_gib else 0.0)
    sharded = 0.0  # bytes that ZeRO divides over the GPUs (for the advice: how many GPUs would fit)
    if lo.enabled:
        sharded = c.lora * 18 + (c.total * 2 if stage == 3 else 0)
        frozen = c.total * 2 / (gpus if stage == 3 else 1)
        plan.add(
            "frozen base (bf16)", frozen, "partitioned over GPUs" if stage == 3 else "replicated (ZeRO-2)"
        )
        plan.add(
            "adapters: bf16 + fp32 master + grads + Adam",
            c.lora * 18 / gpus,
            f"{c.lora / 1e6:.1f}M x 18 B / GPUs",
        )
        cpu_states = 0.0
    elif stage == 3:
        cpu_states, gpu_states = estimate_zero3_model_states(
            c.total, c.largest_module, min(gpus, gpus_per_node), nodes, offload_opt, offload_param
        )
        plan.add(
            "model states (DeepSpeed's ZeRO-3 estimator)",
            gpu_states,
            "4 B x largest module + 18 B x params / GPUs",
        )
        sharded = 0.0 if offload_param else c.total * (2 if offload_opt else 18)
    else:
        plan.add(
            "model states (ZeRO-2)",
            c.total * 2 + c.total * 14 / gpus,
            "bf16 params + (grads + fp32 master + Adam) / GPUs",
        )
        sharded = c.total * 14
        cpu_states = 0.0
    if stage == 3:
        plan.add("gathered parameters", 2 * c.layer * 2, "two decoder blocks in bf16 (current + prefetched)")
    _activation_rows(plan, cfg, a, lo.enabled)
    _logit_rows(plan, cfg, a)
    procs = min(gpus, gpus_per_node)
    plan.host.append(("host RAM per node while loading", procs * SHARD_BYTES + cpu_states))
    export = "final/ gather on rank 0" if not lo.enabled else "LoRA merge on rank 0"
    plan.host.append((f"host RAM on rank 0's node at the end ({export})", c.total * 2))
    per_ckpt = (c.total * 2 + c.lora * 14) if lo.enabled else c.total * 14
    plan.checkpoint_bytes = per_ckpt
    plan.disk.append(("per checkpoint (bf16 params + fp32 master + Adam)", per_ckpt))
    plan.disk.append((f"x keep_last {cfg.train.keep_last}", per_ckpt * cfg.train.keep_last))
    if not plan.fits:
        fixed = plan.peak - sharded / gpus  # what more GPUs do not shrink
        room = plan.budget - fixed
        fixes = []
        if sharded and room > 0:
            need = math.ceil(math.ceil(sharded / room) / gpus_per_node) * gpus_per_node
            fixes.append(f"{need} GPUs ({need // gpus_per_node} nodes of {gpus_per_node})")
        fixes += ["ds_configs/zero3_offload.json", "a smaller train.micro_batch_size or data.seq_len"]
        plan.advice.append("to fit: " + ", or ".join(fixes))
    return plan


def make_plan(
    cfg: Config, model: str | None = None, gpus: int = 0, gpus_per_node: int = 8, gpu_gib: float = 0.0
):
    arch, source = shape_for(cfg, model)
    gib = gpu_gib or cfg.train.gpu_memory_gib
    if cfg.train.backend == "single":
        plan = plan_single(cfg, arch, gib)
    else:
        plan = plan_deepspeed(cfg, arch, gpus or cfg.world_size, gpus_per_node, gib)
    plan.title += f"; shape from {source}: {count(arch).total / 1e9:.2f}B parameters"
    return plan


def render(plan: Plan) -> str:
    lines = [f"# memory plan: {plan.title}", "per GPU (estimates):"]
    for what, nbytes, how in plan.rows:
        lines.append(f"  {what:<46} {nbytes / GIB:8.2f} GiB   {how}")
    verdict = ""
    if plan.budget:
        verdict = f"  {'fits' if plan.fits else 'DOES NOT FIT'} in {plan.budget / GIB:.2f} GiB"
        verdict += f" (GPU memory minus {RESERVE_GIB:g} GiB reserve)"
    lines.append(f"  {'predicted peak':<46} {plan.peak / GIB:8.2f} GiB{verdict}")
    for what, nbytes in plan.host:
        lines.append(f"{what}: {nbytes / GIB:.1f} GiB")
    for what, nbytes in plan.disk:
        lines.append(f"disk {what}: {nbytes / GIB:.1f} GiB")
    lines += plan.advice
    return "\n".join(lines)
