"""Shared fixtures."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    """Run the tests under umask 022, whatever the shell's. The mode tests compare what we write with what the
    umask gives (0644/0755): under a CI umask of 077 safetensors' 0600 would already be "the umask's modes", and
    under 000 a world-writable mode would pass, so either could hide a file left 0600. Set at configure time,
    before any fixture writes a file; subprocesses (training runs, the CLI) inherit it."""
    os.umask(0o022)


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """A real one-node SLURM cluster on this machine (`tools/slurm_cluster.sh up`), or a skip that says why.

    CI brings the cluster up before the tests (.ci/run), so there a failure to start fails CI instead of
    skipping. The cluster is left running after the tests: `bash tools/slurm_cluster.sh down` stops it.
    """
    script = str(REPO / "tools" / "slurm_cluster.sh")
    status = subprocess.run(["bash", script, "status"], capture_output=True, text=True, timeout=60)
    if status.returncode == 0:
        return
    if os.geteuid() != 0:
        pytest.skip("no SLURM cluster is up and starting one needs root: sudo bash tools/slurm_cluster.sh up")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("SLURM is not installed and there is no apt-get to install it")
    try:
        up = subprocess.run(["bash", script, "up"], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.skip("tools/slurm_cluster.sh up did not finish within 15 minutes")
    if up.returncode != 0:
        reason = (up.stderr.strip().splitlines() or [f"exit {up.returncode}"])[-1]
        pytest.skip(f"the SLURM test cluster did not start: {reason}")
