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


def cores(monkeypatch, usable: int, launcher: int) -> None:
    """This process may use `usable` cores; its launcher (the parent) `launcher` of them."""
    me, parent = os.getpid(), os.getppid()

    def affinity(pid: int) -> set[int]:
        return set(range(usable if pid in (0, me) else launcher if pid == parent else 0))

    monkeypatch.setattr(os, "sched_getaffinity", affinity)


@pytest.mark.parametrize(
    ("var", "ranks", "usable", "launcher", "want", "why"),
    [
        ("LOCAL_SIZE", 2, 2, 2, 1, "2 usable cores / 2 local ranks"),  # DeepSpeed's launcher, this machine
        ("LOCAL_WORLD_SIZE", 4, 16, 16, 4, "16 usable cores / 4 local ranks"),  # torchrun's variable
        ("LOCAL_SIZE", 8, 4, 4, 1, "4 usable cores / 8 local ranks"),  # more ranks than cores: never 0
        # A container's or job's cpuset narrows the launcher as well: still shared by the ranks.
        ("LOCAL_SIZE", 4, 8, 8, 2, "8 usable cores / 4 local ranks"),
        ("LOCAL_SIZE", 4, 6, 64, 6, "6 cores this rank is bound to"),  # numactl / --cpu-bind: all its own
        (None, 1, 3, 3, 3, "3 usable cores / 1 local ranks"),  # no launcher: one process, every core
    ],
)
def test_a_rank_takes_its_share_of_the_cores(monkeypatch, var, ranks, usable, launcher, want, why):
    if var:
        monkeypatch.setenv(var, str(ranks))
    cores(monkeypatch, usable, launcher)
    got = threads.set_rank_threads()
    assert got == {"torch_threads": want, "why": why}
    assert torch.get_num_threads() == want and os.environ["RAYON_NUM_THREADS"] == str(want)


def test_the_users_omp_num_threads_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("LOCAL_SIZE", "2")
    torch.set_num_threads(3)
    cores(monkeypatch, 2, 2)
    assert threads.set_rank_threads() == {"torch_threads": 3, "why": "OMP_NUM_THREADS=3"}
    assert torch.get_num_threads() == 3
