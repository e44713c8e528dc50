"""`mellama-train export CHECKPOINT OUT_DIR`: one ZeRO checkpoint, of any step, becomes a verified Hugging Face
model directory (sharded safetensors, config, tokenizer, model card).

Reading (backends/deepspeed/offline.py, behind the DeepSpeed boundary). DeepSpeed's own reader (zero_to_fp32,
lazy mode) maps each rank's fp32 optimizer partitions (torch.load with mmap) and hands back, per parameter, a
view that joins that parameter's slices only when asked. It passes weights_only=False; it is run with
PyTorch's TORCH_FORCE_WEIGHTS_ONLY_LOAD set, allowing tensors, containers and the few plain DeepSpeed classes
its checkpoints pickle, so a crafted checkpoint cannot run code on the exporting host.

Writing, shard by shard. The parameters are split into shards of at most `max_shard_size` bytes in the output
dtype (huggingface_hub's planner); each shard is materialised, checked, written and freed before the next.
Host memory bound (anonymous memory beyond what the process held before the export, whatever the model size):
S + 4 x (the largest tensor's numel) bytes, S the largest shard (max_shard_size, or one tensor bigger than that
in the output dtype): the shard being written and one tensor's fp32 value during its cast; plus DeepSpeed's
checkpoint metadata (names and shapes, measured ~20 MB). safetensors writes a shard without copying it, and the checks
below are reductions, not masks as big as a tensor. The optimizer files are mapped, not read: their pages are file-backed page cache, which the kernel drops
under pressure, so they add to RSS but not to the memory the export needs.

Verification (any failure: exit 1, the output left in OUT_DIR.partial for inspection, never in OUT_DIR):
- names, shapes and parameter count equal those of the model its config.json describes;
- no tensor is empty, non-finite, or all zero after the dtype cast where the checkpoint's fp32 value was not;
- the logits of the checkpoint's probe sequence (computed by the training-time model at save time, export/final.py)
  are reproduced by the written model, loaded back by transformers from OUT_DIR in fp32, within the tolerance of
  the two precisions involved (PROBE_TOLERANCE). This load holds the model once in fp32 (4 bytes/parameter) on
  `--device` (cpu, cuda, or auto: accelerate spreads it over GPUs, host and disk); `--skip-probe` verifies the
  rest and says the probe was skipped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import resource
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mellama_train import checkpoint, host_memory, watchdog
from mellama_train.export.final import HF_META, PROBE_FILE
from mellama_train.integrity import follow_umask

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
VERIFICATION = "export.json"
"""Written into the exported directory: what was exported and what its verification measured."""
_PARTIAL_MARK = ".mellama-export"

# Probe tolerance: the mean absolute logit difference allowed, as a fraction of the reference logits' spread
# (their standard deviation), summed over the two sides' precisions: the training-time model's (its compute) and
# the export's (its weights; the check computes in fp32, so only the weights' rounding counts). Measured with
# bf16 weights against an fp32-trained 558M model (24 layers, docs/EVALUATION.md): 0.66%; there, one projection
# scaled by 0.9 gives 2.5%, the final norm scaled by 1.05 or one layer's q_proj replaced by the next one's about
# 4%, a zeroed or permuted projection 9-24%. The mean, not the maximum: the largest of 65k differences of a
# near-random model is noise-driven (4.2% there).
PROBE_TOLERANCE = {"bf16": 0.015, "fp32": 1e-4}


class ExportError(ValueError):
    """The checkpoint cannot be exported (input error: exit 2)."""


class VerificationFailed(RuntimeError):
    """The export was written but did not verify (exit 1)."""


@dataclass
class ExportResult:
    checkpoint: str
    out_dir: str
    step: int | None
    dtype: str
    tensors: int = 0
    parameters: int = 0
    shards: int = 0
    bytes_written: int = 0
    largest_tensor_bytes_fp32: int = 0
    max_shard_bytes: int = 0
    memory_bound_bytes: int = 0
    """The largest planned shard + 4 x the largest tensor's numel: what the design guarantees (module docstring),
    DeepSpeed's metadata aside."""
    peak_anon_bytes: int = 0
    """Peak anonymous host memory measured during conversion (sampled every 2 ms), beyond the start."""
    peak_rss_bytes: int = 0
    """Peak resident set of the process (ru_maxrss), mapped optimizer pages and the probe's load included."""
    seconds: float = 0.0
    probe: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def resolve_checkpoint(path: Path) -> Path:
    """CHECKPOINT is a step directory, a run directory (its newest complete checkpoint) or its checkpoints/."""
    path = Path(path)
    if (path / checkpoint.COMPLETE).is_file():
        found = path
    elif newest := (
        checkpoint.complete_checkpoints(path / "checkpoints") or checkpoint.complete_checkpoints(path)
    ):
        found = newest[-1]
    elif path.is_dir() and checkpoint.incomplete_checkpoints(path / "checkpoints"):
        raise ExportError(
            f"{path}: it has only incomplete checkpoints (no COMPLETE marker); nothing to export"
        )
    else:
        raise ExportError(
            f"{path}: not a checkpoint (no {checkpoint.COMPLETE} marker) nor a run directory with complete"
            " checkpoints; pass <run>/checkpoints/step_N or <run>"
        )
    # Every file's content against its digest: an export is what people share, it must not carry a flipped bit.
    if problem := checkpoint.verify(found, deep=True):
        raise ExportError(f"{found} is damaged: {problem}; export an earlier checkpoint of the run")
    meta = found / HF_META
    if not (meta / "config.json").is_file() or not (meta / PROBE_FILE).is_file():
        raise ExportError(
            f"{found} has no {HF_META}/ (config, tokenizer and probe logits). Only full-weight DeepSpeed"
            " checkpoints of this version carry it: a LoRA run's adapter is <run>/adapter (merge it with"
            " `mellama-train merge`), and train.backend single writes plain PyTorch checkpoints"
        )
    return found


def _anon_bytes() -> int:
    """Anonymous resident memory of this process (Linux /proc; 0 elsewhere)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakAnon:
    """Samples anonymous memory every few milliseconds in a thread; `.peak` is the most seen above the value at
    the start. A tensor the export allocates lives for far longer than a sampling interval."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._start = _anon_bytes()
        self._thread = threading.Thread(target=self._run, name="peak-anon", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _anon_bytes() - self._start)

    def __enter__(self) -> PeakAnon:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _anon_bytes() - self._start)


def _expected_tensors(config: Any) -> dict[str, torch.Size]:
    """Names and shapes of the state dict the model described by `config` saves (built on the meta device:
    no memory); tied weights are saved once, as save_pretrained does."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {name: t.shape for name, t in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        for name in getattr(model, "_tied_weights_keys", None) or []:
            shapes.pop(name, None)
    return shapes


def _lazy_state_dict(ckpt: Path) -> dict[str, Any]:
    from mellama_train.backends.deepspeed.offline import lazy_zero_state_dict

    with contextlib.redirect_stdout(None):  # DeepSpeed's reader prints its progress to stdout
        try:
            return lazy_zero_state_dict(str(ckpt.parent), ckpt.name)
        except Exception as exc:  # noqa: BLE001 - any reader failure becomes one line naming the checkpoint
            lines = str(exc).splitlines() or [type(exc).__name__]
            # A weights-only refusal says which class it would not build; other errors say what broke first.
            reason = next((ln.strip() for ln in lines if "GLOBAL" in ln), lines[0].strip())
            raise ExportError(f"{ckpt}: DeepSpeed could not read it as a ZeRO checkpoint ({reason})") from exc


def _numel(shape: torch.Size) -> int:
    return math.prod(shape)


def _check_names(lazy: dict[str, Any], expected: dict[str, torch.Size], problems: list[str]) -> None:
    missing = sorted(set(expected) - set(lazy))
    unexpected = sorted(set(lazy) - set(expected))
    if missing:
        problems.append(f"{len(missing)} tensors of the model are not in the checkpoint, e.g. {missing[0]}")
    if unexpected:
        problems.append(
            f"{len(unexpected)} tensors of the checkpoint are not in the model, e.g. {unexpected[0]}"
        )
    for name in sorted(set(lazy) & set(expected)):
        if tuple(lazy[name].shape) != tuple(expected[name]):
            problems.append(
                f"{name}: shape {tuple(lazy[name].shape)} in the checkpoint, {tuple(expected[name])} in the model"
            )


def _materialise(lazy_tensor: Any, dtype: torch.dtype, name: str, problems: list[str]) -> torch.Tensor:
    """The full tensor in `dtype`, after the checks that need its fp32 value."""
    full = lazy_tensor.contiguous() if not isinstance(lazy_tensor, torch.Tensor) else lazy_tensor
    if full.numel() == 0:
        problems.append(f"{name} is empty")
        return full.to(dtype) if full.is_floating_point() else full
    if not full.is_floating_point():
        return full.contiguous()
    # Reductions only (a sum, nonzero counts): an elementwise test would allocate a mask as big as the tensor.
    # A NaN or inf anywhere makes the fp32 sum non-finite; bf16 has fp32's exponent range, so a finite fp32
    # tensor stays finite when cast.
    finite = bool(torch.isfinite(full.sum()))
    out = full.to(dtype).contiguous()
    if not finite:
        problems.append(f"{name} has non-finite values in the checkpoint")
    elif int(torch.count_nonzero(out)) == 0 and int(torch.count_nonzero(full)) > 0:
        problems.append(f"{name} is all zero after the cast to {dtype}, but not in the checkpoint")
    return out


def _write_shards(
    lazy: dict[str, Any],
    names: list[str],
    out: Path,
    dtype: torch.dtype,
    max_shard_size: str,
    result: ExportResult,
) -> None:
    from huggingface_hub import split_state_dict_into_shards_factory
    from safetensors.torch import save_file

    item = torch.empty((), dtype=dtype).element_size()
    split = split_state_dict_into_shards_factory(
        {n: lazy[n] for n in names},
        get_storage_size=lambda t: _numel(t.shape) * item,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_size,
    )
    # The bound the design guarantees (module docstring), from the planned shards.
    largest_shard = max(
        sum(_numel(lazy[n].shape) * item for n in group) for group in split.filename_to_tensors.values()
    )
    result.memory_bound_bytes = largest_shard + result.largest_tensor_bytes_fp32
    for filename, tensor_names in split.filename_to_tensors.items():
        shard = {n: _materialise(lazy[n], dtype, n, result.problems) for n in tensor_names}
        save_file(shard, str(out / filename), metadata={"format": "pt"})
        watchdog.progress(f"export: {filename} written")  # a 70B export is many shards, each a beat
        result.bytes_written += sum(t.numel() * t.element_size() for t in shard.values())
        result.shards += 1
        del shard
        host_memory.release_freed_memory()  # the shard's blocks below the mmap threshold
    if split.is_sharded:
        index = {"metadata": {"total_size": result.bytes_written}, "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


@torch.no_grad()
def _check_probe(out: Path, ckpt: Path, dtype_name: str, device: str, result: ExportResult) -> None:
    """Load the written model back with transformers (weights upcast to fp32, so the host's kernels add no bf16
    error of their own) and compare its logits of the probe sequence with the training-time model's."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    path = str(ckpt / HF_META / PROBE_FILE)
    probe = load_file(path)
    with safe_open(path, "pt") as fh:
        trained = (fh.metadata() or {}).get("precision", "bf16")  # unknown: the looser side
    ids, reference = probe["input_ids"], probe["logits"].float()
    if device == "auto":  # accelerate places the layers over the GPUs, the host and, past those, the disk
        model = AutoModelForCausalLM.from_pretrained(
            out, dtype=torch.float32, device_map="auto", offload_folder=str(out / ".offload")
        )
        device = str(model.get_input_embeddings().weight.device)
    else:
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(device)
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    logits = model.eval()(input_ids=ids.to(device), position_ids=positions.to(device)).logits.float().cpu()
    del model
    shutil.rmtree(out / ".offload", ignore_errors=True)
    if logits.shape != reference.shape:
        result.problems.append(
            f"probe logits have shape {tuple(logits.shape)}, expected {tuple(reference.shape)}"
        )
        return
    spread = float(reference.std()) or 1.0
    diff = (logits - reference).abs()
    mean_rel, max_rel = float(diff.mean()) / spread, float(diff.max()) / spread
    tolerance = PROBE_TOLERANCE[dtype_name] + PROBE_TOLERANCE.get(trained, PROBE_TOLERANCE["bf16"])
    result.probe = {
        "tokens": int(ids.shape[1]),
        "reference_precision": trained,
        "reference_std": spread,
        "mean_diff_over_std": mean_rel,
        "max_diff_over_std": max_rel,
        "tolerance_mean_over_std": tolerance,
        "argmax_agreement": float((logits.argmax(-1) == reference.argmax(-1)).float().mean()),
        "device": device,
    }
    if not mean_rel <= tolerance:
        result.problems.append(
            f"probe logits differ from the training-time model's by {mean_rel:.2%} of their spread on average"
            f" (tolerance {tolerance:.2%} for {trained} training and {dtype_name} weights; largest difference"
            f" {max_rel:.2%})"
        )


def _shard_bytes(size: str) -> int:
    """--max-shard-size as bytes, parsed the way huggingface_hub's splitter parses it (5GB = 5 x 10^9)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(KB|MB|GB|TB)\s*", str(size).upper())
    if not match:
        raise ExportError(f"--max-shard-size {size}: give a number with KB, MB, GB or TB, e.g. 2GB or 500MB")
    return int(float(match.group(1)) * 1000 ** ("KMGT".index(match.group(2)[0]) + 1))


def _fresh_partial(out_dir: Path) -> Path:
    """OUT_DIR.partial, empty and marked as the export's own (only a marked one is ever removed)."""
    partial = out_dir.with_name(out_dir.name + ".partial")
    if partial.exists():
        if not (partial / _PARTIAL_MARK).is_file():
            raise ExportError(f"{partial} exists and was not written by an export; move it away")
        shutil.rmtree(partial)  # an earlier export's leftover
    partial.mkdir(parents=True)
    (partial / _PARTIAL_MARK).write_text("an unfinished or unverified `mellama-train export`\n")
    return partial


def export_checkpoint(
    path: Path,
    out_dir: Path,
    dtype: str = "bf16",
    max_shard_size: str = "2GB",
    probe: bool = True,
    device: str = "cpu",
) -> ExportResult:
    """Convert and verify. Raises ExportError before writing anything, VerificationFailed after writing
    OUT_DIR.partial when a check fails; on success OUT_DIR holds the model and its export.json."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    started = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ExportError(f"{out_dir} exists and is not empty; choose a new OUT_DIR (nothing is overwritten)")
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    _shard_bytes(max_shard_size)  # a bad size fails here, before anything is read
    ckpt = resolve_checkpoint(path)
    meta = ckpt / HF_META
    config = AutoConfig.from_pretrained(meta)  # LLaMA's own config class: trust_remote_code stays off
    trainer = json.loads((ckpt / checkpoint.TRAINER_STATE).read_text())
    result = ExportResult(str(ckpt), str(out_dir), trainer.get("step"), dtype)
    expected = _expected_tensors(config)
    names = list(expected)
    result.tensors = len(names)
    result.parameters = sum(_numel(expected[n]) for n in names)
    largest = max(_numel(expected[n]) for n in names)
    result.max_shard_bytes = _shard_bytes(max_shard_size)
    result.largest_tensor_bytes_fp32 = 4 * largest
    partial = _fresh_partial(out_dir)
    log.info(
        "exporting %s (step %s): %d tensors, %.1fM parameters",
        ckpt,
        result.step,
        result.tensors,
        result.parameters / 1e6,
    )
    host_memory.large_blocks_from_mmap()  # a freed fp32 temporary goes straight back to the OS
    with PeakAnon() as peak:
        lazy = _lazy_state_dict(ckpt)
        _check_names(lazy, expected, result.problems)
        if result.problems:  # a different model: writing it would only produce a misleading directory
            shutil.rmtree(partial)
            raise VerificationFailed("; ".join(result.problems))
        _write_shards(lazy, names, partial, DTYPES[dtype], max_shard_size, result)
        del lazy
    result.peak_anon_bytes = peak.peak
    config.use_cache = True  # the inference default, turned off for training
    config.dtype = DTYPES[dtype]
    config.save_pretrained(partial)
    with contextlib.suppress(OSError, ValueError):
        GenerationConfig.from_model_config(config).save_pretrained(partial)
    AutoTokenizer.from_pretrained(meta).save_pretrained(partial)
    if probe and not result.problems:
        _check_probe(partial, ckpt, dtype, device, result)
    elif not probe:
        result.probe = {"skipped": True}
    from mellama_train.export.model_card import write_model_card

    write_model_card(partial, ckpt.parent.parent, "export", checkpoint=ckpt)
    result.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result.seconds = time.perf_counter() - started
    (partial / VERIFICATION).write_text(json.dumps(asdict(result), indent=2) + "\n")
    if result.problems:
        raise VerificationFailed(f"{'; '.join(result.problems)} (output left in {partial})")
    (partial / _PARTIAL_MARK).unlink()
    follow_umask(partial)
    if out_dir.exists():
        out_dir.rmdir()  # empty (checked above)
    partial.rename(out_dir)
    return result
