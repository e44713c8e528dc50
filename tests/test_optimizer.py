"""Which AdamW runs (backends/deepspeed/engine.choose_adam_kernel, backends/single.make_optimizer): on CPU torch's
fused kernel, whose loop predecessor allocated temporaries the size of a ZeRO partition every step; the update
rule stays AdamW's (docs/PERFORMANCE.md). The 2-rank runs in test_train_e2e.py train and resume with it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from mellama_train.backends.deepspeed import load
from mellama_train.backends.deepspeed.engine import choose_adam_kernel
from mellama_train.backends.single import make_optimizer

REPO = Path(__file__).resolve().parents[1]


def shipped(name: str) -> dict:
    return json.loads((REPO / "ds_configs" / name).read_text())


def built_by_deepspeed(params: dict, model_parameters: list) -> torch.optim.Optimizer:
    """The optimizer DeepSpeed's own code builds from a JSON's optimizer section (no process group needed)."""
    engine = load().runtime.engine.DeepSpeedEngine

    class Config:
        get_optimizer_configuration = engine.get_optimizer_configuration

        def optimizer_params(self):
            return params

        def optimizer_name(self):
            return "adamw"

        def zero_use_cpu_optimizer(self):
            return False

    return engine._configure_basic_optimizer(Config(), model_parameters)


@pytest.mark.parametrize("name", ["zero3.json", "zero2.json", "zero3_offload.json"])
def test_deepspeed_builds_torchs_fused_adamw_from_every_shipped_json_on_cpu(name):
    ds = shipped(name)
    choose_adam_kernel(ds, cuda=False)
    params = {**ds["optimizer"]["params"], "lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}
    optimizer = built_by_deepspeed(params, [torch.nn.Parameter(torch.zeros(8))])
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.param_groups[0]["fused"] is True


def test_a_json_that_asks_for_foreach_or_no_fusing_keeps_it_on_cpu():
    ds = {"optimizer": {"type": "AdamW", "params": {"foreach": True}}}
    choose_adam_kernel(ds, cuda=False)
    assert "fused" not in ds["optimizer"]["params"] and ds["optimizer"]["params"]["foreach"] is True
    ds = {"optimizer": {"type": "AdamW", "params": {"fused": False}}}
    choose_adam_kernel(ds, cuda=False)
    assert ds["optimizer"]["params"]["fused"] is False


def test_on_gpu_torch_kernel_keys_are_dropped_for_fusedadam_and_said_so(caplog):
    """FusedAdam and CPUAdam take no `fused`/`foreach`: a JSON written for CPU runs must not fail on a GPU."""
    ds = {"optimizer": {"type": "AdamW", "params": {"fused": False, "foreach": True, "lr": "auto"}}}
    with caplog.at_level(logging.WARNING):
        choose_adam_kernel(ds, cuda=True)
    assert ds["optimizer"]["params"] == {"lr": "auto"}
    assert "fused, foreach" in caplog.text
    asked = {"optimizer": {"type": "AdamW", "params": {"torch_adam": True, "fused": True}}}
    choose_adam_kernel(asked, cuda=True)  # torch's AdamW asked for on GPU: its settings stay
    assert asked["optimizer"]["params"] == {"torch_adam": True, "fused": True}


def adamw_steps(lr: float = 1e-2, **kwargs) -> torch.Tensor:
    torch.manual_seed(0)
    flat = torch.nn.Parameter(torch.randn(10_000))  # a ZeRO partition is one flat tensor per param group
    opt = torch.optim.AdamW([flat], lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, **kwargs)
    for _ in range(5):
        flat.grad = torch.randn_like(flat)
        opt.step()
    return flat.detach()


def test_the_fused_kernel_makes_the_loops_update():
    fused, loop = adamw_steps(fused=True), adamw_steps(foreach=False)
    assert torch.allclose(fused, loop, rtol=0, atol=1e-6)
    assert (fused - adamw_steps(foreach=False, lr=0.0)).abs().max() > 0.01  # the steps moved the weights


def test_the_single_device_backend_fuses_on_cpu():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = make_optimizer("adamw", [{"params": [p], "weight_decay": 0.0}], 1e-3, [0.9, 0.95], 1e-8)
    assert opt.defaults["fused"] is True
