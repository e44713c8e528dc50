"""DeepSpeed work that needs no process group: reading a ZeRO checkpoint for `mellama-train export`, and
DeepSpeed's estimate of ZeRO-3 model-state memory for the planner (plan.py)."""

from __future__ import annotations

from typing import Any

from mellama_train.backends.deepspeed import load
from mellama_train.backends.deepspeed.files import safe_loading


def lazy_zero_state_dict(checkpoints_dir: str, tag: str) -> dict[str, Any]:
    """A ZeRO-2/3 checkpoint's full fp32 state dict, offline and lazily (DeepSpeed's zero_to_fp32 reader: each
    value joins a parameter's slices from the mapped rank partitions when `.contiguous()` is called), read with
    weights-only loads so that a checkpoint from elsewhere cannot run code. No process group needed."""
    load()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with safe_loading():
        return get_fp32_state_dict_from_zero_checkpoint(checkpoints_dir, tag=tag, lazy_mode=True)


def estimate_zero3_model_states(
    total_params: int,
    largest_module_params: int,
    gpus_per_node: int,
    nodes: int,
    offload_optimizer: bool,
    offload_params: bool,
) -> tuple[float, float]:
    """(host bytes per node, bytes per GPU) of ZeRO-3 model states: DeepSpeed's own estimator (it assumes every
    parameter is trained: 16-bit weights and grads, fp32 master weights and two Adam moments)."""
    load()
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        total_params,
        largest_module_params,
        num_gpus_per_node=gpus_per_node,
        num_nodes=nodes,
        cpu_offload=offload_optimizer,
        cpu_offload_params=offload_params,
        zero_init=True,
    )
    return float(cpu), float(gpu)
