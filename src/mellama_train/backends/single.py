"""The single-device backend: the `Backend` verbs without DeepSpeed, for one GPU (the 8gb QLoRA profile).

The training loop, checkpoint layout, metrics and outputs are the same code as on the DeepSpeed path; only the
object behind the verbs changes. No process group, no launcher: `train.backend: single` refuses WORLD_SIZE > 1.

Semantics kept equal to DeepSpeed's so the loop needs no branch: `backward` divides by the accumulation steps,
`step` is called after every micro-batch and steps the optimizer and the lr schedule at accumulation ends, and
`grad_norm` is the norm before clipping. It alone can run the output layer and loss in chunks
(`train.loss_chunk_tokens`): DeepSpeed's engine must run the whole module forward for its hooks.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from mellama_train import integrity
from mellama_train.backends.base import DistEnv, LossParts, exported_weights
from mellama_train.loss import forward_loss

STATE_FILE = "engine_state.pt"


def local_env() -> DistEnv:
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return DistEnv(rank=0, world_size=1, local_rank=0, device=device)


def make_optimizer(name: str, param_groups: list[dict[str, Any]], lr: float, betas, eps: float):
    if name == "paged_adamw_8bit":
        import bitsandbytes as bnb

        # Paged: optimizer states live in unified memory that pages to the host under pressure, so the
        # memory spike of the first step cannot OOM an 8 GB card; 8-bit: 2 bytes of state per parameter, not 8.
        return bnb.optim.PagedAdamW8bit(param_groups, lr=lr, betas=tuple(betas), eps=eps)
    # torch's fused kernel where it has one (CPU, CUDA): one pass over each tensor with no temporaries, where the
    # default loop (CPU) or foreach (CUDA) allocates a few tensors of the parameters' size every step.
    fused = all(p.device.type in ("cpu", "cuda") for group in param_groups for p in group["params"])
    return torch.optim.AdamW(param_groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused or None)


class SingleDeviceBackend:
    def __init__(
        self,
        model: torch.nn.Module,
        param_groups: list[dict[str, Any]],
        lr_lambda: Callable[[int], float],
        *,
        optimizer: str,
        lr: float,
        betas: list[float],
        eps: float,
        grad_clip: float,
        accum_steps: int,
        chunk_tokens: int = 0,
        env: DistEnv | None = None,
    ):
        self.env = env or local_env()
        self.chunk_tokens = chunk_tokens
        self._module = model
        self.optimizer = make_optimizer(optimizer, param_groups, lr, betas, eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)
        self.grad_clip, self.accum_steps = grad_clip, accum_steps
        self._params = [p for group in param_groups for p in group["params"]]
        self._micro_steps = 0
        self.optimizer_steps = 0
        self.skipped_steps = 0
        self._grad_norm: float | None = None
        self.step_applied = True
        """Whether the last accumulation-boundary step changed the weights (see guard.py)."""

    @property
    def module(self) -> torch.nn.Module:
        return self._module

    def __call__(self, **inputs: torch.Tensor) -> Any:
        return self._module(**inputs)

    def forward_loss(self, batch: dict[str, torch.Tensor], num_sources: int) -> LossParts:
        return forward_loss(self, batch, num_sources, self.env.device, self.chunk_tokens)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum_steps).backward()

    def step(self) -> None:
        self._micro_steps += 1
        if self._micro_steps % self.accum_steps:
            return
        max_norm = self.grad_clip if self.grad_clip > 0 else math.inf
        self._grad_norm = float(torch.nn.utils.clip_grad_norm_(self._params, max_norm))
        # As DeepSpeed does: a non-finite gradient norm discards the step (weights, moments and the lr schedule
        # stay as they were); the step still counts, so accumulation boundaries stay where they were.
        self.step_applied = math.isfinite(self._grad_norm)
        if self.step_applied:
            self.optimizer.step()
            self.scheduler.step()
        else:
            self.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_steps += 1

    def train(self) -> None:
        self._module.train()

    def eval(self) -> None:
        self._module.eval()

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    @property
    def grad_norm(self) -> float | None:
        return self._grad_norm

    @property
    def exportable(self) -> bool:
        return False  # `mellama-train export` reads ZeRO checkpoints; this one's weights are in final/ or adapter/

    def read_file(self, path: str, mmap: bool = False) -> Any:
        return integrity.safe_load(path, mmap=mmap)

    # ---- checkpoints: trainable weights + optimizer + schedule in one file of the step directory ----------
    def save(self, checkpoints_dir: str, tag: str) -> dict[str, integrity.FileDigest]:
        """The state file, hashed while written (checkpoint.py): {path: digest}."""
        path = Path(checkpoints_dir) / tag
        path.mkdir(parents=True, exist_ok=True)
        state = {
            "trainable": self.trainable_state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "optimizer_steps": self.optimizer_steps,
            "skipped_steps": self.skipped_steps,
        }
        return {str(path / STATE_FILE): integrity.save_torch(state, path / STATE_FILE)}

    def saved_counters(self, step_dir: str, rank: int) -> dict[str, int] | None:
        """The optimizer, skipped and scheduler steps the state file holds (checkpoint.py's consistency check)."""
        path = Path(step_dir) / STATE_FILE
        if not path.is_file():
            return None
        state = integrity.safe_load(str(path), mmap=True)
        steps = int(state["optimizer_steps"])
        return {
            "global_steps": steps,
            "skipped_steps": int(state.get("skipped_steps", 0)),
            "scheduler_steps": int(state["scheduler"].get("last_epoch", -1)),
        }

    @property
    def reshapes(self) -> bool:
        return False  # one process, always: there is no other number of ranks to move to

    def load(self, checkpoints_dir: str, tag: str, reshape: bool = False) -> None:
        path = Path(checkpoints_dir) / tag / STATE_FILE
        if not path.is_file():
            raise ValueError(
                f"{path.parent}: no {STATE_FILE}; it was not written by train.backend single (resume it with the"
                " backend that wrote it)"
            )
        state = integrity.safe_load(str(path))
        missing, unexpected = self._module.load_state_dict(state["trainable"], strict=False)
        trainable = {n for n, p in self._module.named_parameters() if p.requires_grad}
        if unexpected or trainable - set(state["trainable"]):
            raise ValueError(
                f"{path}: its trainable weights do not match this model (LoRA settings changed?); resume with the"
                " settings that wrote it or start a new run"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.optimizer_steps = state["optimizer_steps"]
        self.skipped_steps = state.get("skipped_steps", 0)
        self._micro_steps = self.optimizer_steps * self.accum_steps

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self._module.named_parameters() if p.requires_grad}

    def full_tensors(self) -> dict[str, torch.Tensor]:
        return {
            n: torch.empty(w.shape, dtype=w.dtype, device="meta")
            for n, w in exported_weights(self._module).items()
        }

    @contextlib.contextmanager
    def gathered_full(self, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
        weights = exported_weights(self._module)
        # From a GPU a copy; on a CPU the weights themselves (written before the block ends).
        yield {n: weights[n].detach().cpu() for n in names}


class SingleDeviceMaker:
    """`BackendMaker` for one device: no process group; the model is built on the device directly."""

    def __init__(self, optim: Any, accum_steps: int, chunk_tokens: int):
        self.optim, self.accum_steps, self.chunk_tokens = optim, accum_steps, chunk_tokens
        self._env: DistEnv | None = None
        self.ds_config: dict[str, Any] = {}  # no DeepSpeed: --ds is ignored

    def start(self, timeout_minutes: int) -> DistEnv:
        self._env = local_env()
        return self._env

    @contextlib.contextmanager
    def building_model(self) -> Iterator[torch.device | None]:
        yield self._env.device if self._env else None

    def wrap(
        self,
        model: torch.nn.Module,
        param_groups: list[dict[str, Any]],
        lr_lambda: Callable[[int], float],
        env: DistEnv,
    ) -> SingleDeviceBackend:
        o = self.optim
        return SingleDeviceBackend(
            model,
            param_groups,
            lr_lambda,
            optimizer=o.optimizer,
            lr=o.lr,
            betas=o.betas,
            eps=o.eps,
            grad_clip=o.grad_clip,
            accum_steps=self.accum_steps,
            chunk_tokens=self.chunk_tokens,
            env=env,
        )

    def release_model_construction(self) -> None:
        pass
