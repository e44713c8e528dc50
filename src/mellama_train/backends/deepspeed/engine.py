"""The DeepSpeed backend: process-group start-up, ZeRO-3 partitioned model construction, and the wrapped model's
forward/backward/step, checkpoint save/load (through files.py: hashed while written, weights-only when read) and
full-weight gathers for export. The loop sees it through the `Backend` verbs (backends/__init__.py) only.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from mellama_train import integrity, leftovers
from mellama_train.backends.base import DistEnv, LossParts, exported_weights
from mellama_train.backends.collectives import broadcast_object
from mellama_train.backends.deepspeed import load, universal
from mellama_train.backends.deepspeed.files import CheckpointFiles, safe_load, safe_loading, step_counters
from mellama_train.loss import forward_loss
from mellama_train.watchdog import progress

log = logging.getLogger(__name__)

# DeepSpeed's comm layer calls torch.distributed functions that torch 2.13 deprecates, once per collective:
# thousands of identical lines per run that a user can do nothing about.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_minutes: int) -> DistEnv:
    """Join (or, without a launcher, create) the process group.

    Without a launcher, `deepspeed.init_distributed()` would fall into MPI discovery and fail, so a plain
    `python launch/pretrain.py` is made a world of one by setting the variables a launcher would set.
    """
    deepspeed = load()
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


# The param-group keys that pick torch's AdamW implementation (fused kernel, foreach, or its loop).
TORCH_KERNEL_KEYS = ("fused", "foreach")


def choose_adam_kernel(ds_config: dict[str, Any], cuda: bool) -> None:
    """Which AdamW runs. On CUDA, DeepSpeed's FusedAdam (or CPUAdam under offload), which take no `fused` or
    `foreach`: those keys, torch settings a JSON may carry for CPU runs, are dropped there (said in the log)
    unless the JSON asks for torch's AdamW itself (`torch_adam`).

    Without CUDA: FusedAdam is a CUDA kernel, so torch's AdamW (the same update rule) instead of JIT-building a
    CPU op, and torch's fused CPU kernel of it, not its default per-tensor loop. Under ZeRO each param group's
    partition is one flat tensor, so each of the loop's temporaries (the second moment's square root, the
    update) is the size of the whole partition: at the 25M shape the loop added 100-130 MB to every rank's
    peak RSS, and its step took 5x as long (docs/PERFORMANCE.md). A JSON that asks for foreach, or says
    `"fused": false`, keeps it."""
    params = ds_config.setdefault("optimizer", {}).setdefault("params", {})
    if cuda:
        if not params.get("torch_adam"):
            if dropped := [key for key in TORCH_KERNEL_KEYS if params.pop(key, None) is not None]:
                log.warning(
                    "optimizer.params %s: torch AdamW settings, ignored by DeepSpeed's FusedAdam on GPU",
                    ", ".join(dropped),
                )
        return
    params["torch_adam"] = True
    if not params.get("foreach"):
        params.setdefault("fused", True)


class DeepSpeedBackend:
    """A DeepSpeed-wrapped model behind the `Backend` verbs."""

    def __init__(
        self,
        model: torch.nn.Module,
        ds_config: dict[str, Any],
        param_groups: list[dict[str, Any]],
        lr_lambda: Callable[[int], float],
        env: DistEnv,
    ):
        deepspeed = load()

        self.env = env

        def scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)

        choose_adam_kernel(ds_config, cuda=torch.cuda.is_available())
        self._ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=param_groups, config=ds_config, lr_scheduler=scheduler
        )
        # Every file DeepSpeed saves or loads goes through its checkpoint engine: ours hashes what is written and
        # refuses to unpickle anything but tensors and plain data (DeepSpeed's own passes weights_only=False).
        self._files = CheckpointFiles(self._ds.checkpoint_engine)
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

    def forward_loss(self, batch: dict[str, torch.Tensor], num_sources: int) -> LossParts:
        # The whole module's forward: DeepSpeed's hooks (ZeRO-3 gathers) run around it, so no chunked head here.
        return forward_loss(self, batch, num_sources, self.env.device)

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

    @property
    def exportable(self) -> bool:
        """Full-weight ZeRO checkpoints are what `mellama-train export` reads; a LoRA run's are not."""
        return not any(not p.requires_grad for p in self._ds.module.parameters())

    def saved_counters(self, step_dir: str, rank: int) -> dict[str, int] | None:
        """What this rank's DeepSpeed files of a checkpoint say about its step (checkpoint.py's consistency
        check), read before anything is loaded."""
        return step_counters(step_dir, rank)

    def read_file(self, path: str, mmap: bool = False) -> Any:
        return safe_load(path, mmap=mmap)

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

    @property
    def reshapes(self) -> bool:
        """ZeRO-3 only: its universal conversion and load are what the tests run (tests/test_reshape_e2e.py);
        ZeRO-1/2 take other paths through DeepSpeed that no test of ours has run."""
        return self._ds.zero_optimization_stage() == 3

    def load(self, checkpoints_dir: str, tag: str, reshape: bool = False) -> None:
        """Collective. `reshape`: the checkpoint was written by another number of ranks; rank 0 converts it to
        DeepSpeed's universal checkpoint (kept beside it) and every rank loads that (universal.py)."""
        if reshape:
            step_dir = Path(checkpoints_dir) / tag
            job: universal.Conversion | str | None = None
            if self.env.is_main:
                try:
                    job = universal.Conversion(step_dir, _conversion_workers())
                except Exception as exc:  # noqa: BLE001 (the others wait for rank 0's word: it must come)
                    job = f"{type(exc).__name__}: {exc}"
            status: str | None = universal.RUNNING
            while status == universal.RUNNING:  # short collectives: every rank's watchdog sees them as life
                status = broadcast_object(_poll(job))
                progress(f"converting {tag} to a universal checkpoint")
            if status:
                raise RuntimeError(f"converting it to a universal checkpoint failed: {status}")
            tag = universal.universal_dir(Path(checkpoints_dir) / tag).name
        # The flag is read by load_checkpoint only; an engine loads the layout of the checkpoint in hand.
        self._ds._config.load_universal_checkpoint = reshape
        decay = [g["weight_decay"] for g in self.optimizer.param_groups]
        kernels = [{k: g[k] for k in TORCH_KERNEL_KEYS if k in g} for g in self.optimizer.param_groups]
        with safe_loading():
            path, _ = self._ds.load_checkpoint(
                checkpoints_dir, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        # torch's load_state_dict brings back each group's kernel as it was saved: a checkpoint from before the
        # fused kernel (or from a JSON that said otherwise) would bring back the loop, for good, since every save
        # writes it again. The kernel is this run's choice (choose_adam_kernel); the state is the same either way.
        for group, kernel in zip(self.optimizer.param_groups, kernels):
            group.update(kernel)
        if reshape:
            # DeepSpeed 0.19.8's universal ZeRO-3 load gives every parameter group the hyperparameters of the
            # first ("the hyperparameters of each parameter should be the same"): our norms would take the
            # matrices' weight decay. Each group gets its own back (the other hyperparameters are the same in
            # every group), and the rate its schedule restored.
            for group, weight_decay, lr in zip(
                self.optimizer.param_groups, decay, self.scheduler.get_last_lr()
            ):
                group.update(weight_decay=weight_decay, lr=lr)
            # It also puts ONE `step` tensor into every sub-group's state (stage3.py: state[fp32]['step'] =
            # state_step); torch's AdamW increments it in place once per sub-group per step, so Adam's bias
            # correction would run ahead by the number of sub-groups. Each state gets its own copy, as torch's
            # Optimizer.load_state_dict gives on the plain path.
            for state in self._ds.optimizer.optimizer.state.values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].clone()
        if path is None:
            # DeepSpeed only warns and returns None: training would silently restart from step 0.
            raise RuntimeError(
                f"DeepSpeed could not load checkpoint {checkpoints_dir}/{tag}; see its log above"
            )

    @contextlib.contextmanager
    def _gathered(self, params: list[torch.nn.Parameter]) -> Iterator[None]:
        """Collective: under ZeRO-3, these parameters whole on every rank for the block, partitioned again after
        it; otherwise nothing to do (each rank holds them whole)."""
        if not self._ds.zero_optimization_partition_weights():
            yield
            return
        with load().zero.GatheredParameters(params, modifier_rank=None):
            yield

    def trainable_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Collective: full copies of the TRAINABLE parameters only (a LoRA adapter) on rank 0, None elsewhere.

        Under ZeRO-3 only these parameters are gathered, never the frozen base, so saving a 70B model's adapter
        costs the adapter's size in memory and traffic."""
        named = [(n, p) for n, p in self._ds.module.named_parameters() if p.requires_grad]
        with self._gathered([p for _, p in named]):
            # One copy (from a GPU or from the gathered buffers, which are freed after the block).
            return {n: p.detach().to("cpu", copy=True) for n, p in named} if self.env.is_main else None

    def full_tensors(self) -> dict[str, torch.Tensor]:
        """Full shapes (ZeRO-3 keeps each parameter's in ds_shape; its own tensor is a partition) as meta tensors."""
        return {
            n: torch.empty(getattr(w, "ds_shape", w.shape), dtype=w.dtype, device="meta")
            for n, w in exported_weights(self._ds.module).items()
        }

    @contextlib.contextmanager
    def gathered_full(self, names: list[str]) -> Iterator[dict[str, torch.Tensor] | None]:
        """Collective: ZeRO-3 gathers these parameters on every rank (one export shard at a time: never the whole
        model at once). Rank 0 gets them on its host for the block: from a GPU one copy; on a CPU the gathered
        buffers themselves (DeepSpeed gives each parameter a buffer of its own), so a shard is never held twice."""
        weights = exported_weights(self._ds.module)
        with self._gathered([weights[n] for n in names if isinstance(weights[n], torch.nn.Parameter)]):
            yield {n: weights[n].detach().cpu() for n in names} if self.env.is_main else None


def _poll(job: universal.Conversion | str | None) -> str | None:
    """Rank 0's word on its conversion (universal.Conversion.poll), never an exception: the others wait for it."""
    if not isinstance(job, universal.Conversion):
        return job
    try:
        return job.poll(10.0)
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"


def _conversion_workers() -> int:
    """Processes for the universal conversion on rank 0's node: its share of the cores, at most 8."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, min(8, (os.cpu_count() or 1) // max(local, 1)))


class DeepSpeedMaker:
    """`BackendMaker` for DeepSpeed: the launcher's process group, ZeRO-3 construction, `deepspeed.initialize`."""

    def __init__(self, resolve_ds_config: Callable[[], dict[str, Any]]):
        self._resolve = resolve_ds_config
        self.ds_config: dict[str, Any] = {}

    def start(self, timeout_minutes: int) -> DistEnv:
        env = init_distributed(timeout_minutes)
        # Resolved only now: its batch keys depend on the world size, which MPI discovery sets during init.
        self.ds_config = self._resolve()
        return env

    @contextlib.contextmanager
    def building_model(self) -> Iterator[torch.device | None]:
        with model_construction(self.ds_config):
            yield None  # DeepSpeed moves the partitions to the device

    def wrap(
        self,
        model: torch.nn.Module,
        param_groups: list[dict[str, Any]],
        lr_lambda: Callable[[int], float],
        env: DistEnv,
    ) -> DeepSpeedBackend:
        return DeepSpeedBackend(model, self.ds_config, param_groups, lr_lambda, env)

    def release_model_construction(self) -> None:
        end_model_construction()
