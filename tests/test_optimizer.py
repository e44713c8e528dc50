"""The CPU optimizer: torch's fused AdamW kernel, under DeepSpeed (backends/deepspeed/engine.use_torch_adamw) and
the single-device backend. The loop it replaces allocated temporaries the size of a ZeRO partition every step;
the update rule stays AdamW's (docs/PERFORMANCE.md). The 2-rank runs in test_train_e2e.py train with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mellama_train.backends.deepspeed.engine import use_torch_adamw
from mellama_train.backends.single import make_optimizer

REPO = Path(__file__).resolve().parents[1]


def shipped(name: str) -> dict:
    return json.loads((REPO / "ds_configs" / name).read_text())


@pytest.mark.parametrize("name", ["zero3.json", "zero2.json", "zero3_offload.json"])
def test_every_shipped_json_gets_torchs_fused_adamw_on_cpu(name):
    ds = shipped(name)
    use_torch_adamw(ds)
    params = ds["optimizer"]["params"]
    assert params["torch_adam"] is True and params["fused"] is True
    assert ds["optimizer"]["type"] == "AdamW"


def test_a_json_that_asks_for_foreach_or_no_fusing_keeps_it():
    ds = {"optimizer": {"type": "AdamW", "params": {"foreach": True}}}
    use_torch_adamw(ds)
    assert "fused" not in ds["optimizer"]["params"] and ds["optimizer"]["params"]["foreach"] is True
    ds = {"optimizer": {"type": "AdamW", "params": {"fused": False}}}
    use_torch_adamw(ds)
    assert ds["optimizer"]["params"]["fused"] is False


def adamw_steps(lr: float = 1e-2, **kwargs) -> torch.Tensor:
    torch.manual_seed(0)
    flat = torch.nn.Parameter(torch.randn(10_000))  # a ZeRO partition is one flat tensor per param group
    opt = torch.optim.AdamW([flat], lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, **kwargs)
    for _ in range(5):
        flat.grad = torch.randn_like(flat)
        opt.step()
    return flat.detach()


def test_the_fused_kernel_is_built_as_deepspeed_builds_it_and_makes_the_loops_update():
    """DeepSpeed's torch_adam path calls torch.optim.AdamW(params, **rest, foreach=<JSON's or None>)."""
    ds = shipped("zero3.json")
    use_torch_adamw(ds)
    params = ds["optimizer"]["params"]
    fused = adamw_steps(fused=params["fused"], foreach=params.get("foreach"))
    loop = adamw_steps(foreach=False)
    assert torch.allclose(fused, loop, rtol=0, atol=1e-6)
    assert (fused - adamw_steps(foreach=False, lr=0.0)).abs().max() > 0.01  # the steps moved the weights


def test_the_single_device_backend_fuses_on_cpu():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = make_optimizer("adamw", [{"params": [p], "weight_decay": 0.0}], 1e-3, [0.9, 0.95], 1e-8)
    assert opt.defaults["fused"] is True
