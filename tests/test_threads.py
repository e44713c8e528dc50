"""Each rank's share of the cores (threads.py): what DeepSpeed's launcher leaves unset."""

from __future__ import annotations

import os

import pytest
import torch

from mellama_train import threads


@pytest.fixture(autouse=True)
def keep_torch_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("RAYON_NUM_THREADS", raising=False)
    for var in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(var, raising=False)
    yield
    torch.set_num_threads(before)
    os.environ.pop("RAYON_NUM_THREADS", None)


def cores(monkeypatch, usable: int, node: int) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(usable)))
    monkeypatch.setattr(os, "cpu_count", lambda: node)


@pytest.mark.parametrize(
    ("var", "ranks", "usable", "node", "want"),
    [
        ("LOCAL_SIZE", 2, 2, 2, 1),  # DeepSpeed's launcher, 2 ranks on this 2-core machine
        ("LOCAL_WORLD_SIZE", 4, 16, 16, 4),  # torchrun's variable
        ("LOCAL_SIZE", 8, 4, 4, 1),  # more ranks than cores: never 0
        ("LOCAL_SIZE", 4, 6, 64, 6),  # pinned to 6 cores of 64 (numactl, --cpu-bind): all of its own
        (None, 1, 3, 3, 3),  # no launcher: one process, every core
    ],
)
def test_a_rank_takes_its_share_of_the_cores(monkeypatch, var, ranks, usable, node, want):
    if var:
        monkeypatch.setenv(var, str(ranks))
    cores(monkeypatch, usable, node)
    got = threads.set_rank_threads()
    assert got["torch_threads"] == want == torch.get_num_threads()
    assert os.environ["RAYON_NUM_THREADS"] == str(want)
    assert f"{usable} usable cores / {ranks} local ranks" == got["why"]


def test_the_users_omp_num_threads_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("LOCAL_SIZE", "2")
    torch.set_num_threads(3)
    cores(monkeypatch, 2, 2)
    assert threads.set_rank_threads() == {"torch_threads": 3, "why": "OMP_NUM_THREADS=3"}
    assert torch.get_num_threads() == 3
