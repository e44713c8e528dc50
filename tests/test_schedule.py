"""The lr schedule is exactly the documented closed form, and torch's LambdaLR applies it step by step."""

from __future__ import annotations

import math

import pytest
import torch

from mellama_train.config import resolve
from mellama_train.schedule import lr_lambda, lr_multiplier


def closed_form(step: int, peak: float, floor: float, warmup: int, total: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return floor + (peak - floor) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) / 2


@pytest.mark.parametrize("warmup,total", [(5, 100), (0, 10), (1538, 30756)])
def test_multiplier_is_the_closed_form(warmup, total):
    for step in sorted({0, 1, warmup - 1, warmup, warmup + 1, total // 2, total - 1} - {-1}):
        got = lr_multiplier(step, warmup, total, 0.1)
        assert got == pytest.approx(closed_form(step, 1.0, 0.1, warmup, total), rel=1e-12), step


def test_shape_warmup_peak_floor():
    warmup, total = 5, 100
    lrs = [lr_multiplier(s, warmup, total, 0.1) for s in range(total + 20)]
    assert lrs[0] == pytest.approx(0.2) and lrs[warmup - 1] == pytest.approx(1.0)
    assert lrs[warmup] == pytest.approx(1.0)  # cosine starts at the peak
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1 :]))  # then never rises
    assert lrs[total - 1] > 0.1 and lrs[total - 1] == pytest.approx(0.1, abs=1e-3)
    assert lrs[-1] == pytest.approx(0.1)  # past the end it stays at the floor


def test_lambdalr_applies_the_profile_schedule():
    cfg = resolve("13b", overrides=["train.max_steps=200"])
    assert (cfg.warmup_steps, cfg.total_steps) == (10, 200)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=cfg.optim.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(cfg.warmup_steps, cfg.total_steps, cfg.optim.min_lr_ratio)
    )
    seen = []
    for _ in range(cfg.total_steps):
        seen.append(opt.param_groups[0]["lr"])  # the rate this optimizer step uses
        opt.step()
        sched.step()
    expected = [closed_form(s, 8e-6, 8e-7, 10, 200) for s in range(200)]
    assert seen == pytest.approx(expected, rel=1e-12)
