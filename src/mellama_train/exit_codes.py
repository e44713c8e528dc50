"""Every exit code a run can end with, in one table: what it means, and what a scheduler should do.

slurm/launch.sh requeues on EXIT_PREEMPTED and EXIT_HUNG; everything else needs a person. The numbers are part
of the interface (job scripts and CI test them): never reuse or renumber one.
"""

from __future__ import annotations

OK = 0
"""The run finished (or a dry run found no problem)."""
EXIT_CONFIG = 2
"""Bad input, named in one line: a config field, a data file, a refused resume, a full disk. Fix it, rerun."""
EXIT_DIVERGED = 3
"""Stopped after too many consecutive skipped steps (non-finite or spiking loss). Not requeued: it needs a
person; the weights saved are the last good ones."""
EXIT_FORGETTING = 4
"""Stopped by the forgetting monitor (train.stop_on_forgetting). Not requeued."""
EXIT_PREEMPTED = 75
"""EX_TEMPFAIL ("try again later"): a checkpoint was saved on request (SIGUSR2/SIGTERM/SIGINT); requeue."""
EXIT_HUNG = 76
"""A rank ended by the watchdog after no progress (stacks dumped to the run directory); requeue."""

TABLE = {
    OK: "finished",
    EXIT_CONFIG: "bad input (one line names the fix)",
    EXIT_DIVERGED: "diverged (too many skipped steps)",
    EXIT_FORGETTING: "stopped by the forgetting monitor",
    EXIT_PREEMPTED: "stopped on request after a save (requeue)",
    EXIT_HUNG: "hung, ended by the watchdog (requeue)",
}
"""Each code and its meaning, for messages and docs."""
