"""DeepSpeed JSON handling: fill its "auto" values from the run config and reject contradictions.

One JSON serves every profile: batch sizes, learning rate, betas, clipping and precision are "auto" in the
shipped files and come from the typed config. DeepSpeed itself does not understand "auto" (that convention is
the HF Trainer's); we resolve it here, before `deepspeed.initialize` sees the dict. An explicit number that
disagrees with the recipe is an error naming both numbers, never a silent winner.

Plain dict work: this module does not import DeepSpeed (that stays in `engine.py`).
"""

from __future__ import annotations

import copy
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mellama_train.config import Config

AUTO = "auto"


def load_ds_config(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{path}: invalid JSON at line {exc.lineno} ({exc.msg}); fix the DeepSpeed config"
        ) from None


MIN_BUCKET = 2**22
"""The smallest "auto" ZeRO bucket, in elements; see zero_sizes."""


def zero_sizes(h: int) -> dict[tuple[str, ...], int]:
    """The "auto" ZeRO collective sizes for hidden size h, in elements; they change speed and memory, never the
    math (the losses are bit-equal).

    HF's integration derives them from the hidden size alone: reduce h^2, prefetch 0.9 h^2, persistence 10 h. At
    hidden 2048 and above (every 1B-70B LLaMA) that is 4-67M elements a bucket, and so it stays. Below it (the
    demo, a 25M model, every test) a bucket holds one weight matrix or less, and ZeRO-3 then makes a
    latency-bound collective per matrix several times a step: the gather for the forward, again for the
    recomputation under activation checkpointing and for the backward, and the gradients' reduce. So a bucket is
    never below MIN_BUCKET (DeepSpeed's own defaults are 5e8 and 5e7). What that costs: the gradient bucket
    buffer (one per gradient dtype under ZeRO-3, two with overlap_comm under ZeRO-2) of 16 MB in fp32, and up to
    MIN_BUCKET gathered elements prefetched ahead. Measured with bench/ab.py against HF's sizes
    (docs/PERFORMANCE.md): 1.48x tokens/s on the tiny model.

    The persistence threshold keeps HF's rule: raising it to DeepSpeed's 1e5 gave 3% more on the tiny model but
    would keep whole on every GPU, at 13B, the LoRA matrices of rank 16 (16 x 5120 elements), and on the CPU
    every decoder weight of the tiny model the 2-rank tests partition."""
    return {
        ("zero_optimization", "reduce_bucket_size"): max(h * h, MIN_BUCKET),
        ("zero_optimization", "stage3_prefetch_bucket_size"): max(int(0.9 * h * h), MIN_BUCKET),
        ("zero_optimization", "stage3_param_persistence_threshold"): 10 * h,
    }


def _recipe_values(cfg: Config) -> dict[tuple[str, ...], Any]:
    """Every ds_config key the trainer owns -> the value the recipe gives it."""
    h = cfg.model.arch.hidden_size
    return {
        ("train_micro_batch_size_per_gpu",): cfg.train.micro_batch_size,
        ("gradient_accumulation_steps",): cfg.grad_accum_steps,
        ("train_batch_size",): cfg.train.global_batch_size,
        ("gradient_clipping",): cfg.optim.grad_clip,
        ("bf16", "enabled"): cfg.train.precision == "bf16",
        ("optimizer", "params", "lr"): cfg.optim.lr,
        ("optimizer", "params", "betas"): list(cfg.optim.betas),
        ("optimizer", "params", "eps"): cfg.optim.eps,
        ("optimizer", "params", "weight_decay"): cfg.optim.weight_decay,
        **zero_sizes(h),
    }


# Keys that only change speed: an explicit value is the user's tuning, not a contradiction.
_TUNABLE = {"reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"}


def _get(tree: dict[str, Any], keys: tuple[str, ...]) -> Any:
    node: Any = tree
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) <= 1e-12 * max(1.0, abs(a), abs(b))
    return a == b


def check_ds_config(path: str, cfg: Config) -> list[str]:
    """Problems with a ds_config for this run, one line each with both numbers and the fix."""
    try:
        ds = load_ds_config(path)
    except ValueError as exc:
        return [str(exc)]
    problems = []
    for keys, want in _recipe_values(cfg).items():
        have = _get(ds, keys)
        if have is None or have == AUTO or keys[-1] in _TUNABLE:
            continue
        if not _same(have, want):
            dotted = ".".join(keys)
            problems.append(
                f'{path}: {dotted} is {have!r} but the recipe gives {want!r}; set it to "auto" or change the recipe'
            )
    if _get(ds, ("fp16", "enabled")) is True:
        problems.append(
            f"{path}: fp16.enabled is true; LLaMA-2 trains in bf16: remove the fp16 block (precision comes from train.precision)"
        )
    if "scheduler" in ds:
        problems.append(
            f"{path}: has a scheduler block; remove it: the schedule is optim.* (warmup + cosine, closed form)"
        )
    opt_type = str(_get(ds, ("optimizer", "type")) or "AdamW").lower()
    if opt_type not in ("adamw", "adam"):
        problems.append(
            f"{path}: optimizer.type {opt_type!r} is not AdamW, which the recipe uses; set it to AdamW"
        )
    stage = _get(ds, ("zero_optimization", "stage"))
    if stage not in (None, 0, 1, 2, 3):
        problems.append(f"{path}: zero_optimization.stage must be 0-3 (got {stage!r})")
    return problems


def resolve_ds_config(path: str, cfg: Config) -> dict[str, Any]:
    """The ds_config dict with every "auto" (and every trainer-owned key left out) filled from the recipe."""
    ds = copy.deepcopy(load_ds_config(path))
    for keys, want in _recipe_values(cfg).items():
        parent_keys, leaf = keys[:-1], keys[-1]
        parent = _get(ds, parent_keys) if parent_keys else ds
        if parent_keys and parent is None:
            if parent_keys[0] == "zero_optimization":
                continue  # no ZeRO block: nothing to tune
            parent = ds
            for key in parent_keys:
                parent = parent.setdefault(key, {})
        if parent.get(leaf, AUTO) == AUTO:
            parent[leaf] = want
    ds.setdefault("optimizer", {}).setdefault("type", "AdamW")
    # The trainer prints its own progress and metrics; DeepSpeed's per-step prints would interleave with them.
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def zero_stage(ds: dict[str, Any]) -> int:
    return int(_get(ds, ("zero_optimization", "stage")) or 0)
