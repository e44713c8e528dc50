"""The DeepSpeed boundary: the only module that imports deepspeed.

Everything distributed goes through here: process-group start-up, ZeRO-3 partitioned model construction,
the wrapped model's forward/backward/step, checkpoint save/load (every file hashed while DeepSpeed writes it, and
read back with weights-only unpickling), gathering full weights for export, and the offline, weights-only read of
a ZeRO checkpoint for `mellama-train export`.
The training loop sees a small `Engine` object and never a DeepSpeed type.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from mellama_train import integrity, leftovers

log = logging.getLogger(__name__)

# DeepSpeed's comm layer calls torch.distributed functions that torch 2.13 deprecates, once per collective:
# thousands of identical lines per run that a user can do nothing about.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_minutes: int) -> DistEnv:
    """Join (or, without a launcher, create) the process group.

    Without a launcher, `deepspeed.init_distributed()` would fall into MPI discovery and fail, so a plain
    `python launch/pretrain.py` is made a world of one by setting the variables a launcher would set.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("LOCAL_SIZE", "1")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if not cuda and "LOCAL_SIZE" not in os.environ and "LOCAL_WORLD_SIZE" in os.environ:
        os.environ["LOCAL_SIZE"] = os.environ["LOCAL_WORLD_SIZE"]  # torchrun's name for it
    # DeepSpeed's CPU accelerator answers device_count() from LOCAL_SIZE, else by running `numactl --hardware`,
    # and ZeRO-3 asks once per gradient bucket: 76 subprocesses a step on the tiny model, 15% of its step time
    # (docs/PERFORMANCE.md). Its own launcher sets LOCAL_SIZE; a launcher-less run is set above. SLURM CPU jobs
    # (the test cluster) still pay it: LOCAL_SIZE also switches DeepSpeed's shared-memory all-reduce on, which
    # is left as SLURM leaves it.
    if cuda:
        torch.cuda.set_device(local_rank)
    # gloo on CPU: DeepSpeed's CPU accelerator would otherwise ask for oneCCL, which a laptop does not have.
    backend = "nccl" if cuda else "gloo"
    if local_rank == 0 and not torch.distributed.is_initialized():
        # DeepSpeed JIT-loads ops here (on CPU its shared-memory all-reduce) and in initialize(): a build lock a
        # killed process left would make every rank wait forever, and killed runs' buffers hold RAM.
        leftovers.clear_stale_locks()
        if not cuda:
            leftovers.clear_stale_shm_buffers()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
        if not cuda:
            torch.distributed.barrier()  # every rank has mapped every shared-memory buffer: names can go
            leftovers.release_shm_buffer(torch.distributed.get_rank())
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    log.debug("rank %d/%d on %s (accelerator %s)", rank, world, device, get_accelerator().device_name())
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device)


def shutdown() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def model_construction(ds_config: dict[str, Any]) -> Iterator[None]:
    """Context in which transformers builds or loads the model.

    Under ZeRO-3 a live `HfDeepSpeedConfig` makes `from_pretrained`/`from_config` construct the model inside
    `deepspeed.zero.Init`: each parameter is partitioned as soon as it is created or loaded, so no rank ever
    holds the whole 70B model. The object must stay referenced while the model is built (transformers keeps
    only a weak reference), and is kept for the engine's lifetime after that.
    """
    from transformers.integrations import HfDeepSpeedConfig

    holder = HfDeepSpeedConfig(ds_config)
    _LIVE_HF_DS_CONFIGS.append(holder)
    yield


_LIVE_HF_DS_CONFIGS: list[Any] = []


def end_model_construction() -> None:
    """Forget the ZeRO-3 construction config, so a model loaded afterwards in this process (the LoRA merge on
    rank 0) is an ordinary full model instead of an empty partitioned one."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    _LIVE_HF_DS_CONFIGS.clear()


class Engine:
    """A DeepSpeed-wrapped model, seen by the loop through a few verbs."""

    def __init__(
        self,
        model: torch.nn.Module,
        ds_config: dict[str, Any],
        param_groups: list[dict[str, Any]],
        lr_lambda: Callable[[int], float],
    ):
        import deepspeed

        def scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)

        if not torch.cuda.is_available():
            # FusedAdam is a CUDA kernel; on CPU use torch's AdamW (same update rule) instead of JIT-building one.
            ds_config.setdefault("optimizer", {}).setdefault("params", {})["torch_adam"] = True
        self._ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=param_groups, config=ds_config, lr_scheduler=scheduler
        )
        # Every file DeepSpeed saves or loads goes through its checkpoint engine: ours hashes what is written and
        # refuses to unpickle anything but tensors and plain data (DeepSpeed's own passes weights_only=False).
        self._files = _CheckpointFiles(self._ds.checkpoint_engine)
        self._ds.checkpoint_engine = self._files
        # Rank 0 also copies DeepSpeed's zero_to_fp32.py beside the checkpoints at every save, outside the
        # checkpoint engine: on a full disk that copy must not raise out of save_checkpoint either (the other
        # ranks would be left in DeepSpeed's final barrier).
        self._ds._copy_recovery_script = self._files.guarded(self._ds._copy_recovery_script)

    @property
    def module(self) -> torch.nn.Module:
        return self._ds.module

    def __call__(self, **inputs: torch.Tensor) -> Any:
        out = self._ds(**inputs)
        if not self._ds.module.training:  # DeepSpeed's eval() sets the module's flag, not the engine's
            self._forget_forward_only_trace()
        return out

    def _forget_forward_only_trace(self) -> None:
        """Drop a ZeRO-3 parameter trace that an evaluation pass has begun to record.

        ZeRO-3 records the order in which modules run in the first passes it sees, then prefetches and keeps
        parameters by that record. When the first record comes from forward-only passes (the step-0 evaluation,
        before any training step), DeepSpeed 0.19.8 gathers each layer twice in every later training step,
        once in the forward and again before the backward, for the rest of the run. On the tiny model with
        2 ranks that is 63 all-gathers a step instead of 33, most of the trainer's 15% gap to a bare DeepSpeed
        loop (docs/PERFORMANCE.md).
        An evaluation later in the run reuses the training record and does no harm. Dropping the record
        once the evaluation is over is too late: the first training pass must find no record at all, so
        the record is dropped after every eval pass that began one. DeepSpeed has no public call for this."""
        offload = getattr(getattr(self._ds, "optimizer", None), "parameter_offload", None)
        if offload is None:  # ZeRO-1/2: parameters are not partitioned, so there is no trace
            return
        coordinator = offload.get_param_coordinator()
        if coordinator.is_record_trace():
            coordinator._invalidate_trace()

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed divides by gradient_accumulation_steps here: the loop passes the micro-batch mean.
        self._ds.backward(loss)

    def step(self) -> None:
        """Call after every micro-batch; the optimizer (and the lr schedule) steps only at accumulation ends."""
        self._ds.step()

    def train(self) -> None:
        self._ds.train()

    def eval(self) -> None:
        self._ds.eval()

    @property
    def lr(self) -> float:
        return self._ds.get_lr()[0]

    @property
    def grad_norm(self) -> float | None:
        """Global gradient norm of the last optimizer step (before clipping)."""
        norm = self._ds.get_global_grad_norm()
        return float(norm) if norm is not None else None

    @property
    def optimizer_steps(self) -> int:
        return self._ds.global_steps

    def saved_counters(self, step_dir: str, rank: int) -> dict[str, int] | None:
        """What this rank's DeepSpeed files of a checkpoint say about its step (checkpoint.py's consistency
        check), read before anything is loaded."""
        return step_counters(step_dir, rank)

    @property
    def step_applied(self) -> bool:
        """Whether the last accumulation-boundary step changed the weights. ZeRO-2/3 (DeepSpeed >= 0.19.8)
        discard a step whose global gradient norm is not finite, on every rank, and hold the lr schedule."""
        return self._ds.was_step_applied()

    # ---- checkpoints -----------------------------------------------------------------------------------
    def save(self, checkpoints_dir: str, tag: str) -> dict[str, integrity.FileDigest]:
        """Collective: every rank writes its shard of the model, optimizer and scheduler states. Returns the
        digest of each file this rank wrote (path -> digest). A write that fails (a full disk) does not raise
        inside DeepSpeed, where the other ranks would wait for this one in its barriers: it is raised here, after
        DeepSpeed's save has ended on every rank (checkpoint.save then stops every rank together)."""
        self._files.begin_save()
        self._ds.save_checkpoint(checkpoints_dir, tag=tag, save_latest=False)
        return self._files.end_save()

    def load(self, checkpoints_dir: str, tag: str) -> None:
        with safe_loading():
            path, _ = self._ds.load_checkpoint(
                checkpoints_dir, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        if path is None:
            # DeepSpeed only warns and returns None: training would silently restart from step 0.
            raise RuntimeError(
                f"DeepSpeed could not load checkpoint {checkpoints_dir}/{tag}; see its log above"
            )

    def trainable_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Collective: full copies of the TRAINABLE parameters only (a LoRA adapter) on rank 0, None elsewhere.

        Under ZeRO-3 only these parameters are gathered, never the frozen base, so saving a 70B model's adapter
        costs the adapter's size in memory and traffic."""
        import deepspeed

        named = [(n, p) for n, p in self._ds.module.named_parameters() if p.requires_grad]
        is_main = torch.distributed.get_rank() == 0
        gathered = contextlib.nullcontext()
        if self._ds.zero_optimization_partition_weights():
            gathered = deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None)
        with gathered:
            return {n: p.detach().cpu().clone() for n, p in named} if is_main else None

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Collective: gather the full 16-bit weights on rank 0 (None on other ranks) for the HF export."""
        if self._ds.zero_optimization_partition_weights():
            return self._ds._zero3_consolidated_16bit_state_dict()
        state = self._ds.module.state_dict()
        return state if torch.distributed.get_rank() == 0 else None


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


# ---- collectives the loop needs, kept here so the loop never touches the process group itself ----------


def _deepspeed_safe_globals() -> list[Any]:
    """The plain data classes DeepSpeed pickles into its checkpoints: an enum, the loss scalers and ZeRO-1/2's
    `fragment_address` (numel, start) in its parameter slice mappings. Attributes only: no code of theirs runs to
    build them. Everything else must be tensors and builtin containers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


@contextlib.contextmanager
def safe_loading() -> Iterator[None]:
    """Every torch.load inside is forced to weights_only=True (DeepSpeed's readers pass weights_only=False),
    with DeepSpeed's plain data classes allowed: a pickle that would build any other object (os.system, a
    class with a __reduce__) is refused with an UnpicklingError instead of running."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def safe_load(path: str, mmap: bool = False) -> Any:
    """torch.load of a checkpoint file with weights-only unpickling (DeepSpeed's classes allowed). mmap: map the
    tensors instead of reading them, to check a large shard's pickle and read its counters cheaply."""
    with safe_loading():
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


class _CheckpointFiles:
    """Stands in for DeepSpeed's checkpoint engine (TorchCheckpointEngine): saves hash while writing, loads
    are weights-only, everything else is delegated. Write errors are kept, not raised, until end_save()."""

    def __init__(self, inner: Any):
        self._inner = inner
        self._written: dict[str, integrity.PendingDigest] = {}
        self._error: OSError | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def begin_save(self) -> None:
        self._written, self._error = {}, None

    def end_save(self) -> dict[str, integrity.FileDigest]:
        digests = {}
        for path, pending in self._written.items():  # every hash thread is joined, whatever failed
            try:
                digests[path] = pending.result()
            except OSError as exc:
                self._error = self._error or exc
        if self._error is not None:
            raise self._error
        return digests

    def guarded(self, write: Callable[..., None]) -> Callable[..., None]:
        """`write`, with an OSError kept for end_save() instead of raised inside DeepSpeed's save."""

        def call(*args: Any, **kwargs: Any) -> None:
            if self._error is not None:
                return
            try:
                write(*args, **kwargs)
            except OSError as exc:
                self._error = exc

        return call

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self.guarded(self._inner.makedirs)(path, exist_ok=exist_ok)

    def save(self, state_dict: Any, path: str) -> None:
        if self._error is not None:
            return  # this save has failed already: write nothing more, let DeepSpeed reach its barriers
        try:
            self._written[os.path.abspath(path)] = integrity.save_torch_pending(state_dict, path)
        except OSError as exc:
            self._error = exc

    def load(self, path: str, map_location: Any = None) -> Any:
        with safe_loading():
            return torch.load(path, map_location=map_location, weights_only=True)


def step_counters(step_dir: str, rank: int) -> dict[str, int] | None:
    """What DeepSpeed's own files of a checkpoint say about its step, for the consistency check at resume:
    {"global_steps", "skipped_steps", "scheduler_steps"} from the model-states file this rank loads, or None
    when there is none (a single-device checkpoint). Read weights-only, tensors mapped, not loaded."""
    names = [f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt", "mp_rank_00_model_states.pt"]
    found = [os.path.join(step_dir, name) for name in names if os.path.isfile(os.path.join(step_dir, name))]
    if not found:
        return None
    state = safe_load(found[0], mmap=True)
    scheduler = state.get("lr_scheduler") or {}
    return {
        "global_steps": int(state["global_steps"]),
        "skipped_steps": int(state.get("skipped_steps", 0)),
        "scheduler_steps": int(scheduler.get("last_epoch", -1)),
    }


def lazy_zero_state_dict(checkpoints_dir: str, tag: str) -> dict[str, Any]:
    """A ZeRO-2/3 checkpoint's full fp32 state dict, offline and lazily (DeepSpeed's zero_to_fp32 reader: each
    value joins a parameter's slices from the mapped rank partitions when `.contiguous()` is called), read with
    weights-only loads so that a checkpoint from elsewhere cannot run code. No process group needed."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with safe_loading():
        return get_fp32_state_dict_from_zero_checkpoint(checkpoints_dir, tag=tag, lazy_mode=True)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a small tensor over ranks (a host sync on GPU: call it only when logging)."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
    return values


def all_reduce_min(values: torch.Tensor) -> torch.Tensor:
    """The element-wise smallest of a small tensor over ranks."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MIN)
    return values


def all_reduce_max(value: int) -> int:
    """The largest of one integer over ranks (e.g. a batch count every rank must match)."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    box = torch.tensor([value], dtype=torch.long, device=device)
    torch.distributed.all_reduce(box, op=torch.distributed.ReduceOp.MAX)
    return int(box.item())


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (small things: file digests, problems found)."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]
