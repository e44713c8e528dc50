"""What the training loop trains through: a `Backend`, chosen once by `train.backend`.

    backends/
      __init__.py        `open_backend` (imports only the implementation asked for) and the public names
      base.py            the Backend protocol and DistEnv
      collectives.py     barrier, all-reduces, object gather/broadcast: torch.distributed only, used by both
      single.py          one device, no DeepSpeed, no process group (the 8gb QLoRA profile)
      deepspeed/         the only code that imports deepspeed:
        engine.py          process group start-up, ZeRO-3 model construction, the DeepSpeed-wrapped model
        files.py           safe (weights-only) loading of DeepSpeed's pickles, hashing while DeepSpeed writes
        offline.py         the ZeRO checkpoint reader for `mellama-train export`, the planner's estimator

The loop, evaluation, checkpointing and export see the protocol's verbs and never a concrete class, so a new
backend (FSDP2, a fake one in tests) is a new module here and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mellama_train.backends.base import Backend, BackendMaker, DistEnv, LossParts

__all__ = ["Backend", "BackendMaker", "DistEnv", "LossParts", "open_backend"]


def open_backend(
    name: str,
    ds_config: Callable[[], dict[str, Any]],
    optim: Any,
    accum_steps: int,
    chunk_tokens: int,
) -> BackendMaker:
    """The maker of backend `name` ("deepspeed" or "single"); only the chosen implementation is imported.
    `ds_config` resolves the DeepSpeed JSON, called once the ranks have joined (DeepSpeed only)."""
    if name == "single":
        from mellama_train.backends.single import SingleDeviceMaker

        return SingleDeviceMaker(optim, accum_steps, chunk_tokens)
    from mellama_train.backends.deepspeed.engine import DeepSpeedMaker

    return DeepSpeedMaker(ds_config)
