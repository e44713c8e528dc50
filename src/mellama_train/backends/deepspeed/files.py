"""DeepSpeed's checkpoint files, read and written safely.

DeepSpeed's readers call torch.load with weights_only=False: a checkpoint on shared scratch could then run code
when loaded. Every load here is weights-only, with the few plain classes DeepSpeed pickles allowed, and every file
DeepSpeed writes is hashed while written (its checkpoint engine is replaced by `CheckpointFiles`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from mellama_train import integrity
from mellama_train.backends.deepspeed import load


def _deepspeed_safe_globals() -> list[Any]:
    """The plain data classes DeepSpeed pickles into its checkpoints: an enum, the loss scalers and ZeRO-1/2's
    `fragment_address` (numel, start) in its parameter slice mappings. Attributes only: no code of theirs runs to
    build them. Everything else must be tensors and builtin containers."""
    load()
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


@contextlib.contextmanager
def safe_loading() -> Iterator[None]:
    """Every torch.load inside is forced to weights_only=True (DeepSpeed's readers pass weights_only=False),
    with DeepSpeed's plain data classes allowed: a pickle that would build any other object (os.system, a
    class with a __reduce__) is refused with an UnpicklingError instead of running.

    Re-entrant: only the outermost use changes anything. torch's safe_globals context removes its classes from
    the one process-wide allow-list on exit, so a nested use (DeepSpeed's loader calling our checkpoint engine's
    load) would otherwise disallow them for the rest of the outer one (the universal checkpoint's
    optimizer_state.pt is read after such a nested load)."""
    if _DEPTH[0]:
        _DEPTH[0] += 1
        try:
            yield
        finally:
            _DEPTH[0] -= 1
        return
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    _DEPTH[0] = 1
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    finally:
        _DEPTH[0] = 0
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


_DEPTH = [0]
"""How deep this process is inside safe_loading (rank processes load on one thread)."""


def safe_load(path: str, mmap: bool = False) -> Any:
    """torch.load of a checkpoint file with weights-only unpickling (DeepSpeed's classes allowed). mmap: map the
    tensors instead of reading them, to check a large shard's pickle and read its counters cheaply."""
    with safe_loading():
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


class CheckpointFiles:
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
